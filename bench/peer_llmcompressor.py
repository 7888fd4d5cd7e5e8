"""Peer benchmark: fptq against llm-compressor on the default model (SmolLM2-135M-Instruct).

Both tools quantize the same float model with THE SAME calibration windows
(``fptq.calibration_windows`` over C4 documents 1000-1999, seed 0) and every
quantized model is scored by fptq's one evaluator
(``fptq.eval.perplexity.evaluate_perplexity``) on the same WikiText-2 windows.

Pairs (weights symmetric int4 in groups of 64 unless said otherwise):

=====================  ==========================================================
fptq method            llm-compressor recipe (bench/_llmc_worker.py)
=====================  ==========================================================
gptq-w4a16             GPTQModifier, W4 g64 (damp 0.01, block 128, no act-order)
smoothquant-w8a8       SmoothQuantModifier(0.5) + QuantizationModifier scheme W8A8
                       (int8 per-channel weights, int8 dynamic per-token inputs)
lae-dynamic-w4a8       SmoothQuantModifier(algorithm="log_equalization") (what
                       LogarithmicEqualizationModifier is in 0.14) +
                       QuantizationModifier W4 g64 / A8 dynamic per-token
fptq                   (no llm-compressor counterpart; shown against logeq-w4a8)
=====================  ==========================================================

Timing: wall clock of ``fptq.quantize`` and of llm-compressor's ``oneshot`` only
(model loading and evaluation excluded), in the same run, on the CPU.

llm-compressor lives in its own venv (it pins its own transformers); create it once::

    python -m venv --system-site-packages /work/venvs/llmc
    echo "torch==2.13.0" > /work/venvs/llmc-constraints.txt      # never pull a CUDA torch
    /work/venvs/llmc/bin/pip install "llmcompressor==0.14.*" -c /work/venvs/llmc-constraints.txt

(``--system-site-packages`` lets it reuse the system torch; it installs its own
transformers inside the venv.) Each llm-compressor recipe then runs in a subprocess
with the venv's python: ``bench/_llmc_worker.py`` gets the model directory, the
token-id windows (a .safetensors written here), the recipe and an output file; it runs
``oneshot``, keeps the model in memory (compressed-tensors' fake-quant forward) and
evaluates it with fptq's evaluator imported from this checkout's ``src``.

Usage::

    python bench/peer_llmcompressor.py [--nsamples 64] [--seqlen 512] [--max-windows 40]
    python bench/peer_llmcompressor.py --nsamples 4 --seqlen 128 --max-windows 2 --name peer_llmcompressor_tiny
    python bench/peer_llmcompressor.py --max-windows 10 --resume   # after an interruption: only missing rows

Every finished row is saved to bench/results/NAME.partial.json (removed at the end);
``--resume`` reuses those rows when nsamples/seqlen/max-windows/eval-seqlen match.

Writes bench/results/peer_llmcompressor.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import fptq
from fptq.eval.perplexity import evaluate_perplexity, load_eval_text, token_windows

from common import RESULTS, calibration_text, machine, quantize_and_evaluate, wikitext_path, write_results

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_llmc_worker.py"
DEFAULT_VENV = os.environ.get("FPTQ_LLMC_VENV", "/work/venvs/llmc")

# (fptq method, llm-compressor recipe or None, label)
PAIRS = [
    ("gptq-w4a16", "gptq-w4a16", "GPTQ W4A16 g64"),
    ("smoothquant-w8a8", "smoothquant-w8a8", "SmoothQuant W8A8 (per-channel W, dynamic per-token A)"),
    ("lae-dynamic-w4a8", "logeq-w4a8", "log-equalization W4A8 g64, dynamic per-token A8"),
    ("fptq", "logeq-w4a8", "fptq W4A8 g64 (vs llm-compressor's LogEq W4A8)"),
]
LLMC_RECIPES = ("gptq-w4a16", "smoothquant-w8a8", "logeq-w4a8")
LLMC_COMPUTES = {
    "gptq-w4a16": "float activations; weights fake-quantized (int4 sym g64 GPTQ scales) in each forward",
    "smoothquant-w8a8": "smoothed model; inputs of every Linear quantize-dequantized to int8 per token "
                        "(dynamic scale) and weights int8 per output channel, in each forward",
    "logeq-w4a8": "log-equalized model; inputs of every Linear quantize-dequantized to int8 per token "
                  "(dynamic scale) and weights int4 sym g64, in each forward",
}


def venv_python(venv: str) -> Path:
    py = Path(venv) / "bin" / "python"
    create = (f"  python -m venv --system-site-packages {venv}\n"
              f"  echo 'torch==2.13.0' > /tmp/llmc-constraints.txt\n"
              f"  {venv}/bin/pip install 'llmcompressor==0.14.*' -c /tmp/llmc-constraints.txt")
    if not py.exists():
        sys.exit(f"llm-compressor venv not found: {py} does not exist. Create it with:\n{create}\n"
                 f"(or point --venv / FPTQ_LLMC_VENV at an existing one)")
    probe = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('llmcompressor'))"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        sys.exit(f"{py} exists but has no llmcompressor ({probe.stderr.strip().splitlines()[-1:]}). Install it with:\n"
                 f"{create}")
    print(f"llm-compressor {probe.stdout.strip()} in {venv}", flush=True)
    return py


def run_worker(py: Path, src: str, windows_file: Path, recipe: str, tmp: Path, threads: int) -> dict:
    out = tmp / f"{recipe}.json"
    log = tmp / f"{recipe}.log"
    cmd = [str(py), str(WORKER), "--model-dir", str(src), "--windows", str(windows_file), "--recipe", recipe,
           "--out", str(out), "--threads", str(threads)]
    print(f"[llm-compressor] {recipe}: {' '.join(cmd)}", flush=True)
    t = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0 or not out.exists():
        tail = log.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"llm-compressor worker {recipe} failed (rc {rc}); log tail:\n{tail}")
    res = json.loads(out.read_text())
    res["worker_wall_s"] = time.perf_counter() - t
    print(f"[llm-compressor] {recipe}: ppl {res['ppl']:.3f}, oneshot {res.get('oneshot_s', 0):.1f} s", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--fptq-methods", default=",".join(p[0] for p in PAIRS))
    ap.add_argument("--llmc-recipes", default=",".join(LLMC_RECIPES))
    ap.add_argument("--no-venv-float", action="store_true",
                    help="skip the float model evaluated inside the llm-compressor venv (transformers check)")
    ap.add_argument("--venv", default=DEFAULT_VENV, help="llm-compressor venv (default %(default)s)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both tools (0: torch default)")
    ap.add_argument("--name", default="peer_llmcompressor")
    ap.add_argument("--note", default="", help="a line added to the Markdown")
    ap.add_argument("--resume", action="store_true",
                    help="reuse the rows of bench/results/NAME.partial.json (written after every row) "
                         "when its settings match, and run only the missing ones")
    args = ap.parse_args()

    py = venv_python(args.venv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    model, tok, src = fptq.load_float_model(None)
    calib = fptq.calibration_windows(tok, calibration_text(), args.nsamples, args.seqlen, seed=0)
    windows = token_windows(tok, load_eval_text(wikitext_path()), args.eval_seqlen, args.max_windows)
    print(f"model {src}; calib {tuple(calib.shape)}; eval {tuple(windows.shape)}; threads {threads}", flush=True)

    fptq_rows: dict[str, dict] = {}
    llmc_rows: dict[str, dict] = {}
    key = {k: getattr(args, k) for k in ("nsamples", "seqlen", "max_windows", "eval_seqlen")}
    partial = RESULTS / f"{args.name}.partial.json"
    if args.resume and partial.exists():
        old = json.loads(partial.read_text())
        if old.get("key") == key:
            fptq_rows.update(old["fptq"])
            llmc_rows.update(old["llmcompressor"])
            print(f"resuming from {partial}: fptq {list(fptq_rows)}, llm-compressor {list(llmc_rows)}", flush=True)
        else:
            print(f"{partial} has other settings {old.get('key')}; starting over", flush=True)

    def save_partial() -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"key": key, "fptq": fptq_rows, "llmcompressor": llmc_rows}, indent=2))

    if "float" not in fptq_rows:
        t = time.perf_counter()
        r = evaluate_perplexity(model, windows, desc="float")
        fptq_rows["float"] = {"ppl": r["ppl"], "eval_s": time.perf_counter() - t}
        save_partial()
    print("float", fptq_rows["float"], flush=True)

    for name in [m for m in args.fptq_methods.split(",") if m and m not in fptq_rows]:
        # smoothquant-w8a8 is per-channel (group_size=-1) by its preset: pass 64 only to the group methods
        cfg = fptq.method_config(name) if name == "smoothquant-w8a8" else fptq.method_config(name, group_size=64)
        fptq_rows[name], qmodel, _ = quantize_and_evaluate(model, cfg, calib, windows, name, progress=False)
        print(f"[fptq] {name}: ppl {fptq_rows[name]['ppl']:.3f}, quantize {fptq_rows[name]['quantize_s']:.1f} s",
              flush=True)
        save_partial()
        del qmodel
    del model

    with tempfile.TemporaryDirectory(prefix="peer_llmc_") as td:
        tmp = Path(td)
        from safetensors.torch import save_file

        wfile = tmp / "windows.safetensors"
        save_file({"calib": calib.contiguous(), "eval": windows.contiguous()}, str(wfile))
        recipes = [r for r in args.llmc_recipes.split(",") if r]
        if not args.no_venv_float:
            recipes = ["float"] + recipes
        for recipe in [r for r in recipes if r not in llmc_rows]:
            llmc_rows[recipe] = run_worker(py, src, wfile, recipe, tmp, threads)
            save_partial()

    # checks: same float numbers in both environments; activation quant visible in ppl
    checks = {}
    if "float" in llmc_rows:
        checks["float_ppl_fptq_env"] = fptq_rows["float"]["ppl"]
        checks["float_ppl_llmc_env"] = llmc_rows["float"]["ppl"]
        checks["float_ppl_rel_diff"] = abs(llmc_rows["float"]["ppl"] / fptq_rows["float"]["ppl"] - 1)
    for rec in ("smoothquant-w8a8", "logeq-w4a8"):
        if rec in llmc_rows:
            q = llmc_rows[rec]["quant"]
            checks[f"{rec}_act_quant_rel_effect"] = q.get("rel_diff_input_quant_vs_weight_only")
            checks[f"{rec}_status"] = q.get("status")
            checks[f"{rec}_act_check"] = llmc_rows[rec].get("act_check")

    pairs = []
    for fm, rec, label in PAIRS:
        if fm not in fptq_rows or rec not in llmc_rows:
            continue
        f, l_ = fptq_rows[fm], llmc_rows[rec]
        pairs.append({"fptq_method": fm, "llmc_recipe": rec, "label": label,
                      "fptq_s": f["quantize_s"], "llmc_s": l_["oneshot_s"], "ratio_llmc_over_fptq": l_["oneshot_s"] / f["quantize_s"],
                      "fptq_ppl": f["ppl"], "llmc_ppl": l_["ppl"]})

    llmc_version = next((r.get("llmcompressor") for r in llmc_rows.values() if r.get("llmcompressor")), "?")
    ct_version = next((r.get("compressed_tensors") for r in llmc_rows.values() if r.get("compressed_tensors")), "?")
    tf_llmc = next((r.get("transformers") for r in llmc_rows.values()), "?")
    import transformers

    md = [
        f"# fptq vs llm-compressor {llmc_version} on {Path(src).name}\n",
        f"Calibration: the same {args.nsamples} windows of {args.seqlen} tokens (C4 documents 1000-1999, "
        f"`fptq.calibration_windows`, seed 0) for both tools. Evaluation: fptq's `evaluate_perplexity` on "
        f"WikiText-2 test, first {windows.shape[0]} windows of {args.eval_seqlen} tokens, for every model. "
        f"Times: wall clock of `fptq.quantize` / llm-compressor `oneshot` only, same run, CPU, {threads} torch threads "
        f"(fptq: transformers {transformers.__version__}; llm-compressor {llmc_version} + compressed-tensors "
        f"{ct_version} in its venv with transformers {tf_llmc}, torch {torch.__version__} in both).\n",
    ]
    if args.note:
        md.append(args.note + "\n")
    md += ["| pair | fptq s | llm-compressor s | ratio (llmc / fptq) | fptq ppl | llm-compressor ppl |",
           "|---|---|---|---|---|---|"]
    md.append(f"| float (no quantization) | - | - | - | {fptq_rows['float']['ppl']:.3f} | "
              f"{llmc_rows['float']['ppl']:.3f} (float in the llmc venv) |" if "float" in llmc_rows else
              f"| float (no quantization) | - | - | - | {fptq_rows['float']['ppl']:.3f} | - |")
    for p in pairs:
        md.append(f"| {p['label']}: fptq `{p['fptq_method']}` / llmc `{p['llmc_recipe']}` | {p['fptq_s']:.1f} | "
                  f"{p['llmc_s']:.1f} | {p['ratio_llmc_over_fptq']:.2f} | {p['fptq_ppl']:.3f} | {p['llmc_ppl']:.3f} |")
    md.append("\nWhat llm-compressor's evaluated models compute (kept in memory after `oneshot`, "
              "compressed-tensors fake-quant forward, quantization status as reported):\n")
    for rec in LLMC_RECIPES:
        if rec in llmc_rows:
            q = llmc_rows[rec]["quant"]
            md.append(f"- `{rec}`: {LLMC_COMPUTES[rec]}. Modules {q['quantized_modules']} ({q['schemes']}; status "
                      f"{q['status']}); on `{q.get('check_module')}` input fake-quant changes the output by "
                      f"{q.get('rel_diff_input_quant_vs_weight_only', 0):.3g} (relative, vs the same module with input "
                      f"quant switched off)."
                      + (f" On the first {q2['windows']} eval windows: ppl {q2['ppl_act_quant_on']:.3f} as evaluated vs "
                         f"{q2['ppl_act_quant_off']:.3f} with input quant switched off in all {q2['modules_switched']} "
                         f"modules (the W4A16-like number of the same weights)."
                         if (q2 := llmc_rows[rec].get("act_check")) else ""))
    md.append("\nNotes: llm-compressor's smoothing/log-equalization uses its default Llama mappings "
              "(input_layernorm -> q/k/v, post_attention_layernorm -> gate/up); so does fptq's "
              "lae-dynamic-w4a8 (equalize_into='norms'), while fptq's smoothquant-w8a8 and fptq (LAE band "
              "only) also fold v_proj -> o_proj and up_proj -> down_proj. fptq's lae-dynamic-w4a8 and smoothquant-w8a8 use "
              "round-to-nearest weights, as QuantizationModifier does; gptq-w4a16 is GPTQ in both. "
              "`lm_head` stays float in both.")
    if checks.get("float_ppl_rel_diff") is not None:
        md.append(f"Float check: float ppl {checks['float_ppl_fptq_env']:.4f} (fptq env) vs "
                  f"{checks['float_ppl_llmc_env']:.4f} (llm-compressor venv).")
    data = {"settings": vars(args), "machine": machine(), "model": str(src),
            "versions": {"llmcompressor": llmc_version, "compressed_tensors": ct_version,
                         "transformers_fptq": transformers.__version__, "transformers_llmc": tf_llmc,
                         "torch": torch.__version__, "fptq": fptq.__version__},
            "pairs": pairs, "fptq": fptq_rows, "llmcompressor": llmc_rows, "checks": checks,
            "llmc_computes": LLMC_COMPUTES}
    write_results(args.name, data, "\n".join(md) + "\n")
    partial.unlink(missing_ok=True)


if __name__ == "__main__":
    main()

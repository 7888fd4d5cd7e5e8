"""Peer benchmark: fptq against llm-compressor on one model, every shared recipe, in one run.

Both tools quantize the same float model with THE SAME calibration windows
(``fptq.calibration_windows`` over C4 documents 1000-1999, seed ``--calib-seed``, default 0), and every quantized
model is scored by one evaluator (``bench/_evalset.py`` over ``fptq.eval.perplexity``) on
the same WikiText-2 and C4 windows: perplexity, and KL divergence and top-1 agreement
against the float model (whose log-probabilities are computed once, here, and read by
every llm-compressor worker).

Recipes (weights symmetric int4 in groups of ``--group-size`` unless said otherwise):

=====================  ==========================================================
fptq method            llm-compressor recipe (bench/_llmc_worker.py)
=====================  ==========================================================
rtn-w4a16              QuantizationModifier W4 (round-to-nearest, min-max)
gptq-w4a16             GPTQModifier W4 (damp 0.01, block 128, static act-order)
smoothquant-w8a8       SmoothQuantModifier(0.5) + QuantizationModifier scheme W8A8
                       (int8 per-channel weights, int8 dynamic per-token inputs)
lae-dynamic-w4a8       SmoothQuantModifier(algorithm="log_equalization") (what
                       LogarithmicEqualizationModifier is in 0.14) +
                       QuantizationModifier W4 / A8 dynamic per-token
naive-w4a8             QuantizationModifier W4 / A8 static per-tensor (default
                       observer)
fptq (default)         no counterpart: shown against llm-compressor's best W4A8
                       (logeq-w4a8, every activation dynamic)
=====================  ==========================================================

Timing: wall clock of ``fptq.quantize`` and of llm-compressor's ``oneshot`` only (model
loading and evaluation excluded), in the same run, on the CPU, the same thread count.

llm-compressor lives in its own venv (it pins its own transformers); create it once::

    python -m venv /work/venvs/llmc
    # reuse fptq's torch: a .pth line appends fptq's site-packages after the venv's own
    echo /work/venv/lib/python3.11/site-packages > /work/venvs/llmc/lib/python3.11/site-packages/zz_fptq_venv.pth
    echo "torch==2.13.0" > /work/venvs/llmc-constraints.txt      # never pull another torch
    /work/venvs/llmc/bin/pip install "llmcompressor==0.14.*" -c /work/venvs/llmc-constraints.txt

(its own transformers is installed inside the venv and shadows fptq's.) Each
llm-compressor recipe then runs in a subprocess with the venv's python
(``bench/_llmc_worker.py``).

Usage::

    python bench/peer_llmcompressor.py                       # SmolLM2-135M, group 64, 20 + 20 windows
    python bench/peer_llmcompressor.py --model "$(../shared/tools/get-qwen2.5-coder-0.5b)" --group-size 128 \\
        --name peer_llmcompressor_qwen
    python bench/peer_llmcompressor.py --nsamples 8 --seqlen 128 --wiki 1 --c4 1 --name peer_tiny   # smoke run
    python bench/peer_llmcompressor.py ... --resume          # after an interruption: only the missing rows

Every finished row is saved to bench/results/NAME.partial.json (removed at the end); ``--resume``
reuses those rows when the settings match, or those of a finished NAME.json (to add methods or recipes
to a run in a later invocation; each row records its own times). Writes bench/results/NAME.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import fptq

from _evalset import build_reference, evaluate_all, load_reference, save_windows
from accuracy_sweep import eval_windows, reference_dir
from common import RESULTS, calibration_text, machine, model_arguments, write_results

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_llmc_worker.py"
DEFAULT_VENV = os.environ.get("FPTQ_LLMC_VENV", "/work/venvs/llmc")

# (label, fptq method, llm-compressor recipe)
PAIRS = [
    ("RTN W4A16", "rtn-w4a16", "rtn-w4a16"),
    ("GPTQ W4A16", "gptq-w4a16", "gptq-w4a16"),
    ("GPTQ W4A16, llm-compressor's scales rounded to float16 as fptq's", "gptq-w4a16", "gptq-w4a16-f16scale"),
    ("GPTQ W4A16, llm-compressor's MSE weight observer (clip search)", "gptq-w4a16", "gptq-w4a16-mse"),
    ("SmoothQuant W8A8 (W8 per channel, A8 dynamic per token)", "smoothquant-w8a8", "smoothquant-w8a8"),
    ("LogEq W4A8 (A8 dynamic per token everywhere)", "lae-dynamic-w4a8", "logeq-w4a8"),
    ("LogEq W4A8, llm-compressor's scales rounded to float16 as fptq's", "lae-dynamic-w4a8", "logeq-w4a8-f16scale"),
    ("naive W4A8 (A8 static per tensor everywhere)", "naive-w4a8", "naive-w4a8"),
    ("FPTQ W4A8 (fptq default) vs llm-compressor's best W4A8 (LogEq, all dynamic)", "fptq", "logeq-w4a8"),
    ("FPTQ paper recipe vs llm-compressor's best W4A8", "fptq-paper", "logeq-w4a8"),
]
LLMC_RECIPES = ("rtn-w4a16", "gptq-w4a16", "smoothquant-w8a8", "logeq-w4a8", "naive-w4a8")
# run only when asked for (--llmc-recipes): experiments on a gap, not a shared recipe
LLMC_EXTRA_RECIPES = ("gptq-w4a16-f16scale", "gptq-w4a16-mse", "logeq-w4a8-f16scale")
LLMC_COMPUTES = {
    "rtn-w4a16": "float activations; weights fake-quantized (int4 sym, min-max scales) in each forward",
    "gptq-w4a16": "float activations; weights fake-quantized (int4 sym GPTQ) in each forward",
    "gptq-w4a16-f16scale": "as gptq-w4a16, its group scales rounded to float16 (compressed-tensors scale_dtype) "
                           "before GPTQ quantizes with them",
    "gptq-w4a16-mse": "as gptq-w4a16, each group's scale from llm-compressor's MSE observer (a clip search, "
                      "shrink up to 20%) before GPTQ quantizes with it",
    "smoothquant-w8a8": "smoothed model; inputs of every Linear quantize-dequantized to int8 per token "
                        "(dynamic scale) and weights int8 per output channel, in each forward",
    "logeq-w4a8": "log-equalized model; inputs of every Linear quantize-dequantized to int8 per token "
                  "(dynamic scale) and weights int4 sym, in each forward",
    "logeq-w4a8-f16scale": "as logeq-w4a8, its weight scales rounded to float16 (compressed-tensors scale_dtype)",
    "naive-w4a8": "inputs of every Linear quantize-dequantized to int8 with one static scale per tensor "
                  "(moving-average min-max observer) and weights int4 sym, in each forward",
}


def venv_python(venv: str) -> Path:
    py = Path(venv) / "bin" / "python"
    if not py.exists():
        sys.exit(f"llm-compressor venv not found: {py} does not exist. Create it as this script's docstring says "
                 f"(or point --venv / FPTQ_LLMC_VENV at an existing one)")
    probe = subprocess.run([str(py), "-c", "import importlib.metadata as m, torch; "
                            "print(m.version('llmcompressor'), torch.__version__)"], capture_output=True, text=True)
    if probe.returncode != 0:
        sys.exit(f"{py} exists but cannot import llmcompressor and torch ({probe.stderr.strip().splitlines()[-1:]}); "
                 "install it as this script's docstring says")
    print(f"llm-compressor, torch in {venv}: {probe.stdout.strip()}", flush=True)
    return py


def run_worker(py: Path, src: str, windows_file: Path, ref: Path, recipe: str, group_size: int, tmp: Path,
               threads: int) -> dict:
    out = tmp / f"{recipe}.json"
    log = tmp / f"{recipe}.log"
    cmd = [str(py), str(WORKER), "--model-dir", str(src), "--windows", str(windows_file), "--ref-cache", str(ref),
           "--recipe", recipe, "--group-size", str(group_size), "--out", str(out), "--threads", str(threads)]
    print(f"[llm-compressor] {recipe}: {' '.join(cmd)}", flush=True)
    t = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0 or not out.exists():
        tail = log.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"llm-compressor worker {recipe} failed (rc {rc}); log tail:\n{tail}")
    res = json.loads(out.read_text())
    res["worker_wall_s"] = time.perf_counter() - t
    print(f"[llm-compressor] {recipe}: {_line(res['metrics'])}, oneshot {res.get('oneshot_s', 0):.1f} s", flush=True)
    return res


def llmc_weights(py: Path, src: str, calib: torch.Tensor, recipe: str, group_size: int, threads: int) -> dict:
    """The effective (quantize-dequantized) weights of every Linear that the llm-compressor
    ``recipe`` quantizes on ``calib`` (the worker's ``--dump-weights``; its own evaluation: one short window)."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="llmc_weights_") as td:
        wfile, dump = Path(td) / "w.safetensors", Path(td) / "llmc.safetensors"
        save_windows(wfile, calib, {"wikitext2": calib[:1].clone()})
        subprocess.run([str(py), str(WORKER), "--model-dir", str(src), "--windows", str(wfile), "--recipe", recipe,
                        "--group-size", str(group_size), "--out", str(Path(td) / "o.json"), "--threads", str(threads),
                        "--dump-weights", str(dump), "--act-check-windows", "0"],
                       check=True, stdout=subprocess.DEVNULL)
        return load_file(str(dump))


def _line(m: dict) -> str:
    return "  ".join(f"{k} ppl {v['ppl']:.3f} kld {v.get('kld', 0):.4f} top1 {100 * v.get('top1', 1):.2f}%"
                     for k, v in m.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(ap)
    ap.add_argument("--calib-seed", type=int, default=0,
                    help="seed that draws the calibration windows (both tools get the same ones)")
    ap.add_argument("--wiki", type=int, default=20, help="WikiText-2 windows")
    ap.add_argument("--c4", type=int, default=20, help="C4 windows (documents 0-999)")
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--fptq-methods", default=",".join(dict.fromkeys(p[1] for p in PAIRS)))
    ap.add_argument("--llmc-recipes", default=",".join(LLMC_RECIPES),
                    help=f"llm-compressor recipes (default %(default)s; also {', '.join(LLMC_EXTRA_RECIPES)})")
    ap.add_argument("--no-venv-float", action="store_true",
                    help="skip the float model evaluated inside the llm-compressor venv (transformers check)")
    ap.add_argument("--venv", default=DEFAULT_VENV, help="llm-compressor venv (default %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for both tools")
    ap.add_argument("--name", default="peer_llmcompressor")
    ap.add_argument("--note", default="", help="a line added to the Markdown")
    ap.add_argument("--resume", action="store_true",
                    help="reuse the rows of bench/results/NAME.partial.json (written after every row), or else "
                         "of NAME.json, when the settings match, and run only the missing ones")
    args = ap.parse_args()

    py = venv_python(args.venv)
    torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    model, tok, src = fptq.load_float_model(args.model)
    calib = fptq.calibration_windows(tok, calibration_text(), args.nsamples, args.seqlen, seed=args.calib_seed)
    windows = eval_windows(tok, args.wiki, args.c4, args.eval_seqlen)
    print(f"model {src}; calib {tuple(calib.shape)}; eval {[tuple(w.shape) for w in windows.values()]}; "
          f"threads {threads}", flush=True)
    ref_dir = reference_dir(src, windows)
    meta = build_reference(model, windows, ref_dir)
    reference = load_reference(ref_dir)

    fptq_rows: dict[str, dict] = {}
    llmc_rows: dict[str, dict] = {}
    key = {k: getattr(args, k) for k in ("model", "group_size", "nsamples", "seqlen", "calib_seed", "wiki", "c4",
                                        "eval_seqlen")}
    partial = RESULTS / f"{args.name}.partial.json"
    final = RESULTS / f"{args.name}.json"
    if args.resume and (partial.exists() or final.exists()):
        # an interrupted run's rows, else the rows of a finished run with the same settings (a run can be
        # extended by more methods / recipes in a later invocation)
        src_file = partial if partial.exists() else final
        old = json.loads(src_file.read_text())
        old_key = old.get("key") or {k: old.get("settings", {}).get(k) for k in key}
        old_key["calib_seed"] = old_key.get("calib_seed") or 0  # runs from before --calib-seed drew with seed 0
        if old_key == key:
            fptq_rows.update(old["fptq"])
            llmc_rows.update(old["llmcompressor"])
            print(f"resuming from {src_file}: fptq {list(fptq_rows)}, llm-compressor {list(llmc_rows)}", flush=True)
        else:
            print(f"{src_file} has other settings {old_key}; starting over", flush=True)

    def save_partial() -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"key": key, "fptq": fptq_rows, "llmcompressor": llmc_rows}, indent=2))

    fptq_rows["float"] = {"metrics": meta["float"]}
    for name in [m for m in args.fptq_methods.split(",") if m and m not in fptq_rows]:
        # smoothquant-w8a8 is per-channel (group_size=-1) by its preset
        cfg = fptq.method_config(name) if name == "smoothquant-w8a8" else fptq.method_config(
            name, group_size=args.group_size)
        qmodel = copy.deepcopy(model)
        t = time.perf_counter()
        plan = fptq.quantize(qmodel, cfg, calib, device="cpu", progress=False)
        qs = time.perf_counter() - t
        fptq_rows[name] = {"quantize_s": qs, "counts": dict(plan.counts()), "config": cfg.to_dict(), "measured": _now(),
                           "metrics": evaluate_all(qmodel, windows, reference, desc=name)}
        print(f"[fptq] {name}: {_line(fptq_rows[name]['metrics'])}, quantize {qs:.1f} s {dict(plan.counts())}",
              flush=True)
        save_partial()
        del qmodel
    del model

    with tempfile.TemporaryDirectory(prefix="peer_llmc_") as td:
        tmp = Path(td)
        wfile = tmp / "windows.safetensors"
        save_windows(wfile, calib, windows)
        recipes = [r for r in args.llmc_recipes.split(",") if r]
        if not args.no_venv_float:
            recipes = ["float"] + recipes
        for recipe in [r for r in recipes if r not in llmc_rows]:
            llmc_rows[recipe] = run_worker(py, src, wfile, ref_dir, recipe, args.group_size, tmp, threads)
            llmc_rows[recipe]["measured"] = _now()
            save_partial()

    pairs = []
    for label, fm, rec in PAIRS:
        if fm not in fptq_rows or rec not in llmc_rows:
            continue
        f, l_ = fptq_rows[fm], llmc_rows[rec]
        pairs.append({"label": label, "fptq_method": fm, "llmc_recipe": rec, "fptq_s": f["quantize_s"],
                      "llmc_s": l_["oneshot_s"], "fptq": f["metrics"], "llmc": l_["metrics"],
                      "fptq_counts": f.get("counts")})
    write_results(args.name, _data(args, src, threads, fptq_rows, llmc_rows, pairs),
                  _markdown(args, src, calib, windows, threads, fptq_rows, llmc_rows, pairs))
    partial.unlink(missing_ok=True)


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def _versions(llmc_rows: dict) -> dict:
    import transformers

    pick = lambda k: next((r.get(k) for r in llmc_rows.values() if r.get(k)), "?")  # noqa: E731
    return {"llmcompressor": pick("llmcompressor"), "compressed_tensors": pick("compressed_tensors"),
            "transformers_llmc": pick("transformers"), "transformers_fptq": transformers.__version__,
            "torch": torch.__version__, "fptq": fptq.__version__}


def _data(args, src, threads, fptq_rows, llmc_rows, pairs) -> dict:
    return {"settings": vars(args), "machine": machine(), "model": str(src), "threads": threads,
            "versions": _versions(llmc_rows), "pairs": pairs, "fptq": fptq_rows, "llmcompressor": llmc_rows,
            "llmc_computes": LLMC_COMPUTES}


SETS = ("wikitext2", "c4")  # the column order of every table (a worker's JSON may list them in another)


def _cells(m: dict) -> str:
    order = [s for s in SETS if s in m] + [s for s in m if s not in SETS]
    return " | ".join(f"{m[s]['ppl']:.3f} | {m[s].get('kld', 0):.4f} | {100 * m[s].get('top1', 1):.2f}%"
                      for s in order)


def _markdown(args, src, calib, windows, threads, fptq_rows, llmc_rows, pairs) -> str:
    v = _versions(llmc_rows)
    sets = list(windows)
    md = [f"# fptq vs llm-compressor {v['llmcompressor']} on {Path(src).name}\n",
          f"Calibration: the same {calib.shape[0]} windows of {calib.shape[1]} tokens (C4 documents 1000-1999, "
          f"`fptq.calibration_windows`, seed {args.calib_seed}) for both tools; weights symmetric int4 in groups of "
          f"{args.group_size} (SmoothQuant W8A8: int8 per output channel). Evaluation: one evaluator (`bench/_evalset.py`) for every "
          f"model, " + ", ".join(f"{w.shape[0]} {k} windows of {w.shape[1]} tokens" for k, w in windows.items())
          + "; KLD = mean KL(float || quantized) of the next-token distributions, top-1 = agreement of the argmax "
          f"with the float model. Times: wall clock of `fptq.quantize` / llm-compressor `oneshot` only, same run, "
          f"CPU, {threads} torch threads (fptq: transformers {v['transformers_fptq']}; llm-compressor "
          f"{v['llmcompressor']} + compressed-tensors {v['compressed_tensors']} in its venv with transformers "
          f"{v['transformers_llmc']}; torch {v['torch']} in both).\n"]
    if args.note:
        md.append(args.note + "\n")
    days = sorted({r["measured"][:10] for r in [*fptq_rows.values(), *llmc_rows.values()] if r.get("measured")})
    if len(days) > 1:
        md.append(f"Rows were measured in more than one invocation (`--resume`), on {', '.join(days)}, each alone "
                  "on the same kind of machine; the JSON has each row's time.\n")
    head = " | ".join(f"{s} ppl | {s} KLD | {s} top-1" for s in sets)
    md += [f"| recipe | tool | quantize s | {head} |", "|---|---|---|" + "---|" * (3 * len(sets))]
    md.append(f"| float | - | - | {_cells(fptq_rows['float']['metrics'])} |")
    if "float" in llmc_rows:
        md.append(f"| float, in the llm-compressor venv | - | - | {_cells(llmc_rows['float']['metrics'])} |")
    for p in pairs:
        c = p.get("fptq_counts") or {}
        static = c.get("static_tensor", 0) + c.get("lae_static_tensor", 0)
        total = sum(c.values()) or 1
        note = f" ({static}/{total} Linears static)" if p["fptq_method"].startswith("fptq") else ""
        md.append(f"| {p['label']} | fptq `{p['fptq_method']}`{note} | {p['fptq_s']:.1f} | {_cells(p['fptq'])} |")
        md.append(f"| | llm-compressor `{p['llmc_recipe']}` | {p['llmc_s']:.1f} | {_cells(p['llmc'])} |")
    paired = {p["llmc_recipe"] for p in pairs}
    paired_fptq = {p["fptq_method"] for p in pairs}
    for name, row in fptq_rows.items():  # fptq methods run without their llm-compressor recipe in this invocation
        if name != "float" and name not in paired_fptq:
            c = row.get("counts") or {}
            static = c.get("static_tensor", 0) + c.get("lae_static_tensor", 0)
            md.append(f"| (llm-compressor row not run here) | fptq `{name}` ({static}/{sum(c.values()) or 1} Linears "
                      f"static) | {row['quantize_s']:.1f} | {_cells(row['metrics'])} |")
    for rec, row in llmc_rows.items():  # recipes run without their fptq method in this invocation
        if rec != "float" and rec not in paired:
            md.append(f"| (fptq row not run here) | llm-compressor `{rec}` | {row['oneshot_s']:.1f} | "
                      f"{_cells(row['metrics'])} |")
    md.append("\nWhat llm-compressor's evaluated models compute (kept in memory after `oneshot`, "
              "compressed-tensors fake-quant forward, quantization status as reported):\n")
    for rec in LLMC_RECIPES + LLMC_EXTRA_RECIPES:
        if rec in llmc_rows:
            q = llmc_rows[rec]["quant"]
            q2 = llmc_rows[rec].get("act_check")
            md.append(f"- `{rec}`: {LLMC_COMPUTES[rec]}. Modules {q['quantized_modules']} ({q['schemes']}; status "
                      f"{q['status']})."
                      + (f" Input fake-quant is live: on the first {q2['windows']} evaluation window(s) ppl "
                         f"{q2['ppl_act_quant_on']:.3f} as evaluated vs {q2['ppl_act_quant_off']:.3f} with it switched "
                         f"off in all {q2['modules_switched']} modules." if q2 else ""))
    md.append("\nNotes: llm-compressor's smoothing/log-equalization uses its default mappings "
              "(input_layernorm -> q/k/v, post_attention_layernorm -> gate/up); so does fptq's lae-dynamic-w4a8 "
              "(equalize_into='norms'). `lm_head` stays float in both tools.")
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()

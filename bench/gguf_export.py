"""fptq's GGUF export inside llama.cpp: perplexity and KL divergence against llama.cpp's own 4-bit formats.

One run, one set of windows (the first ``--wiki`` WikiText-2 and ``--c4`` C4 windows of ``--eval-seqlen`` tokens,
token ids from the Hugging Face tokenizer, fed identically to every model), one llama.cpp build
(llama-cpp-python in its own venv, ``bench/_gguf_worker.py``; never a dependency of fptq). Rows, all in llama.cpp:

1. the float model written as an F16 GGUF (:func:`fptq.export.gguf.export_float_gguf`): llama.cpp's float
   reference, against which every llama.cpp row's KL divergence is measured;
2. llama.cpp's own quantizations of that F16 file (``llama_model_quantize``, the call ``llama-quantize`` makes):
   ``--llama-ftypes`` (default Q4_0, Q4_K_M, and Q4_1, the asymmetric format);
3. fptq's checkpoints (``--methods``, default ``fptq``, ``gptq-w4a16``, ``rtn-w4a16``, all with ``--group-size``
   32, calibrated on ``--calib-nsamples`` x ``--seqlen`` C4 windows drawn as bench/peer_llmcompressor.py draws
   them) exported by ``fptq export --format gguf`` with F16 embeddings, and for ``--matched`` methods also with
   the embedding and output types of llama.cpp's own Q4_0 file (read from it: e.g. Q8_0 where its Q6_K output
   falls back to Q8_0 because the width is not a multiple of 256, Q4_0 for an untied token_embd), so that the
   two files differ only in the Linears' Q4_0 blocks, and have the same size.

Beside them, in fptq's own runtime: ``fptq eval`` of each checkpoint with dynamic per-token int8 activations in
every layer (``--activations dynamic``) and with float activations (``--activations float``: the weights alone; the
plan of the W4A16 methods), KL divergence against the float model in transformers, so the two runtimes can be
compared on the same weights (llama.cpp quantizes activations to Q8_0, 32 values per scale: finer than per token);
for ``--emulate-q8-0`` methods also with float activations rounded as llama.cpp's Q8_0 rounds them (emulated with a
forward pre-hook, bench only).

Usage (the llama.cpp venv: ``../shared/tools/build-llama-cpp-python VENV``)::

    python bench/gguf_export.py --llama-python VENV/bin/python --wiki 8 --c4 8 --name gguf_export_smollm2
    python bench/gguf_export.py --model "$(../shared/tools/get-qwen2.5-coder-0.5b)" --wiki 8 --c4 8 \\
        --name gguf_export_qwen
    python bench/gguf_export.py --wiki 1 --c4 0 --calib-nsamples 4 --seqlen 128 --name gguf_smoke  # smoke run

Files (GGUFs, checkpoints, per-window sums) live in ``--work`` (default /tmp/fptq_gguf_bench/NAME); a rerun
with the same settings reuses them and only scores the windows still missing. On a shared machine, take the lock
one unit of work at a time (exit code 75: more to do)::

    while true; do flock /work/heavy.lock python bench/gguf_export.py --wiki 8 --c4 8 --name gguf_export_smollm2 \
        --max-steps 1; [ $? -eq 75 ] || break; done

Writes bench/results/NAME.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import fptq
from fptq.export.gguf import export_float_gguf, export_gguf
from fptq.models.loading import load_tokenizer, resolve_model_dir
from fptq.nn import set_act_mode
from fptq.workflow import quantize_to_dir

from _evalset import build_reference, evaluate_all, load_reference
from accuracy_sweep import eval_windows, reference_dir
from common import calibration_text, machine, write_results

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_gguf_worker.py"
FLOAT = "llama.cpp F16 (float reference)"
MORE = 75  # exit code: stopped by --max-steps with work left
MATCHED = "embeddings as llama.cpp's Q4_0 file"


def llama_q4_0_types(path: Path) -> tuple[str, str]:
    """``(token_embd, output)`` types of llama.cpp's Q4_0 file, as ``fptq export --gguf-embeddings/--gguf-output``
    names them (a tied model has no output tensor: the embeddings' type)."""
    from gguf import GGUFReader

    types = {t.name: t.tensor_type.name.lower() for t in GGUFReader(str(path)).tensors}
    emb = types["token_embd.weight"]
    return emb, types.get("output.weight", emb)


def worker(py: str, job: dict, work: Path) -> dict:
    jp, op = work / "job.json", work / "job.out.json"
    jp.write_text(json.dumps(job))
    subprocess.run([py, str(WORKER), str(jp), str(op)], check=True)
    return json.loads(op.read_text())


def _load_state(path: Path, settings: dict) -> dict:
    if path.exists():
        state = json.loads(path.read_text())
        if state["settings"] != settings:
            sys.exit(f"{path} holds a run with other settings ({state['settings']}); use another --work or delete it")
        return state
    return {"settings": settings, "files": {}, "quantize_s": {}, "llama": {}, "torch": {}}


def build_files(args, state: dict, save, src: str, work: Path) -> dict[str, Path]:
    """label -> GGUF file of every llama.cpp row (made once, kept in ``work``)."""
    files = {FLOAT: work / "float-f16.gguf"}
    if not files[FLOAT].exists():
        export_float_gguf(src, files[FLOAT], progress=False)
    for ft in args.llama_ftypes:
        files[f"llama.cpp {ft}"] = path = work / f"llamacpp-{ft}.gguf"
        if not path.exists():
            worker(args.llama_python, {"op": "quantize", "input": str(files[FLOAT]), "output": str(path), "ftype": ft,
                                       "threads": args.threads}, work)
    calib = work / "calib.txt"
    calib.write_text(calibration_text())
    for method in args.methods:
        ckpt = work / f"ckpt-{method}"
        if not (ckpt / "fptq_plan.json").exists():
            t = time.perf_counter()
            quantize_to_dir(args.model, ckpt, fptq.method_config(method, group_size=args.group_size), calib=str(calib),
                            nsamples=args.calib_nsamples, seqlen=args.seqlen, seed=args.calib_seed, device="cpu",
                            force=True, progress=False)
            state["quantize_s"][method] = time.perf_counter() - t
            save()
        variants = {"F16 embeddings": ("f16", "f16")}
        if method in args.matched and "llama.cpp Q4_0" in files:
            variants[MATCHED] = llama_q4_0_types(files["llama.cpp Q4_0"])
        for what, (emb, out) in variants.items():
            files[f"fptq {method} -> Q4_0, {what}"] = path = work / f"fptq-{method}-{emb}-{out}.gguf"
            if not path.exists():
                export_gguf(ckpt, path, embeddings=emb, output=out, progress=False)
    return files


class Steps:
    """Counts units of work (one llama.cpp window, one fptq eval row) against ``--max-steps``."""

    def __init__(self, limit: int | None):
        self.limit, self.done = limit, 0

    def take(self) -> bool:
        if self.limit is not None and self.done >= self.limit:
            return False
        self.done += 1
        return True


def score_llama(args, state: dict, save, files: dict[str, Path], windows: dict, work: Path, steps: Steps) -> None:
    models = {label: str(p) for label, p in files.items() if label != FLOAT}
    for name, w in windows.items():
        for i in range(w.shape[0]):
            key = f"{name}:{i}"
            if key in state["llama"] or not steps.take():
                continue
            t = time.perf_counter()
            res = worker(args.llama_python, {"op": "score", "ref": str(files[FLOAT]), "models": models,
                                             "window": w[i].tolist(), "threads": args.threads}, work)
            res[FLOAT] = res.pop("__ref__")
            state["llama"][key] = res
            save()
            q = {k: math.exp(v["nll_sum"] / v["tokens"]) for k, v in res.items()}
            print(f"[llama.cpp] {key} ({time.perf_counter() - t:.0f} s): " + ", ".join(f"{k} {v:.2f}" for k, v in q.items()),
                  flush=True)


def torch_label(method: str, activations: str) -> str:
    if activations == "q8_0":
        return f"fptq (torch) {method}, inputs rounded as llama.cpp's Q8_0 (emulated)"
    return f"fptq eval {method}, {activations} activations"


def q8_0_round(x: torch.Tensor) -> torch.Tensor:
    """``x`` quantized and dequantized as llama.cpp quantizes the input of a Q4_0 matrix product (Q8_0): blocks of
    32 values along the last dimension, ``d = absmax / 127``, codes ``roundf(x / d)``, dequantized with ``d`` rounded
    to float16 (the block stores it so)."""
    shape = x.shape
    b = x.float().reshape(-1, shape[-1] // 32, 32)
    d = b.abs().amax(dim=-1, keepdim=True) / 127
    v = b / d.clamp_min(1e-30)
    q = torch.where(d > 0, torch.sign(v) * torch.floor(v.abs() + 0.5), torch.zeros_like(b))  # C's roundf
    return (q * d.to(torch.float16).float()).reshape(shape).to(x.dtype)


def round_inputs_as_q8_0(model) -> None:
    """Every quantized Linear (float activations) gets its input rounded by :func:`q8_0_round` (a forward pre-hook)."""
    for m in model.modules():
        if isinstance(m, fptq.QuantLinear):
            m.register_forward_pre_hook(lambda mod, args: (q8_0_round(args[0]),))


def score_torch(args, state: dict, save, src: str, windows: dict, work: Path, steps: Steps) -> None:
    """``fptq eval --activations dynamic`` and ``--activations float`` of each checkpoint (KL divergence against
    the float model in transformers, whose log-probabilities are computed once and cached on disk)."""
    wanted = {"dynamic": args.methods, "float": args.float_activations, "q8_0": args.emulate_q8_0}
    todo = [(m, a) for m in args.methods for a in ("dynamic", "float", "q8_0")
            if m in wanted[a] and torch_label(m, a) not in state["torch"]]
    if not todo and "float (transformers)" in state["torch"]:
        return
    ref_dir = reference_dir(src, windows)
    model, _, _ = fptq.load_float_model(args.model)
    state["torch"]["float (transformers)"] = build_reference(model, windows, ref_dir)["float"]
    del model
    reference = load_reference(ref_dir)
    for method, act in todo:
        if not steps.take():
            return
        label = torch_label(method, act)
        qmodel = fptq.load(work / f"ckpt-{method}", runtime="off")  # transformers' modules, as `fptq eval` runs
        set_act_mode(qmodel, {"dynamic": "dynamic_token"}.get(act, "none"))
        if act == "q8_0":
            round_inputs_as_q8_0(qmodel)
        state["torch"][label] = evaluate_all(qmodel, windows, reference, desc=method)
        save()
        print(f"[fptq eval] {label}: " + ", ".join(f"{k} {v['ppl']:.3f}" for k, v in state["torch"][label].items()),
              flush=True)
        del qmodel


def aggregate(state: dict, files: dict[str, Path], sets: list[str]) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    from collections import Counter

    from gguf import GGUFReader

    for label, path in files.items():
        types = Counter(t.tensor_type.name for t in GGUFReader(str(path)).tensors)
        row = {"runtime": "llama.cpp", "file_bytes": path.stat().st_size, "tensor_types": dict(types), "metrics": {}}
        for name in sets:
            sums = [w[label] for k, w in state["llama"].items() if k.split(":")[0] == name]
            tok = sum(s["tokens"] for s in sums)
            row["metrics"][name] = {"ppl": math.exp(sum(s["nll_sum"] for s in sums) / tok),
                                    "kld": sum(s["kld_sum"] for s in sums) / tok,
                                    "top1": sum(s["top1_sum"] for s in sums) / tok, "windows": len(sums), "tokens": tok}
        rows[label] = row
    for label, metrics in state["torch"].items():
        rows[label] = {"runtime": "fptq (torch)", "metrics": {k: metrics[k] for k in sets}}
    return rows


def checks(rows: dict, methods: list[str], sets: list[str], matched: list[str]) -> list[dict]:
    out = []
    q4 = rows.get("llama.cpp Q4_0")
    for method in methods:
        for what in ["F16 embeddings"] + ([MATCHED] if method in matched else []):
            label = f"fptq {method} -> Q4_0, {what}"
            for name in sets:
                m = rows[label]["metrics"][name]
                if q4:
                    r = q4["metrics"][name]
                    out.append({"check": f"{label} vs llama.cpp Q4_0, {name}", "ppl": [m["ppl"], r["ppl"]],
                                "kld": [m["kld"], r["kld"]], "pass": m["ppl"] < r["ppl"] and m["kld"] < r["kld"]})
                if what == "F16 embeddings":
                    for act in ("dynamic", "float", "q8_0"):
                        if torch_label(method, act) not in rows:
                            continue
                        t = rows[torch_label(method, act)]["metrics"][name]["ppl"]
                        diff = 100 * (m["ppl"] / t - 1)
                        other = ("torch with llama.cpp's Q8_0 input rounding" if act == "q8_0" else
                                 f"fptq eval --activations {act}")
                        out.append({"check": f"{method}: llama.cpp ppl vs {other}, {name}",
                                    "ppl": [m["ppl"], t], "diff_percent": diff, "pass": abs(diff) <= 0.5})
    return out


def markdown(args, rows: dict, sets: list[str], chk: list[dict], meta: dict) -> str:
    head = ["row", "runtime", "size (MB)"] + [f"{s} {c}" for s in sets for c in ("ppl", "KLD", "top-1")]
    lines = [f"# fptq's GGUF export in llama.cpp: {meta['model']}", "",
             f"{meta['windows']}; calibration {args.calib_nsamples} x {args.seqlen} C4 windows (seed "
             f"{args.calib_seed}); fptq group size {args.group_size}; llama-cpp-python {meta['llama_cpp_python']}, "
             f"{args.threads} threads. KL divergence: llama.cpp rows against llama.cpp's F16 file, fptq eval rows "
             "against the float model in transformers.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, row in rows.items():
        size = f"{row['file_bytes'] / 1e6:.1f}" if "file_bytes" in row else "-"
        cells = [label, row["runtime"], size]
        for s in sets:
            m = row["metrics"][s]
            cells += [f"{m['ppl']:.3f}", f"{m.get('kld', 0):.4f}", f"{100 * m.get('top1', 1):.2f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| check | values | pass |", "|---|---|---|"]
    for c in chk:
        vals = (f"ppl {c['ppl'][0]:.3f} vs {c['ppl'][1]:.3f} ({c['diff_percent']:+.2f}%)" if "diff_percent" in c else
                f"ppl {c['ppl'][0]:.3f} vs {c['ppl'][1]:.3f}, KLD {c['kld'][0]:.4f} vs {c['kld'][1]:.4f}")
        lines.append(f"| {c['check']} | {vals} | {'yes' if c['pass'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory or .gguf (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--wiki", type=int, default=8, help="WikiText-2 windows")
    ap.add_argument("--c4", type=int, default=8, help="C4 windows (documents 0-999)")
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--calib-nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512, help="calibration window length")
    ap.add_argument("--calib-seed", type=int, default=0)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--methods", default="fptq,gptq-w4a16,rtn-w4a16")
    ap.add_argument("--matched", default="fptq",
                    help="methods also exported with the embedding/output types of llama.cpp's Q4_0 file")
    ap.add_argument("--float-activations", default=None,
                    help="methods also evaluated by fptq eval with float activations (default: all of --methods)")
    ap.add_argument("--emulate-q8-0", default="fptq",
                    help="methods also evaluated in torch with llama.cpp's Q8_0 input rounding emulated")
    ap.add_argument("--llama-ftypes", default="Q4_0,Q4_K_M,Q4_1")
    ap.add_argument("--llama-python", default=os.environ.get("FPTQ_LLAMA_CPP_PYTHON", "/work/llama-venv/bin/python"),
                    help="python of the llama-cpp-python venv (default $FPTQ_LLAMA_CPP_PYTHON or %(default)s)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=None, help="folder for the GGUF files and checkpoints (default /tmp/fptq_gguf_bench/NAME)")
    ap.add_argument("--name", default="gguf_export")
    ap.add_argument("--max-steps", type=int, default=None,
                    help="stop after this many units of work (a llama.cpp window, an fptq eval row), exit code 75, "
                         "so that a loop can take the shared lock one unit at a time; a rerun continues")
    args = ap.parse_args()
    if args.float_activations is None:
        args.float_activations = args.methods
    for k in ("methods", "matched", "llama_ftypes", "emulate_q8_0", "float_activations"):
        setattr(args, k, [x for x in getattr(args, k).split(",") if x])
    if not Path(args.llama_python).exists():
        sys.exit(f"llama-cpp-python venv not found: {args.llama_python} (build one with "
                 "../shared/tools/build-llama-cpp-python VENV and pass --llama-python VENV/bin/python)")
    torch.set_num_threads(args.threads)
    work = Path(args.work or f"/tmp/fptq_gguf_bench/{args.name}")
    work.mkdir(parents=True, exist_ok=True)

    src = resolve_model_dir(args.model)
    windows = eval_windows(load_tokenizer(src), args.wiki, args.c4, args.eval_seqlen)
    sets = list(windows)
    settings = {k: getattr(args, k) for k in ("model", "wiki", "c4", "eval_seqlen", "calib_nsamples", "seqlen",
                                              "calib_seed", "group_size")}
    state_path = work / "state.json"
    state = _load_state(state_path, settings)

    def save() -> None:
        state_path.write_text(json.dumps(state, indent=1))

    t0 = time.perf_counter()
    steps = Steps(args.max_steps)
    files = build_files(args, state, save, src, work)
    score_torch(args, state, save, src, windows, work, steps)
    score_llama(args, state, save, files, windows, work, steps)
    if args.max_steps is not None and steps.done >= args.max_steps:
        print(f"stopped after {steps.done} steps (--max-steps); run again to continue", flush=True)
        sys.exit(MORE)
    version = subprocess.run([args.llama_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    rows = aggregate(state, files, sets)
    chk = checks(rows, args.methods, sets, args.matched)
    meta = {"model": src, "windows": ", ".join(f"{w.shape[0]} {k} windows of {w.shape[1]} tokens"
                                                for k, w in windows.items()),
            "llama_cpp_python": version}
    data = {"settings": settings, "meta": meta, "machine": machine(), "quantize_s": state["quantize_s"],
            "rows": rows, "checks": chk, "wall_s_this_invocation": time.perf_counter() - t0}
    write_results(args.name, data, markdown(args, rows, sets, chk, meta))
    print(markdown(args, rows, sets, chk, meta))


if __name__ == "__main__":
    main()

"""Which part of the ``fptq`` default makes its GGUF export lose WikiText-2 perplexity to llama.cpp's own Q4_0
on Qwen2.5-Coder-0.5B? The default quantized again without one setting at a time (the weight clip search;
GPTQ), scored with float activations -- which track llama.cpp's own perplexity of the same weights to 0.1%
(docs/results/export.md) -- on the windows and calibration of ``bench/gguf_export.py``'s run, whose work folder
holds the calibration text and the float model's cached log-probabilities.

    python bench/investigations/gguf_weight_levers.py --model "$(../shared/tools/get-qwen2.5-coder-0.5b)" \\
        --work /tmp/fptq_gguf_bench/gguf_export_qwen --wiki 4 --c4 4 --name gguf_weight_levers_qwen

Writes bench/results/NAME.{json,md}.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import fptq  # noqa: E402
from fptq.models.loading import load_tokenizer, resolve_model_dir  # noqa: E402
from fptq.nn import set_act_mode  # noqa: E402
from fptq.workflow import quantize_to_dir  # noqa: E402

from _evalset import build_reference, evaluate_all, load_reference  # noqa: E402
from accuracy_sweep import eval_windows, reference_dir  # noqa: E402
from common import write_results  # noqa: E402

LEVERS = {"without the weight clip search": dict(weight_clip_search=False), "without GPTQ": dict(gptq=False)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--work", required=True, help="bench/gguf_export.py's work folder (its calib.txt is used)")
    ap.add_argument("--wiki", type=int, default=4)
    ap.add_argument("--c4", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--name", default="gguf_weight_levers")
    args = ap.parse_args()
    torch.set_num_threads(2)
    work = Path(args.work)
    src = resolve_model_dir(args.model)
    windows = eval_windows(load_tokenizer(src), args.wiki, args.c4, 2048)
    ref_dir = reference_dir(src, windows)
    model, _, _ = fptq.load_float_model(args.model)
    build_reference(model, windows, ref_dir)  # the float model's log-probabilities: reused when cached
    del model
    ref = load_reference(ref_dir)
    rows = {}
    for label, kw in LEVERS.items():
        ckpt = work / ("lever-" + "-".join(f"{k}={v}" for k, v in kw.items()))
        t = time.perf_counter()
        quantize_to_dir(args.model, ckpt, fptq.method_config("fptq", group_size=args.group_size, **kw),
                        calib=str(work / "calib.txt"), nsamples=64, seqlen=512, seed=0, device="cpu", force=True)
        seconds = time.perf_counter() - t
        q = fptq.load(ckpt, runtime="off")
        set_act_mode(q, "none")
        rows[f"fptq {label}"] = {"quantize_s": seconds, **evaluate_all(q, windows, ref, desc=label)}
        print(label, {k: round(v["ppl"], 3) for k, v in rows[f"fptq {label}"].items() if k != "quantize_s"}, flush=True)
    lines = [f"# The fptq default without one weight setting: {src}", "",
             f"Float activations (the weights alone), {args.wiki} + {args.c4} windows of 2048 tokens, group "
             f"{args.group_size}, 64 x 512 calibration as bench/gguf_export.py.", "",
             "| checkpoint | WikiText-2 ppl | KLD | C4 ppl | KLD | quantize s |", "|---|---|---|---|---|---|"]
    for label, r in rows.items():
        w, c = r["wikitext2"], r["c4"]
        lines.append(f"| {label} | {w['ppl']:.3f} | {w['kld']:.4f} | {c['ppl']:.3f} | {c['kld']:.4f} | "
                     f"{r['quantize_s']:.0f} |")
    write_results(args.name, {"model": src, "rows": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

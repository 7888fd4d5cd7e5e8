"""Accuracy of each CPU integer backend against the simulated quantization
(the `reference` backend) on an fptq checkpoint of the default model:
logits SQNR and WikiText-2 perplexity on the same windows.

    python bench/kernel_accuracy.py CHECKPOINT [--max-windows 40] [--seqlen 2048]

Writes bench/results/kernel_accuracy.{json,md}.
"""
from __future__ import annotations

import argparse
import time

import torch

import fptq
from fptq.eval.perplexity import evaluate_perplexity, load_eval_text, token_windows
from fptq.nn import QuantLinear

from common import machine, wikitext_path, write_results


def set_backend(model, name):
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.set_backend(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("checkpoint")
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--backends", default="reference,int8_perchannel,int8_grouped")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    model = fptq.load(args.checkpoint)
    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    windows = token_windows(tok, load_eval_text(wikitext_path()), args.seqlen, args.max_windows)
    probe = windows[:2, :512]
    rows = {}
    ref_logits = None
    for name in args.backends.split(","):
        set_backend(model, name)
        with torch.inference_mode():
            logits = model(probe).logits.float()
        if ref_logits is None:
            ref_logits = logits
        sqnr = float(20 * torch.log10(ref_logits.norm() / (ref_logits - logits).norm().clamp_min(1e-30)))
        t = time.perf_counter()
        r = evaluate_perplexity(model, windows, desc=name)
        rows[name] = {"ppl": r["ppl"], "logits_sqnr_db_vs_reference": sqnr if name != "reference" else None,
                      "eval_s": time.perf_counter() - t}
        print(name, rows[name], flush=True)
    base = rows["reference"]["ppl"]
    md = [f"Checkpoint {args.checkpoint}; WikiText-2 first {args.max_windows} windows of {args.seqlen} tokens; "
          "SQNR of the logits on 2 x 512 tokens against the simulated quantization.", "",
          "| backend | ppl | vs simulated | logits SQNR (dB) | eval time (s) |", "|---|---|---|---|---|"]
    for n, r in rows.items():
        s = "—" if r["logits_sqnr_db_vs_reference"] is None else f"{r['logits_sqnr_db_vs_reference']:.1f}"
        md.append(f"| {n} | {r['ppl']:.3f} | {100 * (r['ppl'] / base - 1):+.2f}% | {s} | {r['eval_s']:.0f} |")
    write_results("kernel_accuracy", {"settings": vars(args), "machine": machine(), "rows": rows}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()

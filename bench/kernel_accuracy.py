"""Accuracy of the fast paths against the simulated quantization (the ``reference`` backend) on an fptq
checkpoint: WikiText-2 perplexity on the same windows, KL divergence and top-1 agreement of the next-token
distributions against the simulated model, and logits SQNR.

Paths: ``reference`` (transformers forward, simulated quantization in float32), ``native`` (transformers forward,
fptq's AVX-512 VNNI kernels), ``runtime`` (fptq's runtime, :mod:`fptq.runtime`: native kernels, fused stages,
16-bit embeddings and ``lm_head`` as stored), and optionally the torch integer paths (``int8_grouped``,
``int8_perchannel``).

    python bench/kernel_accuracy.py CHECKPOINT [--max-windows 10] [--seqlen 2048] [--name kernel_accuracy]

Writes bench/results/NAME.{json,md}.
"""
from __future__ import annotations

import argparse
import time

import torch

import fptq
from fptq.eval.perplexity import evaluate_perplexity, load_eval_text, token_windows
from fptq.hf import set_backend
from fptq.runtime import Engine, EngineLM, load_for_runtime

from common import machine, sqnr_db, wikitext_path, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--max-windows", type=int, default=10)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--paths", default="reference,native,runtime")
    ap.add_argument("--name", default="kernel_accuracy")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    torch.set_num_threads(torch.get_num_threads())
    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    windows = token_windows(tok, load_eval_text(wikitext_path()), args.seqlen, args.max_windows)
    model = fptq.load(args.checkpoint, backend="reference")
    rows, ref_logp = {}, []
    probe = windows[:1, :512]
    with torch.inference_mode():
        ref_logits = model(probe).logits.float()
    for name in args.paths.split(","):
        if name == "runtime":
            lm = EngineLM(Engine(load_for_runtime(args.checkpoint)))
        else:
            lm = set_backend(model, name)
        with torch.inference_mode():
            logits = lm(probe).logits.float()
        sqnr = sqnr_db(ref_logits, logits)
        t = time.perf_counter()
        with torch.inference_mode():
            if not ref_logp:
                r = evaluate_perplexity(lm, windows, desc=name, keep_logprobs=ref_logp)
            else:
                r = evaluate_perplexity(lm, windows, desc=name, reference_logprobs=ref_logp)
        r.update(logits_sqnr_db_vs_reference=sqnr if rows else None, eval_s=time.perf_counter() - t)
        rows[name] = r
        print(name, r, flush=True)
    base = next(iter(rows.values()))["ppl"]
    md = [f"Checkpoint `{args.checkpoint}`; WikiText-2 first {args.max_windows} windows of {args.seqlen} tokens; "
          f"KL divergence, top-1 agreement and logits SQNR (1 x 512 tokens) against the first path "
          f"({next(iter(rows))}); {torch.get_num_threads()} threads.", "",
          "| path | ppl | vs simulated | KLD | top-1 | logits SQNR (dB) | eval time (s) |", "|---|---|---|---|---|---|---|"]
    for n, r in rows.items():
        s = "—" if r["logits_sqnr_db_vs_reference"] is None else f"{r['logits_sqnr_db_vs_reference']:.1f}"
        kld = f"{r['kld']:.5f}" if "kld" in r else "—"
        top1 = f"{100 * r['top1']:.2f}%" if "top1" in r else "—"
        md.append(f"| {n} | {r['ppl']:.3f} | {100 * (r['ppl'] / base - 1):+.2f}% | {kld} | {top1} | {s} | "
                  f"{r['eval_s']:.0f} |")
    write_results(args.name, {"settings": vars(args), "machine": machine(), "rows": rows}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()

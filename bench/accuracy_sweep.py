"""Accuracy of fptq methods and settings on one model: WikiText-2 and C4 perplexity, KL divergence and
top-1 agreement against the float model, and quantization time, all in one run with one evaluator
(``bench/_evalset.py``) and one set of calibration windows.

Variants are ``LABEL=METHOD`` or ``LABEL=METHOD:FIELD=VALUE;FIELD=VALUE`` (QuantConfig fields; values
parsed as JSON when they can be), or just ``METHOD``. Usage::

    python bench/accuracy_sweep.py --variants rtn-w4a16,gptq-w4a16 --wiki 8 --c4 8 --name gptq_sweep
    python bench/accuracy_sweep.py --model "$(../shared/tools/get-qwen2.5-coder-0.5b)" --group-size 128 \\
        --variants 'fptq,paper=fptq-paper' --name qwen_sweep

Calibration: ``--nsamples`` windows of ``--seqlen`` tokens from C4 documents 1000-1999 (``--calib-seed``, 0).
Evaluation: the first ``--wiki`` WikiText-2 windows and ``--c4`` C4 windows (documents 0-999) of
``--eval-seqlen`` tokens. Writes bench/results/NAME.{json,md} after every variant.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch

import fptq
from fptq.eval.perplexity import load_eval_text, token_windows

from _evalset import build_reference, evaluate_all, load_reference, metrics_line
from common import c4_eval_path, calibration_text, machine, model_arguments, wikitext_path, write_results


def parse_variant(spec: str) -> tuple[str, str, dict]:
    head, _, fields = spec.partition(":")
    label, method = head.split("=", 1) if "=" in head else (spec, head)
    overrides = {}
    for item in filter(None, fields.split(";")):
        k, _, v = item.partition("=")
        try:
            overrides[k] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k] = v
    return label, method, overrides


def split_variants(text: str) -> list[str]:
    """Split on the commas that are not inside brackets (``a=fptq:equalization_powers=[0,0.5,1],b``)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [v for v in out + [cur] if v]


def eval_windows(tok, wiki: int, c4: int, seqlen: int) -> dict[str, torch.Tensor]:
    out = {}
    if wiki:
        out["wikitext2"] = token_windows(tok, load_eval_text(wikitext_path()), seqlen, wiki)
    if c4:
        out["c4"] = token_windows(tok, load_eval_text(c4_eval_path()), seqlen, c4)
    return out


def reference_dir(src: str, windows: dict) -> Path:
    key = hashlib.sha1(json.dumps([src, {k: list(v.shape) for k, v in windows.items()},
                                   {k: int(v.long().sum()) for k, v in windows.items()}]).encode()).hexdigest()[:12]
    return Path(os.environ.get("FPTQ_REF_CACHE", "/tmp/fptq_ref")) / key


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(ap)
    ap.add_argument("--variants", required=True)
    ap.add_argument("--calib-seed", type=int, default=0, help="seed that draws the calibration windows")
    ap.add_argument("--wiki", type=int, default=8)
    ap.add_argument("--c4", type=int, default=8)
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="accuracy_sweep")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    model, tok, src = fptq.load_float_model(args.model)
    calib = fptq.calibration_windows(tok, calibration_text(), args.nsamples, args.seqlen, seed=args.calib_seed)
    windows = eval_windows(tok, args.wiki, args.c4, args.eval_seqlen)
    ref_dir = reference_dir(src, windows)
    meta = build_reference(model, windows, ref_dir)
    ref = load_reference(ref_dir)
    rows = {"float": {"metrics": meta["float"]}}
    print("float", metrics_line(meta["float"]), flush=True)
    for spec in split_variants(args.variants):
        label, method, overrides = parse_variant(spec)
        overrides.setdefault("group_size", args.group_size if method != "smoothquant-w8a8" else -1)
        cfg = fptq.method_config(method, **overrides)
        qmodel = copy.deepcopy(model)
        t = time.perf_counter()
        plan = fptq.quantize(qmodel, cfg, calib, device="cpu", progress=False)
        qs = time.perf_counter() - t
        res = evaluate_all(qmodel, windows, ref, desc=label)
        rows[label] = {"method": method, "overrides": overrides, "quantize_s": qs, "counts": dict(plan.counts()),
                       "metrics": res, "config": cfg.to_dict()}
        print(f"{label}: quantize {qs:.1f} s  {metrics_line(res)}  {dict(plan.counts())}", flush=True)
        del qmodel
        _write(args, src, rows)


def _write(args, src, rows) -> None:
    sets = list(rows["float"]["metrics"])
    head = "| variant | quantize s | " + " | ".join(f"{s} ppl | {s} KLD | {s} top-1" for s in sets) + " | static / LAE / dynamic |"
    md = [f"Model {Path(src).name}; calibration {args.nsamples} x {args.seqlen} (C4 docs 1000-1999, seed {args.calib_seed}); group "
          f"{args.group_size}; eval {args.wiki} WikiText-2 + {args.c4} C4 windows of {args.eval_seqlen}; "
          f"{args.threads} threads.\n", head, "|" + "---|" * (2 + 3 * len(sets) + 1)]
    for label, r in rows.items():
        m = r["metrics"]
        c = r.get("counts", {})
        md.append(f"| {label} | {r.get('quantize_s', 0):.1f} | " + " | ".join(
            f"{m[s]['ppl']:.3f} | {m[s].get('kld', 0):.4f} | {100 * m[s].get('top1', 1):.2f}%" for s in sets)
            + f" | {c.get('static_tensor', 0)} / {c.get('lae_static_tensor', 0)} / {c.get('dynamic_token', 0)} |")
    write_results(args.name, {"settings": vars(args), "machine": machine(), "model": str(src), "rows": rows},
                  "\n".join(md) + "\n")


if __name__ == "__main__":
    main()

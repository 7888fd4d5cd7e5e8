"""WikiText-2 perplexity of the default model (SmolLM2-135M-Instruct): float
against fptq W4A8 and its variants, with the issue's settings.

Calibration: 128 windows of 512 tokens from C4 documents 1000-1999 (seed 0);
evaluation: WikiText-2 test, lines joined with blank lines, first 40 windows of
2048 tokens. Usage::

    python bench/investigations/default_model_ppl.py [--variants fptq,fptq-max,...] [--nsamples 128] [--max-windows 40]

Writes bench/results/default_model_ppl.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

import fptq
from fptq.eval.perplexity import evaluate_perplexity, load_eval_text, token_windows

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: common.py and the scripts reused here

from common import calibration_text, machine, wikitext_path, write_results  # noqa: E402

VARIANTS = {
    "fptq": dict(method="fptq"),
    "fptq-max": dict(method="fptq", static_observer="max"),
    "fptq-mean_max": dict(method="fptq", static_observer="mean_max"),
    "fptq-percentile": dict(method="fptq", static_observer="percentile"),
    "fptq-wclip": dict(method="fptq", weight_clip_search=True),
    "fptq-gptq": dict(method="fptq", gptq=True),
    "fptq-g128": dict(method="fptq", group_size=128),
    "naive-w4a8": dict(method="naive-w4a8"),
    "naive-w4a8-max": dict(method="naive-w4a8", static_observer="max"),
    "naive-w4a8-mean_max": dict(method="naive-w4a8", static_observer="mean_max"),
    "fptq-bf16calib-intprop": dict(method="fptq", calib_dtype="bfloat16", propagate_backend="auto"),
    "fptq-noLAE": dict(method="fptq", equalization="none"),
    "fptq-sq": dict(method="fptq", equalization="smoothquant"),
    "dynamic-w4a8": dict(method="dynamic-w4a8"),
    "lae-dynamic-w4a8": dict(method="lae-dynamic-w4a8"),
    "lae-dynamic-w4a8-all": dict(method="lae-dynamic-w4a8", equalize_into="all"),
    "fptq-norms": dict(method="fptq", equalize_into="norms"),
    "fptq-band": dict(method="fptq", lae_scope="band"),  # the paper's scope
    "fptq-all": dict(method="fptq", lae_scope="all"),
    "rtn-w4a16": dict(method="rtn-w4a16"),
}


def quantize_and_evaluate(model, config, calib, windows, desc: str, progress: bool = True):
    """Quantize a copy of ``model`` with ``config`` and measure its perplexity on ``windows``.

    Returns ``(row, qmodel, plan)``; ``row`` has ppl, quantize/eval seconds, strategy counts and the config.
    """
    qmodel = copy.deepcopy(model)
    t = time.perf_counter()
    plan = fptq.quantize(qmodel, config, calib, device="cpu", progress=progress)
    quantize_s = time.perf_counter() - t
    t = time.perf_counter()
    r = evaluate_perplexity(qmodel, windows, desc=desc)
    row = {"ppl": r["ppl"], "quantize_s": quantize_s, "eval_s": time.perf_counter() - t,
           "counts": dict(plan.counts()), "config": config.to_dict()}
    return row, qmodel, plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--variants", default="fptq,fptq-max,fptq-mean_max,naive-w4a8")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--no-float", action="store_true", help="skip the float row")
    ap.add_argument("--name", default="default_model_ppl")
    ap.add_argument("--save", default=None, help="save the first variant's checkpoint to this directory")
    args = ap.parse_args()

    model, tok, src = fptq.load_float_model(None)
    calib = fptq.calibration_windows(tok, calibration_text(), args.nsamples, args.seqlen, seed=0)
    windows = token_windows(tok, load_eval_text(wikitext_path()), args.eval_seqlen, args.max_windows)
    rows = {}
    if not args.no_float:
        t = time.perf_counter()
        r = evaluate_perplexity(model, windows, desc="float")
        rows["float"] = {"ppl": r["ppl"], "eval_s": time.perf_counter() - t}
        print("float", rows["float"], flush=True)
    for name in args.variants.split(","):
        spec = dict(VARIANTS[name])
        method = spec.pop("method")
        spec.setdefault("group_size", args.group_size)
        cfg = fptq.method_config(method, **spec)
        rows[name], qmodel, plan = quantize_and_evaluate(model, cfg, calib, windows, name)
        print(name, {k: v for k, v in rows[name].items() if k != "config"}, flush=True)
        if args.save and name == args.variants.split(",")[0]:
            from fptq.workflow import model_sizes

            fptq.save(qmodel, plan, args.save, tokenizer=tok, force=True,
                      report={"source_model": src, "config": cfg.to_dict(), "sizes": model_sizes(qmodel),
                              "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen,
                                              "source": "C4 documents 1000-1999"}})
        del qmodel
        _write(args, src, rows)
    _write(args, src, rows)


def _write(args, src, rows) -> None:
    md = ["| variant | WikiText-2 ppl | strategies (static / LAE / dynamic / float) | quantize s |", "|---|---|---|---|"]
    for name, r in rows.items():
        c = r.get("counts", {})
        md.append(f"| {name} | {r['ppl']:.2f} | {c.get('static_tensor', 0)} / {c.get('lae_static_tensor', 0)} / "
                  f"{c.get('dynamic_token', 0)} / {c.get('float', 0)} | {r.get('quantize_s', 0):.0f} |")
    md.insert(0, f"Default model {src}; calibration {args.nsamples}x{args.seqlen} C4 docs 1000-1999; "
                 f"WikiText-2 first {args.max_windows} windows of {args.eval_seqlen}; group {args.group_size}.\n")
    write_results(args.name, {"settings": vars(args), "machine": machine(), "rows": rows}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()

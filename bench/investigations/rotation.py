"""Does a rotation help FPTQ W4A8? The float model is turned by randomized Hadamard matrices folded into its
weights (:mod:`fptq.rotation`: ``r1`` the residual stream, ``r1r2`` also every head's values; QuaRot /
SpinQuant's offline rotations, no online transform, the architecture unchanged), then quantized by each
method, on the evaluator, windows and calibration of ``bench/accuracy_sweep.py``::

    python bench/investigations/rotation.py --variants fptq --rotations none,r1,r1r2 --wiki 8 --c4 8 \\
        --name rotation_smollm2
    python bench/investigations/rotation.py --model "$(../shared/tools/get-qwen2.5-coder-0.5b)" --group-size 128 \\
        --variants fptq --rotations none,r1,r1r2 --wiki 8 --c4 8 --name rotation_qwen

Variants take ``bench/accuracy_sweep.py``'s syntax (``LABEL=METHOD:FIELD=VALUE;...``). The float model's own
metrics are checked on the rotated float model too (``float@r1``...: equal up to float32 rounding). Writes
bench/results/NAME.{json,md} after every row.
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import fptq  # noqa: E402
from fptq.models import get_adapter  # noqa: E402
from fptq.quant.hadamard import random_hadamard  # noqa: E402
from fptq.rotation import rotate_heads, rotate_residual  # noqa: E402

from _evalset import build_reference, evaluate_all, load_reference, metrics_line  # noqa: E402
from accuracy_sweep import eval_windows, parse_variant, reference_dir, split_variants  # noqa: E402
from common import calibration_text, machine, model_arguments, write_results  # noqa: E402

ROTATIONS = ("none", "r1", "r1r2")


def rotated(model: torch.nn.Module, how: str, seed: int) -> tuple[torch.nn.Module, float]:
    """A rotated copy of ``model`` and the seconds the rotation took."""
    out = copy.deepcopy(model)
    t = time.perf_counter()
    if how != "none":
        adapter = get_adapter(out)
        rotate_residual(out, adapter, random_hadamard(out.config.hidden_size, seed=seed))
        if how == "r1r2":
            cfg = out.config
            d = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
            rotate_heads(out, adapter, random_hadamard(d, seed=seed + 1))
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(ap)
    ap.add_argument("--variants", default="fptq")
    ap.add_argument("--rotations", default=",".join(ROTATIONS), help=f"among {', '.join(ROTATIONS)}")
    ap.add_argument("--rotation-seed", type=int, default=0)
    ap.add_argument("--calib-seed", type=int, default=0)
    ap.add_argument("--wiki", type=int, default=8)
    ap.add_argument("--c4", type=int, default=8)
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="rotation")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    rotations = [r for r in args.rotations.split(",") if r]
    bad = [r for r in rotations if r not in ROTATIONS]
    if bad:
        ap.error(f"unknown rotation {bad}; choose among {', '.join(ROTATIONS)}")

    model, tok, src = fptq.load_float_model(args.model)
    calib = fptq.calibration_windows(tok, calibration_text(), args.nsamples, args.seqlen, seed=args.calib_seed)
    windows = eval_windows(tok, args.wiki, args.c4, args.eval_seqlen)
    ref_dir = reference_dir(src, windows)
    meta = build_reference(model, windows, ref_dir)
    ref = load_reference(ref_dir)
    rows = {"float": {"metrics": meta["float"]}}
    print("float", metrics_line(meta["float"]), flush=True)
    for how in rotations:
        if how != "none":
            rmodel, _ = rotated(model, how, args.rotation_seed)
            res = evaluate_all(rmodel, windows, ref, desc=f"float@{how}")
            rows[f"float@{how}"] = {"rotation": how, "metrics": res}
            print(f"float@{how}: {metrics_line(res)}", flush=True)
            del rmodel
        for spec in split_variants(args.variants):
            label, method, overrides = parse_variant(spec)
            overrides.setdefault("group_size", args.group_size)
            cfg = fptq.method_config(method, **overrides)
            qmodel, rot_s = rotated(model, how, args.rotation_seed)
            t = time.perf_counter()
            plan = fptq.quantize(qmodel, cfg, calib, device="cpu", progress=False)
            qs = time.perf_counter() - t
            res = evaluate_all(qmodel, windows, ref, desc=f"{label}@{how}")
            rows[f"{label}@{how}"] = {"method": method, "overrides": overrides, "rotation": how,
                                      "rotate_s": rot_s, "quantize_s": qs, "counts": dict(plan.counts()),
                                      "metrics": res, "config": cfg.to_dict()}
            print(f"{label}@{how}: rotate {rot_s:.1f} s quantize {qs:.1f} s  {metrics_line(res)}  "
                  f"{dict(plan.counts())}", flush=True)
            del qmodel
            _write(args, src, rows)


def _write(args, src, rows) -> None:
    sets = list(rows["float"]["metrics"])
    head = ("| variant @ rotation | rotate + quantize s | " + " | ".join(f"{s} ppl | {s} KLD | {s} top-1" for s in sets)
            + " | static / LAE / dynamic |")
    md = [f"Model {Path(src).name}; calibration {args.nsamples} x {args.seqlen} (C4 docs 1000-1999, seed "
          f"{args.calib_seed}); group {args.group_size}; rotation seed {args.rotation_seed}; eval {args.wiki} "
          f"WikiText-2 + {args.c4} C4 windows of {args.eval_seqlen}; {args.threads} threads.\n", head,
          "|" + "---|" * (2 + 3 * len(sets) + 1)]
    for label, r in rows.items():
        m = r["metrics"]
        c = r.get("counts", {})
        secs = r.get("rotate_s", 0) + r.get("quantize_s", 0)
        md.append(f"| {label} | {secs:.1f} | " + " | ".join(
            f"{m[s]['ppl']:.3f} | {m[s].get('kld', 0):.4f} | {100 * m[s].get('top1', 1):.2f}%" for s in sets)
            + f" | {c.get('static_tensor', 0)} / {c.get('lae_static_tensor', 0)} / {c.get('dynamic_token', 0)} |")
    write_results(args.name, {"settings": vars(args), "machine": machine(), "model": str(src), "rows": rows},
                  "\n".join(md) + "\n")


if __name__ == "__main__":
    main()

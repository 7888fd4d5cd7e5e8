"""Why llama.cpp's own round-to-nearest ``Q4_0`` beats fptq's ``rtn-w4a16`` in llama.cpp (docs/results/export.md):
the weight mean squared error of every decoder Linear under three scale rules, groups of ``--group-size``.

* fptq: ``absmax / 7.5`` rounded down to float16, codes -8..7 (:func:`fptq.quant.weights.weight_scales`);
* llama.cpp ``Q4_0``: ``d = (the group's signed extreme) / -8``, so the extreme is code -8 exactly and ``d`` is
  negative when the extreme is positive;
* the same with positive scales only: ``absmax / 8`` where the extreme is negative, ``absmax / 7.5`` elsewhere.

    python bench/investigations/q4_0_scale_rule.py [--model M] [--group-size 32]

Writes bench/results/q4_0_scale_rule.{json,md}.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fptq  # noqa: E402
from fptq.quant.weights import dequantize_weight, quantize_weight, weight_scales  # noqa: E402

from common import write_results  # noqa: E402


def errors(w: torch.Tensor, gs: int) -> dict[str, float]:
    s = weight_scales(w, 4, gs)
    out = {"fptq (absmax / 7.5)": (dequantize_weight(quantize_weight(w, s, 4, gs), s, gs) - w).pow(2).mean().item()}
    g = w.view(w.shape[0], -1, gs)
    extreme = g.gather(-1, g.abs().argmax(-1, keepdim=True))
    for label, d in (("llama.cpp Q4_0 (signed extreme / -8)", (extreme / -8).half().float()),
                     ("positive scales only", torch.where(extreme < 0, extreme.abs() / 8,
                                                          extreme.abs() / 7.5).half().float())):
        safe = torch.where(d == 0, torch.ones_like(d), d)
        q = torch.clamp(torch.round(g / safe), -8, 7)
        out[label] = (q * d - g).pow(2).mean().item()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--name", default="q4_0_scale_rule")
    args = ap.parse_args()
    model, _, src = fptq.load_float_model(args.model)
    total: dict[str, float] = {}
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}":
            for k, v in errors(m.weight.detach().float(), args.group_size).items():
                total[k] = total.get(k, 0.0) + v
            n += 1
    mean = {k: v / n for k, v in total.items()}
    base = mean["fptq (absmax / 7.5)"]
    lines = [f"# Weight MSE of three 4-bit scale rules: {src}", "",
             f"{n} decoder Linears, groups of {args.group_size}; mean over Linears of the per-weight squared error.", "",
             "| rule | weight MSE | vs fptq |", "|---|---|---|"]
    lines += [f"| {k} | {v:.4g} | {v / base:.3f}x |" for k, v in mean.items()]
    write_results(args.name, {"model": str(src), "group_size": args.group_size, "linears": n, "mse": mean},
                  "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

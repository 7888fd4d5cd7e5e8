"""Does the float16 rounding of the group scales change GPTQ's own objective, layer by layer?

End to end, GPTQ weights on SmolLM2-135M are better with scales rounded to nearest than rounded down
(bench/results/smol_gptq_scale_rounding.md), while round-to-nearest weights are better rounded down
(rtn_rounding_spread.md). This script asks whether that shows in the quantity GPTQ minimises: for every
Linear of a few decoder layers of the *float* model, the output error ``tr(dW H dW^T) / tr(W H W^T)``
(``dW`` the quantization error of the weights, ``H = X^T X`` from calibration inputs of that Linear), for
round-to-nearest and GPTQ (column order and act-order) weights, scales rounded down and to nearest.

    python bench/investigations/gptq_rounding_proxy.py                    # SmolLM2-135M, group 64, layers 0, 10, 20, 29
    python bench/investigations/gptq_rounding_proxy.py --model "$(../shared/tools/get-qwen2.5-coder-0.5b)" \\
        --group-size 128 --layers 0,8,16,23 --name gptq_rounding_proxy_qwen

Writes bench/results/NAME.{json,md}.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import fptq
from fptq.quant.gptq import HessianAccumulator, gptq_quantize
from fptq.quant.weights import dequantize_weight, quantize_weight, weight_scales

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: common.py and the scripts reused here

from common import calibration_text, machine, model_arguments, write_results  # noqa: E402

VARIANTS = (("rtn", False, False), ("gptq", True, False), ("gptq act-order", True, True))


def relative_output_error(w: torch.Tensor, deq: torch.Tensor, h: torch.Tensor) -> float:
    """``tr(dW H dW^T) / tr(W H W^T)``: the squared error the weights add to the Linear's outputs on the
    calibration inputs, relative to the outputs' squared norm."""
    d = deq - w
    return float(torch.einsum("ij,jk,ik->", d, h, d) / torch.einsum("ij,jk,ik->", w, h, w))


def quantized(w: torch.Tensor, h: torch.Tensor, gs: int, gptq: bool, act_order: bool, rounding: str) -> torch.Tensor:
    if gptq:
        codes, scales, ok = gptq_quantize(w.clone(), h.clone(), 4, gs, act_order=act_order, scale_rounding=rounding)
        assert ok, "GPTQ fell back to round-to-nearest"
    else:
        scales = weight_scales(w, 4, gs, rounding=rounding)
        codes = quantize_weight(w, scales, 4, gs)
    return dequantize_weight(codes, scales, gs)


def layer_arguments(description: str, name: str) -> argparse.Namespace:
    """The command line shared by the per-Linear GPTQ scripts (this one and gptq_vs_llmc_layer.py)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(ap, nsamples=32)
    ap.add_argument("--layers", default="0,10,20,29", help="decoder layers whose Linears are measured")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default=name)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    return args


def float_layer_hessians(args: argparse.Namespace) -> tuple[str, dict, dict]:
    """``(source, {name: Linear}, {name: HessianAccumulator})`` for every Linear of the decoder layers
    ``args.layers`` of the float model, from ``args.nsamples`` x ``args.seqlen`` calibration tokens."""
    layers = [int(x) for x in args.layers.split(",")]
    model, tok, src = fptq.load_float_model(args.model)
    calib = fptq.calibration_windows(tok, calibration_text(), args.nsamples, args.seqlen, seed=0)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and any(f".layers.{i}." in n for i in layers)}
    hess = {n: HessianAccumulator(m.in_features) for n, m in linears.items()}
    handles = [m.register_forward_hook(lambda _m, inp, _o, n=n: hess[n].add(inp[0].detach()))
               for n, m in linears.items()]
    with torch.inference_mode():
        for i in range(len(calib)):
            model(calib[i: i + 1])
    for hd in handles:
        hd.remove()
    return src, linears, hess


def main() -> None:
    args = layer_arguments(__doc__, "gptq_rounding_proxy")
    gs = args.group_size
    src, linears, hess = float_layer_hessians(args)

    rows = []
    for n, m in linears.items():
        w, h = m.weight.detach().float(), hess[n].h
        row = {"linear": n}
        for label, gptq, act in VARIANTS:
            for rounding in ("down", "nearest"):
                row[f"{label} / {rounding}"] = relative_output_error(w, quantized(w, h, gs, gptq, act, rounding), h)
        rows.append(row)
        print(n, {k: f"{v:.5f}" for k, v in row.items() if k != "linear"}, flush=True)

    cols = [f"{label} / {r}" for label, _, _ in VARIANTS for r in ("down", "nearest")]
    summary = {}
    for label, _, _ in VARIANTS:
        dn, nr = [r[f"{label} / down"] for r in rows], [r[f"{label} / nearest"] for r in rows]
        summary[label] = {"mean_down": sum(dn) / len(dn), "mean_nearest": sum(nr) / len(nr),
                          "nearest_lower": sum(b < a for a, b in zip(dn, nr)), "linears": len(rows)}
    md = [f"# GPTQ's objective under the two scale roundings ({src.rsplit('/', 1)[-1]}, group {gs})", "",
          f"`python bench/investigations/gptq_rounding_proxy.py --group-size {gs} --layers {args.layers}` "
          "(float model; Hessians "
          f"from {args.nsamples} x {args.seqlen} calibration tokens of C4 documents 1000-1999; each Linear quantized "
          "alone from the float model's inputs).", "",
          "Relative output error tr(dW H dW^T) / tr(W H W^T), in units of 1e-3:", "",
          "| linear | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        md.append(f"| {r['linear']} | " + " | ".join(f"{1e3 * r[c]:.3f}" for c in cols) + " |")
    md += ["", "| weights | mean, scales rounded down | mean, to nearest | Linears where nearest is lower |",
           "|---|---|---|---|"]
    for label, s in summary.items():
        md.append(f"| {label} | {1e3 * s['mean_down']:.4f} | {1e3 * s['mean_nearest']:.4f} | "
                  f"{s['nearest_lower']} / {s['linears']} |")
    write_results(args.name, {"settings": vars(args), "machine": machine(), "model": src, "rows": rows,
                              "summary": summary}, "\n".join(md) + "\n")
    print("\n".join(md[-5:]))


if __name__ == "__main__":
    main()

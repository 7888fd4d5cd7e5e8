"""Is fptq's GPTQ the same algorithm as llm-compressor's, given the same weights and Hessian?

Runs in the llm-compressor venv (it imports both tools; see bench/peer_llmcompressor.py for the venv).
For every Linear of a few decoder layers of the *float* model, one Hessian ``H = X^T X`` from calibration
inputs, then GPTQ in act-order (both tools' default) four ways:

* fptq ``gptq_quantize``, float16 scales rounded to nearest (fptq's default for GPTQ) and rounded down;
* llm-compressor ``quantize_weight`` with its own scales (float32 ``absmax / 7.5``, the memoryless min-max
  observer of its weights);
* llm-compressor ``quantize_weight`` given fptq's float16 nearest scales: if the two loops are the same
  algorithm, its weights are fptq's (up to float32 summation order).

Reports the relative output error ``tr(dW H dW^T) / tr(W H W^T)`` of each, and the share of weights whose
code differs between fptq and llm-compressor on the same scales.

    PYTHONPATH=src /work/venvs/llmc/bin/python bench/investigations/gptq_vs_llmc_layer.py \\
        --model "$(../shared/tools/get-qwen2.5-coder-0.5b)" \\
        --group-size 128 --layers 0,8,16,23 --name gptq_vs_llmc_layer_qwen

Writes bench/results/NAME.{json,md}.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from fptq.quant.gptq import gptq_quantize
from fptq.quant.weights import dequantize_weight

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: common.py and the scripts reused here

from common import machine, write_results  # noqa: E402
from gptq_rounding_proxy import float_layer_hessians, layer_arguments, relative_output_error  # noqa: E402


def llmc_gptq(w: torch.Tensor, h: torch.Tensor, scales: torch.Tensor, gs: int) -> torch.Tensor:
    """llm-compressor 0.14's GPTQ loop (static act-order, damp 0.01, block 128) on ``w`` with ``scales``
    (``[N, G]``, used as float32); returns the dequantized weights."""
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight as llmc_quantize_weight

    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=gs,
                            actorder="static")
    s = scales.float().unsqueeze(0).clone()
    deq, _, fallback = llmc_quantize_weight(w.unsqueeze(0).clone(), h.unsqueeze(0).clone(), s,
                                            torch.zeros_like(s, dtype=torch.int8), None, args,
                                            blocksize=128, percdamp=0.01)
    assert not bool(fallback.any()), "llm-compressor fell back to round-to-nearest"
    return deq[0].float()


def main() -> None:
    args = layer_arguments(__doc__, "gptq_vs_llmc_layer")
    gs = args.group_size
    src, linears, hess = float_layer_hessians(args)

    cols = ("fptq / nearest", "fptq / down", "llmc / float32", "llmc / fptq's nearest")
    rows = []
    for n, m in linears.items():
        w, h = m.weight.detach().float(), hess[n].h.float()
        deq = {}
        for rounding in ("nearest", "down"):
            codes, sc, ok = gptq_quantize(w.clone(), h.clone(), 4, gs, act_order=True, scale_rounding=rounding)
            assert ok, "fptq GPTQ fell back to round-to-nearest"
            deq[f"fptq / {rounding}"] = dequantize_weight(codes, sc, gs)
            if rounding == "nearest":
                near_scales = sc
        absmax = w.abs().reshape(w.shape[0], -1, gs).amax(dim=-1).clamp_min(1e-8)
        deq["llmc / float32"] = llmc_gptq(w, h, absmax / 7.5, gs)
        deq["llmc / fptq's nearest"] = llmc_gptq(w, h, near_scales, gs)
        row = {"linear": n, **{c: relative_output_error(w, deq[c], h) for c in cols}}
        step = near_scales.float().repeat_interleave(gs, dim=1)[:, : w.shape[1]]
        same = torch.round(deq["fptq / nearest"] / step) == torch.round(deq["llmc / fptq's nearest"] / step)
        row["codes_differ_same_scales"] = float(1 - same.float().mean())
        rows.append(row)
        print(n, {k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items() if k != "linear"},
              flush=True)

    summary = {c: sum(r[c] for r in rows) / len(rows) for c in cols}
    summary["codes_differ_same_scales"] = sum(r["codes_differ_same_scales"] for r in rows) / len(rows)
    summary["llmc_float32_lower_than_fptq_nearest"] = sum(r["llmc / float32"] < r["fptq / nearest"] for r in rows)
    summary["linears"] = len(rows)
    md = [f"# fptq's GPTQ vs llm-compressor's on the same weights and Hessian ({src.rsplit('/', 1)[-1]}, "
          f"group {gs}, act-order)", "",
          f"`bench/investigations/gptq_vs_llmc_layer.py --group-size {gs} --layers {args.layers}` "
          "in the llm-compressor venv "
          f"(float model; Hessians from {args.nsamples} x {args.seqlen} calibration tokens of C4 documents "
          "1000-1999; each Linear quantized alone from the float model's inputs).", "",
          "Relative output error tr(dW H dW^T) / tr(W H W^T) in units of 1e-3, and the share of codes that differ "
          "between fptq and llm-compressor given the same (fptq's nearest float16) scales:", "",
          "| linear | " + " | ".join(cols) + " | codes differing, same scales |", "|---" * (len(cols) + 2) + "|"]
    for r in rows:
        md.append(f"| {r['linear']} | " + " | ".join(f"{1e3 * r[c]:.4f}" for c in cols)
                  + f" | {100 * r['codes_differ_same_scales']:.4f}% |")
    md.append("| **mean** | " + " | ".join(f"**{1e3 * summary[c]:.4f}**" for c in cols)
              + f" | {100 * summary['codes_differ_same_scales']:.4f}% |")
    md += ["", f"llm-compressor's float32 scales give a lower error than fptq's nearest float16 ones in "
           f"{summary['llmc_float32_lower_than_fptq_nearest']} of {len(rows)} Linears."]
    write_results(args.name, {"settings": vars(args), "machine": machine(), "model": src, "rows": rows,
                              "summary": summary}, "\n".join(md) + "\n")
    print("\n".join(md[-3:]))


if __name__ == "__main__":
    main()

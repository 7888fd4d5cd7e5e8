"""Why plain GPTQ lost to round-to-nearest: its error on the first token (the attention sink).

For chosen decoder layers of the float model, every Linear's weights are quantized three ways
(symmetric int4, groups of ``--group-size``): round-to-nearest, GPTQ with the usual Hessian
(every calibration token counts once), and GPTQ with the first token of each window counted
``--first-weight`` times. The relative output error ``|X (W_q - W)^T|^2 / |X W^T|^2`` is measured
on held-out WikiText-2 windows of the calibration length, separately for the first token of each
window and for all other tokens. Inputs come from the float model (no error propagation), so the
numbers isolate the weight quantizer.

Usage::

    python bench/gptq_sink_error.py [--layers 3,11,20,28] [--first-weight 128]
    python bench/gptq_sink_error.py --model "$(../shared/tools/get-qwen2.5-coder-0.5b)" --group-size 128 \\
        --layers 3,12,20 --name gptq_sink_error_qwen

Writes bench/results/NAME.{json,md}.
"""
from __future__ import annotations

import argparse

import torch

import fptq
from fptq.calibrate import capture_layer0_inputs, run_layer
from fptq.eval.perplexity import load_eval_text, token_windows
from fptq.models.adapters import get_adapter
from fptq.quant import HessianAccumulator, dequantize_weight, gptq_quantize, quantize_weight, weight_scales

from common import calibration_text, machine, wikitext_path, write_results


def rel_err(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    y = x @ w.t()
    return float((x @ wq.t() - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-30))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--layers", default="3,11,20,28")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--held-out", type=int, default=16, help="WikiText-2 windows of --seqlen tokens")
    ap.add_argument("--first-weight", type=float, default=128.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="gptq_sink_error")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, tok, src = fptq.load_float_model(args.model)
    model.float()
    calib = fptq.calibration_windows(tok, calibration_text(), args.nsamples, args.seqlen, seed=0)
    held = token_windows(tok, load_eval_text(wikitext_path()), args.seqlen, args.held_out)
    adapter = get_adapter(model)
    inputs = capture_layer0_inputs(model, adapter, torch.cat([calib, held]), 16, torch.device("cpu"))
    want = sorted(int(i) for i in args.layers.split(","))
    gs, ncal = args.group_size, calib.numel()
    rows = []
    for li, layer in enumerate(adapter.layers(model)):
        if li > want[-1]:
            break
        inputs.layer_index = li
        if li in want:
            lins = adapter.quantizable_linears(layer)
            seen: dict[str, list[torch.Tensor]] = {n: [] for n in lins}
            hooks = [m.register_forward_pre_hook(
                lambda mod, a, n=n: seen[n].append(a[0].detach().reshape(-1, a[0].shape[-1]).float()))
                for n, m in lins.items()]
            run_layer(layer, inputs, torch.device("cpu"))
            for h in hooks:
                h.remove()
            for name, lin in lins.items():
                x = torch.cat(seen.pop(name))
                xc, xh = x[:ncal], x[ncal:]
                first_c = torch.arange(xc.shape[0]) % args.seqlen == 0
                first_h = torch.arange(xh.shape[0]) % args.seqlen == 0
                w = lin.weight.detach().float()
                plain, weighted = HessianAccumulator(w.shape[1]), HessianAccumulator(w.shape[1])
                plain.add(xc)
                weighted.add(xc, torch.where(first_c, args.first_weight, 1.0))
                s = weight_scales(w, 4, gs)
                variants = {"rtn": dequantize_weight(quantize_weight(w, s, 4, gs), s, gs)}
                for label, acc in (("gptq", plain), ("gptq_first", weighted)):
                    q, sc, _ = gptq_quantize(w, acc.h, 4, gs)
                    variants[label] = dequantize_weight(q, sc, gs)
                row = {"layer": li, "linear": name}
                for label, wq in variants.items():
                    row[f"{label}_first"] = rel_err(xh[first_h], w, wq)
                    row[f"{label}_others"] = rel_err(xh[~first_h], w, wq)
                rows.append(row)
                print(row, flush=True)
        run_layer(layer, inputs, torch.device("cpu"), replace=True)

    md = [f"Model {src}; calibration {args.nsamples} x {args.seqlen} (C4 docs 1000-1999); held-out: "
          f"{args.held_out} WikiText-2 windows of {args.seqlen}; int4 sym g{gs}; float inputs. Relative output "
          f"error |X(Wq-W)^T|^2/|XW^T|^2 on the first token of each held-out window and on all other tokens; "
          f"`gptq_first`: the first token of each calibration window counted {args.first_weight:g} times in the "
          "Hessian.\n",
          "| layer | Linear | RTN first | GPTQ first | GPTQ+first-weight first | RTN others | GPTQ others | "
          "GPTQ+first-weight others |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['layer']} | {r['linear']} | {r['rtn_first']:.4f} | {r['gptq_first']:.4f} | "
                  f"{r['gptq_first_first']:.4f} | {r['rtn_others']:.4f} | {r['gptq_others']:.4f} | "
                  f"{r['gptq_first_others']:.4f} |")
    write_results(args.name, {"settings": vars(args), "machine": machine(), "model": str(src), "rows": rows},
                  "\n".join(md) + "\n")


if __name__ == "__main__":
    main()

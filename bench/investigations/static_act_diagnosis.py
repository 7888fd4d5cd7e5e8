"""Where static per-tensor activations lose to dynamic per-token ones, Linear by Linear.

For every Linear group of the float model (inputs captured on calibration windows), after LAE (on every
group with max|x| < 150, the layers FPTQ runs static) and the weights rounded to int4 (RTN), the relative
squared error of the group's outputs ``|Q(x) Wq^T - x W^T|^2 / |x W^T|^2`` for: weights only, dynamic
per-token int8, static int8 with the MSE-on-activation clip (fptq's old default observer), static with the
plain max, and static with the clip chosen on the layer output. Errors are split into the first position
of each window (the attention-sink token, whose activations are often far larger) and the other positions.
Usage::

    python bench/investigations/static_act_diagnosis.py --model "$(../shared/tools/get-qwen2.5-coder-0.5b)" \\
        --group-size 128
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

import fptq
from fptq.models.adapters import get_adapter
from fptq.quant import lae_scales
from fptq.quant.activations import fake_quantize_per_token, fake_quantize_static
from fptq.quant.static_scale import mse_clip, output_clip_scale
from fptq.quant.weights import fake_quantize_weight

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: common.py and the scripts reused here

from common import calibration_text, machine, model_arguments, write_results  # noqa: E402


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(ap, nsamples=8)
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    model, tok, src = fptq.load_float_model(args.model)
    model.float()
    adapter = get_adapter(model)
    calib = fptq.calibration_windows(tok, calibration_text(), args.nsamples, args.seqlen, seed=0)
    layers = adapter.layers(model)
    captured: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(layers):
        for g in adapter.groups:
            mod = layer.get_submodule(g.consumers[0])
            hooks.append(mod.register_forward_hook(
                lambda m, inp, out, key=(i, g.consumers[0]): captured.__setitem__(key, inp[0].detach().float())))
    with torch.no_grad():
        xs: dict[tuple[int, str], list[torch.Tensor]] = {}
        for row in calib:
            model(row[None])
            for k, v in captured.items():
                xs.setdefault(k, []).append(v[0])
    for h in hooks:
        h.remove()
    rows = []
    first = torch.zeros(args.nsamples * args.seqlen, dtype=torch.bool)
    first[:: args.seqlen] = True
    with torch.no_grad():
        for (i, cname), chunks in xs.items():
            x = torch.cat(chunks)
            group = next(g for g in adapter.groups if g.consumers[0] == cname)
            absmax = x.abs().amax(dim=0)
            v = float(absmax.max())
            s = lae_scales(absmax) if v < 150 else torch.ones_like(absmax)
            xe = x / s
            ws = [layers[i].get_submodule(c).weight.detach().float() for c in group.consumers]
            w = torch.cat(ws)
            wq = fake_quantize_weight(w * s, 4, args.group_size)
            ref = x @ w.T
            em = float(xe.abs().max())
            variants = {
                "weights only": xe,
                "dynamic": fake_quantize_per_token(xe),
                "static max": fake_quantize_static(xe, em / 127),
                "static mse": fake_quantize_static(xe, mse_clip(xe, em) / 127),
                "static output": fake_quantize_static(xe, output_clip_scale(xe[::4], wq, em, 8)),
            }
            r = {"layer": i, "linear": cname, "v": v, "equalized_max": em}
            for name, xq in variants.items():
                y = xq @ wq.T
                r[name] = rel(y, ref)
                r[name + " first"] = rel(y[first], ref[first])
                r[name + " rest"] = rel(y[~first], ref[~first])
            rows.append(r)
            print(f"{i:2d} {cname:28s} v={v:8.1f} eq={em:7.2f} " + " ".join(
                f"{k}={r[k]:.2e}/{r[k + ' first']:.1e}" for k in variants), flush=True)
    keys = list(variants)
    md = [f"Model {src}; {args.nsamples} x {args.seqlen} calibration windows; int4 RTN g{args.group_size} after "
          "LAE; relative squared output error (all tokens / first position of each window)\n",
          "| layer | linear | max abs x | " + " | ".join(keys) + " |", "|" + "---|" * (3 + len(keys))]
    for r in rows:
        md.append(f"| {r['layer']} | {r['linear']} | {r['v']:.1f} | " + " | ".join(
            f"{r[k]:.2e} / {r[k + ' first']:.1e}" for k in keys) + " |")
    tot = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    md.append("| mean | | | " + " | ".join(f"{tot[k]:.2e}" for k in keys) + " |")
    name = args.name or "static_act_diagnosis"
    write_results(name, {"settings": vars(args), "machine": machine(), "rows": rows, "mean": tot}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()

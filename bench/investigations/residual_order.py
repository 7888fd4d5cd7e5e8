"""Does sorting the residual stream's channels help 4-bit weights under LAE? (issue 30 lever)

LAE multiplies the weight columns of the outlier channels of a norm's output by their scale (10x and more
on Qwen2.5); with groups of 128 along the input, every group that holds such a column loses the resolution
of its other columns. The channels of the q/k/v and gate/up inputs are the residual stream's: permuting the
whole stream (embedding columns, every norm, the input columns of the Linears that read it, the output rows
of those that write it, lm_head) changes nothing in the float model, and puts the outlier channels of every
layer into as few groups as possible. This script does that to a LLaMA-family model (Qwen2, LLaMA), by
the channels' largest LAE scale over every norm output on the calibration windows, then runs the
accuracy sweep's variants on it (KL divergence against the unpermuted float model's cached reference).

    python bench/investigations/residual_order.py --model "$(../shared/tools/get-qwen2.5-coder-0.5b)" \
        --group-size 128 --wiki 4 --c4 4 --variants fptq --name qwen_residual_order
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fptq  # noqa: E402
from fptq.quant import lae_scales  # noqa: E402

from _evalset import evaluate_all, load_reference, metrics_line  # noqa: E402
from accuracy_sweep import (_write, eval_windows, parse_variant, reference_dir,  # noqa: E402
                            split_variants)
from common import calibration_text, model_arguments  # noqa: E402


@torch.no_grad()
def residual_scores(model, windows: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """Per residual channel: the largest LAE scale over every norm output inside the decoder layers."""
    best = torch.zeros(model.config.hidden_size)
    hooks = []
    for layer in model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            def hook(_m, _i, out):
                m = out.detach().float().abs().reshape(-1, out.shape[-1]).amax(0)
                best.copy_(torch.maximum(best, lae_scales(m)))
            hooks.append(norm.register_forward_hook(hook))
    try:
        for i in range(0, len(windows), batch):
            model(windows[i:i + batch])
    finally:
        for h in hooks:
            h.remove()
    return best


@torch.no_grad()
def permute_residual(model, perm: torch.Tensor) -> None:
    """Permute the residual stream's channels of a LLaMA-family model in place (exact)."""
    m = model.model
    emb = m.embed_tokens.weight
    tied = model.lm_head.weight.data_ptr() == emb.data_ptr()
    emb.copy_(emb[:, perm])
    if not tied:
        model.lm_head.weight.copy_(model.lm_head.weight[:, perm])
    m.norm.weight.copy_(m.norm.weight[perm])
    for layer in m.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.copy_(norm.weight[perm])
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj,
                    layer.mlp.up_proj):
            lin.weight.copy_(lin.weight[:, perm])
        for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
            lin.weight.copy_(lin.weight[perm])
            if lin.bias is not None:
                lin.bias.copy_(lin.bias[perm])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(ap)
    ap.add_argument("--variants", required=True)
    ap.add_argument("--wiki", type=int, default=4)
    ap.add_argument("--c4", type=int, default=4)
    ap.add_argument("--calib-seed", type=int, default=0)
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="residual_order")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    model, tok, src = fptq.load_float_model(args.model)
    calib = fptq.calibration_windows(tok, calibration_text(), args.nsamples, args.seqlen, seed=args.calib_seed)
    windows = eval_windows(tok, args.wiki, args.c4, args.eval_seqlen)
    ref = load_reference(reference_dir(src, windows))  # the unpermuted float model's logits (accuracy_sweep's cache)
    scores = residual_scores(model, calib[:16])
    perm = torch.argsort(scores, descending=True, stable=True)
    top = scores[perm]
    print("largest channel scales:", [round(float(v), 1) for v in top[:16]], "median", float(scores.median()))
    permute_residual(model, perm)
    rows = {"float": {"metrics": evaluate_all(model, windows, ref, desc="float-permuted")}}
    print("float (permuted)", metrics_line(rows["float"]["metrics"]), flush=True)
    for spec in split_variants(args.variants):
        label, method, overrides = parse_variant(spec)
        overrides.setdefault("group_size", args.group_size)
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


if __name__ == "__main__":
    main()

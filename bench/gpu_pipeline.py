"""Quantizing on a GPU: does the layer-by-layer pipeline give the same plan on
CUDA as on the CPU, with and without ``offload`` (cached activations kept on
the CPU), and how much GPU memory does each take?

A random LLaMA-architecture model (outlier channels planted in the norms, so
that the three FPTQ strategies all occur) is quantized three times: on the
CPU, on CUDA, and on CUDA with ``offload=True``. Reported: strategy agreement
with the CPU plan, the largest relative difference of static activation
scales, the SQNR of each quantized model's logits against the CPU-quantized
model's (all evaluated on the CPU with the reference path), peak GPU memory,
and time. Needs a CUDA device::

    python bench/gpu_pipeline.py [--results DIR]

Writes DIR/gpu_pipeline.{json,md} (default bench/results/gpu/).
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from common import RESULTS, machine, sqnr_db


def build_model(hidden: int, layers: int, vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                      max_position_embeddings=1024, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
            layer.input_layernorm.weight[:4] *= 30
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
            layer.post_attention_layernorm.weight[4:8] *= 300
    return model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--results", default=str(RESULTS / "gpu"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")

    import fptq
    from fptq.methods import method_config

    model = build_model(args.hidden, args.layers, args.vocab)
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, args.vocab, (args.nsamples, args.seqlen), generator=g)
    test = torch.randint(0, args.vocab, (4, args.seqlen), generator=g)
    config = method_config("fptq", group_size=128)

    runs = {}
    logits = {}
    plans = {}
    for name, device, offload in (("cpu", "cpu", False), ("cuda", "cuda", False), ("cuda+offload", "cuda", True)):
        q = copy.deepcopy(model)
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        plan = fptq.quantize(q, config, calib, device=device, offload=offload, progress=False)
        if device == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t
        q.to("cpu")
        with torch.inference_mode():
            logits[name] = q(test).logits.float()
        plans[name] = plan
        runs[name] = {"seconds": secs, "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0,
                      "counts": dict(plan.counts())}
        print(name, json.dumps(runs[name]), flush=True)

    ref_plan = plans["cpu"]
    for name in ("cuda", "cuda+offload"):
        p = plans[name]
        same = sum(p.layers[k].strategy == ref_plan.layers[k].strategy for k in ref_plan.layers)
        diffs = [abs(p.layers[k].act_scale - ref_plan.layers[k].act_scale) / ref_plan.layers[k].act_scale
                 for k in ref_plan.layers if ref_plan.layers[k].act_scale and p.layers[k].act_scale]
        runs[name].update({"strategy_agreement": f"{same}/{len(ref_plan.layers)}",
                           "max_rel_act_scale_diff": max(diffs) if diffs else 0.0,
                           "logits_sqnr_db_vs_cpu": sqnr_db(logits["cpu"], logits[name])})
    runs["cuda+offload"]["logits_equal_to_cuda"] = bool(torch.equal(logits["cuda"], logits["cuda+offload"]))

    data = {"model": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab},
            "calibration": f"{args.nsamples} x {args.seqlen} random tokens", "runs": runs,
            "gpu": torch.cuda.get_device_name(0), "machine": machine()}
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    (res / "gpu_pipeline.json").write_text(json.dumps(data, indent=2))
    lines = ["# Quantizing on the GPU: CPU vs CUDA vs CUDA with offload", "",
             f"{data['gpu']}; random LLaMA, hidden {args.hidden}, {args.layers} layers; "
             f"calibration {data['calibration']}; fptq, group 128.", "",
             "| run | seconds | peak GPU MiB | strategies as CPU | max rel. static-scale diff | logits SQNR vs CPU (dB) |",
             "|---|---|---|---|---|---|"]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['seconds']:.1f} | {r['peak_gpu_mib']:.0f} | {r.get('strategy_agreement', '-')} | "
                     f"{r.get('max_rel_act_scale_diff', 0):.2e} | {r.get('logits_sqnr_db_vs_cpu', float('inf')):.1f} |")
    lines += ["", f"CUDA with offload gives logits identical to CUDA without: {runs['cuda+offload']['logits_equal_to_cuda']}",
              "", "Reproduce: `python bench/gpu_pipeline.py`"]
    (res / "gpu_pipeline.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

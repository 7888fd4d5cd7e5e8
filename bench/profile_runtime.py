"""Where the time goes: a per-op profile of a prefill and of decode steps, for the bf16 model through
transformers (torch.profiler, self CPU time per aten op) and for fptq's runtime (wall time per stage of
``Engine.forward``, :class:`fptq.runtime.timing.StageTimer`) on a W4A8 checkpoint and on the bf16 model.

    python bench/profile_runtime.py CHECKPOINT [--prefill 512] [--decode-batch 1] [--steps 32] [--name profile]

Writes bench/results/NAME.{json,md}. Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fptq.models.loading import load_float_model
from fptq.runtime import Engine, load_for_runtime
from fptq.runtime.timing import StageTimer

from common import machine, write_results


def hf_profile(model, ids: torch.Tensor, steps: int) -> dict:
    """self CPU ms per aten op: one prefill of ``ids``, then ``steps`` decode steps."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import DynamicCache

    out = {}
    with torch.inference_mode():
        for phase in ("prefill", "decode"):
            cache = DynamicCache(config=model.config)
            nxt = model(ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
            if phase == "prefill":
                cache = DynamicCache(config=model.config)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t = time.perf_counter()
                if phase == "prefill":
                    model(ids, cache=cache, use_cache=True, logits_to_keep=1)
                else:
                    for _ in range(steps):
                        nxt = model(nxt, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
                wall = time.perf_counter() - t
            n = 1 if phase == "prefill" else steps
            ops = {e.key: e.self_cpu_time_total / 1e3 / n for e in prof.key_averages()}
            top = dict(sorted(ops.items(), key=lambda kv: -kv[1])[:12])
            out[phase] = {"wall_ms": wall * 1e3 / n, "ops_ms": top}
    return out


def engine_profile(engine: Engine, ids: torch.Tensor, steps: int) -> dict:
    out = {}
    for phase in ("prefill", "decode"):
        cache = engine.new_cache(ids.shape[0], ids.shape[1] + steps + 1)
        timer = StageTimer()
        if phase == "prefill":
            t = time.perf_counter()
            timer.start()
            engine.forward(ids, cache, timer=timer)
            n = 1
        else:
            nxt = engine.forward(ids, cache).argmax(-1, keepdim=True)
            t = time.perf_counter()
            for _ in range(steps):
                timer.start()
                nxt = engine.forward(nxt, cache, timer=timer).argmax(-1, keepdim=True)
            n = steps
        wall = time.perf_counter() - t
        out[phase] = {"wall_ms": wall * 1e3 / n,
                      "ops_ms": dict(sorted(((k, v * 1e3 / n) for k, v in timer.seconds.items()), key=lambda kv: -kv[1]))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--float-model", default=None)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode-batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--name", default="profile")
    args = ap.parse_args()
    report = json.loads((Path(args.checkpoint) / "quantize_report.json").read_text())
    src = args.float_model or report.get("source_model")
    fmodel, _, _ = load_float_model(src, dtype=torch.bfloat16)
    vocab = fmodel.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.decode_batch, args.prefill), generator=g)
    feng = Engine(fmodel)
    feng.forward(ids[:, :64], feng.new_cache(ids.shape[0], 64))  # warm-up
    rows = {"bf16 (transformers)": hf_profile(fmodel, ids, args.steps),
            "bf16 (fptq runtime)": engine_profile(feng, ids, args.steps)}
    q = Engine(load_for_runtime(args.checkpoint))
    q.forward(ids[:, :64], q.new_cache(ids.shape[0], 64))
    rows["W4A8 (fptq runtime)"] = engine_profile(q, ids, args.steps)
    md = [f"Profile: prefill of {args.decode_batch} x {args.prefill} tokens (per forward) and decode at batch "
          f"{args.decode_batch} (per step, mean of {args.steps} steps after that prompt); {torch.get_num_threads()} "
          "threads. transformers rows: self CPU time per aten op (torch.profiler, top 12; profiling adds overhead). "
          "Runtime rows: wall time per stage of Engine.forward.", ""]
    for name, r in rows.items():
        for phase in ("prefill", "decode"):
            md += [f"### {name}, {phase}: {r[phase]['wall_ms']:.2f} ms", "", "| op / stage | ms | share |", "|---|---|---|"]
            tot = r[phase]["wall_ms"]
            md += [f"| {k} | {v:.3f} | {100 * v / tot:.1f}% |" for k, v in r[phase]["ops_ms"].items()]
            md.append("")
    write_results(args.name, {"settings": vars(args), "machine": machine(), "rows": rows}, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()

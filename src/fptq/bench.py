"""``fptq bench``: end-to-end speed and memory of a W4A8 checkpoint against the
float model, measured in one process with interleaved repeats (ratios matter,
absolute times on shared machines do not)."""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from .errors import FptqError


def tensor_bytes(model) -> int:
    """Bytes of the model's parameters, buffers and kernel caches (tied tensors once)."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    for m in model.modules():
        cache = getattr(m, "_cache", None)
        if isinstance(cache, dict):
            for v in cache.values():
                vals = v if isinstance(v, (tuple, list)) else (v,)
                tensors += [t for t in vals if isinstance(t, torch.Tensor)]
    for t in tensors:
        key = (t.data_ptr(), t.numel())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def time_prefill(model, ids: torch.Tensor) -> float:
    _sync(ids.device)
    t = time.perf_counter()
    model(ids, use_cache=False)
    _sync(ids.device)
    return time.perf_counter() - t


@torch.inference_mode()
def time_decode(model, batch: int, steps: int, vocab: int, device, prompt_len: int = 32) -> float:
    """Seconds for ``steps`` single-token steps with a KV cache (after a short prefill)."""
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=g).to(device)
    cache = DynamicCache()
    import inspect

    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(ids, use_cache=True, **{cache_kw: cache})
    nxt = out.logits[:, -1:].argmax(-1)
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        out = model(nxt, use_cache=True, **{cache_kw: cache})
        nxt = out.logits[:, -1:].argmax(-1)
    _sync(device)
    return time.perf_counter() - t


def _stats(xs: list[float]) -> dict[str, float]:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def run_bench(variants: dict[str, Any], vocab: int, device: str, prefill: list[int], decode_batches: list[int],
              decode_steps: int, repeats: int, progress: bool = True) -> dict[str, Any]:
    """Interleaved timings of every variant; returns per-variant stats and ratios to the first variant."""
    tasks = [("prefill", n) for n in prefill] + [("decode", b) for b in decode_batches]
    raw: dict[str, dict[str, list[float]]] = {v: {f"{k}_{n}": [] for k, n in tasks} for v in variants}
    g = torch.Generator().manual_seed(0)
    inputs = {n: torch.randint(0, vocab, (1, n), generator=g).to(device) for n in prefill}
    for model in variants.values():  # warm-up (kernel caches, allocator)
        time_prefill(model, inputs[prefill[0]][:, :64])
        time_decode(model, 1, 2, vocab, device)
    total = repeats * len(tasks) * len(variants)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="bench", unit="run")
    for _ in range(repeats):
        for kind, n in tasks:
            for name, model in variants.items():
                if kind == "prefill":
                    raw[name][f"prefill_{n}"].append(n / time_prefill(model, inputs[n]))
                else:
                    raw[name][f"decode_{n}"].append(n * decode_steps / time_decode(model, n, decode_steps, vocab, device))
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    base = next(iter(variants))
    results = {}
    for name in variants:
        results[name] = {"tokens_per_s": {k: _stats(v) for k, v in raw[name].items()},
                         "speedup_vs_" + base: {k: statistics.median(v) / statistics.median(raw[base][k])
                                                for k, v in raw[name].items()},
                         "tensor_bytes": tensor_bytes(variants[name])}
    return results


def markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    names = list(results)
    base = names[0]
    keys = list(results[base]["tokens_per_s"])
    lines = [f"# fptq bench: {meta.get('checkpoint')}", "",
             f"device {meta['device']}, torch {meta['torch']}, threads {meta['threads']}, repeats {meta['repeats']}, "
             f"decode steps {meta['decode_steps']}; tokens/s median (min-max), interleaved", "",
             "| variant | " + " | ".join(keys) + " | memory (tensors) |", "|---|" + "---|" * (len(keys) + 1)]
    for n in names:
        cells = [f"{s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f})" for s in results[n]["tokens_per_s"].values()]
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {results[n]['tensor_bytes'] / 2**20:.0f} MiB |")
    lines += ["", f"Speed-up vs {base} (ratio of medians):", "", "| variant | " + " | ".join(keys) + " |",
              "|---|" + "---|" * len(keys)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{v:.2f}x" for v in results[n]["speedup_vs_" + base].values()) + " |")
    if meta.get("checkpoint_bytes"):
        bpw = meta.get("bits_per_weight")
        lines += ["", f"checkpoint size: {meta['checkpoint_bytes'] / 2**20:.1f} MiB"
                  + (f" ({bpw:.3f} bits per quantized weight incl. scales)" if bpw else "")]
    return "\n".join(lines) + "\n"


def cmd_bench(args) -> int:
    from .io import PLAN_NAME, REPORT_NAME, load
    from .models.loading import load_float_model

    out = Path(args.checkpoint)
    if not (out / PLAN_NAME).is_file():
        raise FptqError(f"{out} is not an fptq checkpoint (no {PLAN_NAME}); run fptq quantize first")
    report = json.loads((out / REPORT_NAME).read_text()) if (out / REPORT_NAME).is_file() else {}
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    float_src = args.float_model or report.get("source_model")
    fmodel, _, _ = load_float_model(float_src)
    variants: dict[str, Any] = {}
    if device == "cpu":
        variants["fp32"] = fmodel.float().to(device).eval()
        if not args.no_bf16:
            bf, _, _ = load_float_model(float_src, dtype=torch.bfloat16)
            variants["bf16"] = bf.to(device).eval()
    else:
        variants["fp16"] = fmodel.half().to(device).eval()
    qdtype = torch.float32 if device == "cpu" else torch.float16
    q = load(out, device=device, backend=args.backend).to(qdtype)
    variants[f"w4a8 ({args.backend})"] = q
    for extra in args.compare or []:
        variants[Path(extra).name] = load(extra, device=device, backend=args.backend).to(qdtype)
    meta = {"checkpoint": str(out), "device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "repeats": args.repeats, "decode_steps": args.decode_steps,
            "checkpoint_bytes": sum(p.stat().st_size for p in out.iterdir() if p.is_file()),
            "bits_per_weight": report.get("sizes", {}).get("bits_per_weight")}
    vocab = q.config.vocab_size
    res = run_bench(variants, vocab, device, args.prefill, args.decode_batch, args.decode_steps, args.repeats)
    md = markdown(res, meta)
    print(md)
    if args.out:
        od = Path(args.out)
        od.mkdir(parents=True, exist_ok=True)
        (od / f"{args.name}.json").write_text(json.dumps({"meta": meta, "results": res}, indent=2))
        (od / f"{args.name}.md").write_text(md)
        print(f"wrote {od / args.name}.json and .md")
    return 0


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def register(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="prefill/decode speed and memory of a checkpoint vs the float model")
    b.add_argument("checkpoint", help="fptq output directory")
    b.add_argument("--float-model", default=None, help="float baseline (default: the checkpoint's source_model)")
    b.add_argument("--compare", nargs="*", help="other fptq checkpoints to time in the same run (e.g. W8A8, W4A16)")
    b.add_argument("--backend", default="auto", help="QuantLinear backend (default auto)")
    b.add_argument("--prefill", type=_ints, default=[512, 2048], help="prompt lengths (default 512,2048)")
    b.add_argument("--decode-batch", type=_ints, default=[1, 16], help="decode batch sizes (default 1,16)")
    b.add_argument("--decode-steps", type=int, default=32)
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--no-bf16", action="store_true", help="skip the bf16 baseline on CPU")
    b.add_argument("--device", default=None)
    b.add_argument("-o", "--out", default=None, help="directory for JSON and Markdown results")
    b.add_argument("--name", default="e2e_bench")
    b.set_defaults(func=cmd_bench)

"""``fptq bench``: the seed's Table 2 for the model at hand -- tokens/s of W4A8 (fptq) against the float model
a user would run (bf16 on a CPU with fast bf16, fp32 on other CPUs such as AVX2 ones, fp16 on a GPU), W8A8
(SmoothQuant) and W4A16 checkpoints, for prefill and decode, with the memory of each loaded model.

All variants are timed in one process with interleaved repeats (for each repeat, each task, each variant), so
that a noisy shared machine affects them alike; the table reports medians and ratios of medians to the float
baseline. Quantized checkpoints run on fptq's runtime (:mod:`fptq.runtime`) where it supports the
architecture, else through transformers with fptq's kernels; on a GPU, through transformers' forward on a
static KV cache with each decode step replayed as a CUDA graph (:mod:`fptq.runtime.graphs`; the float model
too, in its own row beside plain transformers); on the CPU the W4A8 checkpoint is also timed as
``fptq.load(OUT)`` called through transformers' forward (the runtime behind it, :mod:`fptq.runtime.hf_fast`). Rows measured elsewhere (llama.cpp, by
``bench/peer_llamacpp.py``) can be merged with ``--peer FILE``; they are marked as such.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from .errors import FptqError
from .runtime.head import HEADS

__all__ = ["run_bench", "bench_prompts", "markdown", "merge_peer", "cmd_bench", "register"]


def _stats(xs: list[float]) -> dict[str, float]:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "n": len(xs)}


def task_names(prefill: list[int], decode_batches: list[int]) -> list[str]:
    return [f"prefill_{n}" for n in prefill] + [f"decode_b{b}" for b in decode_batches]


def bench_prompts(vocab: int, prefill: list[int], decode_batches: list[int], prompt_len: int):
    """The random token prompts every variant (and ``bench/peer_llamacpp.py``) gets: ``{n: [1, n]}`` for
    prefill, ``{b: [b, prompt_len]}`` for decode (seed 0)."""
    g = torch.Generator().manual_seed(0)
    prompts = {n: torch.randint(0, vocab, (1, n), generator=g) for n in prefill}
    dprompts = {b: torch.randint(0, vocab, (b, prompt_len), generator=g) for b in decode_batches}
    return prompts, dprompts


def run_bench(runners: dict[str, Any], vocab: int, prefill: list[int], decode_batches: list[int], steps: int,
              prompt_len: int, repeats: int, progress: bool = True) -> dict[str, Any]:
    """Tokens/s of every runner on every task (see :mod:`fptq.runtime.timing`), interleaved ``repeats`` times;
    ratios to the first runner."""
    prompts, dprompts = bench_prompts(vocab, prefill, decode_batches, prompt_len)
    for r in runners.values():  # warm-up: kernel builds, weight repacking, allocator
        r.prefill(prompts[prefill[0]][:, :64] if prefill else dprompts[decode_batches[0]][:1, :64])
        r.decode(dprompts[decode_batches[0]][:1, :16] if decode_batches else prompts[prefill[0]][:, :16], 2)
    tasks = task_names(prefill, decode_batches)
    raw: dict[str, dict[str, list[float]]] = {v: {t: [] for t in tasks} for v in runners}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=repeats * len(tasks) * len(runners), desc="bench", unit="run")
    for _ in range(repeats):
        for task in tasks:
            kind, n = task.split("_")
            for name, r in runners.items():
                if kind == "prefill":
                    raw[name][task].append(int(n) / r.prefill(prompts[int(n)]))
                else:
                    b = int(n[1:])
                    raw[name][task].append(b * steps / r.decode(dprompts[b], steps))
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    base = next(iter(runners))
    out = {}
    for name, r in runners.items():
        med = {t: statistics.median(v) for t, v in raw[name].items()}
        out[name] = {"tokens_per_s": {t: _stats(v) for t, v in raw[name].items()},
                     "ratio_vs_baseline": {t: med[t] / statistics.median(raw[base][t]) for t in tasks},
                     "memory": r.memory(), "path": getattr(r, "path", "")}
    return out


def merge_peer(results: dict[str, Any], peer: dict[str, Any]) -> None:
    """Add rows measured by another process (``bench/peer_llamacpp.py``) with ratios to this run's baseline."""
    base = next(iter(results))
    for name, row in peer.get("results", {}).items():
        tps = row["tokens_per_s"]
        ratio = {t: s["median"] / results[base]["tokens_per_s"][t]["median"]
                 for t, s in tps.items() if t in results[base]["tokens_per_s"]}
        results[name] = {"tokens_per_s": tps, "ratio_vs_baseline": ratio, "memory": row.get("memory", {}),
                         "path": row.get("path", "peer"), "separate_process": True}


def _cell(row: dict[str, Any], task: str) -> str:
    s = row["tokens_per_s"].get(task)
    if s is None:
        return "—"
    r = row["ratio_vs_baseline"].get(task)
    return f"{s['median']:.1f} ({r:.2f}x)" if r is not None else f"{s['median']:.1f}"


def markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    names = list(results)
    base = names[0]
    tasks = meta["tasks"]
    lines = [f"# fptq bench: {meta['model']}", "",
             f"device {meta['device']}, torch {meta['torch']}, {meta['threads']} threads, {meta['repeats']} interleaved "
             f"repeats; decode: {meta['decode_steps']} new tokens after a {meta['prompt_len']}-token prompt per "
             f"sequence. Tokens/s, median (ratio to {base})."
             + (f" CPU kernels: {meta['cpu_kernels']}." if meta.get("cpu_kernels") and meta["device"] == "cpu" else ""),
             "",
             "| variant | " + " | ".join(tasks) + " | Linear weights | model |",
             "|---|" + "---|" * (len(tasks) + 2)]
    for n in names:
        mem = results[n].get("memory", {})
        lw, mb = mem.get("linear_weight_bytes"), mem.get("model_bytes")
        lin = f"{lw / 2**20:.1f} MiB ({lw / results[base]['memory']['linear_weight_bytes']:.2f}x)" if lw else "—"
        mod = f"{mb / 2**20:.0f} MiB" if mb else "—"
        tag = " †" if results[n].get("separate_process") else ""
        lines.append(f"| {n}{tag} | " + " | ".join(_cell(results[n], t) for t in tasks) + f" | {lin} | {mod} |")
    w4a8 = next((n for n in names if n.startswith("W4A8")), None)
    if w4a8:
        lines += ["", f"{w4a8}: speed-up over each row (ratio of medians)", "",
                  "| over | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for n in names:
            if n == w4a8:
                continue
            cells = []
            for t in tasks:
                a, b = results[w4a8]["tokens_per_s"].get(t), results[n]["tokens_per_s"].get(t)
                cells.append(f"{a['median'] / b['median']:.2f}x" if a and b else "—")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    if any(r.get("separate_process") for r in results.values()):
        lines += ["", "† measured by another process (its own venv) right after this run, same prompts, threads "
                      "and token counts; ratios are to this run's baseline."]
    paths = {n: r.get("path") for n, r in results.items() if r.get("path")}
    if paths:
        lines += ["", "Paths: " + "; ".join(f"{n}: {p}" for n, p in paths.items())]
    return "\n".join(lines) + "\n"


def chart(results: dict[str, Any], tasks: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(1.6 * len(tasks) + 3, 4))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        vals = [results[n]["ratio_vs_baseline"].get(t, 0) for t in tasks]
        ax.bar([j + i * width for j in range(len(tasks))], vals, width, label=n)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks)
    ax.set_ylabel(f"tokens/s relative to {names[0]}")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


_KV = {"bf16": torch.bfloat16, "int8": torch.int8, "fp32": torch.float32}


def _gpu_linears(model) -> str:
    """What multiplies a quantized model's Linears off the CPU (the Triton backend's paths), for the table."""
    from .kernels.triton_perchannel import w8a8_perchannel
    from .nn import QuantLinear

    kinds = set()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            if m.act_mode == "none":
                kinds.add("Triton W4A16 kernel (16-bit activations, the packed codes on tensor cores)")
            elif w8a8_perchannel(m):
                kinds.add("int8 per-channel GEMM")
            else:
                kinds.add("Triton W4A8 kernels")
    return " + ".join(sorted(kinds)) or "no quantized Linears"


def _runner(model, device: str, runtime: bool, quantized: bool, kv: str = "bf16", head: str = "auto"):
    """fptq's runtime where asked and possible, else the transformers forward."""
    from .runtime import engine_unsupported_reason
    from .runtime.timing import EngineRunner, HFRunner, StaticRunner

    kernels = ("fptq kernels" if device == "cpu" else _gpu_linears(model)) if quantized else ""
    what = "transformers forward" + (f" + {kernels}" if kernels else "")
    if runtime and device == "cpu" and engine_unsupported_reason(model) is None:
        r = EngineRunner(model, kv_dtype=_KV[kv], head=head)
        kinds = ", ".join(f"{k} x{v}" for k, v in r.engine.linear_kinds().items())
        r.path = f"fptq runtime ({kinds}; {kv} KV cache; {r.engine.head.label} head)"
        return r
    if runtime and device != "cpu":  # the GPU path: static KV cache, decode steps as CUDA graphs
        return StaticRunner(model, what=what)
    r = HFRunner(model)
    r.path = what
    return r


def _api_runner(path, backend: str, head: str = "auto", device: str = "cpu"):
    """The model ``fptq.load`` returns, called as any transformers model (``model(ids, cache=...)``): fptq's
    runtime behind transformers' forward where it attaches (:mod:`fptq.runtime.hf_fast` on the CPU,
    :mod:`fptq.runtime.hf_graph`'s static cache and CUDA graphs on a GPU)."""
    from .runtime.hf_fast import load, uses_runtime
    from .runtime.hf_graph import uses_graph_runtime
    from .runtime.timing import HFRunner

    model = load(path, device=device, backend=backend, head=head)
    r = HFRunner(model)
    if uses_runtime(model):
        r.path = "transformers forward on fptq's runtime"
    elif uses_graph_runtime(model):
        r.path = ("transformers forward + fptq kernels on a static KV cache, decode steps through fptq's fused step "
                  "(where the model allows it) as CUDA graphs")
    else:
        r.path = "transformers forward + fptq kernels"
    return r


def baseline_dtype(device: torch.device) -> torch.dtype:
    """The float format a user runs on ``device``, the baseline of the table: fp16 on a GPU, bf16 on a CPU with
    fast bf16 matrix products (AVX-512 BF16, AMX), else fp32 (on an AVX2 CPU bf16 is emulated, slower than fp32)."""
    from .kernels import fast_bfloat16

    if device.type != "cpu":
        return torch.float16
    return torch.bfloat16 if fast_bfloat16(device) else torch.float32


def cmd_bench(args) -> int:
    from .io import PLAN_NAME, REPORT_NAME
    from .models.loading import load_float_model
    from .runtime.loading import load_for_runtime

    out = Path(args.checkpoint)
    if not (out / PLAN_NAME).is_file():
        raise FptqError(f"{out} is not an fptq checkpoint (no {PLAN_NAME}); run fptq quantize first")
    for extra in (args.w8a8, args.w4a16):
        if extra and not (Path(extra) / PLAN_NAME).is_file():
            raise FptqError(f"{extra} is not an fptq checkpoint (no {PLAN_NAME}); quantize it with "
                            "--method smoothquant-w8a8 / rtn-w4a16 first")
    report = json.loads((out / REPORT_NAME).read_text()) if (out / REPORT_NAME).is_file() else {}
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    float_src = args.float_model or report.get("source_model")
    base_dtype = baseline_dtype(torch.device(device))
    fmodel, _, _ = load_float_model(float_src, dtype=base_dtype)
    fmodel = fmodel.to(device)
    base_label = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[base_dtype]
    runners: dict[str, Any] = {f"{base_label} (transformers)": _runner(fmodel, device, False, False)}
    if not args.no_runtime_bf16:  # the float model on fptq's runtime (CPU) / static cache + CUDA graphs (GPU)
        runners[f"{base_label} (fptq runtime)"] = _runner(fmodel, device, True, False)
    for label, path in (("W4A8 (fptq)", out), ("W8A8 (fptq, SmoothQuant)", args.w8a8), ("W4A16 (fptq)", args.w4a16)):
        if path:
            model = load_for_runtime(path, device=device, backend=args.backend)
            runners[label] = _runner(model, device, not args.no_runtime, True, args.kv_cache, args.head)
            if label.startswith("W4A8") and args.int8_kv_row and args.kv_cache != "int8":
                runners["W4A8 (fptq, int8 KV cache)"] = _runner(model, device, not args.no_runtime, True, "int8",
                                                                args.head)
            if label.startswith("W4A8") and args.stored_head_row and args.head != "stored":
                runners["W4A8 (fptq, stored head)"] = _runner(model, device, not args.no_runtime, True,
                                                              args.kv_cache, "stored")
            if label.startswith("W4A8") and not args.no_api_row:
                runners["W4A8 (fptq.load, transformers API)"] = _api_runner(path, args.backend, args.head, device)
    vocab = fmodel.config.vocab_size
    results = run_bench(runners, vocab, args.prefill, args.decode_batch, args.decode_steps, args.prompt_len,
                        args.repeats)
    for peer in args.peer or []:
        merge_peer(results, json.loads(Path(peer).read_text()))
    from .kernels import native

    meta = {"model": str(float_src or "default model"), "checkpoint": str(out), "device": device,
            "baseline": base_label, "cpu_kernels": native.isa() or f"none ({native.unavailable_reason()})",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": args.repeats,
            "decode_steps": args.decode_steps, "prompt_len": args.prompt_len,
            "tasks": task_names(args.prefill, args.decode_batch), "w8a8": args.w8a8, "w4a16": args.w4a16}
    md = markdown(results, meta)
    print(md)
    if args.out:
        od = Path(args.out)
        od.mkdir(parents=True, exist_ok=True)
        (od / f"{args.name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        (od / f"{args.name}.md").write_text(md)
        chart(results, meta["tasks"], od / f"{args.name}.png", f"{Path(meta['model']).name}: speed vs {base_label}")
        print(f"wrote {od / args.name}.json, .md and .png")
    return 0


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def register(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="speed table: W4A8 vs the float model, W8A8 and W4A16 (prefill, decode, memory)",
                       description=__doc__.split("\n\n")[0])
    b.add_argument("checkpoint", help="fptq W4A8 checkpoint (fptq quantize output)")
    b.add_argument("--w8a8", default=None, help="a smoothquant-w8a8 checkpoint of the same model to time too")
    b.add_argument("--w4a16", default=None, help="a rtn-w4a16 (or gptq-w4a16) checkpoint of the same model to time too")
    b.add_argument("--float-model", default=None, help="float baseline (default: the checkpoint's source_model), run in bf16 on CPUs with fast bf16, "
                        "fp32 on other CPUs, fp16 on GPUs")
    b.add_argument("--no-runtime-bf16", action="store_true",
                   help="skip the float model on fptq's runtime (shows what the runtime alone brings; on a GPU: on a "
                        "static KV cache with CUDA-graph decode steps)")
    b.add_argument("--no-runtime", action="store_true",
                   help="time the quantized checkpoints through transformers' forward instead of fptq's runtime (on "
                        "a GPU: its DynamicCache and eager steps instead of the static cache and CUDA graphs)")
    b.add_argument("--kv-cache", choices=sorted(_KV), default="bf16",
                   help="KV cache of the fptq runtime rows (default bf16, what the bf16 model caches)")
    b.add_argument("--int8-kv-row", action="store_true", help="also time the W4A8 checkpoint with an int8 KV cache")
    b.add_argument("--head", choices=HEADS, default="auto",
                   help="the runtime's output head for the quantized checkpoints: auto (requantized to int8 at load "
                        "while decoding, half the bytes per token), int8 (every call) or stored (the checkpoint's "
                        "16-bit head); default auto")
    b.add_argument("--stored-head-row", action="store_true",
                   help="also time the W4A8 checkpoint on the runtime with its stored 16-bit head")
    b.add_argument("--no-api-row", action="store_true",
                   help="skip the row of the W4A8 checkpoint through the transformers API (fptq.load(OUT) called "
                        "as any transformers model; on a GPU its static KV cache and CUDA graphs)")
    b.add_argument("--peer", nargs="*", help="JSON rows measured elsewhere (bench/peer_llamacpp.py) to merge")
    b.add_argument("--backend", default="auto", help="QuantLinear backend where the runtime is not used (default auto)")
    b.add_argument("--prefill", type=_ints, default=[512, 2048], help="prompt lengths (default 512,2048)")
    b.add_argument("--decode-batch", type=_ints, default=[1, 16, 64], help="decode batch sizes (default 1,16,64)")
    b.add_argument("--decode-steps", type=int, default=128, help="new tokens per decode measurement (default 128)")
    b.add_argument("--prompt-len", type=int, default=512, help="prompt before decoding (default 512)")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    b.add_argument("--device", default=None)
    b.add_argument("-o", "--out", default=None, help="directory for JSON, Markdown and PNG results")
    b.add_argument("--name", default="speed")
    b.set_defaults(func=cmd_bench)

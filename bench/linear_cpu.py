"""CPU micro-benchmark: W4A8 QuantLinear (CPU integer backends) vs nn.Linear.

For each (M, K, N) it times, with interleaved repeats (each repeat runs every
variant once, in a rotated order, so drift hits all variants alike):

* ``fp32``: ``nn.Linear`` in float32 (the baseline of the ratios);
* ``bf16``: ``nn.Linear`` in bfloat16 (oneDNN / AMX);
* ``w4a8_pc_static`` / ``w4a8_pc_dynamic``: backend ``int8_perchannel``,
  static per-tensor / dynamic per-token activations;
* ``w4a8_grp_static`` / ``w4a8_grp_dynamic``: backend ``int8_grouped``.

W4A8 timings are whole ``QuantLinear.forward`` calls (activation quantization
+ integer GEMM + epilogue) on float32 inputs, with the weight caches built
during warm-up.  Writes ``bench/results/linear_cpu.json`` and ``.md``.

    PYTHONPATH=src python bench/linear_cpu.py [--quick] [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from fptq.nn import QuantLinear  # noqa: E402
from fptq.quant import quantize_weight, weight_scales  # noqa: E402

BIG = [(4096, 4096)]
MODEL = [(576, 576), (576, 1536), (1536, 576)]  # the default model's projections
MS = (1, 16, 512, 2048)
VARIANTS = ("fp32", "bf16", "w4a8_pc_static", "w4a8_pc_dynamic", "w4a8_grp_static", "w4a8_grp_dynamic")


def make_variants(k: int, n: int, group_size: int):
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=True)
    lin_bf16 = torch.nn.Linear(k, n, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        lin_bf16.weight.copy_(lin.weight)
        lin_bf16.bias.copy_(lin.bias)
    w = lin.weight.detach()
    s = weight_scales(w, 4, group_size)
    q = quantize_weight(w, s, 4, group_size)
    mods = {}
    for backend, tag in (("int8_perchannel", "pc"), ("int8_grouped", "grp")):
        for mode, mtag in (("static_tensor", "static"), ("dynamic_token", "dynamic")):
            m = QuantLinear.from_codes(
                q, s, wbits=4, group_size=group_size, abits=8, act_mode=mode, act_scale=0.05,
                bias=lin.bias.detach(),
            )
            mods[f"w4a8_{tag}_{mtag}"] = m.set_backend(backend)
    return lin, lin_bf16, mods


def reps_for(m: int, k: int, n: int) -> int:
    flops = 2 * m * k * n
    if flops >= 2 * 2048 * 4096 * 4096:
        return 5
    if flops >= 2 * 512 * 4096 * 4096:
        return 9
    return 25


@torch.inference_mode()
def bench_shape(m: int, k: int, n: int, group_size: int) -> dict:
    lin, lin_bf16, mods = make_variants(k, n, group_size)
    x = torch.randn(m, k)
    xb = x.to(torch.bfloat16)
    fns = {
        "fp32": lambda: lin(x),
        "bf16": lambda: lin_bf16(xb),
        **{name: (lambda mod=mod: mod(x)) for name, mod in mods.items()},
    }
    for f in fns.values():  # warm-up (builds the kernels' weight caches)
        f()
        f()
    times = {name: [] for name in fns}
    names = list(fns)
    reps = reps_for(m, k, n)
    inner = max(1, int(2e7 // max(1, 2 * m * k * n)))  # batch tiny calls
    inner = min(inner, 50)
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            f = fns[name]
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            times[name].append((time.perf_counter() - t0) / inner * 1e3)
    out = {"M": m, "K": k, "N": n, "group_size": group_size, "repeats": reps, "calls_per_repeat": inner, "ms": {}}
    for name, ts in times.items():
        out["ms"][name] = {"min": min(ts), "median": statistics.median(ts), "max": max(ts)}
    base = out["ms"]["fp32"]["median"]
    out["speedup_vs_fp32"] = {name: base / v["median"] for name, v in out["ms"].items()}
    out["speedup_vs_bf16"] = {
        name: out["ms"]["bf16"]["median"] / v["median"] for name, v in out["ms"].items()
    }
    return out


def write_md(results: dict, path: str) -> None:
    lines = [
        "# W4A8 linear on CPU vs nn.Linear",
        "",
        f"- CPU: {results['env']['cpu']}, torch threads: {results['env']['threads']}, torch {results['env']['torch']}",
        f"- load average (1/5/15 min) at start {results['env'].get('loadavg_start')}, at end "
        f"{results['env'].get('loadavg_end')} on {results['env'].get('cores')} cores (other jobs share this machine)",
        "- times: median ms per call (min-max) over interleaved repeats; ratio = fp32 median / variant median",
        "- W4A8 = whole QuantLinear.forward (activation quantization + int8 GEMM + epilogue), float32 in/out;",
        "  `pc` = backend int8_perchannel, `grp` = backend int8_grouped (exact group-wise)",
        "",
    ]
    hdr = "| M | K | N | gs | " + " | ".join(VARIANTS) + " |"
    lines += [hdr, "|" + "---|" * (4 + len(VARIANTS))]
    for r in results["results"]:
        cells = []
        for v in VARIANTS:
            t = r["ms"][v]
            cells.append(f"{t['median']:.3g} ({t['min']:.3g}-{t['max']:.3g})")
        lines.append(f"| {r['M']} | {r['K']} | {r['N']} | {r['group_size']} | " + " | ".join(cells) + " |")
    lines += ["", "## Speed-up vs fp32 nn.Linear (median ratio)", ""]
    lines += [hdr, "|" + "---|" * (4 + len(VARIANTS))]
    for r in results["results"]:
        cells = [f"{r['speedup_vs_fp32'][v]:.2f}x" for v in VARIANTS]
        lines.append(f"| {r['M']} | {r['K']} | {r['N']} | {r['group_size']} | " + " | ".join(cells) + " |")
    lines += ["", "## Speed-up vs bf16 nn.Linear (median ratio)", ""]
    lines += [hdr, "|" + "---|" * (4 + len(VARIANTS))]
    for r in results["results"]:
        cells = [f"{r['speedup_vs_bf16'][v]:.2f}x" for v in VARIANTS]
        lines.append(f"| {r['M']} | {r['K']} | {r['N']} | {r['group_size']} | " + " | ".join(cells) + " |")
    h = results.get("headline")
    if h:
        lines += [
            "",
            "## Target",
            "",
            f"M=512, K=N=4096: best W4A8 variant `{h['best_variant']}` is {h['best_ratio']:.2f}x faster than fp32 "
            f"nn.Linear (median ratio; target >= 2.5x: {'met' if h['met'] else 'NOT met'}).",
        ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--quick", action="store_true", help="only M=1,16 and the small shapes")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (0: torch's default); 1 is steadier on a shared machine")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    env = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, "python": sys.version.split()[0],
           "loadavg_start": list(os.getloadavg()), "cores": os.cpu_count()}
    shapes = [(k, n, 128) for k, n in BIG] + [(k, n, 64) for k, n in MODEL]
    ms = (1, 16) if args.quick else MS
    results = []
    for k, n, gs in shapes:
        for m in ms:
            if args.quick and k >= 4096:
                continue
            r = bench_shape(m, k, n, gs)
            results.append(r)
            print(
                f"M={m:5d} K={k:5d} N={n:5d}: fp32 {r['ms']['fp32']['median']:.3f} ms | "
                + " | ".join(f"{v} {r['speedup_vs_fp32'][v]:.2f}x" for v in VARIANTS[1:]),
                flush=True,
            )
    env["loadavg_end"] = list(os.getloadavg())
    out = {"env": env, "results": results}
    target = [r for r in results if r["M"] == 512 and r["K"] == 4096 and r["N"] == 4096]
    if target:
        sp = {v: target[0]["speedup_vs_fp32"][v] for v in VARIANTS if v.startswith("w4a8")}
        best = max(sp, key=sp.get)
        out["headline"] = {
            "shape": "M=512, K=N=4096",
            "speedup_vs_fp32": sp,
            "best_variant": best,
            "best_ratio": sp[best],
            "met": sp[best] >= 2.5,
        }
    with open(os.path.join(args.out, "linear_cpu.json"), "w") as f:
        json.dump(out, f, indent=1)
    write_md(out, os.path.join(args.out, "linear_cpu.md"))
    print(f"wrote {args.out}/linear_cpu.json and .md")


if __name__ == "__main__":
    main()

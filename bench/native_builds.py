"""The native W4A8 GEMM under each build of fptq's C kernels this CPU runs (``avx512_amx``, ``avx512_vnni``,
``avx2``), against PyTorch's bfloat16 ``F.linear`` (oneDNN; AMX tiles where the CPU has them) in the same run.

Every build is loaded side by side in one process (each library compiled as ``fptq.kernels.native`` would) and
called on the same quantized input and weights (``fptq_gemm_w4a8``: the integer product, its group scales and
the per-token scales; the input quantization, the same in every build, outside the timing). The builds' outputs
are compared bit for bit first. Interleaved repeats (each repeat runs every variant once), medians.
``--integer-scales`` adds the AVX-512/AMX build on the same codes with integer group scales (a channel base
times 1 .. 16, :mod:`fptq.quant.intscales`), where the AMX kernel sums over all of K in int32.

    python bench/native_builds.py [--ms 16,64,512,2048] [--repeats 5] [--integer-scales] [--name native_builds]

Writes ``bench/results/NAME.{json,md}``. Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import machine, write_results  # noqa: E402
from fptq.kernels import native  # noqa: E402
from fptq.kernels.native import build  # noqa: E402
from fptq.quant import pack_int4_vnni, vnni_padded_shape  # noqa: E402

# (K, N, group size): SmolLM2-135M's q/k/v, gate/up, down; Qwen2.5-0.5B's gate/up and down; a LLaMA-2-7B up
SHAPES = [(576, 960, 64), (576, 3072, 64), (1536, 576, 64), (896, 9728, 128), (4864, 896, 128),
          (4096, 11008, 128)]


def _libraries() -> dict:
    cc = build._compiler()
    libs = {}
    for b in build.BUILDS:
        if any(f not in build.cpu_flags() for f in b.requires):
            continue
        lib = ctypes.CDLL(str(build._build(cc, b)))
        build._declare(lib)
        if lib.fptq_cpu_supported():
            libs[b.isa] = lib
    return libs


def _weights(n: int, k: int, gs: int):
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    groups = -(-k // gs)
    s = (torch.rand(n, groups, generator=g) * 0.01 + 1e-3).half()
    ws = torch.zeros(groups, vnni_padded_shape(n, k)[0], dtype=torch.float16)
    ws[:, :n] = s.t()
    return pack_int4_vnni(q), ws, (q.float() * s.float().repeat_interleave(gs, 1)[:, :k]).bfloat16()


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def _time(fn, number: int) -> float:
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def interleaved_medians(calls: dict, repeats: int, number: int) -> dict:
    """Seconds per call of each of ``calls`` (name -> function): ``repeats`` rounds, each timing every call
    ``number`` times in a rotated order, medians over the rounds."""
    names = list(calls)
    times = {v: [] for v in names}
    for r in range(repeats):
        for v in names[r % len(names):] + names[:r % len(names)]:
            times[v].append(_time(calls[v], number))
    return {v: statistics.median(t) for v, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ms", default="16,64,512,2048", help="token counts")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--integer-scales", action="store_true",
                    help="also time the first build on integer group scales (its own column)")
    ap.add_argument("--name", default="native_builds")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    libs = _libraries()
    if not libs:
        sys.exit(f"no native build runs here: {native.unavailable_reason()}")
    rows = []
    for k, n, gs in SHAPES:
        p, ws, wf = _weights(n, k, gs)
        kp, groups = p.shape[1] * 8, ws.shape[0]
        gemm = native.W4A8Gemm([(p, ws, None, n)], gs)
        for m in (int(v) for v in a.ms.split(",")):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3
            xq, xs, sx = native.quantize(x, kp, "dynamic_token", None, 127, gs, groups)
            xb = x.bfloat16()
            calls, outs = {}, {}
            for isa, lib in libs.items():
                y = torch.empty(m, n)
                _, args = gemm.call(xq, xs, sx, [y], False, a.threads)
                fn = lib.fptq_gemm_w4a8
                calls[isa] = (lambda fn=fn, args=args: fn(*args))
                outs[isa] = y
                calls[isa]()
            same = all(torch.equal(outs[i], next(iter(outs.values()))) for i in outs)
            if a.integer_scales:  # the same codes, scales base * (1 .. 16): found by W4A8Gemm, the AMX int32 path
                isa, lib = next(iter(libs.items()))
                wsi = ws.clone()
                wsi[:, :n] = (torch.randint(1, 17, (groups, n), generator=torch.Generator().manual_seed(1))
                              * 2.0 ** -10).half()
                gi = native.W4A8Gemm([(p, wsi, None, n)], gs)
                assert gi.integer_scales[0] is not None
                yi = torch.empty(m, n)  # kept alive: the call holds a pointer into it
                _, args = gi.call(xq, xs, sx, [yi], False, a.threads)
                calls[f"{isa}, integer scales"] = (lambda fn=lib.fptq_gemm_w4a8, args=args, yi=yi: fn(*args))
            calls["bf16 F.linear"] = lambda: F.linear(xb, wf)
            number = max(2, min(200, int(3e8 / (m * k * n))))
            med = interleaved_medians(calls, a.repeats, number)
            rows.append({"k": k, "n": n, "group_size": gs, "m": m, "builds_bit_identical": same,
                         "ms": {v: t * 1e3 for v, t in med.items()},
                         "gmac_per_s": {v: m * k * n / t / 1e9 for v, t in med.items()}})
            print(f"K={k} N={n} gs={gs} M={m}: " + ", ".join(f"{v} {t * 1e3:.3f} ms" for v, t in med.items())
                  + ("" if same else "  OUTPUTS DIFFER"), flush=True)
    variants = list(rows[0]["ms"])
    base = variants[-1]
    md = ["# The native W4A8 GEMM per build, against bf16 `F.linear`\n",
          f"{_cpu_name()}, {a.threads} threads, {a.repeats} interleaved repeats, medians; ms per call "
          f"(ratio: {base}'s time over the variant's). Input quantization outside the timing.\n",
          "| K x N (group) | M | " + " | ".join(variants) + " | builds bit-identical |",
          "|---|---|" + "---|" * len(variants) + "---|"]
    for r in rows:
        cells = [f"{r['ms'][v]:.3f} ({r['ms'][base] / r['ms'][v]:.2f}x)" for v in variants]
        md.append(f"| {r['k']} x {r['n']} ({r['group_size']}) | {r['m']} | " + " | ".join(cells)
                  + f" | {'yes' if r['builds_bit_identical'] else '**no**'} |")
    md.append(f"\nCommand: `python bench/native_builds.py --ms {a.ms} --repeats {a.repeats}"
              f"{' --integer-scales' if a.integer_scales else ''} --name {a.name}`")
    write_results(a.name, {"machine": machine(), "cpu": _cpu_name(), "builds": list(libs), "threads": a.threads, "repeats": a.repeats, "rows": rows},
                  "\n".join(md) + "\n")


if __name__ == "__main__":
    main()

"""A prompt's causal attention on this CPU: fptq's native kernel in each build that has one (``avx512_amx``:
AMX-BF16 tiles; ``avx512_vnni``: the flash kernel with AVX512-BF16 dot products) against PyTorch's
``scaled_dot_product_attention`` on bfloat16 (oneDNN; AMX tiles where the CPU has them), what the bf16 model
runs, in the same run.

Shapes of one decoder layer: float32 queries ``[1, H, T, hd]`` (what fptq's runtime hands the kernel), a
bfloat16 KV cache ``[1, Hkv, L, hd]``; the SDPA row includes its queries' conversion to bfloat16, as in the
runtime's ``sdpa_bf16`` path. Every variant's output is checked against float32 SDPA first (SQNR). Interleaved
repeats (each repeat runs every variant once), medians.

    python bench/prefill_attention.py [--ts 512,2048] [--repeats 5] [--name prefill_attention]

Writes ``bench/results/NAME.{json,md}``. Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import machine, sqnr_db, write_results  # noqa: E402
from fptq.kernels import native  # noqa: E402
from native_builds import _cpu_name, _libraries, interleaved_medians  # noqa: E402

# (query heads, kv heads, head size): SmolLM2-135M, Qwen2.5-0.5B, LLaMA-2-7B
SHAPES = [(9, 3, 64), (14, 2, 64), (32, 32, 128)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ts", default="512,2048", help="prompt lengths")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="prefill_attention")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    libs = {isa: lib for isa, lib in _libraries().items() if hasattr(lib, "fptq_prefill_attention")
            and (isa != "avx512_amx" or lib.fptq_prefill_attention_amx())}
    if not native.available():
        sys.exit(f"no native build runs here: {native.unavailable_reason()}")
    rows = []
    for h, hkv, hd in SHAPES:
        for t in (int(v) for v in a.ts.split(",")):
            g = torch.Generator().manual_seed(t)
            q = torch.randn(1, h, t, hd, generator=g)
            kc, vc = (torch.randn(1, hkv, t + 64, hd, generator=g).bfloat16() for _ in range(2))
            k, v = kc[:, :, :t], vc[:, :, :t]
            scale = hd ** -0.5
            ref = F.scaled_dot_product_attention(q, k.float(), v.float(), is_causal=True, scale=scale, enable_gqa=True)
            work = torch.empty(native.prefill_attention_work_bytes(1, hkv, hd, t), dtype=torch.uint8)
            calls, sqnr, outs = {}, {}, {}  # outs keeps each output alive while its call (raw pointers) runs
            for isa, lib in libs.items():
                if isa != "avx512_amx" and hd not in (64, 128):
                    continue
                out = outs[isa] = torch.empty(1, h, t, hd)
                args = (q.data_ptr(), kc.data_ptr(), vc.data_ptr(), 1, None, None, 1, h, hkv, hd, kc.shape[2], 0, t,
                        scale, out.data_ptr(), 0, work.data_ptr(), a.threads)
                name = f"fptq native ({isa})"
                calls[name] = (lambda lib=lib, args=args: lib.fptq_prefill_attention(*args))
                calls[name]()
                sqnr[name] = sqnr_db(ref, out)
            calls["bf16 SDPA"] = lambda: F.scaled_dot_product_attention(q.bfloat16(), k, v, is_causal=True, scale=scale,
                                                                        enable_gqa=True)
            sqnr["bf16 SDPA"] = sqnr_db(ref, calls["bf16 SDPA"]())
            number = max(2, min(100, int(2e9 / (h * t * t * hd))))
            med = {n: t * 1e3 for n, t in interleaved_medians(calls, a.repeats, number).items()}
            rows.append({"heads": h, "kv_heads": hkv, "head_dim": hd, "tokens": t, "ms": med, "sqnr_db": sqnr})
            print(f"H={h} Hkv={hkv} hd={hd} T={t}: " + ", ".join(f"{n} {m:.3f} ms ({sqnr[n]:.1f} dB)"
                                                                 for n, m in med.items()), flush=True)
    variants = list(dict.fromkeys(n for r in rows for n in r["ms"]))
    base = "bf16 SDPA"
    md = ["# A prompt's causal attention (one layer), against PyTorch's bf16 SDPA\n",
          f"{_cpu_name()}, {a.threads} threads, {a.repeats} interleaved repeats, medians; ms per call (ratio: "
          f"{base}'s time over the variant's) and SQNR against float32 SDPA on the same bf16 keys and values.\n",
          "| heads / kv heads x head size | tokens | " + " | ".join(variants) + " |",
          "|---|---|" + "---|" * len(variants)]
    for r in rows:
        cells = [f"{r['ms'][n]:.3f} ({r['ms'][base] / r['ms'][n]:.2f}x, {r['sqnr_db'][n]:.0f} dB)" if n in r["ms"]
                 else "-" for n in variants]
        md.append(f"| {r['heads']} / {r['kv_heads']} x {r['head_dim']} | {r['tokens']} | " + " | ".join(cells) + " |")
    md.append(f"\nCommand: `python bench/prefill_attention.py --ts {a.ts} --repeats {a.repeats} --name {a.name}`")
    write_results(a.name, {"machine": machine(), "cpu": _cpu_name(), "threads": a.threads, "repeats": a.repeats,
                           "rows": rows}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()

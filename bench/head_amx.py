"""The output head of many rows (a prompt's logits at every position): fptq's AMX-BF16 head kernel
(:func:`fptq.kernels.native.head_bf16`, what the runtime's stored head runs from
:data:`fptq.runtime.head.AMX_MIN_ROWS` rows, for hidden sizes up to :data:`~fptq.runtime.head.AMX_MAX_K`) against
PyTorch's bfloat16 ``F.linear`` (oneDNN, AMX tiles) in the same run, on the head shapes of SmolLM2-135M,
Qwen2.5-Coder-0.5B and LLaMA-2-7B (random bfloat16 weights; the last one above AMX_MAX_K, run to show why).

Each call returns a new logits tensor, as a model's forward does (the time includes mapping its pages). The
outputs are compared first: the share of logits that differ and the largest difference relative to its row's
largest logit (the two products take their float32 sums in different orders). Interleaved repeats
(:func:`native_builds.interleaved_medians`), medians.

    python bench/head_amx.py [--rows 16,64,128,512,2048] [--repeats 7] [--heads NAME,...] [--name head_amx]

Writes ``bench/results/NAME.{json,md}``. Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import machine, write_results  # noqa: E402
from native_builds import _cpu_name, interleaved_medians  # noqa: E402
from fptq.kernels import native  # noqa: E402

# (name, vocabulary, hidden size)
HEADS = [("SmolLM2-135M", 49152, 576), ("Qwen2.5-Coder-0.5B", 151936, 896), ("LLaMA-2-7B", 32000, 4096)]


def largest_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest ``|a - b|`` over the rows, each relative to its row's largest ``|b|`` (the logit that matters
    most in a softmax)."""
    a, b = a.float(), b.float()
    return float(((a - b).abs().amax(1) / b.abs().amax(1).clamp_min(1e-30)).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="16,64,128,512,2048", help="rows of hidden states (positions x sequences)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--heads", default=",".join(h[0] for h in HEADS),
                    help="which of the heads (names, comma-separated)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="head_amx")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if not (native.available() and native.has_amx_head()):
        sys.exit("fptq's AMX head kernel does not run here: it needs the avx512_amx build on a CPU with AMX-BF16 "
                 f"({native.unavailable_reason() or 'native build ' + native.isa()})")
    rows = []
    for name, vocab, k in (h for h in HEADS if h[0] in a.heads.split(",")):
        w = (torch.randn(vocab, k, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
        for m in (int(v) for v in a.rows.split(",")):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).bfloat16()
            ours, theirs = native.head_bf16(x, w), F.linear(x, w)
            differ = float((ours != theirs).float().mean())
            diff = largest_difference(ours, theirs)
            del ours, theirs
            calls = {"fptq AMX head": lambda: native.head_bf16(x, w), "bf16 F.linear": lambda: F.linear(x, w)}
            med = interleaved_medians(calls, a.repeats, 1)
            rows.append({"head": name, "vocab": vocab, "k": k, "m": m, "ms": {v: t * 1e3 for v, t in med.items()},
                         "speedup": med["bf16 F.linear"] / med["fptq AMX head"], "share_differing": differ,
                         "largest_difference": diff})
            print(f"{name} {vocab} x {k}, {m} rows: fptq {med['fptq AMX head'] * 1e3:.1f} ms, F.linear "
                  f"{med['bf16 F.linear'] * 1e3:.1f} ms ({rows[-1]['speedup']:.2f}x); {differ:.2e} of the logits "
                  f"differ, by at most {diff:.1e} of the row's largest", flush=True)
    md = ["# The output head of many rows: fptq's AMX-BF16 kernel against bf16 `F.linear`\n",
          f"{_cpu_name()}, {a.threads} threads, {a.repeats} interleaved repeats, medians; ms per call, a new "
          "logits tensor each call; speed-up = F.linear's time over fptq's. Random bfloat16 weights of each "
          "model's head shape.\n",
          "| head (vocabulary x hidden) | rows | fptq AMX head | bf16 F.linear | speed-up | logits that differ | "
          "largest difference (of the row's largest logit) |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['head']} ({r['vocab']} x {r['k']}) | {r['m']} | {r['ms']['fptq AMX head']:.1f} | "
                  f"{r['ms']['bf16 F.linear']:.1f} | {r['speedup']:.2f}x | {r['share_differing']:.1e} | "
                  f"{r['largest_difference']:.1e} |")
    md.append(f"\nCommand: `python bench/head_amx.py --rows {a.rows} --repeats {a.repeats} --heads {a.heads} "
              f"--name {a.name}`")
    write_results(a.name, {"machine": machine(), "cpu": _cpu_name(), "threads": a.threads, "repeats": a.repeats,
                           "rows": rows}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()

"""What the W4A8 Triton kernels compile to for a GPU, without a GPU: instructions per weight byte of their main loop.

    python bench/gpu_sass.py [--out bench/results/gpu_sass] [--arch 90]
    python bench/gpu_sass.py --variants --out DIR   # only: does every PTX kernel variant the launchers pass compile?

Triton compiles a kernel for a named target without a device (``triton.compile`` with a ``GPUTarget``; the
triton wheel carries ``ptxas`` and ``nvdisasm``). For each decode GEMV -- the byte-wise one of
``fptq.kernels.triton_grouped`` (activations quantized in the kernel) and the dp4a one of
``fptq.kernels.triton_dp4a`` -- at LLaMA layer shapes, group sizes 128 and 64, and for the tensor-core grouped
kernel at M = 16 and 256 (its earlier forms beside it: loads masked along K, codes unpacked), with the launch
configuration and split-K plan their launchers pick and the integer arguments' divisibility a launch specializes
on, this compiles the kernel, disassembles it and finds its main loop (the one with the most integer multiply
instructions: ``IDP``, ``IMAD``, ``SGXT``; for the tensor-core kernel the loop over groups), and writes per kernel:
the loop's instruction mix, instructions per weight byte per thread (all, and those of the integer pipe),
registers, and for the GEMVs a **model** of the layer's time at M = 1 on an H200 (132 SMs at 1.98 GHz issuing 4
warp instructions per cycle, 2 on the integer pipe; 4.8 TB/s): the largest of issue, integer and memory time. A
model, not a measurement: it ignores latency, occupancy, the split-K reduction and the launch; it says whether a
kernel can be memory-bound at all. Writes ``gpu_sass.json`` and ``gpu_sass.md``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # compile the kernels, do not interpret them
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

H200 = dict(sms=132, clock_ghz=1.98, warp_issue=4, int_issue=2, bandwidth_tbs=4.8)
SHAPES = [(4096, 11008), (11008, 4096), (8192, 28672)]
INT_PIPE = re.compile(r"^(I|LOP|SHF|SGXT|PRMT|LEA|VIADD|SEL|BMSK|POPC|FLO|BREV)")


def _sass(kernel, path: str) -> tuple[str, str]:
    import triton

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with open(path, "wb") as f:
        f.write(kernel.asm["cubin"])
    sass = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", path], capture_output=True, text=True,
                          check=True).stdout
    res = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", path], capture_output=True,
                         text=True).stdout
    return sass, res


def _loops(sass: str) -> list[list[str]]:
    """The instruction lists of the backward-branch loops of ``sass``."""
    lines = sass.splitlines()
    addr_re = re.compile(r"/\*([0-9a-f]{4,})\*/")
    insts = [(int(addr_re.search(x).group(1), 16), x) for x in lines if addr_re.search(x)]
    label_at = {}
    for i, x in enumerate(lines):
        m = re.match(r"^(\.L_x_\d+):", x.strip())
        if m:
            nxt = next((y for y in lines[i + 1:] if addr_re.search(y)), None)
            if nxt:
                label_at[m.group(1)] = int(addr_re.search(nxt).group(1), 16)
    loops = []
    for a, x in insts:
        m = re.search(r"BRA\s+`\((\.L_x_\d+)\)", x)
        if m and m.group(1) in label_at and label_at[m.group(1)] < a:
            loops.append([y for b, y in insts if label_at[m.group(1)] <= b <= a])
    return loops


def _opcode(line: str) -> str:
    body = re.sub(r"^\s*/\*[0-9a-f]+\*/\s*", "", line)
    body = re.sub(r"^@!?U?P[T0-9]+\s+", "", body)
    return body.split()[0].rstrip(";")


def _main_loop(sass: str) -> dict:
    def weight(loop):
        ops = [_opcode(x) for x in loop]
        return sum(o.startswith(("IDP", "SGXT")) or o == "IMAD" for o in ops)

    loop = max(_loops(sass), key=weight)
    mix: dict[str, int] = {}
    for x in loop:
        o = _opcode(x)
        mix[o] = mix.get(o, 0) + 1
    return {"instructions": len(loop), "integer_pipe": sum(v for k, v in mix.items() if INT_PIPE.match(k)),
            "mix": dict(sorted(mix.items(), key=lambda kv: -kv[1]))}


def _compile(fn, types: dict, constexprs: dict, divisible: list[str], arch: int, num_warps: int, num_stages: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {a: types.get(a, "constexpr") for a in fn.arg_names}
    missing = [a for a in fn.arg_names if sig[a] == "constexpr" and a not in constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: no value for constexprs {missing}")
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def _try_compile(rec: dict, fn, types: dict, constexprs: dict, divisible: list, arch: int, num_warps: int,
                 num_stages: int) -> dict:
    """:func:`_compile` one kernel variant into ``rec``: ``ok``, or ``ok=False`` and the error (the variant does not
    build)."""
    try:
        _compile(fn, types, constexprs, divisible, arch, num_warps, num_stages)
        rec["ok"] = True
    except Exception as e:  # noqa: BLE001 -- recorded, not raised: the report lists every variant
        rec.update(ok=False, error=f"{e!r}"[:2000])
    return rec


def _divisible(values: dict) -> list[str]:
    """The integer arguments a launch would specialize as multiples of 16 (pointers always are here)."""
    return [a for a, v in values.items() if isinstance(v, int) and v % 16 == 0 and v != 0]


def bytewise_case(k: int, n: int, gs: int, arch: int) -> dict:
    from fptq.kernels import triton_grouped as tg
    from fptq.kernels.triton_common import _split_plan, pick_gemv_config

    cfg = pick_gemv_config(1, n, k, gs)
    bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
    g = k // gs
    splits, chunk = _split_plan(math.ceil(n / bn), 1, k, g, gs, "cpu", cfg.get("SPLIT_K"))
    ints = dict(M=1, N=n, K=k, GS=gs, CHUNK=chunk, NUNITS=g, stride_am=k, stride_bn=k // 2, stride_wsn=g,
                stride_cm=n)
    types = dict(A="*fp16", B="*u8", WS="*fp16", AS="*fp32", BIAS="*fp16", C="*fp16", P="*fp32", MT="*i8",
                 BASE="*fp32", INV_QMAX="fp32", **{a: "i32" for a in ints})
    const = dict(PER_TOKEN=True, HAS_BIAS=False, ONE_GROUP=False, TILES_PER_GROUP=gs // bk, SPLIT=splits > 1,
                 BLOCK_N=bn, BLOCK_K=bk, QUANT=True, RECIP=True, QMAX=127, BLOCK_R=min(4096, 1 << (k - 1).bit_length()),
                 INT_SCALES=False, EVEN_K=k % gs == 0)
    kern = _compile(tg._w4a8_gemv_kernel, types, const,
                    ["A", "B", "WS", "AS", "C", "P", "MT", "BASE"] + _divisible(ints), arch, cfg["num_warps"],
                    cfg["num_stages"])
    return dict(kernel=kern, bytes_per_iteration=bn * gs // 2, threads=32 * cfg["num_warps"],
                config=dict(cfg, SPLIT_K=splits))


def dp4a_case(k: int, n: int, gs: int, arch: int) -> dict:
    from fptq.kernels import triton_dp4a as td
    from fptq.kernels.triton_common import _split_plan

    cfg = td.pick_dp4a_config(1, n, k, gs)
    bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
    g = k // gs
    nunits, unit_k, gpt, tpg = td._plan(k, gs, g, bk)
    splits, chunk = _split_plan(math.ceil(n / bn), 1, k, nunits, unit_k, "cpu", cfg.get("SPLIT_K"))
    ints = dict(M=1, N=n, K=k, W=k // 8, G=g, CHUNK=chunk, NUNITS=nunits, stride_xm=k, stride_bn=k // 8,
                stride_wsn=g, stride_cm=n)
    types = dict(X="*fp16", B="*i32", WS="*fp16", AS="*fp32", BIAS="*fp16", C="*fp16", P="*fp32", MT="*i8",
                 BASE="*fp32", XW="*i32", INV_QMAX="fp32", CNT="*i32", **{a: "i32" for a in ints})
    const = dict(PER_TOKEN=True, HAS_BIAS=False, ONE_GROUP=False, INT_SCALES=False, SPLIT=splits > 1, QUANT=True,
                 RECIP=True, QMAX=127, BLOCK_R=min(4096, 1 << (k - 1).bit_length()), GPT=gpt, TPG=tpg, BLOCK_N=bn,
                 BLOCK_W=bk // 8, ASM=True, QW=128, SERIAL=splits > 1)
    kern = _compile(td._w4a8_gemv_dp4a_kernel, types, const,
                    ["X", "B", "WS", "AS", "C", "P", "MT", "BASE", "XW"] + _divisible(ints), arch,
                    cfg["num_warps"], cfg["num_stages"])
    return dict(kernel=kern, bytes_per_iteration=bn * unit_k // 2, threads=32 * cfg["num_warps"],
                config=dict(cfg, SPLIT_K=splits))


#: dp4a kernel variants (every value of every flag the launcher sets appears at least once)
DP4A_VARIANTS = [
    dict(PER_TOKEN=True, HAS_BIAS=False, ONE_GROUP=False, INT_SCALES=False, SPLIT=True, QUANT=True, GPT=1, TPG=1),
    dict(PER_TOKEN=False, HAS_BIAS=True, ONE_GROUP=False, INT_SCALES=False, SPLIT=False, QUANT=True, GPT=2, TPG=1),
    dict(PER_TOKEN=True, HAS_BIAS=True, ONE_GROUP=False, INT_SCALES=True, SPLIT=False, QUANT=True, GPT=1, TPG=2),
    dict(PER_TOKEN=False, HAS_BIAS=False, ONE_GROUP=True, INT_SCALES=False, SPLIT=True, QUANT=False, GPT=1, TPG=1),
    dict(PER_TOKEN=True, HAS_BIAS=False, ONE_GROUP=False, INT_SCALES=True, SPLIT=True, QUANT=False, GPT=2, TPG=1),
    # split-K reduced in the same launch (the dispatch's default at decode)
    dict(PER_TOKEN=True, HAS_BIAS=True, ONE_GROUP=False, INT_SCALES=False, SPLIT=True, QUANT=True, GPT=1, TPG=1,
         SERIAL=True),
    dict(PER_TOKEN=False, HAS_BIAS=False, ONE_GROUP=True, INT_SCALES=False, SPLIT=True, QUANT=True, GPT=1, TPG=1,
         SERIAL=True),
]


#: the several-layers kernel's variants (the fused decode step's q/k/v and gate/up launches)
DP4A_LAYERS_VARIANTS = [
    dict(LAYERS=3, PER_TOKEN=True, HAS_BIAS=True, ONE_GROUP=False, INT_SCALES=False, SPLIT=True, QUANT=False, GPT=1,
         TPG=1, SERIAL=True),
    dict(LAYERS=2, PER_TOKEN=False, HAS_BIAS=False, ONE_GROUP=False, INT_SCALES=True, SPLIT=True, QUANT=True, GPT=1,
         TPG=1, SERIAL=True),
    dict(LAYERS=2, PER_TOKEN=True, HAS_BIAS=False, ONE_GROUP=True, INT_SCALES=False, SPLIT=False, QUANT=True, GPT=1,
         TPG=1, SERIAL=False),
]


#: gate/up with SiLU x up in one launch (the fused decode step's MLP at batch 1-2)
DP4A_GLU_VARIANTS = [
    dict(PER_TOKEN=True, HAS_BIAS=False, ONE_GROUP=False, INT_SCALES=False, GPT=1, TPG=1, dtype="fp16"),
    dict(PER_TOKEN=False, HAS_BIAS=True, ONE_GROUP=False, INT_SCALES=True, GPT=1, TPG=1, dtype="bf16"),
]


def compile_dp4a_variants(arch: int) -> list[dict]:
    """Compile :data:`DP4A_VARIANTS` for ``sm_<arch>`` (bf16 activations, fp16 output); the interpreter, where the
    tests run the kernel, accepts code the compiler refuses."""
    from fptq.kernels import triton_dp4a as td
    from fptq.kernels import triton_dp4a_layers as tsi

    out = []
    for v in DP4A_VARIANTS:
        types = dict(X="*bf16" if v["QUANT"] else "*i8", B="*i32", WS="*fp16", AS="*fp32", BIAS="*fp16", C="*fp16",
                     P="*fp32", MT="*i8", BASE="*fp32", XW="*i32", INV_QMAX="fp32", CNT="*i32",
                     **{a: "i32" for a in ("M", "N", "K", "W", "G", "CHUNK", "NUNITS", "stride_xm", "stride_bn",
                                           "stride_wsn", "stride_cm")})
        const = dict(v, RECIP=True, QMAX=127, BLOCK_R=1024, BLOCK_N=128, BLOCK_W=16, ASM=True, QW=128,
                     SERIAL=v.get("SERIAL", False))
        rec = {"variant": v}
        _try_compile(rec, td._w4a8_gemv_dp4a_kernel, types, const, ["X", "B", "WS", "AS", "C", "P", "XW"], arch, 4, 2)
        out.append(rec)
    for v in DP4A_LAYERS_VARIANTS:  # several layers on one input in one launch (q/k/v, gate/up)
        types = dict(X="*bf16" if v["QUANT"] else "*i8", AS="*fp32", XW="*i32", INV_QMAX="fp32", CNT="*i32",
                     **{f"{a}{i}": t for i in range(3) for a, t in (("B", "*i32"), ("WS", "*fp16"), ("BIAS", "*fp16"),
                                                                     ("C", "*fp16"), ("P", "*fp32"), ("MT", "*i8"),
                                                                     ("BASE", "*fp32"), ("N", "i32"))},
                     T0="i32", T1="i32", **{a: "i32" for a in ("M", "K", "W", "G", "CHUNK", "NUNITS", "stride_xm",
                                                               "stride_bn", "stride_wsn")})
        const = dict(v, RECIP=True, QMAX=127, BLOCK_R=1024, BLOCK_N=128, BLOCK_W=16, ASM=True, QW=128)
        rec = {"variant": v}
        out.append(_try_compile(rec, tsi._w4a8_gemv_dp4a_layers_kernel, types, const,
                                ["X", "AS", "XW", "B0", "B1", "B2", "C0", "C1", "C2", "P0", "P1", "P2"], arch, 4, 2))
    for v in DP4A_GLU_VARIANTS:  # gate/up with SiLU x up in one launch
        types = dict(X="*i8", AS="*fp32", XW="*i32", CNT="*i32",
                     **{f"{a}{w}": t for w in "GU" for a, t in (("B", "*i32"), ("WS", "*fp16"), ("BIAS", "*fp16"),
                                                                ("P", "*fp32"), ("MT", "*i8"), ("BASE", "*fp32"))},
                     ACT="*" + v["dtype"], **{a: "i32" for a in ("N", "T", "M", "K", "W", "G", "CHUNK", "NUNITS",
                                                                 "stride_xm", "stride_bn", "stride_wsn")})
        const = {c: x for c, x in v.items() if c != "dtype"}
        const.update(QMAX=127, BLOCK_R=1024, BLOCK_N=128, BLOCK_W=16, ASM=True, QW=128)
        rec = {"variant": dict(v, op="glu")}
        out.append(_try_compile(rec, tsi._w4a8_gemv_dp4a_glu_kernel, types, const,
                                ["X", "AS", "XW", "BG", "BU", "PG", "PU", "ACT"], arch, 4, 2))
    return out


#: tensor-core kernel variants (NIBBLE with the PTX byte split; the unpacking path for integer scales)
TC_VARIANTS = [
    dict(PER_TOKEN=True, HAS_BIAS=False, ONE_GROUP=False, SPLIT=False, SWAP_AB=False, INT_SCALES=False, EVEN_K=True,
         NIBBLE=True),
    dict(PER_TOKEN=False, HAS_BIAS=True, ONE_GROUP=False, SPLIT=True, SWAP_AB=True, INT_SCALES=False, EVEN_K=False,
         NIBBLE=True),
    dict(PER_TOKEN=True, HAS_BIAS=True, ONE_GROUP=True, SPLIT=False, SWAP_AB=True, INT_SCALES=False, EVEN_K=True,
         NIBBLE=True),
    dict(PER_TOKEN=True, HAS_BIAS=False, ONE_GROUP=False, SPLIT=True, SWAP_AB=False, INT_SCALES=True, EVEN_K=True,
         NIBBLE=False),
]


def compile_tc_variants(arch: int) -> list[dict]:
    """Compile :data:`TC_VARIANTS` of the tensor-core grouped kernel for ``sm_<arch>``."""
    from fptq.kernels import triton_grouped as tg

    out = []
    for v in TC_VARIANTS:
        types = dict(A="*i8", B="*u8", WS="*fp16", AS="*fp32", BIAS="*fp16", C="*fp16", P="*fp32", MT="*i8",
                     BASE="*fp32", **{a: "i32" for a in ("M", "N", "K", "G", "GS", "CHUNK", "NUNITS", "stride_am",
                                                          "stride_bn", "stride_wsn", "stride_cm")})
        const = dict(v, TILES_PER_GROUP=1, BLOCK_M=32 if v["SWAP_AB"] else 16, BLOCK_N=64, BLOCK_K=128, GROUP_M=8,
                     ASM=v["NIBBLE"])
        rec = {"kernel": "tensor-core", "variant": v}
        _try_compile(rec, tg._w4a8_gemm_kernel, types, const, ["A", "B", "WS", "AS", "C", "P"], arch, 4, 3)
        out.append(rec)
    return out + compile_tc_layers_variants(arch) + compile_w4a16_variants(arch)


#: the W4A16 kernel (float activations): 16-bit inputs on tensor cores, float32 in IEEE maths; split and not
W4A16_VARIANTS = [
    dict(dtype="fp16", HAS_BIAS=False, SPLIT=True, ONE_GROUP=False, TILES_PER_GROUP=1, BLOCK_M=16, BLOCK_N=64,
         BLOCK_K=128, IEEE=False),
    dict(dtype="bf16", HAS_BIAS=True, SPLIT=False, ONE_GROUP=False, TILES_PER_GROUP=2, BLOCK_M=128, BLOCK_N=128,
         BLOCK_K=64, IEEE=False),
    dict(dtype="fp32", HAS_BIAS=True, SPLIT=False, ONE_GROUP=True, TILES_PER_GROUP=1, BLOCK_M=16, BLOCK_N=64,
         BLOCK_K=128, IEEE=True),
]


def compile_w4a16_variants(arch: int) -> list[dict]:
    """Compile :data:`W4A16_VARIANTS` (``fptq.kernels.triton_w4a16``) for ``sm_<arch>``."""
    from fptq.kernels import triton_w4a16 as tw16

    out = []
    for v in W4A16_VARIANTS:
        p = "*" + v["dtype"]
        types = dict(X=p, B="*u8", WS="*fp16", BIAS=p, C=p, P="*fp32",
                     **{a: "i32" for a in ("M", "N", "K", "CHUNK", "NUNITS", "stride_xm", "stride_bn", "stride_wsn",
                                           "stride_cm")})
        const = dict({c: x for c, x in v.items() if c != "dtype"}, EVEN_K=True)
        rec = {"kernel": "w4a16", "variant": v}
        _try_compile(rec, tw16._w4a16_kernel, types, const, ["X", "B", "WS", "C", "P"], arch, 4, 3)
        out.append(rec)
    return out


#: the tensor-core kernel on several layers of one input (decode batches 3-16: q/k/v; gate/up with SiLU x up)
TC_LAYERS_VARIANTS = [
    dict(op="layers", LAYERS=3, PER_TOKEN=False, HAS_BIAS=True, ONE_GROUP=False, INT_SCALES=False, NIBBLE=True),
    dict(op="layers", LAYERS=2, PER_TOKEN=True, HAS_BIAS=False, ONE_GROUP=False, INT_SCALES=True, NIBBLE=False),
    dict(op="glu", PER_TOKEN=True, HAS_BIAS=False, ONE_GROUP=False, INT_SCALES=False, NIBBLE=True, CODES=True),
    dict(op="glu", PER_TOKEN=False, HAS_BIAS=True, ONE_GROUP=True, INT_SCALES=False, NIBBLE=True, CODES=False),
]


def compile_tc_layers_variants(arch: int) -> list[dict]:
    """Compile :data:`TC_LAYERS_VARIANTS` (``fptq.kernels.triton_grouped_layers``) for ``sm_<arch>``, bf16 outputs."""
    from fptq.kernels import triton_grouped_layers as tgl

    i32 = {a: "i32" for a in ("M", "K", "GS", "NUNITS", "stride_am", "stride_bn", "stride_wsn")}
    out = []
    for v in TC_LAYERS_VARIANTS:
        const = {c: x for c, x in v.items() if c != "op"}
        const.update(TILES_PER_GROUP=1, SWAP_AB=False, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, EVEN_K=True,
                     ASM=v["NIBBLE"])
        if v["op"] == "layers":
            fn = tgl._w4a8_gemm_layers_kernel
            types = dict(A="*i8", AS="*fp32", **{f"{a}{i}": t for i in range(3) for a, t in (
                ("B", "*u8"), ("WS", "*fp16"), ("BIAS", "*bf16"), ("C", "*bf16"), ("MT", "*i8"), ("BASE", "*fp32"),
                ("N", "i32"))}, T0="i32", T1="i32", NT="i32", **i32)
            ptrs = ["A", "AS", "B0", "B1", "B2", "C0", "C1", "C2"]
        else:
            fn = tgl._w4a8_gemm_glu_kernel
            const.update(QMAX=127)
            types = dict(A="*i8", AS="*fp32", **{f"{a}{w}": t for w in "GU" for a, t in (
                ("B", "*u8"), ("WS", "*fp16"), ("BIAS", "*bf16"), ("MT", "*i8"), ("BASE", "*fp32"))},
                ACT="*bf16", Q="*i8", QS="*fp32", T="i32", N="i32", **i32)
            ptrs = ["A", "AS", "BG", "BU", "ACT", "Q"]
        rec = {"kernel": "tensor-core", "variant": v}
        _try_compile(rec, fn, types, const, ptrs, arch, 4, 4)
        out.append(rec)
    return out


def compile_decode_variants(arch: int) -> list[dict]:
    """Compile the fused decode step's kernels (:mod:`fptq.kernels.triton_decode`) for ``sm_<arch>``, fp16 and
    bf16, every flag their launchers pass."""
    from fptq.kernels import triton_decode as td

    i32 = lambda *names: {a: "i32" for a in names}  # noqa: E731
    out = []
    for dt in ("fp16", "bf16"):
        p = "*" + dt
        cases = [
            ("add_rmsnorm", td._add_rmsnorm_kernel,
             dict(h_ptr=p, d_ptr=p, w_ptr=p, out_ptr=p, q_ptr="*i8", s_ptr="*fp32", scale_in="*fp32", INV_QMAX="fp32",
                  K="i32", eps="fp32"),
             [dict(HAS_DELTA=True, QUANT=False, DYNAMIC=False, RECIP=False, QMAX=127, BLOCK=4096),
              dict(HAS_DELTA=False, QUANT=False, DYNAMIC=False, RECIP=False, QMAX=127, BLOCK=8192),
              dict(HAS_DELTA=True, QUANT=True, DYNAMIC=True, RECIP=True, QMAX=127, BLOCK=4096),
              dict(HAS_DELTA=True, QUANT=True, DYNAMIC=False, RECIP=False, QMAX=127, BLOCK=8192)], 8),
            ("silu_mul_quant", td._silu_mul_quant_kernel,
             dict(g_ptr=p, u_ptr=p, out_ptr=p, q_ptr="*i8", s_ptr="*fp32", scale_in="*fp32", INV_QMAX="fp32", N="i32"),
             [dict(DYNAMIC=True, RECIP=True, QMAX=127, BLOCK=16384), dict(DYNAMIC=False, RECIP=False, QMAX=127,
                                                                          BLOCK=16384)], 16),
            ("rope_write_kv", td._rope_kv_kernel, dict(q_ptr=p, k_ptr=p, v_ptr=p, cos_ptr=p, sin_ptr=p, pos_ptr="*i64",
                                                       qo_ptr=p, kc_ptr=p, vc_ptr=p, qn_ptr=p, kn_ptr=p, q_eps="fp32",
                                                       k_eps="fp32", **i32("HQ", "HKV", "L", "D")),
             [dict(NORM=False, HALF_BLOCK=64), dict(NORM=True, HALF_BLOCK=64)], 1),
            ("decode_attention", td._attention_kernel,
             dict(q_ptr=p, k_ptr=p, v_ptr=p, pos_ptr="*i64", m_ptr="*fp32", l_ptr="*fp32", acc_ptr="*fp32", out_ptr=p,
                  codes_ptr="*i8", scale_in="*fp32", scaling="fp32", cnt_ptr="*i32",
                  **i32("HQ", "GROUP", "L", "D", "CHUNK")),
             [dict(SINGLE=single, QUANT=quant, QMAX=127, D_BLOCK=128, BLOCK_N=td.ATTN_BLOCK_N, SERIAL=False,
                   S_BLOCK=1) for single in (True, False) for quant in (False, True)]
             + [dict(SINGLE=False, QUANT=quant, QMAX=127, D_BLOCK=128, BLOCK_N=td.ATTN_BLOCK_N, SERIAL=True,
                     S_BLOCK=8) for quant in (False, True)], 4),
            ("attention_combine", td._attention_combine_kernel,
             dict(m_ptr="*fp32", l_ptr="*fp32", acc_ptr="*fp32", out_ptr=p, codes_ptr="*i8", scale_in="*fp32",
                  **i32("NSPLIT", "D")),
             [dict(QUANT=quant, QMAX=127, S_BLOCK=8, D_BLOCK=128) for quant in (False, True)], 1),
            ("silu_mul", td._silu_mul_kernel, dict(g_ptr=p, u_ptr=p, out_ptr=p, N="i32"), [dict(BLOCK=1024)], 4),
        ]
        for name, fn, types, consts, warps in cases:
            for const in consts:
                rec = {"kernel": "decode", "variant": dict(const, op=name, dtype=dt)}
                _try_compile(rec, fn, types, const, [a for a, t in types.items() if t.startswith("*")], arch, warps, 1)
                out.append(rec)
    return out


def tc_case(m: int, k: int, n: int, gs: int, arch: int, nibble: bool, even_k: bool = True) -> dict:
    from fptq.kernels import triton_grouped as tg
    from fptq.kernels.triton_common import _split_plan, pick_config

    cfg = pick_config(m, n, k, gs)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    g = k // gs
    splits, chunk = _split_plan(math.ceil(m / bm) * math.ceil(n / bn), m, k, g, gs, "cpu", cfg.get("SPLIT_K"))
    ints = dict(M=m, N=n, K=k, G=g, GS=gs, CHUNK=chunk, NUNITS=g, stride_am=k, stride_bn=k // 2, stride_wsn=g,
                stride_cm=n)
    types = dict(A="*i8", B="*u8", WS="*fp16", AS="*fp32", BIAS="*fp16", C="*fp16", P="*fp32", MT="*i8",
                 BASE="*fp32", **{a: "i32" for a in ints})
    const = dict(PER_TOKEN=True, HAS_BIAS=False, ONE_GROUP=False, TILES_PER_GROUP=gs // bk, SPLIT=splits > 1,
                 SWAP_AB=cfg["SWAP_AB"], BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"], INT_SCALES=False,
                 EVEN_K=even_k and k % gs == 0, NIBBLE=nibble, ASM=nibble)
    kern = _compile(tg._w4a8_gemm_kernel, types, const, ["A", "B", "WS", "AS", "C", "P", "MT", "BASE"]
                    + _divisible(ints), arch, cfg["num_warps"], cfg["num_stages"])
    return dict(kernel=kern, bytes_per_iteration=bn * gs // 2, threads=32 * cfg["num_warps"],
                config=dict(cfg, SPLIT_K=splits))


def _measure(case: dict, cubin: str) -> dict:
    """The main loop of a compiled case (``*_case``): its mix, instructions per weight byte per thread, registers."""
    sass, res = _sass(case["kernel"], cubin)
    loop = _main_loop(sass)
    per_thread = case["bytes_per_iteration"] / case["threads"]
    regs = re.search(r"REG:(\d+)", res)
    return dict(config=case["config"], loop=loop, bytes_per_thread_iteration=per_thread,
                inst_per_byte=loop["instructions"] / per_thread, int_inst_per_byte=loop["integer_pipe"] / per_thread,
                registers=int(regs.group(1)) if regs else None, spills="LOCAL:0" not in res)


def model_us(inst_per_byte: float, int_per_byte: float, layer_bytes: int) -> dict:
    """The issue-, integer- and memory-bound times (us) of reading ``layer_bytes`` of weights on an H200."""
    per_s = H200["sms"] * H200["clock_ghz"] * 1e9
    warp_inst = inst_per_byte * layer_bytes / 32
    return {"issue_us": warp_inst / (per_s * H200["warp_issue"]) * 1e6,
            "int_us": int_per_byte * layer_bytes / 32 / (per_s * H200["int_issue"]) * 1e6,
            "memory_us": layer_bytes / (H200["bandwidth_tbs"] * 1e12) * 1e6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "gpu_sass"))
    ap.add_argument("--arch", type=int, default=90, help="compute capability to compile for (90 = Hopper)")
    ap.add_argument("--variants", action="store_true",
                    help="only compile every variant of the dp4a GEMV, the tensor-core kernel and the decode step's "
                         "kernels (gpu_sass_variants.json); exit 1 if one fails")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import triton

    if args.variants:
        recs = ([dict(r, kernel="dp4a") for r in compile_dp4a_variants(args.arch)] + compile_tc_variants(args.arch)
                + compile_decode_variants(args.arch))
        with open(os.path.join(args.out, "gpu_sass_variants.json"), "w") as f:
            json.dump({"triton": triton.__version__, "arch": args.arch, "variants": recs}, f, indent=1)
        for r in recs:
            print(("ok    " if r["ok"] else "FAIL  ") + r["kernel"] + " " + json.dumps(r["variant"]) + ("" if r["ok"] else " " + r["error"]))
        return 0 if all(r["ok"] for r in recs) else 1

    results = {"triton": triton.__version__, "arch": args.arch, "model": H200, "rows": []}
    t0 = time.time()
    for gs in (128, 64):
        for k, n in SHAPES:
            for name, build in (("bytewise", bytewise_case), ("dp4a", dp4a_case)):
                row = {"kernel": name, "K": k, "N": n, "group_size": gs}
                try:
                    row.update(_measure(build(k, n, gs, args.arch), os.path.join(args.out, f"{name}_{k}x{n}_g{gs}.cubin")))
                    row.update(model_us(row["inst_per_byte"], row["int_inst_per_byte"], n * k // 2))
                    row["model_bound_us"] = max(row["issue_us"], row["int_us"], row["memory_us"])
                except Exception as e:  # noqa: BLE001 - recorded, the other kernels still compile
                    row["error"] = f"{e!r}"[:1000]
                results["rows"].append(row)
                print(f"{name:8s} {k:5d}x{n:5d} g{gs}: " + (
                    f"{row['inst_per_byte']:.2f} inst/B ({row['int_inst_per_byte']:.2f} int), "
                    f"{row['registers']} regs, model {row['model_bound_us']:.1f} us "
                    f"(memory {row['memory_us']:.1f})" if "error" not in row else row["error"]), flush=True)
    for m in (16, 256):  # the tensor-core kernel, unpacking the codes (before) or splitting the bytes (now)
        k, n, gs = 4096, 11008, 128
        for nibble, even_k, name in ((False, False, "unpacked codes, K-masked loads (before)"),
                                     (False, True, "unpacked codes, unmasked loads"),
                                     (True, True, "byte split, unmasked loads (now)")):
            row = {"kernel": name, "M": m, "K": k, "N": n, "group_size": gs}
            try:
                row.update(_measure(tc_case(m, k, n, gs, args.arch, nibble, even_k),
                                    os.path.join(args.out, f"tc_{m}_{int(nibble)}{int(even_k)}.cubin")))
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{e!r}"[:1000]
            results["tensor_core"] = results.get("tensor_core", []) + [row]
            print(f"tensor-core, {name} M={m}: " + (f"{row['inst_per_byte']:.2f} inst/B, {row['registers']} regs"
                                       if "error" not in row else row["error"]), flush=True)
    results["elapsed_s"] = time.time() - t0
    with open(os.path.join(args.out, "gpu_sass.json"), "w") as f:
        json.dump(results, f, indent=1)
    write_md(results, os.path.join(args.out, "gpu_sass.md"))
    for p in os.listdir(args.out):  # the binaries are not results
        if p.endswith(".cubin"):
            os.remove(os.path.join(args.out, p))
    return 1 if any("error" in r for r in results["rows"] + results.get("tensor_core", [])) else 0


def write_md(results: dict, path: str) -> None:
    lines = [f"# Decode GEMVs compiled for sm_{results['arch']} (Triton {results['triton']}), no GPU run", "",
             "Main loop of each kernel at M = 1 with its launcher's configuration: instructions per weight byte per "
             "thread (all / integer pipe), registers, and the H200 **model** (issue / integer / memory bound, us; "
             "not a measurement). `python bench/gpu_sass.py`.", "",
             "| kernel | K x N | group | config | inst/B | int inst/B | regs | model us (issue / int / memory) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['K']}x{r['N']} | {r['group_size']} | error: {r['error'][:80]} "
                         "| | | | |")
            continue
        c = r["config"]
        lines.append(f"| {r['kernel']} | {r['K']}x{r['N']} | {r['group_size']} | "
                     f"N{c['BLOCK_N']} K{c['BLOCK_K']} w{c['num_warps']} split {c['SPLIT_K']} | "
                     f"{r['inst_per_byte']:.2f} | {r['int_inst_per_byte']:.2f} | {r['registers']} | "
                     f"{r['issue_us']:.1f} / {r['int_us']:.1f} / {r['memory_us']:.1f} |")
    if results.get("tensor_core"):
        lines += ["", "The tensor-core grouped kernel (`_w4a8_gemm_kernel`, M > 2), 4096 x 11008, group 128, its launcher's "
                  "configuration: main loop per group.", "",
                  "| kernel | M | config | inst/B | int inst/B | regs | loop mix (top) |", "|---|---|---|---|---|---|---|"]
        for r in results["tensor_core"]:
            if "error" in r:
                lines.append(f"| {r['kernel']} | {r['M']} | error: {r['error'][:80]} | | | | |")
                continue
            c = r["config"]
            top = ", ".join(f"{k} {v}" for k, v in list(r["loop"]["mix"].items())[:5])
            lines.append(f"| {r['kernel']} | {r['M']} | M{c['BLOCK_M']} N{c['BLOCK_N']} K{c['BLOCK_K']} "
                         f"swap {c['SWAP_AB']} | {r['inst_per_byte']:.2f} | {r['int_inst_per_byte']:.2f} | "
                         f"{r['registers']} | {top} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())

"""Triton W4A8 kernels for CUDA (backends ``triton``, ``triton_grouped``, ``triton_perchannel``;
optional ``fptq[triton]``).

Paths (all numerics checked against :meth:`fptq.nn.QuantLinear.reference_forward`):

``triton_grouped`` -- **exact group-wise** (same maths as the reference, only the float
summation order differs).  Reads the packed int4 weights directly (0.5 byte/weight, no cache):

* ``_w4a8_gemv_kernel`` (M <= ``GEMV_MAX_M``, decode): no tensor cores; each program
  owns one token row, ``BLOCK_N`` output channels and a range of groups (split-K);
  nibbles are sign-extended with int32 shifts and multiplied with the even / odd
  activation codes in int32, reduced once per group, scaled by the fp16 group scale
  in float32.
* ``_w4a8_gemm_kernel`` (tensor cores): ``tl.dot(..., out_dtype=int32)`` per group,
  the group scale applied in float32 at the end of each group (``BLOCK_K`` divides
  the group size).  For small M the operands are swapped (``SWAP_AB``: the unpacked
  weight tile is the MMA's M side, the tokens its N side, so M=1..64 does not waste a
  64-row MMA); optional split-K over groups.

  Split-K (both kernels): the ``SPLIT_K`` programs of an output tile write float32
  partials ``[SPLIT_K, M, N]`` to a workspace and ``_splitk_reduce_kernel`` sums them
  in a fixed order (deterministic, no atomics), then applies the activation scale and
  the bias and casts.  With ``SPLIT_K == 1`` the epilogue is fused.

``triton_perchannel`` -- **one extra rounding of the weights** (QQQ / OdysseyLLM approach,
the same conversion as the CPU ``int8_perchannel`` backend, computed by
:func:`fptq.kernels.cpu.perchannel_weight`): at first use the group-scaled int4 weights
become int8 codes with one float32 scale per output channel.  **Memory: the int8 weight
(1 byte/weight, i.e. twice the packed int4 size) and the [N] scales are cached on the
module** (``module._cache['triton_w8_perchannel']``).  A plain int8 x int8 -> int32 GEMM
over the whole K (``_int8_gemm_kernel``: B tiles loaded from the int8 cache by pointer,
so Hopper's wgmma gets shared-memory operands and one int32 accumulator), with the
per-token / per-tensor x per-channel scales and the bias fused in the epilogue; or
(``PERCHANNEL_IMPL = 'int_mm'``) ``torch._int_mm`` (cuBLASLt) + the Triton epilogue.
For per-channel layers (one group per row) the codes and scales are used unchanged and
this path is exact too.

``triton`` (default on CUDA) -- picks by M: ``triton_grouped`` for ``M <= GROUPED_MAX_M``
(memory-bound decode: reading 4-bit weights is what makes it fast, and it is exact),
``triton_perchannel`` above (compute-bound prefill).

Activation quantization (``_quant_act_kernel``): one program per token row, a single
pass over the row when ``K <= 16384`` (row held in registers): per-token absmax, the
scale, and int8 codes ``clamp(rint(x / s))`` with IEEE division (``tl.math.div_rn``)
and round-half-to-even -- bit-identical to :meth:`QuantLinear.quantize_input` *on the
same device*.  Note torch on CUDA computes ``amax / qmax`` (division by a Python
scalar) as ``amax * fp32(1 / qmax)`` (``div_true_kernel_cuda``'s reciprocal
optimisation), while on CPU it divides; the kernel reproduces whichever the device's
torch does (probed once per device, :func:`_scalar_div_mode`).

Launch configurations come from small heuristic tables (``pick_*_config``); every
entry point takes ``config=`` to override them (``bench/gpu_kernels.py`` sweeps them).
If a fast path fails to compile on some GPU / triton version, :func:`triton_forward`
warns once and falls back to the baseline grouped kernel.

This module imports without triton or CUDA (``HAS_TRITON`` is then False and the entry
points raise a clear error).  Layers the kernels do not cover (weights other than
4-bit, float activations, group sizes that are not a multiple of 32 with more than one
group) fall back to the reference maths.
"""
from __future__ import annotations

import warnings

import torch

try:  # optional dependency
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the machine
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "is_available",
    "PATHS",
    "GEMV_MAX_M",
    "GROUPED_MAX_M",
    "PERCHANNEL_IMPL",
    "pick_config",
    "pick_gemv_config",
    "pick_int8_config",
    "select_path",
    "quantize_activations",
    "w4a8_matmul",
    "w4a8_gemv",
    "int8_perchannel_matmul",
    "perchannel_weight_device",
    "triton_forward",
    "triton_grouped_forward",
    "triton_perchannel_forward",
]

#: ``triton_forward(path=...)`` values: "auto" (by M), "grouped" (exact), "perchannel" (int8 cache)
PATHS = ("auto", "grouped", "perchannel")
#: grouped path: the CUDA-core GEMV kernel for M <= this, the tensor-core kernel above
GEMV_MAX_M = 2
#: auto path: exact grouped kernels for M <= this, the int8 per-channel GEMM above
GROUPED_MAX_M = 8  # H200 run: at M=16 the int8 per-channel GEMM beat the grouped kernel on 3 of 4 shapes
#: per-channel GEMM implementation: "triton" (fused epilogue) or "int_mm" (cuBLASLt + epilogue)
PERCHANNEL_IMPL = "triton"
#: split-K aims at about this many programs per SM
_PROGRAMS_PER_SM = 6


def is_available() -> bool:
    """True when triton is importable and a CUDA device is present."""
    return HAS_TRITON and torch.cuda.is_available()


def _require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("the 'triton' backend needs the triton package: pip install 'fptq[triton]'")


if HAS_TRITON:

    @triton.jit
    def _round_half_even(v):
        # exact rint for |v| < 2**22 in float32 (round-to-nearest-even addition)
        return (v + 12582912.0) - 12582912.0

    @triton.jit
    def _codes(x, scale, QMAX: tl.constexpr):
        v = tl.math.div_rn(x, scale + tl.zeros_like(x))
        v = tl.minimum(tl.maximum(v, -QMAX * 1.0), QMAX * 1.0)
        return _round_half_even(v).to(tl.int8)

    @triton.jit
    def _quant_act_kernel(
        X, Q, S, SCALE_IN, INV_QMAX,
        K, stride_xm, stride_qm,
        QMAX: tl.constexpr,
        DYNAMIC: tl.constexpr,
        RECIP: tl.constexpr,  # scale = amax * fp32(1/qmax) (torch on CUDA) instead of amax / qmax
        SINGLE: tl.constexpr,  # BLOCK >= K: the row stays in registers (one read)
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        x_row = X + row * stride_xm
        q_row = Q + row * stride_qm
        offs = tl.arange(0, BLOCK)
        if SINGLE:
            mask = offs < K
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            if DYNAMIC:
                m = tl.max(tl.abs(x), axis=0)
                if RECIP:
                    scale = tl.maximum(m * INV_QMAX, 1e-8)
                else:
                    scale = tl.maximum(tl.math.div_rn(m, QMAX * 1.0), 1e-8)
                tl.store(S + row, scale)
            else:
                scale = tl.load(SCALE_IN).to(tl.float32)
            tl.store(q_row + offs, _codes(x, scale, QMAX), mask=mask)
        else:
            if DYNAMIC:
                amax = tl.zeros([BLOCK], dtype=tl.float32)
                for k0 in range(0, K, BLOCK):
                    x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
                    amax = tl.maximum(amax, tl.abs(x))
                m = tl.max(amax, axis=0)
                if RECIP:
                    scale = tl.maximum(m * INV_QMAX, 1e-8)
                else:
                    scale = tl.maximum(tl.math.div_rn(m, QMAX * 1.0), 1e-8)
                tl.store(S + row, scale)
            else:
                scale = tl.load(SCALE_IN).to(tl.float32)
            for k0 in range(0, K, BLOCK):
                mask = k0 + offs < K
                x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(q_row + k0 + offs, _codes(x, scale, QMAX), mask=mask)

    @triton.jit
    def _unpacked_w_tile(b_rows, k0, offs_kb, mask_n, K2, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # [BLOCK_N, BLOCK_K] int8 codes from packed bytes (low nibble = even column)
        kb = k0 // 2 + offs_kb
        b = tl.load(b_rows + kb[None, :], mask=mask_n[:, None] & (kb[None, :] < K2), other=0)
        bi = b.to(tl.int32)
        lo = (bi << 28) >> 28
        hi = (bi << 24) >> 28
        return tl.reshape(tl.join(lo, hi), [BLOCK_N, BLOCK_K]).to(tl.int8)

    @triton.jit
    def _store_out(acc, offs_m, offs_n, mask_m, mask_n, AS, BIAS, C, P, pid_s, M, N, stride_cm,
                   PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
        # acc: float32 [BLOCK_M, BLOCK_N] (group scales applied)
        mask = mask_m[:, None] & mask_n[None, :]
        if SPLIT:
            p_ptrs = P + pid_s.to(tl.int64) * M * N + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
            tl.store(p_ptrs, acc, mask=mask)
        else:
            if PER_TOKEN:
                sx = tl.load(AS + offs_m, mask=mask_m, other=0.0)
                acc = acc * sx[:, None]
            else:
                acc = acc * tl.load(AS)
            if HAS_BIAS:
                bias = tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                acc = acc + bias[None, :]
            c_ptrs = C + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
            tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=mask)

    @triton.jit
    def _w4a8_gemm_kernel(
        A, B, WS, AS, BIAS, C, P,
        M, N, K, G, GS, CHUNK, NUNITS,
        stride_am, stride_bn, stride_wsn, stride_cm,
        PER_TOKEN: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        ONE_GROUP: tl.constexpr,
        TILES_PER_GROUP: tl.constexpr,
        SPLIT: tl.constexpr,
        SWAP_AB: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        # Work units along K: K tiles (ONE_GROUP) or groups; split s owns units [s*CHUNK, (s+1)*CHUNK).
        pid = tl.program_id(0)
        pid_s = tl.program_id(1)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        offs_kb = tl.arange(0, BLOCK_K // 2)
        mask_m = offs_m < M
        mask_n = offs_n < N
        K2 = (K + 1) // 2
        b_rows = B + offs_n.to(tl.int64)[:, None] * stride_bn
        u0 = pid_s * CHUNK
        u1 = tl.minimum(u0 + CHUNK, NUNITS)

        if SWAP_AB:
            # acc^T [BLOCK_N, BLOCK_M] = W [BLOCK_N, BLOCK_K] @ X^T [BLOCK_K, BLOCK_M]
            a_cols = A + offs_m.to(tl.int64)[None, :] * stride_am
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            if ONE_GROUP:
                acc_i = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
                for u in range(u0, u1):
                    k0 = u * BLOCK_K
                    ka = k0 + offs_k
                    at = tl.load(a_cols + ka[:, None], mask=(ka[:, None] < K) & mask_m[None, :], other=0)
                    w = _unpacked_w_tile(b_rows, k0, offs_kb, mask_n, K2, BLOCK_N, BLOCK_K)
                    acc_i = tl.dot(w, at, acc_i, out_dtype=tl.int32)
                s = tl.load(WS + offs_n * stride_wsn, mask=mask_n, other=0.0).to(tl.float32)
                acc = acc_i.to(tl.float32) * s[:, None]
            else:
                for g in range(u0, u1):
                    acc_i = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
                    for t in tl.static_range(TILES_PER_GROUP):
                        k0 = g * GS + t * BLOCK_K
                        ka = k0 + offs_k
                        at = tl.load(a_cols + ka[:, None], mask=(ka[:, None] < K) & mask_m[None, :], other=0)
                        w = _unpacked_w_tile(b_rows, k0, offs_kb, mask_n, K2, BLOCK_N, BLOCK_K)
                        acc_i = tl.dot(w, at, acc_i, out_dtype=tl.int32)
                    s = tl.load(WS + offs_n * stride_wsn + g, mask=mask_n, other=0.0).to(tl.float32)
                    acc += acc_i.to(tl.float32) * s[:, None]
            _store_out(tl.trans(acc), offs_m, offs_n, mask_m, mask_n, AS, BIAS, C, P, pid_s, M, N, stride_cm,
                       PER_TOKEN, HAS_BIAS, SPLIT)
        else:
            a_rows = A + offs_m.to(tl.int64)[:, None] * stride_am
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            if ONE_GROUP:
                acc_i = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
                for u in range(u0, u1):
                    k0 = u * BLOCK_K
                    ka = k0 + offs_k
                    a = tl.load(a_rows + ka[None, :], mask=mask_m[:, None] & (ka[None, :] < K), other=0)
                    w = _unpacked_w_tile(b_rows, k0, offs_kb, mask_n, K2, BLOCK_N, BLOCK_K)
                    acc_i = tl.dot(a, tl.trans(w), acc_i, out_dtype=tl.int32)
                s = tl.load(WS + offs_n * stride_wsn, mask=mask_n, other=0.0).to(tl.float32)
                acc = acc_i.to(tl.float32) * s[None, :]
            else:
                for g in range(u0, u1):
                    acc_i = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
                    for t in tl.static_range(TILES_PER_GROUP):
                        k0 = g * GS + t * BLOCK_K
                        ka = k0 + offs_k
                        a = tl.load(a_rows + ka[None, :], mask=mask_m[:, None] & (ka[None, :] < K), other=0)
                        w = _unpacked_w_tile(b_rows, k0, offs_kb, mask_n, K2, BLOCK_N, BLOCK_K)
                        acc_i = tl.dot(a, tl.trans(w), acc_i, out_dtype=tl.int32)
                    s = tl.load(WS + offs_n * stride_wsn + g, mask=mask_n, other=0.0).to(tl.float32)
                    acc += acc_i.to(tl.float32) * s[None, :]
            _store_out(acc, offs_m, offs_n, mask_m, mask_n, AS, BIAS, C, P, pid_s, M, N, stride_cm,
                       PER_TOKEN, HAS_BIAS, SPLIT)

    @triton.jit
    def _w4a8_gemv_kernel(
        A, B, WS, AS, BIAS, C, P,
        M, N, K, GS, CHUNK, NUNITS,
        stride_am, stride_bn, stride_wsn, stride_cm,
        PER_TOKEN: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        ONE_GROUP: tl.constexpr,
        TILES_PER_GROUP: tl.constexpr,
        SPLIT: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # grid (M, n tiles, splits): the token is the fastest axis, so the programs
        # sharing a weight tile run together (L2 reuse when M > 1)
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_s = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_j = tl.arange(0, BLOCK_K // 2)
        mask_n = offs_n < N
        K2 = (K + 1) // 2
        b_rows = B + offs_n.to(tl.int64)[:, None] * stride_bn
        x_row = A + pid_m.to(tl.int64) * stride_am
        u0 = pid_s * CHUNK
        u1 = tl.minimum(u0 + CHUNK, NUNITS)
        if ONE_GROUP:
            acc2 = tl.zeros([BLOCK_N, BLOCK_K // 2], dtype=tl.int32)
            for u in range(u0, u1):
                k0 = u * BLOCK_K
                kb = k0 // 2 + offs_j
                b = tl.load(b_rows + kb[None, :], mask=mask_n[:, None] & (kb[None, :] < K2), other=0)
                ke = k0 + 2 * offs_j
                xe = tl.load(x_row + ke, mask=ke < K, other=0).to(tl.int32)
                xo = tl.load(x_row + ke + 1, mask=ke + 1 < K, other=0).to(tl.int32)
                bi = b.to(tl.int32)
                acc2 += ((bi << 28) >> 28) * xe[None, :] + ((bi << 24) >> 28) * xo[None, :]
            s = tl.load(WS + offs_n * stride_wsn, mask=mask_n, other=0.0).to(tl.float32)
            acc = tl.sum(acc2, axis=1).to(tl.float32) * s
        else:
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for g in range(u0, u1):
                acc2 = tl.zeros([BLOCK_N, BLOCK_K // 2], dtype=tl.int32)
                for t in tl.static_range(TILES_PER_GROUP):
                    k0 = g * GS + t * BLOCK_K
                    kb = k0 // 2 + offs_j
                    b = tl.load(b_rows + kb[None, :], mask=mask_n[:, None] & (kb[None, :] < K2), other=0)
                    ke = k0 + 2 * offs_j
                    xe = tl.load(x_row + ke, mask=ke < K, other=0).to(tl.int32)
                    xo = tl.load(x_row + ke + 1, mask=ke + 1 < K, other=0).to(tl.int32)
                    bi = b.to(tl.int32)
                    acc2 += ((bi << 28) >> 28) * xe[None, :] + ((bi << 24) >> 28) * xo[None, :]
                s = tl.load(WS + offs_n * stride_wsn + g, mask=mask_n, other=0.0).to(tl.float32)
                acc += tl.sum(acc2, axis=1).to(tl.float32) * s
        if SPLIT:
            tl.store(P + pid_s.to(tl.int64) * M * N + pid_m.to(tl.int64) * N + offs_n, acc, mask=mask_n)
        else:
            if PER_TOKEN:
                acc = acc * tl.load(AS + pid_m)
            else:
                acc = acc * tl.load(AS)
            if HAS_BIAS:
                acc = acc + tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            tl.store(C + pid_m.to(tl.int64) * stride_cm + offs_n, acc.to(C.dtype.element_ty), mask=mask_n)

    @triton.jit
    def _splitk_reduce_kernel(
        P, CS, AS, BIAS, C,
        M, N, S, stride_cm,
        PER_TOKEN: tl.constexpr,
        HAS_COLSCALE: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # C = (sum_s P[s]) (* CS[n]) * AS (+ bias), partials summed in a fixed order
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        mask = mask_m[:, None] & mask_n[None, :]
        p_ptrs = P + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for _s in range(0, S):
            acc += tl.load(p_ptrs, mask=mask, other=0).to(tl.float32)
            p_ptrs += M * N
        if HAS_COLSCALE:
            cs = tl.load(CS + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc = acc * cs[None, :]
        if PER_TOKEN:
            sx = tl.load(AS + offs_m, mask=mask_m, other=0.0)
            acc = acc * sx[:, None]
        else:
            acc = acc * tl.load(AS)
        if HAS_BIAS:
            bias = tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc = acc + bias[None, :]
        c_ptrs = C + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=mask)

    @triton.jit
    def _int8_gemm_kernel(
        A, B, CS, AS, BIAS, C,
        M, N, K,
        stride_am, stride_bn, stride_cm,
        PER_TOKEN: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        # y = (x_q @ W8^T) * s_c[n] * s_x (+ bias): int8 codes [M, K] x int8 [N, K], one int32 accumulator
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # out-of-range rows / columns read valid (duplicate) rows: no masks in the main loop
        offs_am = tl.max_contiguous(tl.multiple_of(offs_m % M, BLOCK_M), BLOCK_M)
        offs_bn = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = A + offs_am.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
        b_ptrs = B + offs_bn.to(tl.int64)[None, :] * stride_bn + offs_k[:, None]  # [BLOCK_K, BLOCK_N], K-major
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                kr = K - k * BLOCK_K
                a = tl.load(a_ptrs, mask=offs_k[None, :] < kr, other=0)
                b = tl.load(b_ptrs, mask=offs_k[:, None] < kr, other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        mask_m = offs_m < M
        mask_n = offs_n < N
        cs = tl.load(CS + offs_n, mask=mask_n, other=0.0)
        y = acc.to(tl.float32) * cs[None, :]
        if PER_TOKEN:
            sx = tl.load(AS + offs_m, mask=mask_m, other=0.0)
            y = y * sx[:, None]
        else:
            y = y * tl.load(AS)
        if HAS_BIAS:
            bias = tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            y = y + bias[None, :]
        c_ptrs = C + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, y.to(C.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ------------------------------------------------------------------ python side
_SM_COUNT: dict = {}


def _num_sms(device) -> int:
    dev = torch.device(device)
    if dev.type != "cuda":
        return 132  # interpreter runs: pretend an H100/H200
    key = dev.index if dev.index is not None else torch.cuda.current_device()
    if key not in _SM_COUNT:
        _SM_COUNT[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SM_COUNT[key]


def _block_k_for(group_size: int, k: int, bk: int) -> int:
    """Largest power-of-two <= ``bk`` (>= 32) dividing the group size (multi-group layers)."""
    if group_size > 0 and -(-k // group_size) > 1:
        while bk > 32 and group_size % bk:
            bk //= 2
    return bk


def pick_config(m: int, n: int, k: int, group_size: int) -> dict:
    """Launch configuration of the tensor-core grouped kernel (``_w4a8_gemm_kernel``) for an
    ``[m, k] x [k, n]`` product with ``group_size`` (``<= 0``: per-channel).  ``SPLIT_K``
    None means automatic (:func:`_split_plan`)."""
    if m <= 16:  # H200 sweep (bench/results/gpu): unswapped, narrow N tiles, no split-K was fastest
        cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4, SWAP_AB=False)
        cfg["GROUP_M"] = 8
        cfg["SPLIT_K"] = 1
        cfg["BLOCK_K"] = _block_k_for(group_size, k, cfg["BLOCK_K"])
        return cfg
    elif m <= 32:
        cfg = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3, SWAP_AB=True)
    elif m <= 64:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3, SWAP_AB=True)
    elif m <= 256:
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3, SWAP_AB=False)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3, SWAP_AB=False)
    cfg["GROUP_M"] = 8
    cfg["SPLIT_K"] = None
    cfg["BLOCK_K"] = _block_k_for(group_size, k, cfg["BLOCK_K"])
    return cfg


def pick_gemv_config(m: int, n: int, k: int, group_size: int) -> dict:
    """Launch configuration of the CUDA-core GEMV kernel (``_w4a8_gemv_kernel``)."""
    # H200 sweep: wide-N layers liked BLOCK_N=64 without split-K, narrow-N ones BLOCK_N=32 with split-K
    if n >= 8192:
        cfg = dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=1, SPLIT_K=1)
    else:
        cfg = dict(BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=1, SPLIT_K=None)
    cfg["BLOCK_K"] = _block_k_for(group_size, k, cfg["BLOCK_K"])
    return cfg


def pick_int8_config(m: int, n: int, k: int) -> dict:
    """Launch configuration of the int8 per-channel GEMM (``_int8_gemm_kernel``)."""
    if m <= 64:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    elif m <= 128:
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4)
    elif m <= 512:  # H200 sweep at M=256
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4)
    else:  # H200 sweep at M=2048
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)
    cfg["GROUP_M"] = 8
    return cfg


def select_path(m: int) -> str:
    """Kernel the ``triton`` (auto) backend uses for ``m`` tokens: ``gemv`` / ``grouped``
    (exact, packed int4) or ``perchannel`` (int8 cache)."""
    if m > GROUPED_MAX_M:
        return "perchannel"
    return "gemv" if m <= GEMV_MAX_M else "grouped"


#: minimum K elements per split-K slice
_MIN_SPLIT_K_ELEMS = 512


def _split_plan(tiles: int, m: int, k: int, nunits: int, unit_k: int, device, split_k=None) -> tuple[int, int]:
    """(number of splits, units per split) over ``nunits`` K units of ``unit_k`` elements."""
    if split_k is None:
        target = _PROGRAMS_PER_SM * _num_sms(device)
        if tiles >= target:
            s = 1
        else:
            s = -(-target // tiles)
            s = min(s, max(1, nunits // max(1, -(-_MIN_SPLIT_K_ELEMS // unit_k))))
            # keep the float32 partials' traffic (2 * S * M * N * 4 B) well under the weights' (N * K / 2 B)
            s = min(s, max(1, k // (32 * max(1, m))))
    else:
        s = int(split_k)
    s = max(1, min(s, nunits))
    chunk = -(-nunits // s)
    return -(-nunits // chunk), chunk


def _supported(group_size: int, k: int) -> bool:
    """Whether the grouped kernels handle this grouping (tiles must not straddle groups)."""
    if group_size <= 0 or -(-k // group_size) == 1:
        return True
    return group_size % 32 == 0


# ------------------------------------------------------- activation quantization
_DIV_MODE: dict = {}


def _scalar_div_mode(device, qmax: int) -> bool:
    """True if torch on ``device`` computes ``t / qmax`` (float32 tensor / Python int) as
    ``t * fp32(1 / qmax)`` -- what ``div_true_kernel_cuda`` does for a CPU-scalar divisor --
    rather than an IEEE division (torch on CPU).  Probed once per (device, qmax)."""
    dev = torch.device(device)
    key = (dev.type, dev.index, int(qmax))
    if key not in _DIV_MODE:
        if dev.type == "cpu":
            _DIV_MODE[key] = False
        else:
            import numpy as np

            g = torch.Generator().manual_seed(12345)
            t = torch.rand(8192, 1, generator=g, dtype=torch.float32) * 64
            r = (t.to(dev).abs().amax(dim=-1, keepdim=True) / qmax).cpu()
            mul = t * torch.tensor(np.float32(1.0 / qmax))
            div = torch.from_numpy(t.numpy() / np.float32(qmax))
            if torch.equal(r, mul):
                _DIV_MODE[key] = True
            else:
                if not torch.equal(r, div):
                    warnings.warn(f"fptq triton: torch's float32 division by {qmax} on {dev} matches neither "
                                  "IEEE division nor the reciprocal product; per-token scales may differ by 1 ulp")
                _DIV_MODE[key] = False
    return _DIV_MODE[key]


def quantize_activations(
    x2d: torch.Tensor,
    scale: torch.Tensor | None = None,
    qmax: int = 127,
    block: int | None = None,
    recip: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes ``[M, K]`` of ``x2d`` and the float32 scale, bit-identical to
    :meth:`QuantLinear.quantize_input` on the same device.

    ``scale=None``: dynamic per-token (returns ``[M]`` scales); otherwise a static
    per-tensor scale (0-d tensor on the same device, returned as is).  ``recip``
    overrides how the per-token scale divides by ``qmax`` (default: as torch does on
    this device, :func:`_scalar_div_mode`).
    """
    _require_triton()
    if x2d.dim() != 2:
        raise ValueError("quantize_activations expects a 2-D [M, K] tensor")
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    m, k = x2d.shape
    q = torch.empty(m, k, dtype=torch.int8, device=x2d.device)
    dynamic = scale is None
    s = torch.empty(m, dtype=torch.float32, device=x2d.device) if dynamic else scale.to(torch.float32).reshape(())
    if m == 0:
        return q, s
    if recip is None:
        recip = dynamic and _scalar_div_mode(x2d.device, qmax)
    if block is None:
        block = max(128, triton.next_power_of_2(k)) if k <= 16384 else 4096
    single = block >= k
    num_warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    import numpy as np

    _quant_act_kernel[(m,)](
        x2d, q, s, s, float(np.float32(1.0 / qmax)), k, x2d.stride(0), q.stride(0),
        QMAX=qmax, DYNAMIC=dynamic, RECIP=bool(recip), SINGLE=single, BLOCK=block, num_warps=num_warps,
    )
    return q, s


# ------------------------------------------------------------- grouped (exact)
def _check_grouped_args(xq, x_scale, qweight, w_scales, in_features, group_size):
    m, k = xq.shape
    if k != in_features:
        raise ValueError(f"xq has K={k}, expected {in_features}")
    if qweight.dtype != torch.uint8 or qweight.shape[1] != (k + 1) // 2:
        raise ValueError("qweight must be packed uint8 [N, ceil(K/2)]")
    if not _supported(group_size, k):
        raise ValueError(f"triton kernel needs group_size % 32 == 0 (or one group per row), got {group_size}")
    per_token = x_scale.dim() > 0
    x_scale = x_scale.to(torch.float32).contiguous()
    if per_token:
        if x_scale.numel() != m:
            raise ValueError(f"per-token x_scale must have M={m} elements, got {x_scale.numel()}")
        x_scale = x_scale.reshape(m)
    return xq.contiguous(), x_scale, per_token, qweight.contiguous(), w_scales.contiguous()


def _reduce(partials, x_scale, per_token, bias, c, col_scale=None) -> torch.Tensor:
    s, m, n = partials.shape
    bm = min(16, triton.next_power_of_2(m))
    bn = max(128, 2048 // bm)
    has_bias = bias is not None
    _splitk_reduce_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        partials, col_scale if col_scale is not None else x_scale, x_scale,
        bias if has_bias else x_scale, c,
        m, n, s, c.stride(0),
        PER_TOKEN=per_token, HAS_COLSCALE=col_scale is not None, HAS_BIAS=has_bias,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=4,
    )
    return c


def w4a8_matmul(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    qweight: torch.Tensor,
    w_scales: torch.Tensor,
    in_features: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
    config: dict | None = None,
) -> torch.Tensor:
    """Exact group-wise ``y = x_scale * sum_g w_scales[:, g] * (xq_g @ q_g^T) (+ bias)`` with
    packed int4 weights, tensor-core kernel (``_w4a8_gemm_kernel``, optional split-K).

    ``xq``: int8 ``[M, K]``; ``x_scale``: float32 0-d (per-tensor) or ``[M]``
    (per-token); ``qweight``: uint8 ``[N, ceil(K/2)]``; ``w_scales``: fp16
    ``[N, G]``; returns ``[M, N]`` in ``out_dtype``.  ``config`` overrides
    :func:`pick_config` (keys BLOCK_M/N/K, GROUP_M, SWAP_AB, SPLIT_K, num_warps, num_stages).
    """
    _require_triton()
    xq, x_scale, per_token, qweight, w_scales = _check_grouped_args(
        xq, x_scale, qweight, w_scales, in_features, group_size)
    m, k = xq.shape
    n = qweight.shape[0]
    g = w_scales.shape[1]
    one_group = g == 1
    gs = k if group_size <= 0 else group_size
    cfg = dict(pick_config(m, n, k, group_size))
    if config:
        cfg.update(config)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    if not one_group and gs % bk:
        raise ValueError(f"BLOCK_K={bk} must divide group_size={gs}")
    c = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    if m == 0 or n == 0:
        return c
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    if one_group:
        nunits, unit_k = triton.cdiv(k, bk), bk
    else:
        nunits, unit_k = g, gs
    splits, chunk = _split_plan(tiles, m, k, nunits, unit_k, xq.device, cfg.get("SPLIT_K"))
    has_bias = bias is not None
    bias_arg = bias.contiguous() if has_bias else c
    part = torch.empty(splits, m, n, dtype=torch.float32, device=xq.device) if splits > 1 else c
    _w4a8_gemm_kernel[(tiles, splits)](
        xq, qweight, w_scales, x_scale, bias_arg, c, part,
        m, n, k, g, gs, chunk, nunits,
        xq.stride(0), qweight.stride(0), w_scales.stride(0), c.stride(0),
        PER_TOKEN=per_token,
        HAS_BIAS=has_bias,
        ONE_GROUP=one_group,
        TILES_PER_GROUP=1 if one_group else gs // bk,
        SPLIT=splits > 1,
        SWAP_AB=bool(cfg.get("SWAP_AB", False)),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if splits > 1:
        _reduce(part, x_scale, per_token, bias.contiguous() if has_bias else None, c)
    return c


def w4a8_gemv(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    qweight: torch.Tensor,
    w_scales: torch.Tensor,
    in_features: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
    config: dict | None = None,
) -> torch.Tensor:
    """Same maths and arguments as :func:`w4a8_matmul` (exact group-wise), with the
    CUDA-core GEMV kernel (one token row per program, split-K), meant for M <= 2-4.
    ``config`` overrides :func:`pick_gemv_config` (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages)."""
    _require_triton()
    xq, x_scale, per_token, qweight, w_scales = _check_grouped_args(
        xq, x_scale, qweight, w_scales, in_features, group_size)
    m, k = xq.shape
    n = qweight.shape[0]
    g = w_scales.shape[1]
    one_group = g == 1
    gs = k if group_size <= 0 else group_size
    cfg = dict(pick_gemv_config(m, n, k, group_size))
    if config:
        cfg.update(config)
    bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
    if not one_group and gs % bk:
        raise ValueError(f"BLOCK_K={bk} must divide group_size={gs}")
    c = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    if m == 0 or n == 0:
        return c
    n_tiles = triton.cdiv(n, bn)
    if one_group:
        nunits, unit_k = triton.cdiv(k, bk), bk
    else:
        nunits, unit_k = g, gs
    splits, chunk = _split_plan(n_tiles * m, m, k, nunits, unit_k, xq.device, cfg.get("SPLIT_K"))
    has_bias = bias is not None
    bias_arg = bias.contiguous() if has_bias else c
    part = torch.empty(splits, m, n, dtype=torch.float32, device=xq.device) if splits > 1 else c
    _w4a8_gemv_kernel[(m, n_tiles, splits)](
        xq, qweight, w_scales, x_scale, bias_arg, c, part,
        m, n, k, gs, chunk, nunits,
        xq.stride(0), qweight.stride(0), w_scales.stride(0), c.stride(0),
        PER_TOKEN=per_token,
        HAS_BIAS=has_bias,
        ONE_GROUP=one_group,
        TILES_PER_GROUP=1 if one_group else gs // bk,
        SPLIT=splits > 1,
        BLOCK_N=bn, BLOCK_K=bk,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if splits > 1:
        _reduce(part, x_scale, per_token, bias.contiguous() if has_bias else None, c)
    return c


# -------------------------------------------------------- per-channel (int8 cache)
class _PerChannelSource:
    """What :func:`fptq.kernels.cpu.perchannel_weight` reads from a module, with a private
    cache (so the CPU helper's intermediates are not kept on the module)."""

    def __init__(self, module):
        self._module = module
        self.qweight = module.qweight
        self.w_scales = module.w_scales
        self.wbits = module.wbits
        self.group_size = module.group_size
        self.in_features = module.in_features
        self._cache: dict = {}

    def codes(self) -> torch.Tensor:
        return self._module.codes()


def perchannel_weight_device(module) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 ``[N, K]`` codes and float32 ``[N]`` per-channel scales on the module's device,
    computed by :func:`fptq.kernels.cpu.perchannel_weight` (same numerics as the CPU
    ``int8_perchannel`` backend) and cached on the module (1 byte/weight)."""
    from .cpu import _weight_key, perchannel_weight

    key = _weight_key(module)
    hit = module._cache.get("triton_w8_perchannel")
    if hit is not None and hit[0] == key:
        return hit[1]
    dev = module.qweight.device
    w8, sc = perchannel_weight(_PerChannelSource(module))
    value = (w8.to(dev).contiguous(), sc.to(device=dev, dtype=torch.float32).contiguous())
    module._cache["triton_w8_perchannel"] = (key, value)
    return value


def int8_perchannel_matmul(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    w8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
    config: dict | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """``y = (xq @ w8^T) * w_scale[n] * x_scale (+ bias)``: int8 ``[M, K]`` x int8 ``[N, K]``
    with one int32 accumulator over K.  ``impl``: ``"triton"`` (``_int8_gemm_kernel``,
    fused epilogue) or ``"int_mm"`` (``torch._int_mm`` + the Triton epilogue; needs
    M > 16 and K, N multiples of 8 on CUDA, else the Triton kernel is used); default
    ``PERCHANNEL_IMPL``."""
    _require_triton()
    m, k = xq.shape
    n = w8.shape[0]
    if w8.dtype != torch.int8 or w8.shape[1] != k:
        raise ValueError(f"w8 must be int8 [N, {k}]")
    xq = xq.contiguous()
    w8 = w8.contiguous()
    w_scale = w_scale.to(torch.float32).contiguous()
    per_token = x_scale.dim() > 0
    x_scale = x_scale.to(torch.float32).contiguous()
    if per_token:
        x_scale = x_scale.reshape(m)
    c = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    if m == 0 or n == 0:
        return c
    has_bias = bias is not None
    bias_c = bias.contiguous() if has_bias else None
    impl = impl or PERCHANNEL_IMPL
    if impl == "int_mm" and (xq.device.type != "cuda" or (m > 16 and k % 8 == 0 and n % 8 == 0)):
        acc = torch._int_mm(xq, w8.t())
        return _reduce(acc.unsqueeze(0), x_scale, per_token, bias_c, c, col_scale=w_scale)
    if impl not in ("triton", "int_mm"):
        raise ValueError(f"unknown per-channel impl {impl!r}")
    cfg = dict(pick_int8_config(m, n, k))
    if config:
        cfg.update(config)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _int8_gemm_kernel[grid](
        xq, w8, w_scale, x_scale, bias_c if has_bias else c, c,
        m, n, k,
        xq.stride(0), w8.stride(0), c.stride(0),
        PER_TOKEN=per_token, HAS_BIAS=has_bias, EVEN_K=k % bk == 0,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return c


# ------------------------------------------------------------------ forward
_warned: set = set()
_broken: set = set()
#: the configuration validated on the first GPU run (no split-K, no operand swap)
_BASELINE_CONFIG = dict(SWAP_AB=False, SPLIT_K=1)


def _warn_once(why: str) -> None:
    if why not in _warned:
        _warned.add(why)
        warnings.warn(why, stacklevel=4)


def _fallback(module, x: torch.Tensor, why: str) -> torch.Tensor:
    _warn_once(f"fptq triton backend: {why}; using the reference path for this layer")
    return module.reference_forward(x)


def _guarded(name: str, fast, baseline):
    """Run ``fast()``; if it raises (e.g. a kernel that does not compile on this GPU /
    triton), warn once, remember it and use ``baseline()`` from then on."""
    if name in _broken:
        return baseline()
    try:
        return fast()
    except Exception as e:  # noqa: BLE001 - reported, then the validated kernel runs
        _broken.add(name)
        _warn_once(f"fptq triton backend: the {name!r} kernel failed ({e!r}); falling back to the "
                   "baseline grouped kernel")
        return baseline()


def triton_forward(module, x: torch.Tensor, path: str = "auto") -> torch.Tensor:
    """QuantLinear forward with the Triton kernels.

    ``path``: ``"auto"`` (backend ``triton``: :func:`select_path` by the number of
    tokens), ``"grouped"`` (backend ``triton_grouped``: exact, packed int4; GEMV kernel
    for M <= ``GEMV_MAX_M``, tensor-core kernel above) or ``"perchannel"`` (backend
    ``triton_perchannel``: int8 per-channel cache, one extra weight rounding unless the
    layer is per-channel).
    """
    _require_triton()
    if path not in PATHS:
        raise ValueError(f"unknown triton path {path!r}; choose one of {PATHS}")
    if x.shape[-1] != module.in_features:
        raise ValueError(f"expected input [..., {module.in_features}], got {tuple(x.shape)}")
    if module.wbits != 4:
        return _fallback(module, x, f"{module.wbits}-bit weights are not covered by the W4A8 kernel")
    if module.act_mode == "none":
        return _fallback(module, x, "float activations (act_mode='none') are not covered")
    if module.abits != 8:
        return _fallback(module, x, f"{module.abits}-bit activations are not covered")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, module.in_features)
    m = x2.shape[0]
    kind = select_path(m) if path == "auto" else path
    if kind != "perchannel" and not _supported(module.group_size, module.in_features):
        if path == "grouped":
            return _fallback(module, x, f"group_size={module.group_size} is not a multiple of 32")
        kind = "perchannel"  # any grouping works once the weights are int8 per-channel
    static = module.act_mode == "static_tensor"
    xq, sx = quantize_activations(x2, module.act_scale if static else None, qmax=module.act_qmax())
    out_dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    args = (xq, sx, module.qweight, module.w_scales, module.in_features, module.group_size)

    def baseline():
        if not _supported(module.group_size, module.in_features):
            raise RuntimeError("no Triton kernel covers this layer")
        return w4a8_matmul(*args, bias=module.bias, out_dtype=out_dtype, config=_BASELINE_CONFIG)

    if kind == "perchannel":
        y = _guarded("perchannel", lambda: int8_perchannel_matmul(
            xq, sx, *perchannel_weight_device(module), bias=module.bias, out_dtype=out_dtype), baseline)
    elif kind == "gemv" or (kind == "grouped" and m <= GEMV_MAX_M):
        y = _guarded("gemv", lambda: w4a8_gemv(*args, bias=module.bias, out_dtype=out_dtype), baseline)
    else:
        y = _guarded("grouped", lambda: w4a8_matmul(*args, bias=module.bias, out_dtype=out_dtype), baseline)
    return y.to(x.dtype).reshape(*lead, module.out_features)


def triton_grouped_forward(module, x: torch.Tensor) -> torch.Tensor:
    """Backend ``triton_grouped``: exact group-wise kernels for every M."""
    return triton_forward(module, x, path="grouped")


def triton_perchannel_forward(module, x: torch.Tensor) -> torch.Tensor:
    """Backend ``triton_perchannel``: int8 per-channel GEMM for every M."""
    return triton_forward(module, x, path="perchannel")

"""Exact group-wise W4A8 Triton kernels on the packed int4 weights: the tensor-core GEMM
(``_w4a8_gemm_kernel``, optional operand swap) and the CUDA-core GEMV (``_w4a8_gemv_kernel``), both
with optional split-K (partials summed by :func:`fptq.kernels.triton_common._reduce`), and their
launchers :func:`w4a8_matmul` and :func:`w4a8_gemv`."""
from __future__ import annotations

import math

import torch

from ..quant.intscales import INT_SUM_MAX_K
from .triton_common import (
    HAS_TRITON,
    _check_grouped_args,
    _check_int_scales,
    _epilogue,
    _grouping,
    _reduce,
    _split_plan,
    _tile_ids,
    pick_config,
    pick_gemv_config,
    require_triton,
    tl,
    triton,
)
from .triton_quant import _codes, _inv_qmax, _row_dynamic_scale, _scalar_div_mode

__all__ = ["w4a8_matmul", "w4a8_gemv", "w4a8_gemv_quant"]

if HAS_TRITON:

    @triton.jit
    def _packed_tile(b_rows, kb, mask_n, K2, EVEN_K: tl.constexpr):
        # the packed bytes kb of each row; EVEN_K (K a multiple of the tiles): no mask along K, which is what lets
        # the compiler vectorize the loads (and pipeline them into shared memory): with it, one load per byte
        if EVEN_K:
            return tl.load(b_rows + kb[None, :], mask=mask_n[:, None], other=0)
        else:
            return tl.load(b_rows + kb[None, :], mask=mask_n[:, None] & (kb[None, :] < K2), other=0)

    @triton.jit
    def _nibbles16(b, ASM: tl.constexpr):
        # (16 x low nibbles, 16 x high nibbles) of the int8 bytes b, as int8: b << 4 and b & 0xF0 (the nibbles are
        # two's complement); ASM: four bytes per PTX instruction pair (Triton's own int8 ops widen each byte)
        if ASM:
            return tl.inline_asm_elementwise(
                "{ .reg .b32 t; shl.b32 t, $2, 4; and.b32 $0, t, 0xF0F0F0F0; and.b32 $1, $2, 0xF0F0F0F0; }",
                "=r,=r,r", [b], dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
        else:
            return b << 4, b & -16

    @triton.jit
    def _unpacked_w_tile(b_rows, k0, offs_kb, mask_n, K2, mult, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         INT_SCALES: tl.constexpr, EVEN_K: tl.constexpr):
        # [BLOCK_N, BLOCK_K] int8 codes from packed bytes (low nibble = even column); INT_SCALES: times the rows'
        # integer group multipliers ``mult`` [BLOCK_N] (int32; q * m stays in int8)
        kb = k0 // 2 + offs_kb
        b = _packed_tile(b_rows, kb, mask_n, K2, EVEN_K)
        bi = b.to(tl.int32)
        lo = (bi << 28) >> 28
        hi = (bi << 24) >> 28
        w = tl.reshape(tl.join(lo, hi), [BLOCK_N, BLOCK_K])
        if INT_SCALES:
            w = w * mult[:, None]
        return w.to(tl.int8)

    @triton.jit
    def _dot_tile(acc_i, a_base, b_rows, k0, offs_k, offs_kb, mask_m, mask_n, K, K2, mult,
                  SWAP_AB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INT_SCALES: tl.constexpr,
                  EVEN_K: tl.constexpr, NIBBLE: tl.constexpr = False, ASM: tl.constexpr = False):
        # acc_i (int32) += the activation tile at k0 times the unpacked weight tile at k0;
        # SWAP_AB: acc_i^T [BLOCK_N, BLOCK_M] = W [BLOCK_N, BLOCK_K] @ X^T [BLOCK_K, BLOCK_M]
        ka = k0 + offs_k
        if SWAP_AB:
            at = tl.load(a_base + ka[:, None], mask=(ka[:, None] < K) & mask_m[None, :], other=0)
        else:
            a = tl.load(a_base + ka[None, :], mask=mask_m[:, None] & (ka[None, :] < K), other=0)
        if NIBBLE:
            # no unpacking: a byte b holds (even code, odd code) in its (low, high) nibble; read as int8, b << 4 is
            # 16 x the even code and b & 0xF0 16 x the odd one, exactly; the activation tile splits into its even
            # and odd columns; two dots of BLOCK_K / 2 give 16 x the tile's sum (the caller scales by s / 16)
            lo, hi = _nibbles16(_packed_tile(b_rows, k0 // 2 + offs_kb, mask_n, K2, EVEN_K).to(tl.int8, bitcast=True),
                                ASM)
            if SWAP_AB:
                ae, ao = tl.split(tl.permute(tl.reshape(at, [BLOCK_K // 2, 2, at.shape[1]]), (0, 2, 1)))
                acc_i = tl.dot(lo, ae, acc_i, out_dtype=tl.int32)
                acc_i = tl.dot(hi, ao, acc_i, out_dtype=tl.int32)
            else:
                ae, ao = tl.split(tl.reshape(a, [a.shape[0], BLOCK_K // 2, 2]))
                acc_i = tl.dot(ae, tl.trans(lo), acc_i, out_dtype=tl.int32)
                acc_i = tl.dot(ao, tl.trans(hi), acc_i, out_dtype=tl.int32)
        else:
            w = _unpacked_w_tile(b_rows, k0, offs_kb, mask_n, K2, mult, BLOCK_N, BLOCK_K, INT_SCALES, EVEN_K)
            if SWAP_AB:
                acc_i = tl.dot(w, at, acc_i, out_dtype=tl.int32)
            else:
                acc_i = tl.dot(a, tl.trans(w), acc_i, out_dtype=tl.int32)
        return acc_i

    @triton.jit
    def _group_scaled(acc_i, ws_ptrs, mask_n, SWAP_AB: tl.constexpr, SIXTEENTH: tl.constexpr = False):
        # float32 acc_i times the fp16 group scales at ws_ptrs (one per output channel); SIXTEENTH: acc_i is 16 x the
        # sum, and float32(16 S) * (s / 16) rounds as float32(S) * s does (powers of two): the same bits
        s = tl.load(ws_ptrs, mask=mask_n, other=0.0).to(tl.float32)
        if SIXTEENTH:
            s = s * 0.0625
        if SWAP_AB:
            out = acc_i.to(tl.float32) * s[:, None]
        else:
            out = acc_i.to(tl.float32) * s[None, :]
        return out

    @triton.jit
    def _store_out(acc, offs_m, offs_n, mask_m, mask_n, AS, BIAS, C, P, pid_s, M, N, stride_cm,
                   PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                   HAS_SCALE: tl.constexpr = True):
        # acc: float32 [BLOCK_M, BLOCK_N] (group scales applied): split s's partial, or C (_epilogue)
        if SPLIT:
            p_ptrs = P + pid_s.to(tl.int64) * M * N + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
            tl.store(p_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])
        else:
            _epilogue(acc, offs_m, offs_n, mask_m, mask_n, AS, BIAS, C, stride_cm, PER_TOKEN, HAS_BIAS, HAS_SCALE)

    @triton.jit
    def _gemm_acc(A, B, WS, MT, BASE, pid_m, pid_n, pid_s, M, N, K, GS, CHUNK, NUNITS, stride_am, stride_bn,
                  stride_wsn, ONE_GROUP: tl.constexpr, TILES_PER_GROUP: tl.constexpr, SWAP_AB: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INT_SCALES: tl.constexpr,
                  EVEN_K: tl.constexpr, NIBBLE: tl.constexpr, ASM: tl.constexpr):
        # output tile (pid_m, pid_n)'s float32 sums [BLOCK_M, BLOCK_N] (group scales applied, not the activation
        # scale) over split pid_s's units of K: K tiles (ONE_GROUP) or groups, units [s*CHUNK, (s+1)*CHUNK)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        offs_kb = tl.arange(0, BLOCK_K // 2)
        mask_m = offs_m < M
        mask_n = offs_n < N
        K2 = (K + 1) // 2
        b_rows = B + offs_n.to(tl.int64)[:, None] * stride_bn
        ws_rows = WS + offs_n * stride_wsn
        u0 = pid_s * CHUNK
        u1 = tl.minimum(u0 + CHUNK, NUNITS)

        # the accumulators are [BLOCK_N, BLOCK_M] with swapped operands, [BLOCK_M, BLOCK_N] without
        if SWAP_AB:
            a_base = A + offs_m.to(tl.int64)[None, :] * stride_am
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        else:
            a_base = A + offs_m.to(tl.int64)[:, None] * stride_am
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if ONE_GROUP:
            # one scale per row: a single int32 accumulator over every K tile, scaled once
            acc_i = tl.zeros(acc.shape, dtype=tl.int32)
            for u in range(u0, u1):
                acc_i = _dot_tile(acc_i, a_base, b_rows, u * BLOCK_K, offs_k, offs_kb, mask_m, mask_n, K, K2, 0,
                                  SWAP_AB, BLOCK_N, BLOCK_K, False, EVEN_K, NIBBLE, ASM)
            acc = _group_scaled(acc_i, ws_rows, mask_n, SWAP_AB, NIBBLE)
        elif INT_SCALES:
            # integer group scales: the codes times their group's multiplier, one int32 accumulator over every
            # group, the channel's base applied once
            mt_rows = MT + offs_n * stride_wsn
            acc_i = tl.zeros(acc.shape, dtype=tl.int32)
            for g in range(u0, u1):
                mult = tl.load(mt_rows + g, mask=mask_n, other=0).to(tl.int32)
                for t in tl.static_range(TILES_PER_GROUP):
                    acc_i = _dot_tile(acc_i, a_base, b_rows, g * GS + t * BLOCK_K, offs_k, offs_kb, mask_m, mask_n,
                                      K, K2, mult, SWAP_AB, BLOCK_N, BLOCK_K, True, EVEN_K)
            acc = _group_scaled(acc_i, BASE + offs_n, mask_n, SWAP_AB)
        else:
            # one int32 accumulator per group, scaled and added in float32 at the end of the group
            for g in range(u0, u1):
                acc_i = tl.zeros(acc.shape, dtype=tl.int32)
                for t in tl.static_range(TILES_PER_GROUP):
                    acc_i = _dot_tile(acc_i, a_base, b_rows, g * GS + t * BLOCK_K, offs_k, offs_kb, mask_m, mask_n,
                                      K, K2, 0, SWAP_AB, BLOCK_N, BLOCK_K, False, EVEN_K, NIBBLE, ASM)
                acc += _group_scaled(acc_i, ws_rows + g, mask_n, SWAP_AB, NIBBLE)
        if SWAP_AB:
            acc = tl.trans(acc)
        return acc

    @triton.jit
    def _w4a8_gemm_kernel(
        A, B, WS, AS, BIAS, C, P, MT, BASE,
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
        INT_SCALES: tl.constexpr = False,  # WS = BASE[n] * MT[n, g] (int8 multipliers [N, G], stride stride_wsn)
        EVEN_K: tl.constexpr = False,  # every tile lies inside K: no mask along K
        NIBBLE: tl.constexpr = False,  # float scales: 16 x the codes straight from the bytes, two dots per tile
        ASM: tl.constexpr = False,  # NIBBLE's byte split in PTX (CUDA)
    ):
        pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        pid_s = tl.program_id(1)
        acc = _gemm_acc(A, B, WS, MT, BASE, pid_m, pid_n, pid_s, M, N, K, GS, CHUNK, NUNITS, stride_am, stride_bn,
                        stride_wsn, ONE_GROUP, TILES_PER_GROUP, SWAP_AB, BLOCK_M, BLOCK_N, BLOCK_K, INT_SCALES,
                        EVEN_K, NIBBLE, ASM)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        _store_out(acc, offs_m, offs_n, offs_m < M, offs_n < N, AS, BIAS, C, P, pid_s, M, N, stride_cm,
                   PER_TOKEN, HAS_BIAS, SPLIT)

    @triton.jit
    def _act_codes(x_row, offs, K, scale, QUANT: tl.constexpr, QMAX: tl.constexpr):
        # int32 activation codes at ``offs``: loaded (int8 codes) or, with QUANT, quantized here from the float
        # activations with ``scale`` (the same rounding as ``_quant_act_kernel``); 0 past K
        if QUANT:
            v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            return _codes(v, scale, QMAX).to(tl.int32)
        else:
            return tl.load(x_row + offs, mask=offs < K, other=0).to(tl.int32)

    @triton.jit
    def _gemv_tile(acc2, b_rows, x_row, k0, offs_j, mask_n, K, K2, scale, mult, QUANT: tl.constexpr,
                   QMAX: tl.constexpr, INT_SCALES: tl.constexpr, EVEN_K: tl.constexpr):
        # acc2 [BLOCK_N, BLOCK_K // 2] (int32) += low nibbles x even activation codes + high nibbles x odd ones
        # (INT_SCALES: times the rows' integer group multipliers ``mult`` [BLOCK_N])
        kb = k0 // 2 + offs_j
        b = _packed_tile(b_rows, kb, mask_n, K2, EVEN_K)
        ke = k0 + 2 * offs_j
        xe = _act_codes(x_row, ke, K, scale, QUANT, QMAX)
        xo = _act_codes(x_row, ke + 1, K, scale, QUANT, QMAX)
        bi = b.to(tl.int32)
        t = ((bi << 28) >> 28) * xe[None, :] + ((bi << 24) >> 28) * xo[None, :]
        if INT_SCALES:
            t = t * mult[:, None]
        acc2 += t
        return acc2

    @triton.jit
    def _row_scale(x_row, AS, INV_QMAX, K, pid_m, first,
                   QUANT: tl.constexpr, PER_TOKEN: tl.constexpr, RECIP: tl.constexpr, QMAX: tl.constexpr,
                   BLOCK_R: tl.constexpr):
        # the token's activation scale: the per-tensor AS, or per token AS[pid_m]; with QUANT and PER_TOKEN the
        # row's absmax / qmax computed here as ``_quant_act_kernel`` does (every program of the row computes the
        # same value; the ``first`` one stores it in AS[pid_m], for the split-K reduction and the caller)
        if PER_TOKEN:
            if QUANT:
                scale = _row_dynamic_scale(x_row, K, INV_QMAX, QMAX, RECIP, BLOCK_R)
                tl.store(AS + pid_m, scale, mask=first)
            else:
                scale = tl.load(AS + pid_m)
        else:
            scale = tl.load(AS)
        return scale

    @triton.jit
    def _w4a8_gemv_kernel(
        A, B, WS, AS, BIAS, C, P, MT, BASE, INV_QMAX,
        M, N, K, GS, CHUNK, NUNITS,
        stride_am, stride_bn, stride_wsn, stride_cm,
        PER_TOKEN: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        ONE_GROUP: tl.constexpr,
        TILES_PER_GROUP: tl.constexpr,
        SPLIT: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        QUANT: tl.constexpr = False,  # A holds float activations, quantized here (no separate launch)
        RECIP: tl.constexpr = False,
        QMAX: tl.constexpr = 127,
        BLOCK_R: tl.constexpr = 1024,
        INT_SCALES: tl.constexpr = False,  # WS = BASE[n] * MT[n, g] (int8 multipliers [N, G], stride stride_wsn)
        EVEN_K: tl.constexpr = False,  # every tile lies inside K: no mask along K
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
        ws_rows = WS + offs_n * stride_wsn
        x_row = A + pid_m.to(tl.int64) * stride_am
        scale = _row_scale(x_row, AS, INV_QMAX, K, pid_m, (pid_n == 0) & (pid_s == 0),
                           QUANT, PER_TOKEN, RECIP, QMAX, BLOCK_R)
        u0 = pid_s * CHUNK
        u1 = tl.minimum(u0 + CHUNK, NUNITS)
        if ONE_GROUP:
            acc2 = tl.zeros([BLOCK_N, BLOCK_K // 2], dtype=tl.int32)
            for u in range(u0, u1):
                acc2 = _gemv_tile(acc2, b_rows, x_row, u * BLOCK_K, offs_j, mask_n, K, K2, scale, 0, QUANT, QMAX,
                                  False, EVEN_K)
            s = tl.load(ws_rows, mask=mask_n, other=0.0).to(tl.float32)
            acc = tl.sum(acc2, axis=1).to(tl.float32) * s
        elif INT_SCALES:
            # integer group scales: one int32 sum over every group (no reduction per group), the base once
            mt_rows = MT + offs_n * stride_wsn
            acc2 = tl.zeros([BLOCK_N, BLOCK_K // 2], dtype=tl.int32)
            for g in range(u0, u1):
                mult = tl.load(mt_rows + g, mask=mask_n, other=0).to(tl.int32)
                for t in tl.static_range(TILES_PER_GROUP):
                    acc2 = _gemv_tile(acc2, b_rows, x_row, g * GS + t * BLOCK_K, offs_j, mask_n, K, K2, scale,
                                      mult, QUANT, QMAX, True, EVEN_K)
            s = tl.load(BASE + offs_n, mask=mask_n, other=0.0)
            acc = tl.sum(acc2, axis=1).to(tl.float32) * s
        else:
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for g in range(u0, u1):
                acc2 = tl.zeros([BLOCK_N, BLOCK_K // 2], dtype=tl.int32)
                for t in tl.static_range(TILES_PER_GROUP):
                    acc2 = _gemv_tile(acc2, b_rows, x_row, g * GS + t * BLOCK_K, offs_j, mask_n, K, K2, scale,
                                      0, QUANT, QMAX, False, EVEN_K)
                s = tl.load(ws_rows + g, mask=mask_n, other=0.0).to(tl.float32)
                acc += tl.sum(acc2, axis=1).to(tl.float32) * s
        _gemv_store(acc, P, C, BIAS, scale, pid_m, pid_s, offs_n, mask_n, M, N, stride_cm, SPLIT, HAS_BIAS)

    @triton.jit
    def _gemv_store(acc, P, C, BIAS, scale, pid_m, pid_s, offs_n, mask_n, M, N, stride_cm, SPLIT: tl.constexpr,
                    HAS_BIAS: tl.constexpr):
        # a GEMV program's float32 row acc [BLOCK_N] (group scales applied): the split-K partial, or scaled by the
        # activation scale (+ bias) and cast into C
        if SPLIT:
            tl.store(P + pid_s.to(tl.int64) * M * N + pid_m.to(tl.int64) * N + offs_n, acc, mask=mask_n)
        else:
            acc = _gemv_scaled(acc, scale, BIAS, offs_n, mask_n, HAS_BIAS)
            tl.store(C + pid_m.to(tl.int64) * stride_cm + offs_n, acc.to(C.dtype.element_ty), mask=mask_n)

    @triton.jit
    def _gemv_scaled(acc, scale, BIAS, offs_n, mask_n, HAS_BIAS: tl.constexpr):
        # a GEMV row's float32 sums times the activation scale (+ bias), before the cast to the output's dtype
        acc = acc * scale
        if HAS_BIAS:
            acc = acc + tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        return acc


def _tensor_core_flags(cfg: dict, k: int, g: int, ints: bool, device, asm: bool | None) -> dict:
    """The tensor-core kernel's own constexprs (``SWAP_AB``, ``BLOCK_M``, ``NIBBLE``, ``ASM``): with float scales
    16 x the codes taken from the bytes by a shift and a mask, two dots per tile (the int32 sums are 16 x the exact
    ones: one group per row needs K <= INT_SUM_MAX_K), the byte split in PTX on CUDA unless ``asm`` is False."""
    nibble = bool(cfg.get("NIBBLE", True)) and not ints and (g > 1 or k <= INT_SUM_MAX_K)
    return dict(SWAP_AB=bool(cfg.get("SWAP_AB", False)), BLOCK_M=cfg["BLOCK_M"], NIBBLE=nibble,
                ASM=nibble and (device.type == "cuda" if asm is None else bool(asm)))


def _launch(xq, x_scale, qweight, w_scales, in_features, group_size, bias, out_dtype, config, gemv: bool,
            quant: tuple | None = None, int_scales: tuple | None = None, asm: bool | None = None):
    """Check the arguments, pick the launch configuration and split-K, run the GEMV (``gemv``) or the
    tensor-core kernel, and reduce the split-K partials.

    ``quant`` (GEMV only): ``(qmax, recip)``: ``xq`` then holds the float activations, quantized inside the
    kernel; ``x_scale`` is the static per-tensor scale, or per token the ``[M]`` float32 tensor the kernel
    writes the scales to. ``int_scales``: ``(base, multipliers)`` of integer group scales
    (:func:`fptq.kernels.triton_w4a8.integer_scales_device`): one int32 accumulator over all of K, the base applied once."""
    require_triton()
    if quant is not None and not gemv:
        raise ValueError("in-kernel activation quantization is a GEMV option")
    xq, x_scale, per_token, qweight, w_scales = _check_grouped_args(
        xq, x_scale, qweight, w_scales, in_features, group_size)
    m, k = xq.shape
    n = qweight.shape[0]
    g = w_scales.shape[1]
    ints = _check_int_scales(int_scales, w_scales, k)
    cfg = dict((pick_gemv_config if gemv else pick_config)(m, n, k, group_size))
    if config:
        cfg.update(config)
    flags, nunits, unit_k, gs = _grouping(k, g, group_size, cfg)
    c = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    if m == 0 or n == 0:
        return c
    # output tiles: one token row x BLOCK_N channels per GEMV program, BLOCK_M x BLOCK_N per GEMM program
    bn = cfg["BLOCK_N"]
    grid = (m, triton.cdiv(n, bn)) if gemv else (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, bn),)
    splits, chunk = _split_plan(math.prod(grid), m, k, nunits, unit_k, xq.device, cfg.get("SPLIT_K"))
    has_bias = bias is not None
    bias_arg = bias.contiguous() if has_bias else c
    part = torch.empty(splits, m, n, dtype=torch.float32, device=xq.device) if splits > 1 else c
    strides = (xq.stride(0), qweight.stride(0), w_scales.stride(0), c.stride(0))
    flags.update(PER_TOKEN=per_token, HAS_BIAS=has_bias, SPLIT=splits > 1, INT_SCALES=ints is not None)
    mt, base = ints if ints is not None else (w_scales, x_scale)  # (unread without INT_SCALES)
    if gemv:
        inv = 1.0
        if quant is not None:
            qmax, recip = quant
            inv = _inv_qmax(qmax)
            flags.update(QUANT=True, QMAX=int(qmax), RECIP=bool(per_token and recip),
                         BLOCK_R=min(4096, max(128, triton.next_power_of_2(k))))
        _w4a8_gemv_kernel[(*grid, splits)](
            xq, qweight, w_scales, x_scale, bias_arg, c, part, mt, base, inv, m, n, k, gs, chunk, nunits, *strides,
            **flags)
    else:
        _w4a8_gemm_kernel[(*grid, splits)](
            xq, qweight, w_scales, x_scale, bias_arg, c, part, mt, base, m, n, k, g, gs, chunk, nunits, *strides,
            GROUP_M=cfg["GROUP_M"], **_tensor_core_flags(cfg, k, g, ints is not None, xq.device, asm), **flags)
    if splits > 1:
        _reduce(part, x_scale, per_token, bias.contiguous() if has_bias else None, c)
    return c


def w4a8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor,
                in_features: int, group_size: int, bias: torch.Tensor | None = None,
                out_dtype: torch.dtype = torch.float16, config: dict | None = None,
                int_scales: tuple[torch.Tensor, torch.Tensor] | None = None, asm: bool | None = None) -> torch.Tensor:
    """Exact group-wise ``y = x_scale * sum_g w_scales[:, g] * (xq_g @ q_g^T) (+ bias)`` with
    packed int4 weights, tensor-core kernel (``_w4a8_gemm_kernel``, optional split-K).

    ``xq``: int8 ``[M, K]``; ``x_scale``: float32 0-d (per-tensor) or ``[M]``
    (per-token); ``qweight``: uint8 ``[N, ceil(K/2)]``; ``w_scales``: fp16
    ``[N, G]``; returns ``[M, N]`` in ``out_dtype``.  ``config`` overrides
    :func:`pick_config` (keys BLOCK_M/N/K, GROUP_M, SWAP_AB, SPLIT_K, num_warps, num_stages).
    ``int_scales``: ``(base [N], multipliers [N, G])`` when ``w_scales == base * multipliers``
    (:func:`fptq.kernels.triton_w4a8.integer_scales_device`): the codes times the multipliers go into one int32 accumulator over
    all of K (no float step per group), the same values to float32 rounding.
    With float scales the bytes are not unpacked: ``b << 4`` and ``b & 0xF0`` are 16 x the even and odd codes as
    int8, multiplied with the activation tile's even and odd columns by two dots (``config["NIBBLE"]=False``: the
    unpacked codes, one dot; the same bits either way); ``asm`` splits the bytes in PTX (default: on CUDA).
    """
    return _launch(xq, x_scale, qweight, w_scales, in_features, group_size, bias, out_dtype, config, gemv=False,
                   int_scales=int_scales, asm=asm)


def w4a8_gemv(xq: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor,
              in_features: int, group_size: int, bias: torch.Tensor | None = None,
              out_dtype: torch.dtype = torch.float16, config: dict | None = None,
              int_scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Same maths and arguments as :func:`w4a8_matmul` (exact group-wise), with the
    CUDA-core GEMV kernel (one token row per program, split-K), meant for M <= 2-4.
    ``config`` overrides :func:`pick_gemv_config` (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages)."""
    return _launch(xq, x_scale, qweight, w_scales, in_features, group_size, bias, out_dtype, config, gemv=True,
                   int_scales=int_scales)


def w4a8_gemv_quant(x: torch.Tensor, act_scale: torch.Tensor | None, qweight: torch.Tensor, w_scales: torch.Tensor,
                    in_features: int, group_size: int, qmax: int = 127, bias: torch.Tensor | None = None,
                    out_dtype: torch.dtype = torch.float16, config: dict | None = None,
                    recip: bool | None = None,
                    int_scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_activations` then :func:`w4a8_gemv` in one launch (decode): ``x`` is the float ``[M, K]``
    input, quantized inside the GEMV kernel to the same int8 codes (per token when ``act_scale`` is None,
    else with the static per-tensor ``act_scale``), so the codes never go through memory and the separate
    quantization launch is gone. Returns ``(y [M, N], x_scale)`` (``[M]`` per token, the 0-d static scale
    otherwise); ``y`` is bit-identical to the unfused pair's with the same ``config``."""
    if x.dim() != 2:
        raise ValueError("w4a8_gemv_quant expects a 2-D [M, K] input")
    if not x.is_floating_point():
        raise ValueError(f"w4a8_gemv_quant expects float activations, got {x.dtype}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    dynamic = act_scale is None
    if recip is None:
        recip = dynamic and _scalar_div_mode(x.device, qmax)
    x_scale = (torch.empty(x.shape[0], dtype=torch.float32, device=x.device) if dynamic
               else act_scale.to(device=x.device, dtype=torch.float32).reshape(()))
    y = _launch(x, x_scale, qweight, w_scales, in_features, group_size, bias, out_dtype, config, gemv=True,
                quant=(qmax, recip), int_scales=int_scales)
    return y, x_scale

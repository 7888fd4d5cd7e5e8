"""Triton kernels of :mod:`fptq.kernels.decode_ops`: what lies between the Linears of a decode step, one launch
each (attention: one, or two when its positions are split among programs).

Every rounding step of transformers' modules is kept in the model's dtype (the residual add, the normalized rows
before the norm's weight, each rotary product, SiLU before the multiply), with float32 arithmetic in between as
PyTorch's half-precision operations do; sums (the mean square, the attention's dot products and softmax) run in
float32 in another order than PyTorch's, so results agree to float rounding, not bit for bit. The position of the
new token is read from a device tensor, so a CUDA graph of a step replays at any position. The norm and SiLU x up
can also write their output's int8 codes for the W4A8 Linears that read it, with
:mod:`~fptq.kernels.triton_quant`'s rounding helpers (the codes ``quantize_activations`` gives, bit for bit). Runs
on CUDA, and on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``), where the tests run it. Needs
triton.
"""
from __future__ import annotations

import math

import torch

from ..quant import act_qmax
from .triton_common import require_triton, triton, tl
from .triton_quant import _inv_qmax, _scalar_div_mode

if triton is not None:
    from .triton_quant import _codes, _dynamic_scale

__all__ = ["ATTN_BLOCK_N", "add_rmsnorm_triton", "attention_splits", "decode_attention_triton",
           "rope_write_kv_triton", "serial_attention_verified", "silu_mul_triton"]

ATTN_BLOCK_N = 32  # cached positions per attention tile
_MIN_SPLIT_TILES = 4  # a split of the positions covers at least this many tiles
_SILU_BLOCK = 1024


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


if triton is not None:

    @triton.jit
    def _quantize_row(o, q_ptr, s_ptr, scale_in, offs, mask, row, K, INV_QMAX, DYNAMIC: tl.constexpr,
                      RECIP: tl.constexpr, QMAX: tl.constexpr):
        # int8 codes of the row o (float32 values of the stored outputs, 0 where masked) into q_ptr, as
        # quantize_activations gives them: per token (scale into s_ptr) or with the static scale_in
        if DYNAMIC:
            scale = _dynamic_scale(tl.max(tl.abs(o), axis=0), INV_QMAX, QMAX, RECIP)
            tl.store(s_ptr + row, scale)
        else:
            scale = tl.load(scale_in).to(tl.float32)
        tl.store(q_ptr + row * K + offs, _codes(o, scale, QMAX), mask=mask)

    @triton.jit
    def _add_rmsnorm_kernel(h_ptr, d_ptr, w_ptr, out_ptr, q_ptr, s_ptr, scale_in, INV_QMAX, K, eps,
                            HAS_DELTA: tl.constexpr, QUANT: tl.constexpr, DYNAMIC: tl.constexpr,
                            RECIP: tl.constexpr, QMAX: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < K
        h = tl.load(h_ptr + row * K + offs, mask=mask, other=0.0)
        if HAS_DELTA:
            d = tl.load(d_ptr + row * K + offs, mask=mask, other=0.0)
            h = (h.to(tl.float32) + d.to(tl.float32)).to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + row * K + offs, h, mask=mask)
        x = h.to(tl.float32)
        inv = tl.rsqrt(tl.sum(x * x, axis=0) / K + eps)
        y = (x * inv).to(h_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        o = (w * y).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * K + offs, o, mask=mask)
        if QUANT:
            _quantize_row(o.to(tl.float32), q_ptr, s_ptr, scale_in, offs, mask, row, K, INV_QMAX, DYNAMIC, RECIP,
                          QMAX)

    @triton.jit
    def _rotate(src, dst, c1, c2, s1, s2, offs, mask, HALF, nw, eps, NORM: tl.constexpr):
        # x * cos + rotate_half(x) * sin, each product and the sum rounded to the model's dtype; NORM: x is first
        # RMS-normalized over the head (rounded to the dtype) and multiplied by the norm's weight nw (Qwen3)
        dt = dst.dtype.element_ty
        x1 = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        if NORM:
            inv = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / (2 * HALF) + eps)
            w1 = tl.load(nw + offs, mask=mask, other=0.0).to(tl.float32)
            w2 = tl.load(nw + HALF + offs, mask=mask, other=0.0).to(tl.float32)
            x1 = (w1 * (x1 * inv).to(dt).to(tl.float32)).to(dt).to(tl.float32)
            x2 = (w2 * (x2 * inv).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        lo = (x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)
        hi = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
        tl.store(dst + offs, lo.to(dt), mask=mask)
        tl.store(dst + HALF + offs, hi.to(dt), mask=mask)

    @triton.jit
    def _rope_kv_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, qo_ptr, kc_ptr, vc_ptr, qn_ptr, kn_ptr,
                        q_eps, k_eps, HQ, HKV, L, D, NORM: tl.constexpr, HALF_BLOCK: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)  # query heads, then key/value heads
        pos = tl.load(pos_ptr)
        half = D // 2
        offs = tl.arange(0, HALF_BLOCK)
        mask = offs < half
        c1 = tl.load(cos_ptr + pos * D + offs, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + pos * D + half + offs, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + pos * D + offs, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + pos * D + half + offs, mask=mask, other=0.0).to(tl.float32)
        if h < HQ:
            row = b * HQ + h
            _rotate(q_ptr + row * D, qo_ptr + row * D, c1, c2, s1, s2, offs, mask, half, qn_ptr, q_eps, NORM)
        else:
            j = h - HQ
            row = b * HKV + j
            at = ((b * HKV + j) * L + pos) * D
            _rotate(k_ptr + row * D, kc_ptr + at, c1, c2, s1, s2, offs, mask, half, kn_ptr, k_eps, NORM)
            for part in tl.static_range(2):
                o = part * half + offs
                tl.store(vc_ptr + at + o, tl.load(v_ptr + row * D + o, mask=mask, other=0.0), mask=mask)

    @triton.jit
    def _attention_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr, out_ptr, codes_ptr, scale_in, scaling,
                          cnt_ptr, HQ, GROUP, L, D, CHUNK, SINGLE: tl.constexpr, QUANT: tl.constexpr,
                          QMAX: tl.constexpr, D_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
                          SERIAL: tl.constexpr = False, S_BLOCK: tl.constexpr = 1):
        bh = tl.program_id(0)  # b * HQ + query head
        s = tl.program_id(1)
        nsplit = tl.num_programs(1)
        b = bh // HQ
        kvh = (bh % HQ) // GROUP
        hkv = HQ // GROUP
        n = tl.load(pos_ptr) + 1  # positions 0..pos
        lo = s * CHUNK
        hi = tl.minimum(lo + CHUNK, n)
        offs_d = tl.arange(0, D_BLOCK)
        mask_d = offs_d < D
        q = tl.load(q_ptr + bh * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        base = (b * hkv + kvh) * L * D
        m = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), axis=0)
        den = tl.sum(tl.zeros([BLOCK_N], tl.float32), axis=0)
        acc = tl.zeros([D_BLOCK], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            mask_n = offs_n < hi
            tile = base + offs_n[:, None] * D + offs_d[None, :]
            mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(k_ptr + tile, mask=mask, other=0.0).to(tl.float32)
            sc = tl.where(mask_n, tl.sum(k * q[None, :], axis=1) * scaling, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, axis=0))
            alpha = tl.exp(m - m_new)
            p = tl.exp(sc - m_new)
            v = tl.load(v_ptr + tile, mask=mask, other=0.0).to(tl.float32)
            den = den * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            m = m_new
        if SINGLE:
            _store_head(acc / den, out_ptr, codes_ptr, scale_in, bh, D, offs_d, mask_d, QUANT, QMAX)
        else:
            at = bh * nsplit + s
            tl.store(m_ptr + at, m)
            tl.store(l_ptr + at, den)
            tl.store(acc_ptr + at * D + offs_d, acc, mask=mask_d)
            if SERIAL:  # the last split of the head to finish (counted in cnt_ptr, put back to 0) combines them
                tl.debug_barrier()  # every thread's partials are stored before the count
                seen = tl.atomic_add(cnt_ptr + bh, 1, sem="acq_rel", scope="gpu")
                if seen == nsplit - 1:
                    _combine_head(m_ptr, l_ptr, acc_ptr, out_ptr, codes_ptr, scale_in, bh, nsplit, D, QUANT, QMAX,
                                  S_BLOCK, D_BLOCK)
                    tl.atomic_xchg(cnt_ptr + bh, 0)

    @triton.jit
    def _store_head(o, out_ptr, codes_ptr, scale_in, bh, D, offs_d, mask_d, QUANT: tl.constexpr, QMAX: tl.constexpr):
        # one head's output (float32), rounded to the output's dtype; QUANT: also its int8 codes with the static
        # scale_in (the output projection's input quantizer, per tensor: each head's slice quantizes alone)
        o = o.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + bh * D + offs_d, o, mask=mask_d)
        if QUANT:
            _quantize_row(o.to(tl.float32), codes_ptr, scale_in, scale_in, offs_d, mask_d, bh, D, 1.0, False, False,
                          QMAX)

    @triton.jit
    def _combine_head(m_ptr, l_ptr, acc_ptr, out_ptr, codes_ptr, scale_in, bh, NSPLIT, D, QUANT: tl.constexpr,
                      QMAX: tl.constexpr, S_BLOCK: tl.constexpr, D_BLOCK: tl.constexpr):
        # head bh's output from its splits' partial softmax sums (.cg: from L2, where other programs stored them)
        offs_s = tl.arange(0, S_BLOCK)
        mask_s = offs_s < NSPLIT
        offs_d = tl.arange(0, D_BLOCK)
        mask_d = offs_d < D
        m = tl.load(m_ptr + bh * NSPLIT + offs_s, mask=mask_s, other=float("-inf"), cache_modifier=".cg")
        den = tl.load(l_ptr + bh * NSPLIT + offs_s, mask=mask_s, other=0.0, cache_modifier=".cg")
        w = tl.exp(m - tl.max(m, axis=0))  # a split with no position: m = -inf, weight 0
        rows = (bh * NSPLIT + offs_s)[:, None] * D + offs_d[None, :]
        acc = tl.load(acc_ptr + rows, mask=mask_s[:, None] & mask_d[None, :], other=0.0, cache_modifier=".cg")
        out = tl.sum(acc * w[:, None], axis=0) / tl.sum(den * w, axis=0)
        _store_head(out, out_ptr, codes_ptr, scale_in, bh, D, offs_d, mask_d, QUANT, QMAX)

    @triton.jit
    def _attention_combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, codes_ptr, scale_in, NSPLIT, D,
                                  QUANT: tl.constexpr, QMAX: tl.constexpr, S_BLOCK: tl.constexpr,
                                  D_BLOCK: tl.constexpr):
        _combine_head(m_ptr, l_ptr, acc_ptr, out_ptr, codes_ptr, scale_in, tl.program_id(0), NSPLIT, D, QUANT, QMAX,
                      S_BLOCK, D_BLOCK)

    @triton.jit
    def _silu_times(g, u, dt):
        # silu(g) * u rounded as PyTorch's two half-precision operations are (g, u float32), in the dtype dt
        return ((g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32) * u).to(dt)

    @triton.jit
    def _silu_mul_quant_kernel(g_ptr, u_ptr, out_ptr, q_ptr, s_ptr, scale_in, INV_QMAX, N, DYNAMIC: tl.constexpr,
                               RECIP: tl.constexpr, QMAX: tl.constexpr, BLOCK: tl.constexpr):
        # one row per program, in registers: silu(g) * u (rounded as silu_mul) and its int8 codes
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < N
        g = tl.load(g_ptr + row * N + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * N + offs, mask=mask, other=0.0).to(tl.float32)
        o = _silu_times(g, u, out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * N + offs, o, mask=mask)
        _quantize_row(o.to(tl.float32), q_ptr, s_ptr, scale_in, offs, mask, row, N, INV_QMAX, DYNAMIC, RECIP, QMAX)

    @triton.jit
    def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, _silu_times(g, u, out_ptr.dtype.element_ty), mask=mask)


def _quant_args(rows: int, n: int, quant, device) -> tuple:
    """The codes and scale buffers and the launch arguments of an in-kernel quantization ``quant`` =
    ``(static scale or None, activation bits)``: ``(codes, scales, kernel args, constexprs)``."""
    scale, bits = quant
    qmax = act_qmax(bits)
    dynamic = scale is None
    q = torch.empty(rows, n, dtype=torch.int8, device=device)
    s = torch.empty(rows, dtype=torch.float32, device=device) if dynamic else scale.to(torch.float32).reshape(())
    recip = dynamic and _scalar_div_mode(device, qmax)
    return q, s, (q, s, s, _inv_qmax(qmax)), dict(DYNAMIC=dynamic, RECIP=bool(recip), QMAX=int(qmax))


def add_rmsnorm_triton(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                       quant: tuple | None = None):
    """:func:`fptq.kernels.decode_ops.add_rmsnorm` in one launch (one program per row); with ``quant``, also the
    rows' int8 codes and scale(s) (``(out, codes, scale)``)."""
    require_triton()
    k = h.shape[-1]
    if not h.is_contiguous() or (delta is not None and (not delta.is_contiguous() or delta.numel() != h.numel())):
        raise ValueError("add_rmsnorm_triton needs contiguous h and delta of the same size")
    out = torch.empty(h.shape, dtype=torch.promote_types(h.dtype, weight.dtype), device=h.device)
    rows, block = h.numel() // k, _pow2(k)
    if quant is not None:
        q, s, qargs, qconst = _quant_args(rows, k, quant, h.device)
    else:
        qargs, qconst = (out, out, out, 1.0), dict(DYNAMIC=False, RECIP=False, QMAX=127)  # (unused)
    _add_rmsnorm_kernel[(rows,)](h, h if delta is None else delta, weight, out, *qargs, k, float(eps),
                                 HAS_DELTA=delta is not None, QUANT=quant is not None, BLOCK=block,
                                 num_warps=max(1, min(8, block // 256)), **qconst)
    return out if quant is None else (out, q, s)


def rope_write_kv_triton(q, k, v, cos, sin, pos, k_cache, v_cache, qk_norm=None) -> torch.Tensor:
    """:func:`fptq.kernels.decode_ops.rope_write_kv` in one launch (one program per sequence and head)."""
    require_triton()
    b, hkv, length, d = k_cache.shape
    hq = q.numel() // (b * d)
    if d % 2 or not all(t.is_contiguous() for t in (q, k, v, cos, sin, k_cache, v_cache)):
        raise ValueError("rope_write_kv_triton needs contiguous tensors and an even head size")
    qo = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    (qn, q_eps), (kn, k_eps) = qk_norm if qk_norm is not None else ((cos, 0.0), (cos, 0.0))
    _rope_kv_kernel[(b, hq + hkv)](q, k, v, cos, sin, pos, qo, k_cache, v_cache, qn, kn, float(q_eps), float(k_eps),
                                   hq, hkv, length, d, NORM=qk_norm is not None, HALF_BLOCK=_pow2(d // 2),
                                   num_warps=1)
    return qo


def attention_splits(batch: int, heads: int, length: int, device: torch.device) -> int:
    """How many programs share one head's positions: on a GPU enough programs for about two per SM (a batch of
    one has only as many heads as programs otherwise), each split at least a few tiles long; one elsewhere."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = math.ceil(2 * sms / max(1, batch * heads))
    return max(1, min(want, length // (ATTN_BLOCK_N * _MIN_SPLIT_TILES)))


def decode_attention_triton(q, k_cache, v_cache, pos, scaling: float, splits: int | None = None,
                            quant: tuple | None = None, counters: torch.Tensor | None = None):
    """:func:`fptq.kernels.decode_attention` in one launch (two when ``splits`` > 1: partial softmax sums per
    split, then their combination, unless ``counters`` are given); with ``quant`` (a static scale only: heads are
    quantized apart) also the output's int8 codes (``(out, codes, scale)``). ``counters``: int32 zeros, one per
    query head of the batch (``B * Hq``), not shared with a concurrent launch: the last split of each head to
    finish combines them in the same launch (the combining launch's operations: the same bits) and puts its
    counter back to zero."""
    require_triton()
    if quant is not None and quant[0] is None:
        raise ValueError("decode_attention_triton quantizes its output with a static scale only (per-token scales "
                         "need every head's output)")
    b, hq, d = q.shape
    hkv, length = k_cache.shape[1], k_cache.shape[2]
    if hq % hkv or not all(t.is_contiguous() for t in (q, k_cache, v_cache)):
        raise ValueError("decode_attention_triton needs contiguous tensors and query heads a multiple of kv heads")
    splits = attention_splits(b, hq, length, q.device) if splits is None else max(1, int(splits))
    chunk = math.ceil(math.ceil(length / splits) / ATTN_BLOCK_N) * ATTN_BLOCK_N
    splits = math.ceil(length / chunk)
    out = torch.empty(b, hq * d, dtype=q.dtype, device=q.device)
    d_block = _pow2(d)
    if splits == 1:
        part = (out, out, out)  # not written
    else:
        part = (torch.empty(b * hq * splits, dtype=torch.float32, device=q.device),
                torch.empty(b * hq * splits, dtype=torch.float32, device=q.device),
                torch.empty(b * hq * splits, d, dtype=torch.float32, device=q.device))
    if quant is not None:
        codes = torch.empty(b, hq * d, dtype=torch.int8, device=q.device)
        scale = quant[0].to(torch.float32).reshape(())
        qargs = (codes, scale)
    else:
        qargs = (out, out)  # (unused)
    qmax = act_qmax(quant[1]) if quant is not None else 127
    serial = splits > 1 and counters is not None
    if serial and (counters.dtype != torch.int32 or counters.numel() < b * hq or counters.device != q.device):
        raise ValueError(f"counters must be int32 on {q.device} with at least {b * hq} elements")
    _attention_kernel[(b * hq, splits)](q, k_cache, v_cache, pos, *part, out, *qargs, float(scaling),
                                        counters if serial else pos, hq, hq // hkv, length, d, chunk,
                                        SINGLE=splits == 1, QUANT=quant is not None, QMAX=qmax, D_BLOCK=d_block,
                                        BLOCK_N=ATTN_BLOCK_N, SERIAL=serial, S_BLOCK=_pow2(splits), num_warps=4)
    if splits > 1 and not serial:
        _attention_combine_kernel[(b * hq,)](*part, out, *qargs, splits, d, QUANT=quant is not None, QMAX=qmax,
                                             S_BLOCK=_pow2(splits), D_BLOCK=d_block, num_warps=1)
    return out if quant is None else (out, codes, scale)


_SERIAL_OK: dict = {}


def _serial_combine_agrees(dev, length: int = 1024) -> bool:
    gen = torch.Generator().manual_seed(11)
    b, hq, hkv, d = 2, 8, 2, 64
    q = torch.randn(b, hq, d, generator=gen).to(torch.float16).to(dev)
    k, v = (torch.randn(b, hkv, length, d, generator=gen).to(torch.float16).to(dev) for _ in range(2))
    counters = torch.zeros(b * hq, dtype=torch.int32, device=dev)
    same = True
    for at in (length - 24, length // 2 + 5, 40):
        pos = torch.tensor([at], device=dev)
        two = decode_attention_triton(q, k, v, pos, d ** -0.5, splits=8)
        one = decode_attention_triton(q, k, v, pos, d ** -0.5, splits=8, counters=counters)
        same = same and bool(torch.equal(one, two)) and not bool(counters.any())
    return same


def serial_attention_verified(device) -> bool:
    """Whether the decode attention's one-launch combination (``counters``) gives, on ``device``, the two-launch
    bits: checked once per device at a few positions; True off CUDA (Triton's interpreter runs programs one after
    another)."""
    from .triton_w4a8 import _checked_once

    return _checked_once(_SERIAL_OK, device, _serial_combine_agrees,
                         "fptq decode step: the one-launch attention combination disagrees with the two-launch one "
                         "on {dev} (or does not build); combining in a second launch")


def silu_mul_triton(gate: torch.Tensor, up: torch.Tensor, quant: tuple | None = None):
    """:func:`fptq.kernels.decode_ops.silu_mul` in one launch; with ``quant``, also the rows' int8 codes and
    scale(s) (``(out, codes, scale)``; one program per row)."""
    require_triton()
    if gate.shape != up.shape or not (gate.is_contiguous() and up.is_contiguous()):
        raise ValueError("silu_mul_triton needs contiguous gate and up of one shape")
    out = torch.empty_like(gate)
    if quant is not None:
        n = gate.shape[-1]
        rows, block = gate.numel() // n, _pow2(n)
        q, s, qargs, qconst = _quant_args(rows, n, quant, gate.device)
        _silu_mul_quant_kernel[(rows,)](gate, up, out, *qargs, n, BLOCK=block, num_warps=max(1, min(16, block // 256)),
                                        **qconst)
        return out, q, s
    n = gate.numel()
    _silu_mul_kernel[(triton.cdiv(n, _SILU_BLOCK),)](gate, up, out, n, BLOCK=_SILU_BLOCK, num_warps=4)
    return out

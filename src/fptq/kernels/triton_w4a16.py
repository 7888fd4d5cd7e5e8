"""W4A16 on the GPU: 4-bit group-wise weights (fptq's packed codes and float16 group scales, as stored) times
16-bit activations, on tensor cores: :func:`w4a16_matmul`, what the ``triton`` backend runs for QuantLinears with
float activations (``act_mode="none"``: ``fptq quantize --w4a16``, GPTQ W4A16), which multiplied dequantized float32
weights before.

Each program owns a ``BLOCK_M x BLOCK_N`` output tile and a range of groups (split-K for small M, reduced by the
split-K reduction of :mod:`.triton_common`). Per tile of K the packed bytes become the codes (-8 .. 7, exact in
float16 and bfloat16) and one ``tl.dot`` multiplies them with the activation tile in float32 accumulation; each
group's sum is scaled by its float32 group scale and added in group order. The products are exact, so the result is
the reference's (``QuantLinear.reference_forward``: ``x @ (codes * scales)^T`` in float32) to float32 summation
order, not the rounding of weights dequantized to 16 bits. float32 activations multiply in IEEE float32 (no TF32).

Its place in Table 2 (``fptq bench --device cuda --w4a16``): the W4A16 row is this kernel, so "W4A8 over W4A16" is
a kernel against a kernel. Not timed: no GPU has run it yet. Runs on CUDA, and under Triton's interpreter on the
CPU, where the tests run it.
"""
from __future__ import annotations

import torch

from .triton_common import (HAS_TRITON, _block_k_for, _grouping, _reduce, _split_plan, _supported, require_triton,
                            tl, triton)

__all__ = ["pick_w4a16_config", "w4a16_matmul", "w4a16_problem"]

if HAS_TRITON:
    from .triton_grouped import _store_out, _unpacked_w_tile

    @triton.jit
    def _w4a16_kernel(
        X, B, WS, BIAS, C, P, M, N, K, CHUNK, NUNITS, stride_xm, stride_bn, stride_wsn, stride_cm,
        HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, ONE_GROUP: tl.constexpr, TILES_PER_GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        # grid (M tiles x N tiles, splits); a unit of K is a group (ONE_GROUP: a K tile); split s owns units
        # [s * CHUNK, (s + 1) * CHUNK)
        pid = tl.program_id(0)
        pid_s = tl.program_id(1)
        nt = tl.cdiv(N, BLOCK_N)
        pid_m = pid // nt
        pid_n = pid % nt
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        offs_kb = tl.arange(0, BLOCK_K // 2)
        mask_m = offs_m < M
        mask_n = offs_n < N
        K2 = (K + 1) // 2
        x_rows = X + offs_m.to(tl.int64)[:, None] * stride_xm
        b_rows = B + offs_n.to(tl.int64)[:, None] * stride_bn
        u0 = pid_s * CHUNK
        u1 = tl.minimum(u0 + CHUNK, NUNITS)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for u in range(u0, u1):
            accg = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for t in tl.static_range(TILES_PER_GROUP):
                k0 = u * (BLOCK_K * TILES_PER_GROUP) + t * BLOCK_K
                ka = k0 + offs_k
                a = tl.load(x_rows + ka[None, :], mask=mask_m[:, None] & (ka[None, :] < K), other=0.0)
                w = _unpacked_w_tile(b_rows, k0, offs_kb, mask_n, K2, 0, BLOCK_N, BLOCK_K, False, EVEN_K)
                if IEEE:
                    accg = tl.dot(a, tl.trans(w.to(tl.float32)), accg, input_precision="ieee")
                else:
                    accg = tl.dot(a, tl.trans(w.to(tl.float32).to(a.dtype)), accg)  # (via float32: exact)
            g = 0 if ONE_GROUP else u
            s = tl.load(WS + offs_n * stride_wsn + g, mask=mask_n, other=0.0).to(tl.float32)
            acc += accg * s[None, :]
        _store_out(acc, offs_m, offs_n, mask_m, mask_n, C, BIAS, C, P, pid_s, M, N, stride_cm, False, HAS_BIAS, SPLIT,
                   False)  # (no activation scale: the activations are floats)


def w4a16_problem(qweight: torch.Tensor, in_features: int, group_size: int) -> str | None:
    """Why :func:`w4a16_matmul` cannot run these packed weights (None if it can)."""
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[1] != (in_features + 1) // 2:
        return "the weights are not packed 4-bit codes [N, ceil(K/2)]"
    if not _supported(group_size, in_features):
        return f"group_size={group_size} is not a multiple of 32"
    return None


def pick_w4a16_config(m: int, n: int, k: int, group_size: int) -> dict:
    """Launch configuration of :func:`w4a16_matmul` (not tuned on a GPU: the W4A8 tensor-core kernel's tile shapes
    for the same M). ``SPLIT_K`` None: :func:`~fptq.kernels.triton_common._split_plan`."""
    if m <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4, SPLIT_K=None)
    elif m <= 64:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3, SPLIT_K=None)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3, SPLIT_K=None)
    cfg["BLOCK_K"] = _block_k_for(group_size, k, cfg["BLOCK_K"])
    return cfg


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor, in_features: int,
                 group_size: int, bias: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """``x @ (codes * scales)^T (+ bias)`` for float activations ``x`` ``[M, K]`` (float16, bfloat16 or float32)
    and packed 4-bit ``qweight`` ``[N, ceil(K/2)]`` with group scales ``w_scales`` ``[N, G]``; returns ``[M, N]`` in
    ``x``'s dtype. ``config`` overrides :func:`pick_w4a16_config`."""
    require_triton()
    why = w4a16_problem(qweight, in_features, group_size)
    if why:
        raise ValueError(f"w4a16_matmul: {why}")
    if x.dim() != 2 or x.shape[1] != in_features or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"w4a16_matmul expects float16/bfloat16/float32 [M, {in_features}], got {x.dtype} "
                         f"{tuple(x.shape)}")
    x, qweight, w_scales = x.contiguous(), qweight.contiguous(), w_scales.contiguous()
    m, k = x.shape
    n, g = qweight.shape[0], w_scales.shape[1]
    cfg = pick_w4a16_config(m, n, k, group_size)
    cfg.update(config or {})
    flags, nunits, unit_k, _ = _grouping(k, g, group_size, cfg)
    c = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return c
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    splits, chunk = _split_plan(tiles, m, k, nunits, unit_k, x.device, cfg.get("SPLIT_K"))
    part = torch.empty(splits, m, n, dtype=torch.float32, device=x.device) if splits > 1 else c
    has_bias = bias is not None
    _w4a16_kernel[(tiles, splits)](
        x, qweight, w_scales, bias.contiguous() if has_bias else c, c, part, m, n, k, chunk, nunits, x.stride(0),
        qweight.stride(0), w_scales.stride(0), c.stride(0), HAS_BIAS=has_bias, SPLIT=splits > 1,
        BLOCK_M=cfg["BLOCK_M"], IEEE=x.dtype == torch.float32, **flags)
    if splits > 1:
        _reduce(part, None, False, bias.contiguous() if has_bias else None, c)
    return c

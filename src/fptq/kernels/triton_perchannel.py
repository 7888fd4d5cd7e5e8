"""The int8 per-channel W4A8 path: the group-scaled int4 weights converted once to int8 codes with
one scale per output channel (cached on the module), then an int8 x int8 -> int32 GEMM over the
whole K with a fused epilogue (``_int8_gemm_kernel``), or ``torch._int_mm`` plus the Triton
epilogue."""
from __future__ import annotations

import torch

from .triton_common import (
    HAS_TRITON,
    PERCHANNEL_IMPL,
    _epilogue,
    _reduce,
    _tile_ids,
    pick_int8_config,
    require_triton,
    tl,
    triton,
)

__all__ = ["int8_perchannel_matmul", "perchannel_weight_device", "w8a8_perchannel"]

if HAS_TRITON:

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
        pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

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
        _epilogue(acc.to(tl.float32) * cs[None, :], offs_m, offs_n, mask_m, mask_n, AS, BIAS, C, stride_cm,
                  PER_TOKEN, HAS_BIAS)


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


def w8a8_perchannel(module) -> bool:
    """Whether a QuantLinear is W8A8 with one weight scale per output channel (SmoothQuant's layers): the int8
    per-channel GEMM multiplies its codes as stored, exactly."""
    return module.wbits == 8 and module.abits == 8 and module.act_mode != "none" and module.w_scales.shape[1] == 1


def perchannel_weight_device(module) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 ``[N, K]`` codes and float32 ``[N]`` per-channel scales on the module's device,
    computed by :func:`fptq.kernels.cpu.perchannel_weight` (same numerics as the CPU
    ``int8_perchannel`` backend) and cached on the module (1 byte/weight)."""
    from .cpu import _cached, perchannel_weight

    def build(m):
        dev = m.qweight.device
        w8, sc = perchannel_weight(_PerChannelSource(m))
        return w8.to(dev).contiguous(), sc.to(device=dev, dtype=torch.float32).contiguous()

    return _cached(module, "triton_w8_perchannel", build)


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
    require_triton()
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

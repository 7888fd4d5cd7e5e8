"""Triton W4A8 kernels for CUDA (backend ``triton``; optional ``fptq[triton]``).

Two kernels:

``_quant_act_kernel``
    one program per row (token): per-token ``absmax/qmax`` (or a static
    per-tensor scale read from device memory), then int8 codes
    ``clamp(rint(x / s), -qmax, qmax)`` with IEEE division
    (``tl.math.div_rn``) and round-half-to-even, i.e. bit-identical to
    :meth:`fptq.nn.QuantLinear.quantize_input`.

``_w4a8_gemm_kernel``
    ``y[M, N] = s_x * sum_g s_g[:, g] * (x_q[:, g] @ q[:, g]^T) (+ bias)``.
    The int8 A tile ``[BLOCK_M, BLOCK_K]`` comes from the pre-quantized
    activations; the B tile is loaded as ``[BLOCK_N, BLOCK_K // 2]`` packed bytes
    (layout of :mod:`fptq.quant.pack`: low nibble = even column), split into two
    sign-extended nibbles with int32 shifts, interleaved with ``tl.join`` +
    ``tl.reshape`` and transposed to ``[BLOCK_K, BLOCK_N]``.  ``tl.dot(...,
    out_dtype=tl.int32)`` accumulates each group exactly in int32; the group's
    fp16 scale is applied in float32 at the end of the group (``BLOCK_K``
    divides the group size, so a tile never straddles two groups; the ragged
    last group and K are handled by masking).  The activation scale
    (per-tensor or per-token) and the bias are applied in the final epilogue;
    the output is fp16 / bf16 / fp32 (the input's dtype).  A per-channel layer
    (one group) accumulates the whole K in int32 and scales once.

Launch configuration comes from a small heuristic table keyed on M
(:func:`pick_config`; decode M <= 16, small, medium, large) rather than
autotuning, so first calls are cheap and deterministic; ``config=`` overrides it.

This module imports without triton or CUDA (``HAS_TRITON`` is then False and
the entry points raise a clear error).  Layers the kernel does not cover
(weights other than 4-bit, float activations, group sizes that are not a
multiple of 32 with more than one group) fall back to the reference maths.
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
    "pick_config",
    "quantize_activations",
    "w4a8_matmul",
    "triton_forward",
]


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
    def _quant_act_kernel(
        X, Q, S, SCALE_IN,
        K, stride_xm, stride_qm,
        QMAX: tl.constexpr,
        DYNAMIC: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        x_row = X + row * stride_xm
        q_row = Q + row * stride_qm
        offs = tl.arange(0, BLOCK)
        if DYNAMIC:
            amax = tl.zeros([BLOCK], dtype=tl.float32)
            for k0 in range(0, K, BLOCK):
                x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(x))
            m = tl.max(amax, axis=0)
            scale = tl.maximum(tl.math.div_rn(m, QMAX * 1.0), 1e-8)
            tl.store(S + row, scale)
        else:
            scale = tl.load(SCALE_IN).to(tl.float32)
        for k0 in range(0, K, BLOCK):
            mask = k0 + offs < K
            x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
            v = tl.math.div_rn(x, scale + tl.zeros_like(x))
            v = tl.minimum(tl.maximum(v, -QMAX * 1.0), QMAX * 1.0)
            v = _round_half_even(v)
            tl.store(q_row + k0 + offs, v.to(tl.int8), mask=mask)

    @triton.jit
    def _w4a8_gemm_kernel(
        A, B, WS, AS, BIAS, C,
        M, N, K, G, GS,
        stride_am, stride_bn, stride_wsn, stride_cm,
        PER_TOKEN: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        ONE_GROUP: tl.constexpr,
        TILES_PER_GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        # grouped launch order (L2 reuse of B across neighbouring M tiles)
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
        offs_k = tl.arange(0, BLOCK_K)
        offs_kb = tl.arange(0, BLOCK_K // 2)
        mask_m = offs_m < M
        mask_n = offs_n < N
        K2 = (K + 1) // 2
        a_rows = A + offs_m.to(tl.int64)[:, None] * stride_am
        b_rows = B + offs_n.to(tl.int64)[:, None] * stride_bn

        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if ONE_GROUP:
            acc_i = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
            for k0 in range(0, K, BLOCK_K):
                ka = k0 + offs_k
                a = tl.load(a_rows + ka[None, :], mask=mask_m[:, None] & (ka[None, :] < K), other=0)
                kb = k0 // 2 + offs_kb
                b = tl.load(b_rows + kb[None, :], mask=mask_n[:, None] & (kb[None, :] < K2), other=0)
                bi = b.to(tl.int32)
                lo = (bi << 28) >> 28
                hi = (bi << 24) >> 28
                w = tl.reshape(tl.join(lo, hi), [BLOCK_N, BLOCK_K]).to(tl.int8)
                acc_i = tl.dot(a, tl.trans(w), acc_i, out_dtype=tl.int32)
            s = tl.load(WS + offs_n * stride_wsn, mask=mask_n, other=0.0).to(tl.float32)
            acc = acc_i.to(tl.float32) * s[None, :]
        else:
            for g in range(0, G):
                acc_i = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
                for t in tl.static_range(TILES_PER_GROUP):
                    k0 = g * GS + t * BLOCK_K
                    ka = k0 + offs_k
                    a = tl.load(a_rows + ka[None, :], mask=mask_m[:, None] & (ka[None, :] < K), other=0)
                    kb = k0 // 2 + offs_kb
                    b = tl.load(b_rows + kb[None, :], mask=mask_n[:, None] & (kb[None, :] < K2), other=0)
                    bi = b.to(tl.int32)
                    lo = (bi << 28) >> 28
                    hi = (bi << 24) >> 28
                    w = tl.reshape(tl.join(lo, hi), [BLOCK_N, BLOCK_K]).to(tl.int8)
                    acc_i = tl.dot(a, tl.trans(w), acc_i, out_dtype=tl.int32)
                s = tl.load(WS + offs_n * stride_wsn + g, mask=mask_n, other=0.0).to(tl.float32)
                acc += acc_i.to(tl.float32) * s[None, :]

        if PER_TOKEN:
            sx = tl.load(AS + offs_m, mask=mask_m, other=0.0)
            acc = acc * sx[:, None]
        else:
            acc = acc * tl.load(AS)
        if HAS_BIAS:
            bias = tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc = acc + bias[None, :]
        c_ptrs = C + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ------------------------------------------------------------------ python side
def pick_config(m: int, n: int, k: int, group_size: int) -> dict:
    """Heuristic launch configuration (block sizes, warps, stages) for an ``[m, k] x [k, n]``
    product with ``group_size`` (``<= 0``: per-channel)."""
    if m <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    elif m <= 64:
        cfg = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    elif m <= 256:
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3)
    cfg["GROUP_M"] = 8
    if group_size > 0 and -(-k // group_size) > 1:
        bk = cfg["BLOCK_K"]
        while bk > 32 and group_size % bk:
            bk //= 2
        cfg["BLOCK_K"] = bk
    return cfg


def _supported(group_size: int, k: int) -> bool:
    """Whether the GEMM kernel handles this grouping (tiles must not straddle groups)."""
    if group_size <= 0 or -(-k // group_size) == 1:
        return True
    return group_size % 32 == 0


def quantize_activations(
    x2d: torch.Tensor,
    scale: torch.Tensor | None = None,
    qmax: int = 127,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes ``[M, K]`` of ``x2d`` and the float32 scale.

    ``scale=None``: dynamic per-token (returns ``[M]`` scales); otherwise a
    static per-tensor scale (0-d tensor on the same device, returned as is).
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
    if block is None:
        block = min(4096, max(128, triton.next_power_of_2(k)))
    num_warps = 4 if block <= 1024 else 8
    _quant_act_kernel[(m,)](
        x2d, q, s, s, k, x2d.stride(0), q.stride(0),
        QMAX=qmax, DYNAMIC=dynamic, BLOCK=block, num_warps=num_warps,
    )
    return q, s


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
    """``y = x_scale * sum_g w_scales[:, g] * (xq_g @ q_g^T) (+ bias)`` with packed int4 weights.

    ``xq``: int8 ``[M, K]``; ``x_scale``: float32 0-d (per-tensor) or ``[M]``
    (per-token); ``qweight``: uint8 ``[N, ceil(K/2)]``; ``w_scales``: fp16
    ``[N, G]``; returns ``[M, N]`` in ``out_dtype``.
    """
    _require_triton()
    m, k = xq.shape
    if k != in_features:
        raise ValueError(f"xq has K={k}, expected {in_features}")
    n = qweight.shape[0]
    if qweight.dtype != torch.uint8 or qweight.shape[1] != (k + 1) // 2:
        raise ValueError("qweight must be packed uint8 [N, ceil(K/2)]")
    if not _supported(group_size, k):
        raise ValueError(f"triton kernel needs group_size % 32 == 0 (or one group per row), got {group_size}")
    g = w_scales.shape[1]
    one_group = g == 1
    gs = k if group_size <= 0 else group_size
    cfg = dict(pick_config(m, n, k, group_size))
    if config:
        cfg.update(config)
    if not one_group and gs % cfg["BLOCK_K"]:
        raise ValueError(f"BLOCK_K={cfg['BLOCK_K']} must divide group_size={gs}")
    xq = xq.contiguous()
    qweight = qweight.contiguous()
    w_scales = w_scales.contiguous()
    per_token = x_scale.dim() > 0
    x_scale = x_scale.to(torch.float32).contiguous()
    if per_token:
        if x_scale.numel() != m:
            raise ValueError(f"per-token x_scale must have M={m} elements, got {x_scale.numel()}")
        x_scale = x_scale.reshape(m)
    c = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    if m == 0 or n == 0:
        return c
    has_bias = bias is not None
    bias_arg = bias.contiguous() if has_bias else c
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _w4a8_gemm_kernel[grid](
        xq, qweight, w_scales, x_scale, bias_arg, c,
        m, n, k, g, gs,
        xq.stride(0), qweight.stride(0), w_scales.stride(0), c.stride(0),
        PER_TOKEN=per_token,
        HAS_BIAS=has_bias,
        ONE_GROUP=one_group,
        TILES_PER_GROUP=1 if one_group else gs // cfg["BLOCK_K"],
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return c


_warned: set = set()


def _fallback(module, x: torch.Tensor, why: str) -> torch.Tensor:
    if why not in _warned:
        _warned.add(why)
        warnings.warn(f"fptq triton backend: {why}; using the reference path for this layer", stacklevel=3)
    return module.reference_forward(x)


def triton_forward(module, x: torch.Tensor) -> torch.Tensor:
    """QuantLinear forward with the Triton kernels (backend ``triton``)."""
    _require_triton()
    if x.shape[-1] != module.in_features:
        raise ValueError(f"expected input [..., {module.in_features}], got {tuple(x.shape)}")
    if module.wbits != 4:
        return _fallback(module, x, f"{module.wbits}-bit weights are not covered by the W4A8 kernel")
    if module.act_mode == "none":
        return _fallback(module, x, "float activations (act_mode='none') are not covered")
    if module.abits != 8:
        return _fallback(module, x, f"{module.abits}-bit activations are not covered")
    if not _supported(module.group_size, module.in_features):
        return _fallback(module, x, f"group_size={module.group_size} is not a multiple of 32")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, module.in_features)
    static = module.act_mode == "static_tensor"
    xq, sx = quantize_activations(x2, module.act_scale if static else None, qmax=module.act_qmax())
    out_dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    y = w4a8_matmul(
        xq, sx, module.qweight, module.w_scales, module.in_features, module.group_size,
        bias=module.bias, out_dtype=out_dtype,
    )
    return y.to(x.dtype).reshape(*lead, module.out_features)

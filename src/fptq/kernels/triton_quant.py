"""Activation quantization for the Triton W4A8 kernels (``_quant_act_kernel``): int8 codes and
per-token / per-tensor scales, bit-identical to :meth:`fptq.nn.QuantLinear.quantize_input` on the
same device (see :mod:`fptq.kernels.triton_w4a8` for the rounding and division details)."""
from __future__ import annotations

import warnings

import torch

from .triton_common import HAS_TRITON, require_triton, tl, triton

__all__ = ["quantize_activations"]

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
    def _dynamic_scale(amax, INV_QMAX, QMAX: tl.constexpr, RECIP: tl.constexpr):
        # per-token scale from the row's absmax, divided by qmax as torch does on this device
        if RECIP:
            scale = tl.maximum(amax * INV_QMAX, 1e-8)
        else:
            scale = tl.maximum(tl.math.div_rn(amax, QMAX * 1.0), 1e-8)
        return scale

    @triton.jit
    def _row_dynamic_scale(x_row, K, INV_QMAX, QMAX: tl.constexpr, RECIP: tl.constexpr, BLOCK: tl.constexpr):
        # the per-token scale of the row at x_row (K values), read BLOCK at a time: absmax / qmax
        offs = tl.arange(0, BLOCK)
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        return _dynamic_scale(tl.max(amax, axis=0), INV_QMAX, QMAX, RECIP)

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
                scale = _dynamic_scale(tl.max(tl.abs(x), axis=0), INV_QMAX, QMAX, RECIP)
                tl.store(S + row, scale)
            else:
                scale = tl.load(SCALE_IN).to(tl.float32)
            tl.store(q_row + offs, _codes(x, scale, QMAX), mask=mask)
        else:
            if DYNAMIC:
                scale = _row_dynamic_scale(x_row, K, INV_QMAX, QMAX, RECIP, BLOCK)
                tl.store(S + row, scale)
            else:
                scale = tl.load(SCALE_IN).to(tl.float32)
            for k0 in range(0, K, BLOCK):
                mask = k0 + offs < K
                x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(q_row + k0 + offs, _codes(x, scale, QMAX), mask=mask)


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


def _inv_qmax(qmax: int) -> float:
    """``fp32(1 / qmax)``, the factor torch on CUDA divides by ``qmax`` with (the kernels' ``INV_QMAX``)."""
    import numpy as np

    return float(np.float32(1.0 / qmax))


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
    require_triton()
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
    _quant_act_kernel[(m,)](
        x2d, q, s, s, _inv_qmax(qmax), k, x2d.stride(0), q.stride(0),
        QMAX=qmax, DYNAMIC=dynamic, RECIP=bool(recip), SINGLE=single, BLOCK=block, num_warps=num_warps,
    )
    return q, s

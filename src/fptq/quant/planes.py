"""8-bit integers as two signed 4-bit planes, and float activations as two int8 terms.

fptq's CPU kernels multiply int8 activations with signed 4-bit weight codes (-8..7). An 8-bit weight code ``q``
in ``-PLANES_QMAX..PLANES_QMAX`` is exactly ``16 * hi + lo`` with ``hi`` and ``lo`` both in -8..7
(:func:`split_planes`), so two 4-bit products, the first with its scales multiplied by 16, give the 8-bit product
with the same memory traffic as int8 weights. (16 * hi + lo spans -136..119; the symmetric range that fits is
+-119: 239 levels instead of 255, 0.1 bit less than int8.)

An activation row quantized per token to int8 keeps ``absmax / 254`` of error on every element; where a few
channels are far above the rest (the input of an LLM's output head: max/rms about 10) that is most of the
quantization error. :func:`two_term_per_token` adds a second int8 term that quantizes the first one's
residual: ``x ~ q1 * s1 + q2 * s2`` with ``s2 <= s1 / 254``, about 15 bits per row. Two terms cost two rows of the
same matrix product (free where the product is memory-bound: one or a few tokens).
"""
from __future__ import annotations

import torch

from .activations import quantize_per_token
from .weights import grouped_view

__all__ = ["PLANES_QMAX", "int8_group_quantize", "split_planes", "merge_planes", "two_term_per_token"]

PLANES_QMAX = 119  # the largest symmetric range of 16 * hi + lo with hi, lo in -8..7


def int8_group_quantize(w: torch.Tensor, group_size: int, qmax: int = PLANES_QMAX
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes ``[N, K]`` and float16 scales ``[N, G]`` of ``w`` ``[N, K]`` in groups of
    ``group_size`` inputs (the last one ragged where it does not divide K): ``s = absmax / qmax`` rounded to
    float16 first, ``q = clamp(round(w / s), -qmax, qmax)``; an all-zero group gets scale 0 and codes 0."""
    if w.dim() != 2 or group_size <= 0:
        raise ValueError(f"int8_group_quantize: expected a 2-D weight and a positive group size, got "
                         f"{tuple(w.shape)} and {group_size}")
    n, k = w.shape
    wf = grouped_view(w.float(), group_size)  # [N, G, group_size], the ragged last group zero-padded
    g = wf.shape[1]
    s = (wf.abs().amax(-1) / qmax).to(torch.float16)
    if not bool(torch.isfinite(s).all()):
        raise ValueError("int8_group_quantize: the weight has non-finite values or groups too large for float16 "
                         "scales")
    sf = s.float()
    safe = torch.where(sf > 0, sf, torch.ones_like(sf))
    q = torch.round(wf / safe[..., None]).clamp(-qmax, qmax).to(torch.int8).view(n, g * group_size)[:, :k]
    return q.contiguous(), s


def split_planes(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hi, lo)``, int8 in -8..7 with ``16 * hi + lo == q``, for codes ``q`` in -PLANES_QMAX..PLANES_QMAX."""
    if q.numel() and (int(q.min()) < -PLANES_QMAX or int(q.max()) > PLANES_QMAX):
        raise ValueError(f"split_planes: codes must lie in -{PLANES_QMAX}..{PLANES_QMAX}")
    q = q.to(torch.int8)
    lo = torch.bitwise_and(q + 8, 15) - 8  # q + 8 <= 127: no int8 overflow; & 15 is the remainder mod 16
    hi = torch.bitwise_right_shift(q - lo, 4)  # an exact multiple of 16 in -112..112
    return hi, lo


def merge_planes(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`split_planes`."""
    return (hi.to(torch.int16) * 16 + lo.to(torch.int16)).to(torch.int8)


def two_term_per_token(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``[2, M, K]`` and per-row scales ``[2, M, 1]`` (float32) of float rows ``x`` ``[M, K]``:
    term 1 is :func:`~fptq.quant.quantize_per_token` of ``x``, term 2 of the float32 residual
    ``x - q1 * s1``; ``x ~ q1 * s1 + q2 * s2``. The native runtime computes the same bits."""
    xf = x.float()
    q1, s1 = quantize_per_token(xf, bits)
    q2, s2 = quantize_per_token(xf - q1.float() * s1, bits)
    return torch.stack([q1, q2]), torch.stack([s1, s2])

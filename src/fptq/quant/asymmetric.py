"""Group-wise asymmetric integer weights: a step and an offset per group, llama.cpp's ``Q4_1`` form.

Same grouping as :mod:`fptq.quant.weights` (``G = ceil(K / group_size)`` groups along the input dimension,
the last one ragged), but each (row, group) keeps a float16 step ``d`` and a float16 offset ``m`` and codes
``q`` in ``0 .. 2**b - 1``::

    W ~ d * q + m,    m = the group's min,  d = (max - m) / (2**b - 1),  q = clamp(round((W - m) / d))

so a group whose values are not centred on zero (what a symmetric grid wastes half its levels on) uses all
``2**b`` levels over its own range. With 8-bit activations ``x = a * xq`` the product of one group is
``a * (d * sum(q * xq) + m * sum(xq))``: the integer dot product plus one correction term per group and token,
what llama.cpp's ``Q4_1 x Q8_1`` product computes. fptq's kernels and checkpoints hold symmetric weights
only; these functions measure what the asymmetric form would gain
(``docs/investigations.md``, ``asym_int4.py``).

``clip_search`` shrinks each group's range ``[min, max]`` toward its midpoint by the factor in
``1 - max_shrink * i / grid`` with the smallest squared error of the group's weights.
"""
from __future__ import annotations

import torch

from .weights import expand_group_scales, grouped_view

__all__ = ["asymmetric_params", "quantize_asymmetric", "dequantize_asymmetric", "fake_quantize_asymmetric"]


def _grouped_range(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, G]`` min and max of each group (a ragged last group over its own elements only)."""
    return (grouped_view(w, group_size, float("inf")).amin(dim=2),
            grouped_view(w, group_size, float("-inf")).amax(dim=2))


def _params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float16 steps and offsets for the ranges ``[lo, hi]`` (a constant group gets the smallest normal step,
    so its codes are 0 and its offset carries the value)."""
    m = lo.to(torch.float16)
    d = ((hi - m.float()) / (2 ** bits - 1)).to(torch.float16)
    return d.clamp_min(torch.finfo(torch.float16).tiny), m


def quantize_asymmetric(w: torch.Tensor, steps: torch.Tensor, mins: torch.Tensor, bits: int = 4,
                        group_size: int = 128) -> torch.Tensor:
    """Codes ``0 .. 2**bits - 1`` (uint8) of ``w`` ``[N, K]`` for group ``steps`` and ``mins`` ``[N, G]``."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    k = w.shape[1]
    d = expand_group_scales(steps.float(), k, group_size)
    m = expand_group_scales(mins.float(), k, group_size)
    return torch.clamp(torch.round((w.float() - m) / d), 0, 2 ** bits - 1).to(torch.uint8)


def dequantize_asymmetric(q: torch.Tensor, steps: torch.Tensor, mins: torch.Tensor,
                          group_size: int = 128) -> torch.Tensor:
    """Float32 weights ``d * q + m``."""
    k = q.shape[1]
    return q.float() * expand_group_scales(steps.float(), k, group_size) + expand_group_scales(mins.float(), k,
                                                                                                 group_size)


def _group_error(w: torch.Tensor, steps, mins, bits: int, group_size: int) -> torch.Tensor:
    """``[N, G]`` squared error of each group with ``steps`` and ``mins``."""
    deq = dequantize_asymmetric(quantize_asymmetric(w, steps, mins, bits, group_size), steps, mins, group_size)
    return grouped_view((deq - w) ** 2, group_size).sum(dim=2)


def asymmetric_params(w: torch.Tensor, bits: int = 4, group_size: int = 128, clip_search: bool = False,
                      grid: int = 20, max_shrink: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """``(steps, mins)``, float16 ``[N, G]`` each, for ``w`` ``[N, K]`` (see the module's notes)."""
    w = w.float()
    lo, hi = _grouped_range(w, group_size)
    best_d, best_m = _params(lo, hi, bits)
    if not clip_search:
        return best_d, best_m
    best = _group_error(w, best_d, best_m, bits, group_size)
    mid = (lo + hi) / 2
    for i in range(1, grid + 1):
        f = 1 - max_shrink * i / grid
        d, m = _params(mid + (lo - mid) * f, mid + (hi - mid) * f, bits)
        err = _group_error(w, d, m, bits, group_size)
        better = err < best
        best = torch.where(better, err, best)
        best_d, best_m = torch.where(better, d, best_d), torch.where(better, m, best_m)
    return best_d, best_m


def fake_quantize_asymmetric(w: torch.Tensor, bits: int = 4, group_size: int = 128,
                             clip_search: bool = False) -> torch.Tensor:
    """Round-to-nearest asymmetric quantize then dequantize (float32 result)."""
    d, m = asymmetric_params(w, bits, group_size, clip_search=clip_search)
    return dequantize_asymmetric(quantize_asymmetric(w, d, m, bits, group_size), d, m, group_size)

"""Group-wise symmetric integer quantization of weights.

Conventions (shared by the reference path, the kernels and the checkpoint):

* A weight ``W`` of shape ``[N, K]`` (out_features, in_features) is cut along
  the input dimension into ``G = ceil(K / group_size)`` groups; the last group
  is ragged when ``group_size`` does not divide ``K``.
* Each (row, group) has one scale ``s`` stored in float16; the integer codes
  are ``q = clamp(round(W / s), -2**(b-1), 2**(b-1) - 1)`` and ``W ~ q * s``.
* ``s = absmax / (2**(b-1) - 0.5)`` (``absmax / 7.5`` for 4 bits: the
  convention of GPTQ and llm-compressor; the code range -8..7 is used fully and
  the rounding error stays within half a step), optionally shrunk by an MSE
  clip search,
  rounded to float16 *before* the codes are computed, so that a checkpoint
  that stores fp16 scales reproduces the in-memory model bit for bit.
* For round-to-nearest weights that rounding is *down* (:func:`fp16_floor`): a
  scale rounded up sends a negative group extreme ``-7.5 s`` to ``-7`` instead of
  ``-8``, so both extremes of such a group come back ~7% too small, an inward
  bias on the largest weights. Rounding to nearest did that to about half the
  groups and cost 3% KL divergence on SmolLM2-135M
  (bench/results/rtn_rounding_spread.md). GPTQ's weights measured better with
  scales rounded to nearest (``QuantConfig.scale_rounding="auto"`` picks per
  method; bench/results/smol_gptq_scale_rounding.md).
* ``sign="signed"`` (llama.cpp's ``Q4_0`` rule): ``s = e / -2**(b-1)`` with ``e`` the
  group's *signed* extreme, so the extreme is code -8 exactly and ``s`` is negative
  when the extreme is positive. The step is ``absmax / 8`` instead of ``absmax / 7.5``
  and the extreme is exact; the codes, the checkpoint and every kernel are the same
  (a scale is a float16 multiplier of either sign). Rounding "down" then means
  toward zero.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "fp16_floor",
    "group_gram",
    "grouped_view",
    "hessian_group_blocks",
    "num_groups",
    "expand_group_scales",
    "weight_scales",
    "quantize_weight",
    "dequantize_weight",
    "fake_quantize_weight",
    "qrange",
    "WEIGHT_SCALE_SIGNS",
]


WEIGHT_SCALE_SIGNS = ("positive", "signed")  # weight_scales' ``sign``: absmax / 7.5, or signed extreme / -8


def qrange(bits: int) -> tuple[int, int]:
    """Smallest and largest code of a signed ``bits``-bit integer."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def num_groups(in_features: int, group_size: int) -> int:
    """Number of groups along the input dimension (last one may be ragged)."""
    if group_size <= 0:
        return 1
    return math.ceil(in_features / group_size)


def _effective_group(in_features: int, group_size: int) -> int:
    return in_features if group_size <= 0 else group_size


def expand_group_scales(scales: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """Repeat ``[N, G]`` group scales to ``[N, K]`` (one per weight)."""
    gs = _effective_group(in_features, group_size)
    return scales.repeat_interleave(gs, dim=1)[:, :in_features]


def _group_absmax(w: torch.Tensor, group_size: int) -> torch.Tensor:
    return grouped_view(w.abs(), group_size).amax(dim=2)


def grouped_view(w: torch.Tensor, group_size: int, fill: float = 0.0) -> torch.Tensor:
    """``[N, G, gs]`` view of ``w`` ``[N, K]``, a ragged last group padded with ``fill`` (0: sums and absolute
    maxima are unchanged; ``inf`` / ``-inf`` for minima / maxima)."""
    n, k = w.shape
    gs = _effective_group(k, group_size)
    g = num_groups(k, gs)
    pad = g * gs - k
    wp = torch.nn.functional.pad(w, (0, pad), value=fill) if pad else w
    return wp.reshape(n, g, gs)


def group_gram(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[G, gs, gs]`` diagonal blocks of ``x^T x / rows`` for the input groups of ``x`` (``[rows, K]``;
    a ragged last group is zero-padded): what :func:`weight_scales` needs to score a group's error
    on the Linear's output instead of on its weights."""
    x = x.reshape(-1, x.shape[-1]).float()
    xg = grouped_view(x, group_size)  # [rows, G, gs]
    return torch.einsum("rgi,rgj->gij", xg, xg) / max(x.shape[0], 1)


def hessian_group_blocks(h: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[G, gs, gs]`` diagonal blocks of a ``[K, K]`` Hessian (or Gram matrix) ``h`` for the input groups
    (a ragged last group is zero-padded): the same blocks :func:`group_gram` computes from the inputs,
    up to a constant factor, which the clip search does not see."""
    k = h.shape[0]
    gs = _effective_group(k, group_size)
    g = num_groups(k, gs)
    pad = g * gs - k
    hp = torch.nn.functional.pad(h.float(), (0, pad, 0, pad)) if pad else h.float()
    idx = torch.arange(g, device=hp.device)
    return hp.reshape(g, gs, g, gs)[idx, :, idx, :]


def _signed_fp16(x: torch.Tensor, to_fp16) -> torch.Tensor:
    """``x`` as float16, its magnitude rounded by ``to_fp16`` (:func:`fp16_floor` or to nearest) and kept
    at least float16's smallest normal (every scale, of either sign rule); the sign kept (zero counts as
    positive)."""
    tiny = torch.finfo(torch.float16).tiny
    mag = to_fp16(x.abs()).clamp_min(tiny)
    return torch.where(x < 0, -mag, mag)


def _group_extreme(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[N, G]`` signed extreme of each group (the value of largest magnitude; ties: the first)."""
    g = grouped_view(w, group_size)
    return g.gather(-1, g.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)


def fp16_floor(x: torch.Tensor) -> torch.Tensor:
    """Non-negative ``x`` as float16, rounded down: the largest float16 that is ``<= x``
    (values above float16's range become its largest finite value)."""
    x = x.float()
    h = x.to(torch.float16)
    over = h.float() > x  # rounded up (or to inf): step one float16 down (positive values order as their bits)
    return torch.where(over, (h.view(torch.int16) - 1).view(torch.float16), h)


def weight_scales(
    w: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    clip_search: bool = False,
    grid: int = 20,
    max_shrink: float = 0.2,
    gram: torch.Tensor | None = None,
    rounding: str = "down",
    sign: str = "positive",
) -> torch.Tensor:
    """Float16 group scales ``[N, G]`` for ``w`` (``[N, K]``), rounded to float16 ``rounding``
    ("down", :func:`fp16_floor`, or "nearest"; for negative scales, of the magnitude).

    Default: ``absmax / (2**(b-1) - 0.5)``; ``sign="signed"``: the group's signed extreme over
    ``-2**(b-1)`` (see the module's notes). With ``clip_search`` the absmax (the extreme) of
    each group is shrunk by the factor in ``1 - max_shrink * i / grid`` that
    minimises the group's squared quantization error, evaluated on all candidates
    at once per group: the error of the weights (the "mse" option of GPTQ's
    quantizer), or, given ``gram`` (:func:`group_gram` of calibration inputs), the
    error that the group adds to the Linear's output on those inputs,
    ``d^T (X_g^T X_g) d`` per row (activation-aware clipping, as AWQ's clip search,
    without the cross terms between groups).
    """
    if rounding not in ("down", "nearest"):
        raise ValueError(f"rounding must be 'down' or 'nearest', not {rounding!r}")
    if sign not in WEIGHT_SCALE_SIGNS:
        raise ValueError(f"sign must be one of {WEIGHT_SCALE_SIGNS}, not {sign!r}")
    to_fp16 = fp16_floor if rounding == "down" else (lambda x: x.to(torch.float16))
    w = w.float()
    if not clip_search:
        top, levels = _scale_top(w, bits, group_size, sign)
        return _signed_fp16(top / levels, to_fp16)
    # rows are independent: searched a block of rows at a time, so the search's temporaries stay small
    rows = max(1, CLIP_SEARCH_ELEMENTS // max(w.shape[1], 1))
    return torch.cat([_clip_searched_scales(w[i:i + rows], bits, group_size, grid, max_shrink, gram, to_fp16, sign)
                      for i in range(0, w.shape[0], rows)]) if w.shape[0] else \
        _clip_searched_scales(w, bits, group_size, grid, max_shrink, gram, to_fp16, sign)


CLIP_SEARCH_ELEMENTS = 1 << 22  # weights per block of rows in the clip search (16 MiB of float32)


def _scale_top(w: torch.Tensor, bits: int, group_size: int, sign: str) -> tuple[torch.Tensor, float]:
    """``[N, G]`` group values a scale divides, and the divisor: ``absmax`` over ``2**(b-1) - 0.5``, or with
    ``sign="signed"`` the signed extreme over ``-2**(b-1)``."""
    qmin, qmax = qrange(bits)
    if sign == "signed":
        return _group_extreme(w, group_size), float(qmin)
    return _group_absmax(w, group_size), qmax + 0.5


def _clip_searched_scales(w: torch.Tensor, bits: int, group_size: int, grid: int, max_shrink: float,
                          gram: torch.Tensor | None, to_fp16, sign: str = "positive") -> torch.Tensor:
    """:func:`weight_scales` with ``clip_search`` for the rows ``w``."""
    qmin, qmax = qrange(bits)
    top, levels = _scale_top(w, bits, group_size, sign)  # candidates keep the sign of a signed extreme
    wg = grouped_view(w, group_size)  # [N, G, gs]
    if gram is not None:
        gram = gram.float().to(w.device)
        if gram.shape != (wg.shape[1], wg.shape[2], wg.shape[2]):
            raise ValueError(f"gram must be [{wg.shape[1]}, {wg.shape[2]}, {wg.shape[2]}] for these groups, "
                             f"got {tuple(gram.shape)}")
    best = torch.full_like(top, float("inf"))
    best_scale = _signed_fp16(top / levels, to_fp16).float()
    for i in range(grid + 1):
        cand = _signed_fp16(top * (1 - max_shrink * i / grid) / levels, to_fp16).float()
        c = cand.unsqueeze(-1)
        d = torch.clamp(torch.round(wg / c), qmin, qmax).mul_(c).sub_(wg)  # [N, G, gs]
        if gram is None:
            err = d.pow_(2).sum(dim=-1)
        else:
            err = (torch.einsum("ngi,gij->ngj", d, gram) * d).sum(dim=-1)
        better = err < best
        best = torch.where(better, err, best)
        best_scale = torch.where(better, cand, best_scale)
    return best_scale.to(torch.float16)  # exact: every candidate is a float16 value


def quantization_error_per_group(w: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Sum of squared errors of round-to-nearest with ``scales``, per group."""
    deq = dequantize_weight(quantize_weight(w, scales, bits, group_size), scales, group_size)
    return grouped_view((deq - w.float()) ** 2, group_size).sum(dim=2)


def quantize_weight(w: torch.Tensor, scales: torch.Tensor, bits: int = 4, group_size: int = 128) -> torch.Tensor:
    """Integer codes (int8 tensor holding ``bits``-bit values) of ``w`` with ``scales``."""
    qmin, qmax = qrange(bits)
    s = expand_group_scales(scales.float(), w.shape[1], group_size)
    return torch.clamp(torch.round(w.float() / s), qmin, qmax).to(torch.int8)


def dequantize_weight(q: torch.Tensor, scales: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """Float32 weights ``q * s`` from codes and group scales."""
    s = expand_group_scales(scales.float(), q.shape[1], group_size)
    return q.float() * s


def fake_quantize_weight(w: torch.Tensor, bits: int = 4, group_size: int = 128, clip_search: bool = False,
                         sign: str = "positive") -> torch.Tensor:
    """Round-to-nearest quantize then dequantize (float32 result)."""
    scales = weight_scales(w, bits, group_size, clip_search=clip_search, sign=sign)
    return dequantize_weight(quantize_weight(w, scales, bits, group_size), scales, group_size)

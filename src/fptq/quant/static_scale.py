"""Choosing a static per-tensor activation scale from calibration data.

Observers:

* ``max``: the true running max over all calibration tokens;
* ``mean_max``: the mean over calibration windows of each window's max (the
  "averaged min/max" of llm-compressor's default observer);
* ``percentile``: the ``q``-th percentile of |x| over sampled tokens;
* ``mse``: the clip value in ``[lo, 1] * max`` minimising the mean squared
  quantization error of the sampled tokens.
"""
from __future__ import annotations

import torch

from .activations import act_qmax

OBSERVERS = ("max", "mean_max", "percentile", "mse")

__all__ = ["OBSERVERS", "choose_static_scale", "mse_clip"]


def mse_clip(sample: torch.Tensor, absmax: float, bits: int = 8, grid: int = 100, lo: float = 0.2,
             bins: int = 8192) -> float:
    """Clip value in ``[lo, 1] * absmax`` minimising the squared quantization
    error of ``sample``.

    The error is evaluated on a histogram of ``|x|`` (``bins`` bins over
    ``[0, absmax]``, each bin represented by its centre), so the search costs
    ``O(bins * grid)`` after one pass over the data.
    """
    qmax = act_qmax(bits)
    x = sample.float().abs().reshape(-1)
    if x.numel() == 0 or absmax <= 0:
        return absmax
    hist = torch.histc(x.clamp(max=absmax), bins=bins, min=0.0, max=absmax).double()
    centres = (torch.arange(bins, dtype=torch.float64) + 0.5) * (absmax / bins)
    clips = torch.linspace(lo * absmax, absmax, grid + 1, dtype=torch.float64)
    steps = (clips / qmax)[:, None]
    deq = torch.clamp(torch.round(centres[None, :] / steps), 0, qmax) * steps
    err = ((deq - centres[None, :]) ** 2 * hist[None, :]).sum(dim=1)
    return float(clips[int(torch.argmin(err))])


def choose_static_scale(
    observer: str,
    absmax: float,
    sample: torch.Tensor | None = None,
    window_maxes: torch.Tensor | None = None,
    bits: int = 8,
    percentile: float = 99.99,
) -> float:
    """Per-tensor scale (clip / qmax) for ``observer``; see module docstring."""
    qmax = act_qmax(bits)
    if absmax <= 0:
        return 1.0 / qmax
    if observer == "max":
        clip = absmax
    elif observer == "mean_max":
        if window_maxes is None or window_maxes.numel() == 0:
            raise ValueError("mean_max needs per-window maxima")
        clip = float(window_maxes.float().mean())
    elif observer == "percentile":
        if sample is None or sample.numel() == 0:
            raise ValueError("percentile needs sampled activations")
        flat = sample.float().abs().reshape(-1)
        if flat.numel() > 16_000_000:
            flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:16_000_000]]
        clip = float(torch.quantile(flat, percentile / 100.0)) if flat.numel() <= 16_000_000 else absmax
        clip = min(max(clip, 1e-8), absmax)
    elif observer == "mse":
        if sample is None or sample.numel() == 0:
            raise ValueError("mse needs sampled activations")
        clip = mse_clip(sample, absmax, bits)
    else:
        raise ValueError(f"unknown observer {observer!r}; choose one of {', '.join(OBSERVERS)}")
    return clip / qmax

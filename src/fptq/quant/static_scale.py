"""Choosing a static per-tensor activation scale from calibration data.

Observers:

* ``max``: the true running max over all calibration tokens;
* ``mean_max``: the mean over calibration windows of each window's max (the
  "averaged min/max" of llm-compressor's default observer);
* ``percentile``: the ``q``-th percentile of |x| over sampled tokens;
* ``mse``: the clip value in ``[lo, 1] * max`` minimising the mean squared
  quantization error of the sampled tokens;
* ``mse_sink``: ``mse``, but never clipping below ``floor`` (the pipeline passes the
  largest input of the first token of the calibration windows: the attention sink,
  whose clipping costs far more than its share of the squared error);
* ``output``: the clip value minimising the squared error the quantization
  leaves in the consuming Linears' outputs (:func:`output_clip_scale`).
"""
from __future__ import annotations

import torch

from .activations import act_qmax, fake_quantize_static

OBSERVERS = ("max", "mean_max", "percentile", "mse", "mse_sink", "output")
# the observers that read sampled calibration activations (``sample``)
SAMPLED_OBSERVERS = ("percentile", "mse", "mse_sink", "output")

__all__ = ["OBSERVERS", "SAMPLED_OBSERVERS", "choose_static_scale", "mse_clip", "output_clip_scale"]


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


def output_clip_scale(x: torch.Tensor, weight: torch.Tensor, absmax: float, bits: int = 8, grid: int = 12,
                      refine: int = 8, lo: float = 0.05) -> float:
    """Static per-tensor activation scale (clip / qmax) whose quantization error, carried through
    ``weight`` (``[N, K]``, the consumers' weights as they will run), is smallest on the sampled inputs
    ``x`` (``[rows, K]``): the clip in ``[lo, 1] * absmax`` minimising ``|(Q(x) - x) W^T|^2``, searched
    on ``grid`` evenly spaced clips and then ``refine`` more between the best one's neighbours.

    Scoring the Linear's output instead of the activation weights each channel by how much the
    weights amplify it, and each token by its size: a token far larger than the rest (an attention
    sink) is clipped only when its error costs less than the resolution gained on every other token."""
    qmax = act_qmax(bits)
    if absmax <= 0 or x.numel() == 0:
        return max(absmax, 1e-8) / qmax
    x = x.float()
    w = weight.float().to(x.device)
    k, n = w.shape[1], w.shape[0]
    gram = w.t() @ w if n > k else None  # |d W^T|^2 = sum((d G) * d) when K < N: cheaper

    def err(c: float) -> float:
        d = fake_quantize_static(x, c / qmax, bits) - x
        return float(((d @ gram) * d).sum()) if gram is not None else float((d @ w.t()).pow(2).sum())

    clips = torch.linspace(lo * absmax, absmax, grid, dtype=torch.float64).tolist()
    errs = [err(c) for c in clips]
    i = min(range(grid), key=lambda j: (errs[j], -j))  # ties: the larger clip
    a, b = clips[max(i - 1, 0)], clips[min(i + 1, grid - 1)]
    for c in torch.linspace(a, b, refine + 2, dtype=torch.float64)[1:-1].tolist():
        clips.append(c)
        errs.append(err(c))
    best = min(range(len(clips)), key=lambda j: (errs[j], -clips[j]))
    return clips[best] / qmax


def choose_static_scale(
    observer: str,
    absmax: float,
    sample: torch.Tensor | None = None,
    window_maxes: torch.Tensor | None = None,
    bits: int = 8,
    percentile: float = 99.99,
    weight: torch.Tensor | None = None,
    floor: float = 0.0,
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
    elif observer in ("mse", "mse_sink"):
        if sample is None or sample.numel() == 0:
            raise ValueError(f"{observer} needs sampled activations")
        clip = mse_clip(sample, absmax, bits)
        if observer == "mse_sink":
            clip = min(max(clip, floor), absmax)
    elif observer == "output":
        if sample is None or sample.numel() == 0 or weight is None:
            raise ValueError("the output observer needs sampled activations and the consumers' weights")
        return output_clip_scale(sample, weight, absmax, bits)
    else:
        raise ValueError(f"unknown observer {observer!r}; choose one of {', '.join(OBSERVERS)}")
    return clip / qmax

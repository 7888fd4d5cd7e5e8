"""Choosing equalization strength by the error it leaves in a layer's output.

For a group of Linears that share one input ``X`` (e.g. q/k/v after the attention norm)
and per-channel equalization scales ``s`` (LAE or SmoothQuant), the candidates
``s**beta`` (``beta = 0``: no equalization, ``beta = 1``: the formula as published) are
scored by the squared error of the quantized Linears' outputs on sampled calibration
inputs, ``Q_a(X / s**beta) Q_w(W * s**beta)^T`` against the float ``X W^T``, with
weights and activations quantized as the pipeline will quantize them (round-to-nearest
weights; static per-tensor, dynamic per-token or float activations). This is AWQ's
scale search applied to the equalization exponent.
"""
from __future__ import annotations

import torch

from .activations import fake_quantize_per_token, fake_quantize_static
from .reorder import channel_order
from .static_scale import choose_static_scale
from .weights import fake_quantize_weight

__all__ = ["quantized_output_error", "best_equalization_power"]

SEARCH_BLOCK_ROWS = 1024  # rows of a weight quantized at a time in the search


def _act_quant(x: torch.Tensor, act_mode: str, abits: int, observer: str) -> torch.Tensor:
    if act_mode == "dynamic_token":
        return fake_quantize_per_token(x, abits)
    if act_mode == "static_tensor":
        absmax = float(x.abs().max())
        scale = choose_static_scale(observer if observer in ("max", "mse", "percentile") else "mse", absmax,
                                    sample=x, bits=abits)
        return fake_quantize_static(x, scale, abits)
    return x


def quantized_output_error(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    refs: list[torch.Tensor],
    s: torch.Tensor,
    *,
    wbits: int,
    group_size: int,
    act_mode: str,
    abits: int = 8,
    observer: str = "mse",
    reorder: bool = False,
    weight_sign: str = "positive",
) -> float:
    """Sum over the Linears of ``|Q_a(x / s) Q_w(W * s)^T - ref|^2 / |ref|^2``.

    ``x``: sampled inputs ``[rows, K]``; ``weights``: the float weights ``[N_i, K]`` sharing
    that input; ``refs``: their float outputs ``x @ W_i^T``; ``s``: per-channel scales ``[K]``.
    ``reorder``: the channels sorted by :func:`~fptq.quant.reorder.channel_order` of the scaled weights
    before the weights are quantized, as the pipeline does for reorderable groups. ``weight_sign``: the
    weight scales' sign rule (:func:`~fptq.quant.weights.weight_scales`).
    """
    s = s.float().to(x.device)
    xq = _act_quant(x / s, act_mode, abits, observer)
    perm = channel_order(weights, s).to(x.device) if reorder else None
    if perm is not None:
        xq = xq[:, perm]
    total = 0.0
    for w, ref in zip(weights, refs):
        # the quantized weights written a block of rows at a time (each row is quantized on its own: the same
        # values as the whole matrix at once) with no whole scaled copy: a layer's largest group (gate/up) is
        # the weights of two Linears, and whole copies and the quantizer's temporaries were a layer's peak
        wq = torch.empty(w.shape, dtype=torch.float32, device=x.device)
        for r in range(0, w.shape[0], SEARCH_BLOCK_ROWS):
            scaled = w[r:r + SEARCH_BLOCK_ROWS].float().to(x.device) * s.view(1, -1)
            if perm is not None:
                scaled = scaled[:, perm]
            wq[r:r + SEARCH_BLOCK_ROWS] = fake_quantize_weight(scaled, wbits, group_size, sign=weight_sign)
        err = (xq @ wq.t() - ref).pow(2).sum()
        total += float(err / ref.pow(2).sum().clamp_min(1e-30))
    return total


def best_equalization_power(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    s: torch.Tensor,
    powers: tuple[float, ...],
    refs: list[torch.Tensor] | None = None,
    **kw,
) -> tuple[float, list[float]]:
    """The power ``beta`` in ``powers`` whose scales ``s**beta`` give the smallest
    :func:`quantized_output_error`, and every candidate's error (ties: the first). ``refs``: the float
    outputs ``x @ W_i^T`` when the caller has them already."""
    x = x.float()
    if refs is None:
        refs = [x @ w.float().t() for w in weights]
    errs = [quantized_output_error(x, weights, refs, s.float().pow(p), **kw) for p in powers]
    best = min(range(len(powers)), key=lambda i: errs[i])
    return powers[best], errs

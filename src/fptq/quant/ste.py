"""Straight-through-estimator (STE) versions of the fake-quantizers, for quantization-aware training.

Each function's forward value is *exactly* the corresponding fake-quantizer of this package
(:func:`~fptq.quant.weights.fake_quantize_weight`, :func:`~fptq.quant.activations.fake_quantize_per_token`,
and the static per-tensor quantizer of :class:`~fptq.nn.QuantLinear`'s reference path), so a trained model
converts to integer codes with no change in its outputs. Backward:

* weights and dynamic per-token activations: the identity (the plain STE of LLM-QAT, Liu et al. 2023,
  arXiv 2305.17888; the scales follow the tensor and are not trained);
* static per-tensor activations with a trainable scale ``s``: LSQ's gradients (Esser et al. 2020,
  arXiv 1902.08153): ``d/dx`` is 1 where the code ``round(x/s)`` is within ``+-qmax`` and 0 where it is
  clipped; ``d/ds`` is ``round(x/s) - x/s`` where it is not clipped and ``+-qmax`` where it is.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .activations import act_qmax, fake_quantize_per_token
from .weights import fake_quantize_weight

__all__ = ["straight_through", "round_ste", "fake_quantize_weight_ste", "fake_quantize_per_token_ste",
           "fake_quantize_static_ste"]


class _StraightThrough(torch.autograd.Function):
    """``fn(x)`` forward, identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return fn(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def straight_through(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn(x)`` in the forward pass, with the gradient of the identity in the backward pass."""
    return _StraightThrough.apply(x, fn)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``torch.round`` forward, identity backward."""
    return straight_through(x, torch.round)


def fake_quantize_weight_ste(w: torch.Tensor, bits: int = 4, group_size: int = 128) -> torch.Tensor:
    """:func:`fake_quantize_weight` of ``w`` (scales ``absmax / (2**(b-1) - 0.5)`` per row and group, computed
    from ``w`` itself), in ``w``'s dtype; the gradient passes straight through to ``w``."""
    return straight_through(w, lambda t: fake_quantize_weight(t, bits, group_size).to(t.dtype))


def fake_quantize_per_token_ste(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """:func:`fake_quantize_per_token` (dynamic, one scale per row); the gradient passes straight through."""
    return straight_through(x, lambda t: fake_quantize_per_token(t, bits))


def fake_quantize_static_ste(x: torch.Tensor, scale: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """``clamp(round(x / scale), -qmax, qmax) * scale`` computed in float32 as :class:`~fptq.nn.QuantLinear`'s
    reference path does (same values), returned in ``x``'s dtype. ``scale`` (a scalar tensor) may require a
    gradient: it then gets LSQ's gradient (module docstring)."""
    qmax = act_qmax(bits)
    s = scale.float()
    xq = torch.clamp(round_ste(x.float() / s), -qmax, qmax) * s
    return xq.to(x.dtype)

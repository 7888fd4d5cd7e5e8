"""Symmetric int8 (or other width) quantization of activations.

Codes lie in ``[-(2**(b-1) - 1), 2**(b-1) - 1]`` (symmetric, -128 unused), so
that negation is exact and integer kernels can use either sign convention.

* static per-tensor: one scale fixed at calibration time;
* dynamic per-token: one scale per row, ``absmax(row) / qmax``, computed at run
  time.
"""
from __future__ import annotations

import torch

__all__ = [
    "act_qmax",
    "quantize_static",
    "quantize_per_token",
    "fake_quantize_static",
    "fake_quantize_per_token",
]


def act_qmax(bits: int) -> int:
    if not 2 <= bits <= 8:
        raise ValueError(f"activation bits must be in 2..8, got {bits}")
    return 2 ** (bits - 1) - 1


def quantize_static(x: torch.Tensor, scale: float | torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Codes of ``x`` (any shape) with one per-tensor scale (int8 tensor)."""
    qmax = act_qmax(bits)
    return torch.clamp(torch.round(x.float() / scale), -qmax, qmax).to(torch.int8)


def quantize_per_token(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and per-row scales (``[..., 1]`` float32) of ``x``."""
    qmax = act_qmax(bits)
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / qmax).clamp_min(1e-8)
    q = torch.clamp(torch.round(xf / scale), -qmax, qmax).to(torch.int8)
    return q, scale


def fake_quantize_static(x: torch.Tensor, scale: float | torch.Tensor, bits: int = 8) -> torch.Tensor:
    return (quantize_static(x, scale, bits).float() * scale).to(x.dtype)


def fake_quantize_per_token(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    q, scale = quantize_per_token(x, bits)
    return (q.float() * scale).to(x.dtype)

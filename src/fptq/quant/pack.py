"""Packing of 4-bit signed codes, two per byte.

Layout: for a code matrix ``q`` of shape ``[N, K]`` (values in -8..7) the packed
matrix has shape ``[N, ceil(K / 2)]`` and dtype uint8; byte ``j`` of row ``n``
holds ``q[n, 2j]`` in its low nibble and ``q[n, 2j + 1]`` in its high nibble,
each as a 4-bit two's-complement number. An odd ``K`` is padded with a zero
code. Kernels (CPU and Triton) read this layout.
"""
from __future__ import annotations

import torch

__all__ = ["pack_int4", "unpack_int4"]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    if q.dim() != 2:
        raise ValueError(f"pack_int4 expects a 2-D code matrix, got shape {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("pack_int4: codes must lie in -8..7")
    n, k = q.shape
    if k % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 codes ``[N, k]``."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4 expects uint8, got {packed.dtype}")
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    # sign-extend 4-bit two's complement
    low = low - ((low & 0x8) << 1)
    high = high - ((high & 0x8) << 1)
    out = torch.stack((low, high), dim=-1).view(packed.shape[0], -1)
    return out[:, :k].contiguous()

"""Packing of 4-bit signed codes, two per byte.

Layout: for a code matrix ``q`` of shape ``[N, K]`` (values in -8..7) the packed
matrix has shape ``[N, ceil(K / 2)]`` and dtype uint8; byte ``j`` of row ``n``
holds ``q[n, 2j]`` in its low nibble and ``q[n, 2j + 1]`` in its high nibble,
each as a 4-bit two's-complement number. An odd ``K`` is padded with a zero
code. Kernels (CPU and Triton) read this layout.

:func:`pack_int32_offset` writes the other common layout, the one of
compressed-tensors' ``pack-quantized`` format (read by vLLM and transformers).
"""
from __future__ import annotations

import torch

__all__ = ["pack_int4", "unpack_int4", "pack_int32_offset", "pack_int4_vnni", "unpack_int4_vnni", "vnni_padded_shape"]


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


def pack_int32_offset(q: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Pack signed ``bits``-bit codes ``[N, K]`` into int32 ``[N, ceil(K * bits / 32)]`` the way
    compressed-tensors' ``pack-quantized`` format does (``bits`` dividing 32): each code is offset
    by ``2**(bits-1)`` to an unsigned value, and element ``i`` of a row occupies bits
    ``bits*(i % per) ..`` of word ``i // per`` (``per = 32 // bits``); the last word is padded with
    zeros."""
    if q.dim() != 2:
        raise ValueError(f"pack_int32_offset expects a 2-D code matrix, got shape {tuple(q.shape)}")
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"pack_int32_offset supports bits dividing 32 (1, 2, 4, 8), got {bits}")
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise ValueError(f"pack_int32_offset: codes must lie in {lo}..{hi}")
    per = 32 // bits
    n, k = q.shape
    u = q.to(torch.int64) + 2 ** (bits - 1)
    if k % per:
        u = torch.nn.functional.pad(u, (0, per - k % per))
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=q.device)
    words = (u.view(n, -1, per) << shifts).sum(dim=-1)  # 0 .. 2**32-1
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32).contiguous()


def vnni_padded_shape(n: int, k: int) -> tuple[int, int]:
    """``(Np, Kp)``: ``n`` rounded up to a multiple of 16, ``k`` to a multiple of 8 (the blocks of the layout below)."""
    return -(-n // 16) * 16, -(-k // 8) * 8


def pack_int4_vnni(q: torch.Tensor) -> torch.Tensor:
    """Pack signed 4-bit codes ``[N, K]`` (-8..7) in the blocked layout of fptq's native CPU kernel.

    The matrix is zero-padded to ``[Np, Kp]`` (:func:`vnni_padded_shape`) and cut into blocks of 16 rows x 8
    columns, stored ``[Np/16][Kp/8]``, 64 bytes each: byte ``4*r + j`` of block ``(nb, kb)`` holds
    ``q[16*nb + r, 8*kb + j] + 8`` in its low nibble and ``q[16*nb + r, 8*kb + 4 + j] + 8`` in its high nibble.
    One 64-byte load gives two 512-bit operands of unsigned bytes for ``vpdpbusd`` (16 output channels x 4
    inputs each). Same size as :func:`pack_int4` (half a byte per code, plus the padding)."""
    if q.dim() != 2:
        raise ValueError(f"pack_int4_vnni expects a 2-D code matrix, got shape {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("pack_int4_vnni: codes must lie in -8..7")
    n, k = q.shape
    np_, kp = vnni_padded_shape(n, k)
    u = torch.nn.functional.pad(q.to(torch.int16) + 8, (0, kp - k, 0, np_ - n), value=8).to(torch.uint8)
    # [nb, r, kb, half, j] -> [nb, kb, r, j, half]
    u = u.view(np_ // 16, 16, kp // 8, 2, 4).permute(0, 2, 1, 4, 3)
    return (u[..., 0] | (u[..., 1] << 4)).contiguous().view(np_ // 16, kp // 8, 64)


def unpack_int4_vnni(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4_vnni`: int8 codes ``[n, k]``."""
    np_, kp = vnni_padded_shape(n, k)
    if packed.dtype != torch.uint8 or packed.numel() != np_ * kp // 2:
        raise ValueError(f"unpack_int4_vnni: expected {np_ * kp // 2} uint8 bytes for [{n}, {k}], "
                         f"got {packed.numel()} {packed.dtype}")
    b = packed.reshape(np_ // 16, kp // 8, 16, 4)
    u = torch.stack((b & 0xF, b >> 4), dim=-1)  # [nb, kb, r, j, half]
    q = u.permute(0, 2, 1, 4, 3).reshape(np_, kp).to(torch.int8) - 8
    return q[:n, :k].contiguous()

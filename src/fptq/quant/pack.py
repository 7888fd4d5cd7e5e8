"""Packing of 4-bit signed codes, two per byte.

Layout: for a code matrix ``q`` of shape ``[N, K]`` (values in -8..7) the packed
matrix has shape ``[N, ceil(K / 2)]`` and dtype uint8; byte ``j`` of row ``n``
holds ``q[n, 2j]`` in its low nibble and ``q[n, 2j + 1]`` in its high nibble,
each as a 4-bit two's-complement number. An odd ``K`` is padded with a zero
code. Kernels (CPU and Triton) read this layout.

:func:`pack_int32_offset` writes the other common layout, the one of
compressed-tensors' ``pack-quantized`` format (read by vLLM and transformers);
:func:`pack_q4_0` writes GGUF's ``Q4_0`` blocks (read by llama.cpp).
"""
from __future__ import annotations

import torch

__all__ = ["pack_int4", "unpack_int4", "pack_int32_offset", "pack_int4_vnni", "unpack_int4_vnni", "vnni_padded_shape",
           "Q4_0_BLOCK", "Q4_0_BLOCK_BYTES", "q4_0_problem", "pack_q4_0", "unpack_q4_0"]

Q4_0_BLOCK = 32  # weights per GGUF Q4_0 block
Q4_0_BLOCK_BYTES = 18  # float16 scale + 16 bytes of codes


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


def q4_0_problem(in_features: int, group_size: int, bits: int = 4) -> str | None:
    """Why symmetric ``bits``-bit codes with float16 scales in groups of ``group_size`` along ``in_features``
    (``<= 0``: one group per row) cannot be written as GGUF ``Q4_0`` without rounding again, or ``None``.

    A ``Q4_0`` block holds 32 consecutive weights of a row and one float16 scale ``d`` (value
    ``d * (q - 8)``, ``q`` in 0..15). A group whose length is a multiple of 32 is exact: its scale is
    repeated in each of its blocks. So are a ragged last group (both ``in_features`` and the group
    size are multiples of 32, hence its length too) and per-channel scales."""
    if bits != 4:
        return f"{bits}-bit weights do not fit Q4_0 (4-bit codes)"
    if in_features % Q4_0_BLOCK:
        return f"in_features {in_features} is not a multiple of {Q4_0_BLOCK} (the Q4_0 block)"
    if group_size > 0 and group_size % Q4_0_BLOCK:
        return f"group size {group_size} is not a multiple of {Q4_0_BLOCK} (the Q4_0 block)"
    return None


def pack_q4_0(q: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """GGUF ``Q4_0`` rows (uint8 ``[N, K / 32 * 18]``) holding exactly the signed codes ``q`` (``[N, K]``,
    -8..7) and the float16 group scales ``scales`` (``[N, G]``, groups of ``group_size`` along ``K``;
    ``<= 0``: one per row), so that ``d * (q' - 8) == scale * code`` bit for bit.

    Block ``b`` of a row: bytes 0-1 its scale ``d`` (float16, little-endian; the scale of the group
    holding weights ``32b .. 32b + 31``), then 16 bytes; byte ``j`` holds ``q' = code + 8`` of weight
    ``32b + j`` in its low nibble and of weight ``32b + j + 16`` in its high nibble. Refuses (ValueError)
    what :func:`q4_0_problem` refuses; never rounds."""
    if q.dim() != 2 or scales.dim() != 2 or q.shape[0] != scales.shape[0]:
        raise ValueError(f"pack_q4_0 expects codes [N, K] and scales [N, G], got {tuple(q.shape)} and "
                         f"{tuple(scales.shape)}")
    n, k = q.shape
    problem = q4_0_problem(k, group_size)
    if problem:
        raise ValueError(f"pack_q4_0: {problem}")
    gs = k if group_size <= 0 else group_size
    if scales.shape[1] != -(-k // gs):
        raise ValueError(f"pack_q4_0: {scales.shape[1]} scales per row, groups of {gs} over {k} need {-(-k // gs)}")
    if scales.dtype != torch.float16:
        raise ValueError(f"pack_q4_0 copies float16 scales, got {scales.dtype}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("pack_q4_0: codes must lie in -8..7")
    blocks = k // Q4_0_BLOCK
    d = scales.repeat_interleave(gs // Q4_0_BLOCK, dim=1)[:, :blocks].contiguous()
    d_bytes = d.view(torch.int16).to(torch.int32)  # little-endian bytes of the float16 bits
    d_bytes = torch.stack((d_bytes & 0xFF, (d_bytes >> 8) & 0xFF), dim=-1).to(torch.uint8)  # [N, blocks, 2]
    u = (q.to(torch.int16) + 8).to(torch.uint8).view(n, blocks, Q4_0_BLOCK)
    nibbles = u[..., :16] | (u[..., 16:] << 4)  # [N, blocks, 16]
    return torch.cat((d_bytes, nibbles), dim=-1).reshape(n, blocks * Q4_0_BLOCK_BYTES).contiguous()


def unpack_q4_0(packed: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_q4_0` with one scale per block: ``(codes int8 [N, k], scales float16
    [N, k / 32])``."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or k % Q4_0_BLOCK or \
            packed.shape[1] != k // Q4_0_BLOCK * Q4_0_BLOCK_BYTES:
        raise ValueError(f"unpack_q4_0: expected uint8 [N, {k // Q4_0_BLOCK * Q4_0_BLOCK_BYTES}] for {k} weights "
                         f"per row, got {packed.dtype} {tuple(packed.shape)}")
    n = packed.shape[0]
    b = packed.view(n, k // Q4_0_BLOCK, Q4_0_BLOCK_BYTES)
    bits = b[..., 0].to(torch.int32) | (b[..., 1].to(torch.int32) << 8)
    d = torch.where(bits >= 2**15, bits - 2**16, bits).to(torch.int16).view(torch.float16)
    nib = b[..., 2:]
    u = torch.cat((nib & 0xF, nib >> 4), dim=-1)  # [N, blocks, 32]
    return (u.to(torch.int8) - 8).reshape(n, k).contiguous(), d.contiguous()

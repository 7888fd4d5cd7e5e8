"""Integer group scales: 4-bit group scales that are small integer multiples of one scale per output channel.

A weight's float16 group scales ``s[n, g]`` have this structure when ``s[n, g] = base[n] * m[n, g]`` exactly, with
``base[n] > 0`` and integer multipliers ``m`` in ``-15 .. -1`` or ``1 .. 16`` (:data:`MULTIPLIERS`). Then ``q * m``
(4-bit code -8 .. 7 times multiplier) is an int8 (``-8 * 16 = -128``, ``-8 * -15 = 120``), and the product of int8
activation codes with it can be summed over the whole input dimension in int32, with one float step per output
(``base[n]``) instead of one per group: what an int8 matrix engine (AMX tiles, GPU tensor cores) needs to run at
its speed. QServe and QQQ quantize weights that way ("progressive" group quantization, with positive integers).
A negative multiplier is the signed-extreme rule (:func:`fptq.quant.weights.weight_scales`' ``sign="signed"``):
the group's positive extreme lands on code -8.

The checkpoint format does not change: the scales are ordinary float16 group scales, every kernel and export reads
them as such, and :func:`integer_scale_factors` finds the structure again when a model is loaded.
:func:`integer_group_scales` chooses such scales (``QuantConfig.group_scales = "integer"``).
"""
from __future__ import annotations

import torch

__all__ = ["MAX_MULTIPLIER", "MIN_MULTIPLIER", "MULTIPLIERS", "BASE_BITS", "INT_SUM_MAX_K", "integer_group_scales",
           "integer_scale_factors", "integer_weight_codes"]

MAX_MULTIPLIER, MIN_MULTIPLIER = 16, -15  # q * m stays in int8 for 4-bit codes -8 .. 7
MULTIPLIERS = tuple(m for m in range(MIN_MULTIPLIER, MAX_MULTIPLIER + 1) if m)
BASE_BITS = 6  # significant bits of a channel's base: base * m (|m| < 2**5) is exact in float16's 11
#: inputs over which int32 holds a sum of int8 activation codes (|x| <= 127) times ``q * m`` (|q * m| <= 128)
INT_SUM_MAX_K = (2 ** 31 - 1) // (127 * 128)
SEARCH_ELEMENTS = 1 << 21  # weights per block of rows in integer_group_scales


def _round_up_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x`` (positive float64) rounded up to ``bits`` significant bits."""
    e = torch.floor(torch.log2(x))
    step = torch.exp2(e - (bits - 1))
    return torch.ceil(x / step) * step


def integer_group_scales(w: torch.Tensor, group_size: int, bits: int = 4, search: bool = True) -> torch.Tensor:
    """float16 group scales ``[N, G]`` of ``w`` ``[N, K]`` with the integer structure: ``base[n] * m``,
    ``base[n]`` the channel's largest ideal step (``absmax / 7.5``) over 16, rounded up to :data:`BASE_BITS` bits
    (so ``base * m`` is exact in float16) and at least float16's smallest normal number (tiny and all-zero rows).
    Each group's multiplier is the one of :data:`MULTIPLIERS` whose round-to-nearest codes give the smallest
    squared error (``search``: either sign; else the positive ideal step rounded to the nearest multiple). Rows
    too large for float16 scales keep plain absmax scales (and the matrix then has no integer structure).
    Computed on the CPU, returned there."""
    if bits != 4:
        raise ValueError("integer group scales are for 4-bit weights")
    n, k = w.shape
    w = w.detach().cpu()
    rows = max(1, SEARCH_ELEMENTS // max(k, 1))  # a block of rows at a time: the search's temporaries stay small
    return torch.cat([_block_scales(w[i:i + rows], group_size, search) for i in range(0, n, rows)]) \
        if n else torch.empty(0, -(-k // group_size), dtype=torch.float16)


def _block_scales(w: torch.Tensor, group_size: int, search: bool) -> torch.Tensor:
    n = w.shape[0]
    g = torch.nn.functional.pad(w.float(), (0, -w.shape[1] % group_size)).reshape(n, -1, group_size)  # ragged: zeros
    ideal = g.abs().amax(-1).double() / 7.5  # [N, G]
    top = ideal.amax(-1)  # [N]
    ok = top * 1.01 < 65504  # (else float16 cannot hold the scales: plain ones, and no integer structure)
    # a base below float16's smallest normal (tiny or all-zero rows) is raised to it: base * m stays exact
    base = _round_up_bits(torch.where(ok & (top > 0), top, torch.ones_like(top)) / MAX_MULTIPLIER, BASE_BITS)
    base = torch.where(top > 0, base, torch.zeros_like(base)).clamp_min(2 ** -14)
    if search:
        best = torch.full(ideal.shape, float("inf"))
        mult = torch.ones(ideal.shape, dtype=torch.float64)
        for m in MULTIPLIERS:
            s = (base * m).float()[:, None, None]
            err = ((torch.clamp(torch.round(g / s), -8, 7) * s - g) ** 2).sum(-1)
            better = err < best
            best = torch.where(better, err, best)
            mult[better] = float(m)
    else:
        mult = torch.clamp(torch.round(ideal / base[:, None]), 1, MAX_MULTIPLIER)
    scales = (base[:, None] * mult).to(torch.float16)
    plain = ideal.clamp_min(2 ** -14).to(torch.float16)
    return torch.where(ok[:, None], scales, plain)


def integer_scale_factors(ws_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(base [Np] float32, multipliers [G, Np] int8)`` with ``ws_t[g, n] == base[n] * m[g, n]`` exactly,
    ``base > 0`` and ``m`` in :data:`MULTIPLIERS`, for transposed group scales ``ws_t`` ``[G, Np]`` (float16, as
    the native kernels hold them; all-zero columns are padding: base 0, multiplier 1); ``None`` if a column has
    no such factors. The largest base is taken (the smallest multipliers)."""
    a = ws_t.double()
    pad = (a == 0).all(0)
    if bool(((a == 0) & ~pad[None]).any()):
        return None
    amin = torch.where(pad, torch.ones_like(a[0]), a.abs().min(0).values)
    base = torch.zeros(a.shape[1], dtype=torch.float32)
    mult = torch.zeros(a.shape, dtype=torch.float64)
    found = pad.clone()
    for j in range(1, MAX_MULTIPLIER + 1):
        b = (amin / j).float().double()  # float32 base
        m = torch.round(a / b)
        good = ~found & (m * b == a).all(0) & (m <= MAX_MULTIPLIER).all(0) & (m >= MIN_MULTIPLIER).all(0)
        base[good] = b[good].float()
        mult[:, good] = m[:, good]
        found |= good
        if bool(found.all()):
            break
    if not bool(found.all()):
        return None
    mult[:, pad] = 1
    return base, mult.to(torch.int8)


def integer_weight_codes(codes: torch.Tensor, scales: torch.Tensor, group_size: int,
                         rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The group-scaled 4-bit weight ``codes`` ``[N, K]`` (int8 -8 .. 7) with group scales ``scales`` ``[N, G]``
    re-expressed exactly per output channel: ``(w8 [N, K] int8, base [N] float32)`` with
    ``w8[n, k] * base[n] == codes[n, k] * scales[n, k // group_size]`` for every weight (``w8 = q * m``, within
    -128 .. 120), or ``None`` when the scales have no integer structure (:func:`integer_scale_factors`). What
    lets an int8 x int8 product over the whole input dimension compute the group-wise weights without a further
    rounding. Computed on the CPU, ``rows`` rows at a time; returned there."""
    factors = integer_scale_factors(scales.detach().cpu().t())
    if factors is None:
        return None
    base, mult = factors
    codes = codes.detach().cpu()
    n, k = codes.shape
    w8 = torch.empty(n, k, dtype=torch.int8)
    for r0 in range(0, n, rows):
        m = mult[:, r0:r0 + rows].t().to(torch.int16).repeat_interleave(group_size, dim=1)[:, :k]
        w8[r0:r0 + rows] = (codes[r0:r0 + rows].to(torch.int16) * m).to(torch.int8)
    return w8, base

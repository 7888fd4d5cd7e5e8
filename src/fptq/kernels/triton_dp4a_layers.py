"""The dp4a decode GEMV (:mod:`.triton_dp4a`, M <= 2) on several W4A8 Linears that read the same input, in one
launch.

A LLaMA layer's decode step multiplies one normalized row by q, k and v, and another by gate and up, whose outputs
go through SiLU x up. Run one at a time, each is a dp4a GEMV launch of its own (:mod:`.triton_dp4a`), and the
small ones (a grouped-query layer's k and v: 1024 outputs in a 7B-shaped model, 8 tiles of 128) need many splits
of K to give the GPU's SMs work.

* :func:`w4a8_gemv_dp4a_layers`: two or three layers' output tiles side by side in one grid (each program the
  GEMV's body, ``_dp4a_program``, on its layer's weights), split-K planned for all the tiles together: one launch
  instead of three (two), each output the bits of its layer's own GEMV with that split (a layer alone may split
  K otherwise: the two then agree to float32 rounding, the partial sums grouped otherwise).
* :func:`w4a8_gemv_dp4a_glu`: gate and up in one grid, every program storing its partial sums; the last of a
  tile's gate and up programs (one atomic counter) adds them, rounds both as the GEMVs' outputs and stores
  SiLU(gate) x up: the bits of the three launches it replaces (on the same split).

What a decode step uses, and when: :mod:`.triton_shared_input`. Runs on CUDA, and under Triton's interpreter on
the CPU, where the tests run it.
"""
from __future__ import annotations

import torch

from .triton_common import HAS_TRITON, _layer_args, _reduce, tl, triton
from .triton_dp4a import _check_counters, _prepare, w4a8_gemv_dp4a
from .triton_quant import _inv_qmax

__all__ = ["MAX_LAYERS", "w4a8_gemv_dp4a_glu", "w4a8_gemv_dp4a_layers"]

MAX_LAYERS = 3  # layers one launch of w4a8_gemv_dp4a_layers runs (q, k, v)

if HAS_TRITON:
    from .triton_decode import _silu_times
    from .triton_dp4a import _dp4a_program, _split_sum
    from .triton_grouped import _gemv_scaled, _row_scale

    @triton.jit
    def _w4a8_gemv_dp4a_layers_kernel(
        X, AS, XW, INV_QMAX, CNT,
        B0, WS0, BIAS0, C0, P0, MT0, BASE0, N0, T0,
        B1, WS1, BIAS1, C1, P1, MT1, BASE1, N1, T1,
        B2, WS2, BIAS2, C2, P2, MT2, BASE2, N2,
        M, K, W, G, CHUNK, NUNITS, stride_xm, stride_bn, stride_wsn,
        LAYERS: tl.constexpr, PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr, ONE_GROUP: tl.constexpr,
        INT_SCALES: tl.constexpr, SPLIT: tl.constexpr, QUANT: tl.constexpr, RECIP: tl.constexpr,
        QMAX: tl.constexpr, BLOCK_R: tl.constexpr, GPT: tl.constexpr, TPG: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_W: tl.constexpr, ASM: tl.constexpr, QW: tl.constexpr = 128, SERIAL: tl.constexpr = False,
    ):
        # grid (M, the layers' n tiles side by side, splits): 2 or 3 layers (LAYERS) that read the same input X,
        # layer i's T_i tiles after those of the layers before it; each program is one layer's _dp4a_program
        pid_m = tl.program_id(0)
        tile = tl.program_id(1)
        pid_s = tl.program_id(2)
        nt = tl.num_programs(1)
        first = (tile == 0) & (pid_s == 0)
        if tile < T0:
            _dp4a_program(X, B0, WS0, AS, BIAS0, C0, P0, MT0, BASE0, XW, INV_QMAX, CNT, pid_m, tile, tile, nt, pid_s,
                          first, M, N0, K, W, G, CHUNK, NUNITS, stride_xm, stride_bn, stride_wsn, N0, PER_TOKEN,
                          HAS_BIAS, ONE_GROUP, INT_SCALES, SPLIT, QUANT, RECIP, QMAX, BLOCK_R, GPT, TPG, BLOCK_N,
                          BLOCK_W, ASM, QW, SERIAL)
        elif tile < T0 + T1:
            _dp4a_program(X, B1, WS1, AS, BIAS1, C1, P1, MT1, BASE1, XW, INV_QMAX, CNT, pid_m, tile - T0, tile, nt,
                          pid_s, first, M, N1, K, W, G, CHUNK, NUNITS, stride_xm, stride_bn, stride_wsn, N1,
                          PER_TOKEN, HAS_BIAS, ONE_GROUP, INT_SCALES, SPLIT, QUANT, RECIP, QMAX, BLOCK_R, GPT, TPG,
                          BLOCK_N, BLOCK_W, ASM, QW, SERIAL)
        else:
            if LAYERS == 3:
                _dp4a_program(X, B2, WS2, AS, BIAS2, C2, P2, MT2, BASE2, XW, INV_QMAX, CNT, pid_m, tile - T0 - T1,
                              tile, nt, pid_s, first, M, N2, K, W, G, CHUNK, NUNITS, stride_xm, stride_bn, stride_wsn,
                              N2, PER_TOKEN, HAS_BIAS, ONE_GROUP, INT_SCALES, SPLIT, QUANT, RECIP, QMAX, BLOCK_R, GPT,
                              TPG, BLOCK_N, BLOCK_W, ASM, QW, SERIAL)

    @triton.jit
    def _w4a8_gemv_dp4a_glu_kernel(
        X, AS, XW, CNT, BG, WSG, BIASG, PG, MTG, BASEG, BU, WSU, BIASU, PU, MTU, BASEU, ACT,
        N, T, M, K, W, G, CHUNK, NUNITS, stride_xm, stride_bn, stride_wsn,
        PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr, ONE_GROUP: tl.constexpr, INT_SCALES: tl.constexpr,
        QMAX: tl.constexpr, BLOCK_R: tl.constexpr, GPT: tl.constexpr, TPG: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_W: tl.constexpr, ASM: tl.constexpr, QW: tl.constexpr = 128,
    ):
        # grid (M, 2 T, splits): gate's T tiles, then up's; every program stores its float32 partial, then the last
        # of the 2 x splits programs of output tile j (gate's and up's, one counter) adds each one's partials in
        # split order, scales and rounds them as the GEMV's output (g, u), and stores silu(g) * u (_silu_times)
        pid_m = tl.program_id(0)
        tile = tl.program_id(1)
        pid_s = tl.program_id(2)
        nt = tl.num_programs(1)
        if tile < T:
            _dp4a_program(X, BG, WSG, AS, BIASG, ACT, PG, MTG, BASEG, XW, 1.0, CNT, pid_m, tile, tile, nt, pid_s,
                          False, M, N, K, W, G, CHUNK, NUNITS, stride_xm, stride_bn, stride_wsn, N, PER_TOKEN,
                          HAS_BIAS, ONE_GROUP, INT_SCALES, True, False, False, QMAX, BLOCK_R, GPT, TPG, BLOCK_N,
                          BLOCK_W, ASM, QW, False)
        else:
            _dp4a_program(X, BU, WSU, AS, BIASU, ACT, PU, MTU, BASEU, XW, 1.0, CNT, pid_m, tile - T, tile, nt, pid_s,
                          False, M, N, K, W, G, CHUNK, NUNITS, stride_xm, stride_bn, stride_wsn, N, PER_TOKEN,
                          HAS_BIAS, ONE_GROUP, INT_SCALES, True, False, False, QMAX, BLOCK_R, GPT, TPG, BLOCK_N,
                          BLOCK_W, ASM, QW, False)
        j = tile % T
        tl.debug_barrier()  # every thread's partials are stored before the count
        seen = tl.atomic_add(CNT + pid_m * T + j, 1, sem="acq_rel", scope="gpu")
        if seen == 2 * tl.num_programs(2) - 1:
            offs = j * BLOCK_N + tl.arange(0, BLOCK_N)
            mask = offs < N
            scale = _row_scale(X, AS, 1.0, K, pid_m, False, False, PER_TOKEN, False, QMAX, BLOCK_R)  # (loaded)
            g = _gemv_scaled(_split_sum(PG, pid_m, offs, mask, M, N), scale, BIASG, offs, mask, HAS_BIAS)
            u = _gemv_scaled(_split_sum(PU, pid_m, offs, mask, M, N), scale, BIASU, offs, mask, HAS_BIAS)
            dt = ACT.dtype.element_ty
            act = _silu_times(g.to(dt).to(tl.float32), u.to(dt).to(tl.float32), dt)
            tl.store(ACT + pid_m.to(tl.int64) * N + offs, act, mask=mask)
            tl.atomic_xchg(CNT + pid_m * T + j, 0)


def w4a8_gemv_dp4a_layers(x: torch.Tensor, x_scale: torch.Tensor | None, layers: list, in_features: int,
                          group_size: int, qmax: int = 127, out_dtype: torch.dtype = torch.float16,
                          config: dict | None = None, recip: bool | None = None, asm: bool | None = None,
                          counters: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """:func:`~fptq.kernels.triton_dp4a.w4a8_gemv_dp4a` of one to :data:`MAX_LAYERS` layers that read the same
    input ``x``, in one launch: ``layers`` holds each one's ``(qweight, w_scales, bias or None, int_scales or
    None)`` (the same group size; all with a bias or none, all with integer scales or none). Their output tiles lie
    side by side in one grid and split-K is planned for all of them together (a decode step's q, k and v: one
    launch instead of three, and enough tiles to fill the GPU with fewer splits). Returns ``([y_i [M, N_i]],
    x_scale)``: each ``y_i`` the bits of ``w4a8_gemv_dp4a`` of that layer alone with the same ``config`` (same
    split-K); ``counters``: the sum of :func:`~fptq.kernels.triton_dp4a.counters_needed` over the layers."""
    if len(layers) == 1:  # the one-layer kernel
        (qweight, w_scales, bias, int_scales), = layers
        y, x_scale = w4a8_gemv_dp4a(x, x_scale, qweight, w_scales, in_features, group_size, qmax, bias, out_dtype,
                                    config, recip, int_scales, asm, counters)
        return [y], x_scale
    L = _prepare(x, x_scale, layers, in_features, group_size, qmax, config, recip, asm, MAX_LAYERS)
    x, x_scale = L.x, L.x_scale
    m, k, g = x.shape[0], in_features, L.g
    outs = [torch.empty(m, n, dtype=out_dtype, device=x.device) for n in L.ns]
    if m == 0 or sum(L.ns) == 0:
        return outs, x_scale
    splits = L.splits
    parts = [torch.empty(splits, m, n, dtype=torch.float32, device=x.device) if splits > 1 else c
             for n, c in zip(L.ns, outs)]
    serial = splits > 1 and counters is not None
    _check_counters(counters if serial else None, m * sum(L.tiles), x.device)
    per = []  # per layer: packed words, scales, bias, output, partials, multipliers, base, outputs, tiles
    for lay, c, p, n, t in zip(L.lays, outs, parts, L.ns, L.tiles):
        qw, ws, b, mt, base = _layer_args(lay, c, x_scale)
        per.append((qw.view(torch.int32), ws, b, c, p, mt, base, n, t))
    common = dict(L.const, SPLIT=splits > 1, SERIAL=serial)
    per += [per[-1]] * (MAX_LAYERS - len(per))  # (unread: LAYERS says how many there are)
    args = [a for layer in per for a in layer][:-1]  # the last layer's tile count is not an argument
    _w4a8_gemv_dp4a_layers_kernel[L.grid](
        x, x_scale, L.staged, _inv_qmax(qmax), counters if serial else L.staged, *args, m, k, k // 8, g, L.chunk,
        L.nunits, x.stride(0), k // 8, g, LAYERS=len(L.lays), **common)
    if splits > 1 and not serial:
        for p, (_, _, b, _), c in zip(parts, L.lays, outs):
            _reduce(p, x_scale, L.per_token, b, c)
    return outs, x_scale


def w4a8_gemv_dp4a_glu(xq: torch.Tensor, x_scale: torch.Tensor, gate: tuple, up: tuple, in_features: int,
                       group_size: int, counters: torch.Tensor, qmax: int = 127,
                       out_dtype: torch.dtype = torch.float16, config: dict | None = None,
                       asm: bool | None = None) -> torch.Tensor:
    """``silu(gate(x)) * up(x)`` in one launch from the int8 codes ``xq`` ``[M, K]`` of ``x`` and their
    ``x_scale``: ``gate`` and ``up`` are ``(qweight, w_scales, bias or None, int_scales or None)`` of the same
    shape, multiplied by the dp4a GEMV (:func:`w4a8_gemv_dp4a_layers`, its tiles and
    split-K), and the last program of each output tile rounds gate's and up's sums as those GEMVs' outputs and
    applies SiLU x up as :func:`~fptq.kernels.triton_decode.silu_mul_triton` does: the bits of that pair of
    launches (on the same split). ``counters``: int32 zeros, one per row and output tile (``counters_needed`` of
    one layer), put back to zero; owned by the caller, not shared with a concurrent launch."""
    if tuple(gate[0].shape) != tuple(up[0].shape):
        raise ValueError("w4a8_gemv_dp4a_glu: gate and up must have the same shape")
    if xq.dtype != torch.int8:
        raise ValueError("w4a8_gemv_dp4a_glu takes the int8 codes of its input (and their x_scale)")
    L = _prepare(xq, x_scale, [gate, up], in_features, group_size, qmax, config, None, asm, 2)
    m, n, k = L.x.shape[0], L.ns[0], in_features
    act = torch.empty(m, n, dtype=out_dtype, device=L.x.device)
    if m == 0 or n == 0:
        return act
    _check_counters(counters, m * L.tiles[0], L.x.device)
    parts = [torch.empty(L.splits, m, n, dtype=torch.float32, device=L.x.device) for _ in range(2)]
    ptrs = []  # per layer: packed words, scales, bias, partials, multipliers, base
    for lay, p in zip(L.lays, parts):
        qw, ws, b, mt, base = _layer_args(lay, act, L.x_scale)
        ptrs.append((qw.view(torch.int32), ws, b, p, mt, base))
    const = {c: v for c, v in L.const.items() if c not in ("QUANT", "RECIP")}
    _w4a8_gemv_dp4a_glu_kernel[L.grid](L.x, L.x_scale, L.staged, counters, *ptrs[0], *ptrs[1], act, n, L.tiles[0],
                                       m, k, k // 8, L.g, L.chunk, L.nunits, L.x.stride(0), k // 8, L.g, **const)
    return act

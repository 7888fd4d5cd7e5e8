"""Decode GEMV (M <= 2) on the packed int4 weights read as 32-bit words, four int8 products per instruction
(PTX ``dp4a``): :func:`w4a8_gemv_dp4a`.

Why: the byte-wise GEMV of :mod:`.triton_grouped` compiles (Triton 3.7, sm_90, its default decode
configuration, the activations quantized in the kernel) to about 25 instructions per weight byte in its group
loop, with single-byte loads (``LDG.E.U8``) and every thread re-quantizing its activations in every group; a
4096 x 11008 layer's 22.5 MB then cost ~18 M warp instructions, about four times the time the H200's memory needs
to deliver those bytes. This kernel compiles to 2.6. Counted from the compiled code (``python bench/gpu_sass.py``),
not timed: no GPU was at hand.

How: a word holds 8 codes (bytes b = 0..3, low nibble = code 2b, high = code 2b + 1, two's complement).
``w & 0xF0F0F0F0`` is, read as four signed bytes, 16 x the high (odd) codes, exactly; ``(w << 4) & 0xF0F0F0F0``
16 x the low (even) ones. The activation codes of the same 8 positions go in two words (even, odd), so two
``dp4a`` give 16 x the word's 8 products. Each program first quantizes its share of the activations once (as
``quantize_activations`` does) into even/odd words in a scratch buffer and reads them back per tile, instead of
every thread re-quantizing the codes it multiplies. Each group's int32 sum is shifted right by 4 (exact: a multiple of 16),
converted and scaled by the group's float scale, group after group in K order: **the same float operations in
the same order as the byte-wise GEMV** (``_w4a8_gemv_kernel``), hence the same output bits for the same split-K
plan; with integer group scales (``int_scales``) the group sums times their multipliers go into one int32
accumulator, as there. The int32 bound: ``16 * 8 * 127 * K < 2**31`` (``K <= INT_SUM_MAX_K``) for one group per
row, where a single accumulator spans K.

``dp4a`` is inline PTX on CUDA; elsewhere (Triton's interpreter, where the tests run) the same four-lane
product is computed with shifts (``_dp4a``'s ``ASM=False``), so everything but that one instruction is tested
on the CPU. Before the PTX variant is used on a device, :func:`fptq.kernels.triton_w4a8.ptx_verified` compares
it once with the shift variant compiled for the same device, bit for bit.

Covers: 4-bit weights, K a multiple of 8, group sizes that are powers of two >= 32 (or one group per row), the
packed rows 4-byte aligned; :func:`dp4a_problem` says why not otherwise (the dispatch then uses the byte-wise
GEMV)."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from ..quant.intscales import INT_SUM_MAX_K
from .triton_common import HAS_TRITON, _check_layers, _layer_args, _reduce, _split_plan, require_triton, tl, triton
from .triton_grouped import _act_codes, _gemv_store, _row_scale
from .triton_quant import _inv_qmax, _scalar_div_mode

__all__ = ["counters_needed", "dp4a_problem", "pick_dp4a_config", "w4a8_gemv_dp4a"]

if HAS_TRITON:

    @triton.jit
    def _dp4a(a, b, c, ASM: tl.constexpr):
        # c + the sum over the four byte lanes of a times those of b, each read as a signed int8 (int32 tensors)
        if ASM:
            return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                             dtype=tl.int32, is_pure=True, pack=1)
        else:
            s = c + ((a << 24) >> 24) * ((b << 24) >> 24)
            s += ((a << 16) >> 24) * ((b << 16) >> 24)
            s += ((a << 8) >> 24) * ((b << 8) >> 24)
            return s + (a >> 24) * (b >> 24)

    @triton.jit
    def _act_word(x_row, c0, K, scale, QUANT: tl.constexpr, QMAX: tl.constexpr):
        # the activation codes at c0, c0 + 2, c0 + 4, c0 + 6 as the four byte lanes of an int32 word (lane i = c0 + 2i)
        w = _act_codes(x_row, c0, K, scale, QUANT, QMAX) & 255
        w = w | ((_act_codes(x_row, c0 + 2, K, scale, QUANT, QMAX) & 255) << 8)
        w = w | ((_act_codes(x_row, c0 + 4, K, scale, QUANT, QMAX) & 255) << 16)
        return w | (_act_codes(x_row, c0 + 6, K, scale, QUANT, QMAX) << 24)

    @triton.jit
    def _stage_act_words(XW, x_row, w_start, w_end, K, scale, QUANT: tl.constexpr, QMAX: tl.constexpr,
                         QW: tl.constexpr):
        # the activation words of words w_start .. w_end - 1 (even-code words, then odd-code words, each w_end - w_start
        # long) into this program's scratch XW: every code quantized once per program, not once per thread that
        # multiplies it
        cw = w_end - w_start
        for w in range(w_start, w_end, QW):
            ow = w + tl.arange(0, QW)
            ok = ow < w_end
            tl.store(XW + (ow - w_start), _act_word(x_row, 8 * ow, K, scale, QUANT, QMAX), mask=ok)
            tl.store(XW + cw + (ow - w_start), _act_word(x_row, 8 * ow + 1, K, scale, QUANT, QMAX),
                     mask=ok)
        tl.debug_barrier()  # the words are read below by other threads of this program

    @triton.jit
    def _dp4a_tile(acc, b_rows, XW, w_start, w_end, w0, offs_w, mask_n, ASM: tl.constexpr):
        # acc [BLOCK_N, BLOCK_W] (int32) += 16 x the products of the words w0 + offs_w of each row with the staged
        # activation words (0 past w_end)
        ow = w0 + offs_w
        ok = ow < w_end
        wd = tl.load(b_rows + ow[None, :], mask=mask_n[:, None] & ok[None, :], other=0)
        xe = tl.load(XW + (ow - w_start), mask=ok, other=0)
        xo = tl.load(XW + (w_end - w_start) + (ow - w_start), mask=ok, other=0)
        acc = _dp4a((wd << 4) & -252645136, xe[None, :], acc, ASM)  # -252645136 = 0xF0F0F0F0: 16 x even codes
        return _dp4a(wd & -252645136, xo[None, :], acc, ASM)  # 16 x odd codes

    @triton.jit
    def _serial_reduce(P, C, BIAS, CNT, scale, pid_m, tile, offs_n, mask_n, M, N, stride_cm, HAS_BIAS: tl.constexpr):
        # split-K in the same launch: the last program of output tile ``tile`` (its counter) to store its partials
        # (counted in CNT, which it puts back to 0) adds the tile's partials in split order and stores the output,
        # as the reduce kernel does
        tl.debug_barrier()  # every thread's partials are stored before the count
        seen = tl.atomic_add(CNT + tile, 1, sem="acq_rel", scope="gpu")
        if seen == tl.num_programs(2) - 1:
            _gemv_store(_split_sum(P, pid_m, offs_n, mask_n, M, N), P, C, BIAS, scale, pid_m, 0, offs_n, mask_n, M, N,
                        stride_cm, False, HAS_BIAS)
            tl.atomic_xchg(CNT + tile, 0)

    @triton.jit
    def _split_sum(P, pid_m, offs_n, mask_n, M, N):
        # row pid_m's float32 split-K partials [splits, M, N] at columns offs_n, added in split order as the reduce
        # kernel adds them (.cg: from L2, where the other programs of the launch stored them)
        acc = tl.zeros_like(offs_n).to(tl.float32)
        for s in range(0, tl.num_programs(2)):
            acc += tl.load(P + (s * M + pid_m) * N + offs_n, mask=mask_n, other=0.0, cache_modifier=".cg")
        return acc

    @triton.jit
    def _dp4a_program(X, B, WS, AS, BIAS, C, P, MT, BASE, XW, INV_QMAX, CNT, pid_m, pid_n, tile, ntiles, pid_s, first,
                      M, N, K, W, G, CHUNK, NUNITS, stride_xm, stride_bn, stride_wsn, stride_cm,
                      PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr, ONE_GROUP: tl.constexpr,
                      INT_SCALES: tl.constexpr, SPLIT: tl.constexpr, QUANT: tl.constexpr, RECIP: tl.constexpr,
                      QMAX: tl.constexpr, BLOCK_R: tl.constexpr, GPT: tl.constexpr, TPG: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, ASM: tl.constexpr, QW: tl.constexpr,
                      SERIAL: tl.constexpr):
        # program (pid_m, pid_n, pid_s) of one layer's GEMV (pid_n its output tile); ``tile`` of ``ntiles``: the
        # tile's index among all the launch's tiles (several layers' in one launch: triton_dp4a_layers), which
        # places its staged words and its split-K counter; ``first``: the program that stores a per-token scale.
        # A unit of K is a tile (one group per row) or GPT groups (TPG tiles); the program stages its activation
        # words in XW[((m * ntiles + tile) * splits + s) * 2 * CHUNK * TPG * BLOCK_W:]
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_w = tl.arange(0, BLOCK_W)
        mask_n = offs_n < N
        b_rows = B + offs_n.to(tl.int64)[:, None] * stride_bn
        x_row = X + pid_m.to(tl.int64) * stride_xm
        scale = _row_scale(x_row, AS, INV_QMAX, K, pid_m, first, QUANT, PER_TOKEN, RECIP, QMAX, BLOCK_R)
        u0 = pid_s * CHUNK
        u1 = tl.minimum(u0 + CHUNK, NUNITS)
        UW = BLOCK_W * TPG  # words per unit
        w_start = u0 * UW
        w_end = tl.minimum(u1 * UW, W)
        prog = (pid_m * ntiles + tile) * tl.num_programs(2) + pid_s
        xw = XW + prog.to(tl.int64) * (2 * CHUNK * UW)
        _stage_act_words(xw, x_row, w_start, w_end, K, scale, QUANT, QMAX, QW)
        # the sums are kept [BLOCK_N, 1] (keep_dims), in the tiles' layout, as are the scales loaded beside them
        rows = offs_n[:, None]
        rmask = mask_n[:, None]
        if ONE_GROUP:
            acc_i = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.int32)
            for u in range(u0, u1):
                acc_i = _dp4a_tile(acc_i, b_rows, xw, w_start, w_end, u * BLOCK_W, offs_w, mask_n, ASM)
            s = tl.load(WS + rows * stride_wsn, mask=rmask, other=0.0).to(tl.float32)
            acc = (tl.sum(acc_i, axis=1, keep_dims=True) >> 4).to(tl.float32) * s
        else:
            wgroup = offs_w[None, :] // (BLOCK_W // GPT)  # the tile's group of each word
            acc = tl.zeros([BLOCK_N, 1], dtype=tl.float32)
            acc_i = tl.zeros([BLOCK_N, 1], dtype=tl.int32)
            for u in range(u0, u1):
                d = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.int32)
                for t in tl.static_range(TPG):
                    d = _dp4a_tile(d, b_rows, xw, w_start, w_end, (u * TPG + t) * BLOCK_W, offs_w, mask_n, ASM)
                for j in tl.static_range(GPT):  # group after group, as the byte-wise GEMV adds them
                    g = u * GPT + j
                    gsum = d if GPT == 1 else tl.where(wgroup == j, d, 0)
                    gsum = tl.sum(gsum, axis=1, keep_dims=True) >> 4  # the group's exact int32 sum
                    gmask = rmask & (g < G)
                    if INT_SCALES:
                        acc_i += gsum * tl.load(MT + rows * stride_wsn + g, mask=gmask, other=0).to(tl.int32)
                    else:
                        acc += gsum.to(tl.float32) * tl.load(WS + rows * stride_wsn + g, mask=gmask,
                                                             other=0.0).to(tl.float32)
            if INT_SCALES:
                acc = acc_i.to(tl.float32) * tl.load(BASE + rows, mask=rmask, other=0.0)
        _gemv_store(tl.reshape(acc, [BLOCK_N]), P, C, BIAS, scale, pid_m, pid_s, offs_n, mask_n, M, N, stride_cm,
                    SPLIT, HAS_BIAS)
        if SPLIT and SERIAL:
            _serial_reduce(P, C, BIAS, CNT, scale, pid_m, pid_m * ntiles + tile, offs_n, mask_n, M, N, stride_cm,
                           HAS_BIAS)

    @triton.jit
    def _w4a8_gemv_dp4a_kernel(
        X, B, WS, AS, BIAS, C, P, MT, BASE, XW, INV_QMAX, CNT,
        M, N, K, W, G, CHUNK, NUNITS,
        stride_xm, stride_bn, stride_wsn, stride_cm,
        PER_TOKEN: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        ONE_GROUP: tl.constexpr,
        INT_SCALES: tl.constexpr,
        SPLIT: tl.constexpr,
        QUANT: tl.constexpr,  # X holds float activations, quantized here; else int8 codes
        RECIP: tl.constexpr,
        QMAX: tl.constexpr,
        BLOCK_R: tl.constexpr,
        GPT: tl.constexpr,  # groups per tile (the tile spans whole groups) ...
        TPG: tl.constexpr,  # ... or tiles per group (GPT == 1)
        BLOCK_N: tl.constexpr,
        BLOCK_W: tl.constexpr,  # words (8 codes) per row and tile
        ASM: tl.constexpr,
        QW: tl.constexpr = 128,  # activation words staged per step
        SERIAL: tl.constexpr = False,  # SPLIT: the last program of each tile reduces (one launch; CNT zeros)
    ):
        # grid (M, n tiles, splits): one layer, program (m, n, s) = _dp4a_program's
        pid_n = tl.program_id(1)
        pid_s = tl.program_id(2)
        _dp4a_program(X, B, WS, AS, BIAS, C, P, MT, BASE, XW, INV_QMAX, CNT, tl.program_id(0), pid_n, pid_n,
                      tl.num_programs(1), pid_s, (pid_n == 0) & (pid_s == 0), M, N, K, W, G, CHUNK, NUNITS,
                      stride_xm, stride_bn, stride_wsn, stride_cm, PER_TOKEN, HAS_BIAS, ONE_GROUP, INT_SCALES, SPLIT,
                      QUANT, RECIP, QMAX, BLOCK_R, GPT, TPG, BLOCK_N, BLOCK_W, ASM, QW, SERIAL)


def dp4a_problem(qweight: torch.Tensor, in_features: int, group_size: int) -> str | None:
    """Why :func:`w4a8_gemv_dp4a` cannot run these packed weights (None if it can)."""
    k = in_features
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[1] != (k + 1) // 2:
        return "the weights are not packed 4-bit codes [N, ceil(K/2)]"
    if k % 8:
        return f"K={k} is not a multiple of 8 (8 codes per 32-bit word)"
    if qweight.stride(1) != 1 or qweight.stride(0) % 4 or qweight.data_ptr() % 4:
        return "the packed rows are not 4-byte aligned"
    one_group = group_size <= 0 or -(-k // group_size) == 1
    if one_group:
        if k > INT_SUM_MAX_K:
            return f"one group per row sums K in int32: K={k} is above {INT_SUM_MAX_K}"
    elif group_size < 32 or group_size & (group_size - 1):
        return f"group_size={group_size} is not a power of two >= 32"
    return None


def pick_dp4a_config(m: int, n: int, k: int, group_size: int) -> dict:
    """Launch configuration of :func:`w4a8_gemv_dp4a`: ``BLOCK_N`` channels per program, ``BLOCK_K`` codes per tile
    (a multiple or a divisor of the group size), split-K (None: :func:`~fptq.kernels.triton_common._split_plan`).
    Chosen by the instructions per weight byte of the code Triton 3.7 compiles for sm_90 (``bench/gpu_sass.py``:
    2.6 for group 128 at 128 x 128, 2.6 for group 64 at 256 x 64), not timed: one group per tile keeps the group
    sums free of selects, and about 8 KB of weights per tile keeps 56 registers."""
    bk = 128
    if group_size > 0 and -(-k // group_size) > 1:
        bk = min(group_size, 128)
    return dict(BLOCK_N=min(256, 128 * 128 // bk), BLOCK_K=bk, num_warps=4, num_stages=2, SPLIT_K=None)


def _plan(k: int, group_size: int, g: int, bk: int) -> tuple[int, int, int, int]:
    """(units along K, codes per unit, groups per tile, tiles per group) for tiles of ``bk`` codes."""
    if g == 1:
        return triton.cdiv(k, bk), bk, 1, 1
    if bk >= group_size:
        if bk % group_size:
            raise ValueError(f"BLOCK_K={bk} must be a multiple or a divisor of group_size={group_size}")
        gpt = bk // group_size
        return triton.cdiv(g, gpt), bk, gpt, 1
    if group_size % bk:
        raise ValueError(f"BLOCK_K={bk} must be a multiple or a divisor of group_size={group_size}")
    return g, group_size, 1, group_size // bk


def w4a8_gemv_dp4a(x: torch.Tensor, x_scale: torch.Tensor | None, qweight: torch.Tensor, w_scales: torch.Tensor,
                   in_features: int, group_size: int, qmax: int = 127, bias: torch.Tensor | None = None,
                   out_dtype: torch.dtype = torch.float16, config: dict | None = None, recip: bool | None = None,
                   int_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
                   asm: bool | None = None, counters: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact group-wise W4A8 GEMV for decode (M <= 2): ``y = x_scale * sum_g w_scales[:, g] * (xq_g @ q_g^T)
    (+ bias)``, the products four at a time (``dp4a``).

    ``x``: float ``[M, K]`` activations, quantized in the kernel as :func:`~fptq.kernels.triton_quant.quantize_activations`
    does (per token when ``x_scale`` is None, else with the static 0-d ``x_scale``), or int8 codes ``[M, K]`` with
    their ``x_scale`` (0-d or ``[M]``). Returns ``(y [M, N], x_scale)``. ``asm``: use the PTX instruction (default:
    on CUDA); False computes the same products with shifts. ``config`` overrides :func:`pick_dp4a_config`;
    ``int_scales`` as for :func:`~fptq.kernels.triton_grouped.w4a8_gemv`. The output bits equal
    :func:`~fptq.kernels.triton_grouped.w4a8_gemv_quant`'s (float input) or ``w4a8_gemv``'s (codes) when both
    tile K by whole groups the same way (``BLOCK_K`` = group size) with the same split-K.

    ``counters``: int32 zeros, at least :func:`counters_needed` of them, owned by the caller and not shared with a
    concurrent launch: a split-K launch then reduces its partials itself (the last program of each output tile to
    finish adds them in split order, the reduce kernel's operations: the same bits) instead of in a second launch,
    and leaves the counters at zero again."""
    L = _prepare(x, x_scale, [(qweight, w_scales, bias, int_scales)], in_features, group_size, qmax, config, recip,
                 asm)
    x, x_scale = L.x, L.x_scale
    m, n, k, g = x.shape[0], L.ns[0], in_features, L.g
    c = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m == 0 or n == 0:
        return c, x_scale
    part = torch.empty(L.splits, m, n, dtype=torch.float32, device=x.device) if L.splits > 1 else c
    serial = L.splits > 1 and counters is not None
    _check_counters(counters if serial else None, m * L.tiles[0], x.device)
    qw, ws, b, mt, base = _layer_args(L.lays[0], c, x_scale)
    _w4a8_gemv_dp4a_kernel[L.grid](
        x, qw.view(torch.int32), ws, x_scale, b, c, part, mt, base, L.staged, _inv_qmax(qmax),
        counters if serial else L.staged, m, n, k, k // 8, g, L.chunk, L.nunits, x.stride(0), k // 8, g, n,
        SPLIT=L.splits > 1, SERIAL=serial, **L.const)
    if L.splits > 1 and not serial:
        _reduce(part, x_scale, L.per_token, L.lays[0][2], c)
    return c, x_scale


def _check_counters(counters: torch.Tensor | None, need: int, device) -> None:
    if counters is not None and (counters.dtype != torch.int32 or counters.numel() < need
                                 or counters.device != device):
        raise ValueError(f"counters must be int32 on {device} with at least {need} elements")


def _prepare(x, x_scale, layers, in_features: int, group_size: int, qmax: int, config, recip, asm,
             max_layers: int = 1) -> SimpleNamespace:
    """What a launch of the dp4a kernels on ``layers`` (``(qweight, w_scales, bias, int_scales)`` each) that read
    ``x`` needs: the checked, contiguous input and layers (``lays``), the per-token scale buffer, the tiling, the
    split-K plan over all the layers' tiles, each program's scratch for its staged activation words (``staged``)
    and the kernel's constexprs (``const``, less ``SPLIT`` / ``SERIAL``)."""
    require_triton()
    if x.dim() != 2:
        raise ValueError("w4a8_gemv_dp4a expects a 2-D [M, K] input")
    if not 1 <= len(layers) <= max_layers:
        raise ValueError(f"one launch runs 1 to {max_layers} layers, not {len(layers)}")
    for qweight, *_ in layers:
        why = dp4a_problem(qweight, in_features, group_size)
        if why:
            raise ValueError(f"w4a8_gemv_dp4a: {why}")
    quant = x.is_floating_point()
    if x.stride(-1) != 1:
        x = x.contiguous()
    m = x.shape[0]
    if quant:
        dynamic = x_scale is None
        if recip is None:
            recip = dynamic and _scalar_div_mode(x.device, qmax)
        x_scale = (torch.empty(m, dtype=torch.float32, device=x.device) if dynamic
                   else x_scale.to(device=x.device, dtype=torch.float32).reshape(()))
    elif x.dtype != torch.int8 or x_scale is None:
        raise ValueError("w4a8_gemv_dp4a expects float activations, or int8 codes with their x_scale")
    k = in_features
    x, x_scale, per_token, lays, g = _check_layers(x, x_scale, layers, in_features, group_size)
    ns = [qw.shape[0] for qw, *_ in lays]
    cfg = pick_dp4a_config(m, sum(ns), k, group_size)
    if config:
        cfg.update(config)
    bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
    if bk < 8 or bk & (bk - 1):
        raise ValueError(f"BLOCK_K={bk} must be a power of two >= 8")
    nunits, unit_k, gpt, tpg = _plan(k, group_size, g, bk)
    tiles = [triton.cdiv(n, bn) for n in ns]
    splits, chunk = (_split_plan(m * sum(tiles), m, k, nunits, unit_k, x.device, cfg.get("SPLIT_K"))
                     if m * sum(tiles) else (1, nunits))
    if asm is None:
        asm = x.device.type == "cuda"
    # each program's staged activation words (int32, 2 per 8 codes of its share of K)
    staged = torch.empty(m * sum(tiles) * splits * 2 * chunk * (unit_k // 8), dtype=torch.int32, device=x.device)
    const = dict(PER_TOKEN=per_token, HAS_BIAS=lays[0][2] is not None, ONE_GROUP=g == 1,
                 INT_SCALES=lays[0][3] is not None, QUANT=quant, RECIP=bool(quant and per_token and recip),
                 QMAX=int(qmax), BLOCK_R=min(4096, max(128, triton.next_power_of_2(k))), GPT=gpt, TPG=tpg,
                 BLOCK_N=bn, BLOCK_W=bk // 8, ASM=bool(asm), num_warps=cfg["num_warps"],
                 num_stages=cfg["num_stages"])
    return SimpleNamespace(x=x, x_scale=x_scale, per_token=per_token, lays=lays, g=g, ns=ns, tiles=tiles,
                           grid=(m, sum(tiles), splits), splits=splits, chunk=chunk, nunits=nunits, staged=staged,
                           const=const)


def counters_needed(m: int, n: int, k: int, group_size: int, config: dict | None = None) -> int:
    """How many ``counters`` :func:`w4a8_gemv_dp4a` needs for ``m`` rows of ``k`` inputs, ``n`` outputs (one per
    output tile)."""
    cfg = pick_dp4a_config(m, n, k, group_size)
    cfg.update(config or {})
    return m * -(-n // cfg["BLOCK_N"])

"""The tensor-core grouped kernel (:mod:`.triton_grouped`, what the ``triton`` backend runs at 3 <= M <=
``GROUPED_MAX_M``: a decode batch of 3-16) on several layers that read the same input, in one launch.

* :func:`w4a8_matmul_layers`: two or three layers' output tiles side by side in one grid (q, k and v); each program
  the kernel's body (``_gemm_acc``) and epilogue on its layer's weights: each output the bits of
  :func:`~fptq.kernels.triton_grouped.w4a8_matmul` of that layer without split-K (the configuration
  :func:`~fptq.kernels.triton_common.pick_config` gives at M <= 16).
* :func:`w4a8_matmul_glu`: gate and up in one program per output tile (two accumulators over the same activation
  tiles), rounded as ``w4a8_matmul``'s outputs and SiLU x up applied with the SiLU kernel's roundings, optionally
  with the int8 codes of the result under a static scale (down_proj's input quantizer): the bits of the gate and
  up GEMMs followed by :func:`~fptq.kernels.triton_decode.silu_mul_triton`.

Split-K is not used (with it, a program no longer holds a whole output tile): the launchers refuse configurations
that split. Runs on CUDA, and under Triton's interpreter on the CPU, where the tests run it.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from ..quant import act_qmax
from .triton_common import HAS_TRITON, _check_layers, _grouping, _layer_args, pick_config, require_triton, tl, triton
from .triton_grouped import _tensor_core_flags

__all__ = ["w4a8_matmul_glu", "w4a8_matmul_layers"]

if HAS_TRITON:
    from .triton_common import _epilogue, _scaled
    from .triton_decode import _silu_times
    from .triton_grouped import _gemm_acc
    from .triton_quant import _codes

    @triton.jit
    def _layer_tile(A, B, WS, MT, BASE, AS, BIAS, C, pid_m, pid_n, M, N, K, GS, NUNITS, stride_am, stride_bn,
                    stride_wsn, PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr, ONE_GROUP: tl.constexpr,
                    TILES_PER_GROUP: tl.constexpr, SWAP_AB: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INT_SCALES: tl.constexpr, EVEN_K: tl.constexpr,
                    NIBBLE: tl.constexpr, ASM: tl.constexpr):
        # one layer's output tile (pid_m, pid_n), all of K, stored as w4a8_matmul's epilogue stores it
        acc = _gemm_acc(A, B, WS, MT, BASE, pid_m, pid_n, 0, M, N, K, GS, NUNITS, NUNITS, stride_am, stride_bn,
                        stride_wsn, ONE_GROUP, TILES_PER_GROUP, SWAP_AB, BLOCK_M, BLOCK_N, BLOCK_K, INT_SCALES,
                        EVEN_K, NIBBLE, ASM)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        _epilogue(acc, offs_m, offs_n, offs_m < M, offs_n < N, AS, BIAS, C, N, PER_TOKEN, HAS_BIAS)

    @triton.jit
    def _w4a8_gemm_layers_kernel(
        A, AS,
        B0, WS0, BIAS0, C0, MT0, BASE0, N0, T0,
        B1, WS1, BIAS1, C1, MT1, BASE1, N1, T1,
        B2, WS2, BIAS2, C2, MT2, BASE2, N2,
        NT, M, K, GS, NUNITS, stride_am, stride_bn, stride_wsn,
        LAYERS: tl.constexpr, PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr, ONE_GROUP: tl.constexpr,
        TILES_PER_GROUP: tl.constexpr, SWAP_AB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, INT_SCALES: tl.constexpr, EVEN_K: tl.constexpr, NIBBLE: tl.constexpr,
        ASM: tl.constexpr,
    ):
        # grid (M tiles x NT): the layers' NT = T0 + T1 (+ T2) column tiles side by side
        pid = tl.program_id(0)
        pid_m = pid // NT
        tile = pid % NT
        if tile < T0:
            _layer_tile(A, B0, WS0, MT0, BASE0, AS, BIAS0, C0, pid_m, tile, M, N0, K, GS, NUNITS, stride_am,
                        stride_bn, stride_wsn, PER_TOKEN, HAS_BIAS, ONE_GROUP, TILES_PER_GROUP, SWAP_AB, BLOCK_M,
                        BLOCK_N, BLOCK_K, INT_SCALES, EVEN_K, NIBBLE, ASM)
        elif tile < T0 + T1:
            _layer_tile(A, B1, WS1, MT1, BASE1, AS, BIAS1, C1, pid_m, tile - T0, M, N1, K, GS, NUNITS, stride_am,
                        stride_bn, stride_wsn, PER_TOKEN, HAS_BIAS, ONE_GROUP, TILES_PER_GROUP, SWAP_AB, BLOCK_M,
                        BLOCK_N, BLOCK_K, INT_SCALES, EVEN_K, NIBBLE, ASM)
        else:
            if LAYERS == 3:
                _layer_tile(A, B2, WS2, MT2, BASE2, AS, BIAS2, C2, pid_m, tile - T0 - T1, M, N2, K, GS, NUNITS,
                            stride_am, stride_bn, stride_wsn, PER_TOKEN, HAS_BIAS, ONE_GROUP, TILES_PER_GROUP,
                            SWAP_AB, BLOCK_M, BLOCK_N, BLOCK_K, INT_SCALES, EVEN_K, NIBBLE, ASM)

    @triton.jit
    def _w4a8_gemm_glu_kernel(
        A, AS, BG, WSG, BIASG, MTG, BASEG, BU, WSU, BIASU, MTU, BASEU, ACT, Q, QS,
        T, M, N, K, GS, NUNITS, stride_am, stride_bn, stride_wsn,
        PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr, ONE_GROUP: tl.constexpr, TILES_PER_GROUP: tl.constexpr,
        SWAP_AB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        INT_SCALES: tl.constexpr, EVEN_K: tl.constexpr, NIBBLE: tl.constexpr, ASM: tl.constexpr,
        CODES: tl.constexpr, QMAX: tl.constexpr,
    ):
        # grid (M tiles x T column tiles): gate's and up's tile (pid_m, pid_n), SiLU(gate) x up, its codes (CODES)
        pid = tl.program_id(0)
        pid_m = pid // T
        pid_n = pid % T
        g = _gemm_acc(A, BG, WSG, MTG, BASEG, pid_m, pid_n, 0, M, N, K, GS, NUNITS, NUNITS, stride_am, stride_bn,
                      stride_wsn, ONE_GROUP, TILES_PER_GROUP, SWAP_AB, BLOCK_M, BLOCK_N, BLOCK_K, INT_SCALES, EVEN_K,
                      NIBBLE, ASM)
        u = _gemm_acc(A, BU, WSU, MTU, BASEU, pid_m, pid_n, 0, M, N, K, GS, NUNITS, NUNITS, stride_am, stride_bn,
                      stride_wsn, ONE_GROUP, TILES_PER_GROUP, SWAP_AB, BLOCK_M, BLOCK_N, BLOCK_K, INT_SCALES, EVEN_K,
                      NIBBLE, ASM)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        dt = ACT.dtype.element_ty
        g = _scaled(g, offs_m, offs_n, mask_m, mask_n, AS, BIASG, PER_TOKEN, HAS_BIAS).to(dt).to(tl.float32)
        u = _scaled(u, offs_m, offs_n, mask_m, mask_n, AS, BIASU, PER_TOKEN, HAS_BIAS).to(dt).to(tl.float32)
        act = _silu_times(g, u, dt)
        at = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        tl.store(ACT + at, act, mask=mask)
        if CODES:  # the static quantizer of the Linear that reads the result
            tl.store(Q + at, _codes(act.to(tl.float32), tl.load(QS).to(tl.float32), QMAX), mask=mask)


def _prepare(xq, x_scale, layers, in_features: int, group_size: int, config, asm, max_layers: int) -> SimpleNamespace:
    """The checked layers (``(qweight, w_scales, bias, int_scales)`` each, all with a bias or none, integer scales or
    none, one number of groups), the configuration (:func:`pick_config` of M, no split-K) and the constexprs."""
    require_triton()
    if xq.dim() != 2 or xq.dtype != torch.int8 or x_scale is None:
        raise ValueError("the tensor-core layers kernels take int8 codes [M, K] and their x_scale")
    if not 2 <= len(layers) <= max_layers:
        raise ValueError(f"one launch runs 2 to {max_layers} layers, not {len(layers)}")
    k = in_features
    xq, x_scale, per_token, lays, g = _check_layers(xq, x_scale, layers, in_features, group_size)
    m = xq.shape[0]
    ns = [qw.shape[0] for qw, *_ in lays]
    cfg = dict(pick_config(m, ns[0], k, group_size))
    cfg.update(config or {})
    if cfg.get("SPLIT_K") != 1:
        raise ValueError("the tensor-core layers kernels do not split K (SPLIT_K must be 1)")
    const, nunits, _, gs = _grouping(k, g, group_size, cfg)
    ints = lays[0][3] is not None
    const.update(PER_TOKEN=per_token, HAS_BIAS=lays[0][2] is not None, INT_SCALES=ints,
                 **_tensor_core_flags(cfg, k, g, ints, xq.device, asm))
    return SimpleNamespace(xq=xq, x_scale=x_scale, lays=lays, ns=ns, gs=gs, g=g, m_tiles=triton.cdiv(m, cfg["BLOCK_M"]),
                           tiles=[triton.cdiv(n, cfg["BLOCK_N"]) for n in ns], nunits=nunits, const=const)


def w4a8_matmul_layers(xq: torch.Tensor, x_scale: torch.Tensor, layers: list, in_features: int, group_size: int,
                       out_dtype: torch.dtype = torch.float16, config: dict | None = None,
                       asm: bool | None = None) -> list[torch.Tensor]:
    """:func:`~fptq.kernels.triton_grouped.w4a8_matmul` of two or three layers (``(qweight, w_scales, bias or None,
    int_scales or None)`` each) on the same int8 codes ``xq`` ``[M, K]`` and ``x_scale``, in one launch: each
    output ``[M, N_i]`` that layer's ``w4a8_matmul`` bits with the same ``config`` (no split-K)."""
    L = _prepare(xq, x_scale, layers, in_features, group_size, config, asm, 3)
    m, k = L.xq.shape
    outs = [torch.empty(m, n, dtype=out_dtype, device=xq.device) for n in L.ns]
    if m == 0:
        return outs
    per = []
    for lay, c, n, t in zip(L.lays, outs, L.ns, L.tiles):
        qw, ws, b, mt, base = _layer_args(lay, c, L.x_scale)
        per.append((qw, ws, b, c, mt, base, n, t))
    per += [per[-1]] * (3 - len(per))  # (unread: LAYERS says how many there are)
    args = [a for layer in per for a in layer][:-1]  # the last layer's tile count is not an argument
    nt = sum(L.tiles)
    _w4a8_gemm_layers_kernel[(L.m_tiles * nt,)](
        L.xq, L.x_scale, *args, nt, m, k, L.gs, L.nunits, L.xq.stride(0), L.lays[0][0].stride(0),
        L.lays[0][1].stride(0), LAYERS=len(L.lays), **L.const)
    return outs


def w4a8_matmul_glu(xq: torch.Tensor, x_scale: torch.Tensor, gate: tuple, up: tuple, in_features: int,
                    group_size: int, out_dtype: torch.dtype = torch.float16, quant: tuple | None = None,
                    config: dict | None = None, asm: bool | None = None):
    """``silu(gate(x)) * up(x)`` in one launch from the int8 codes ``xq`` of ``x`` and their ``x_scale``: ``gate``
    and ``up`` as for :func:`w4a8_matmul_layers` (the same shape). Returns ``[M, N]`` in ``out_dtype``, the bits of
    the two ``w4a8_matmul`` launches followed by :func:`~fptq.kernels.triton_decode.silu_mul_triton`; with
    ``quant = (static scale, activation bits)`` ``(out, codes, scale)``, the codes that launch writes under that
    scale (a per-token scale needs the whole row: not here)."""
    if tuple(gate[0].shape) != tuple(up[0].shape):
        raise ValueError("w4a8_matmul_glu: gate and up must have the same shape")
    if quant is not None and quant[0] is None:
        raise ValueError("w4a8_matmul_glu quantizes its output with a static scale only")
    L = _prepare(xq, x_scale, [gate, up], in_features, group_size, config, asm, 2)
    m, k = L.xq.shape
    n = L.ns[0]
    act = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    codes = torch.empty(m, n, dtype=torch.int8, device=xq.device) if quant is not None else act
    scale = quant[0].to(device=xq.device, dtype=torch.float32).reshape(()) if quant is not None else L.x_scale
    if m:
        _w4a8_gemm_glu_kernel[(L.m_tiles * L.tiles[0],)](
            L.xq, L.x_scale, *_layer_args(L.lays[0], act, L.x_scale), *_layer_args(L.lays[1], act, L.x_scale), act,
            codes, scale, L.tiles[0], m, n, k, L.gs, L.nunits, L.xq.stride(0), L.lays[0][0].stride(0),
            L.lays[0][1].stride(0), CODES=quant is not None, QMAX=act_qmax(quant[1]) if quant is not None else 127,
            **L.const)
    return act if quant is None else (act, codes, scale)

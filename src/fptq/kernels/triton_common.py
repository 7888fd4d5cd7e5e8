"""What the Triton W4A8 kernels share: the optional ``triton`` import, the dispatch
thresholds, the launch-configuration heuristics (``pick_*_config``, split-K planning), and the
deterministic split-K reduction (``_splitk_reduce_kernel``: sums the float32 partials in a fixed
order, then applies the scales and the bias), the epilogue of the split-K grouped kernels and of the
``int_mm`` per-channel variant.

Imports without triton or CUDA.
"""
from __future__ import annotations

import torch

from ..quant.intscales import INT_SUM_MAX_K

try:  # optional dependency
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the machine
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "PATHS",
    "GEMV_MAX_M",
    "GROUPED_MAX_M",
    "PERCHANNEL_IMPL",
    "pick_config",
    "pick_gemv_config",
    "pick_int8_config",
    "select_path",
]

#: ``triton_forward(path=...)`` values: "auto" (by M), "grouped" (exact), "perchannel" (int8 cache)
PATHS = ("auto", "grouped", "perchannel")
#: grouped path: the CUDA-core GEMV kernel for M <= this, the tensor-core kernel above
GEMV_MAX_M = 2
#: auto path: exact grouped kernels for M <= this, the int8 per-channel GEMM above
# The H200 run had the int8 per-channel GEMM ahead of the grouped kernel at M = 16 on 3 of 4 shapes (and set 8 here),
# as the compiled code predicts for that kernel (>= 18 us of integer-pipe issue for 4096 x 11008, per-channel >= 9.4 us
# of reading its int8 weights); since the grouped kernel's unmasked loads and byte split (7.2 instructions per weight
# byte, >= 5.7 us: bench/gpu_sass.py) the packed kernel should win at 16 as well. Not timed: bench/gpu_kernels.py's
# M = 16 row (grouped_tc against perchannel_*) is what to set this by
GROUPED_MAX_M = 16
#: per-channel GEMM implementation: "triton" (fused epilogue) or "int_mm" (cuBLASLt + epilogue)
PERCHANNEL_IMPL = "triton"
#: split-K aims at about this many programs per SM
_PROGRAMS_PER_SM = 6


def require_triton() -> None:
    """Raise a clear error when the triton package is missing."""
    if not HAS_TRITON:
        raise RuntimeError("the 'triton' backend needs the triton package: pip install 'fptq[triton]'")


_SM_COUNT: dict = {}


def _num_sms(device) -> int:
    dev = torch.device(device)
    if dev.type != "cuda":
        return 132  # interpreter runs: pretend an H100/H200
    key = dev.index if dev.index is not None else torch.cuda.current_device()
    if key not in _SM_COUNT:
        _SM_COUNT[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SM_COUNT[key]


def _block_k_for(group_size: int, k: int, bk: int) -> int:
    """Largest power-of-two <= ``bk`` (>= 32) dividing the group size (multi-group layers)."""
    if group_size > 0 and -(-k // group_size) > 1:
        while bk > 32 and group_size % bk:
            bk //= 2
    return bk


def pick_config(m: int, n: int, k: int, group_size: int) -> dict:
    """Launch configuration of the tensor-core grouped kernel (``_w4a8_gemm_kernel``) for an
    ``[m, k] x [k, n]`` product with ``group_size`` (``<= 0``: per-channel).  ``SPLIT_K``
    None means automatic (:func:`_split_plan`)."""
    if m <= 16:  # H200 sweep (bench/results/gpu): unswapped, narrow N tiles, no split-K was fastest
        cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4, SWAP_AB=False)
        cfg["GROUP_M"] = 8
        cfg["SPLIT_K"] = 1
        cfg["BLOCK_K"] = _block_k_for(group_size, k, cfg["BLOCK_K"])
        return cfg
    elif m <= 32:
        cfg = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3, SWAP_AB=True)
    elif m <= 64:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3, SWAP_AB=True)
    elif m <= 256:
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3, SWAP_AB=False)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3, SWAP_AB=False)
    cfg["GROUP_M"] = 8
    cfg["SPLIT_K"] = None
    cfg["BLOCK_K"] = _block_k_for(group_size, k, cfg["BLOCK_K"])
    return cfg


def pick_gemv_config(m: int, n: int, k: int, group_size: int) -> dict:
    """Launch configuration of the CUDA-core GEMV kernel (``_w4a8_gemv_kernel``)."""
    # H200 sweep: wide-N layers liked BLOCK_N=64 without split-K, narrow-N ones BLOCK_N=32 with split-K
    if n >= 8192:
        cfg = dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=1, SPLIT_K=1)
    else:
        cfg = dict(BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=1, SPLIT_K=None)
    cfg["BLOCK_K"] = _block_k_for(group_size, k, cfg["BLOCK_K"])
    return cfg


def pick_int8_config(m: int, n: int, k: int) -> dict:
    """Launch configuration of the int8 per-channel GEMM (``_int8_gemm_kernel``)."""
    if m <= 64:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    elif m <= 128:
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4)
    elif m <= 512:  # H200 sweep at M=256
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4)
    else:  # H200 sweep at M=2048
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)
    cfg["GROUP_M"] = 8
    return cfg


def select_path(m: int) -> str:
    """Kernel the ``triton`` (auto) backend uses for ``m`` tokens: ``gemv`` / ``grouped``
    (exact, packed int4) or ``perchannel`` (int8 cache)."""
    if m > GROUPED_MAX_M:
        return "perchannel"
    return "gemv" if m <= GEMV_MAX_M else "grouped"


#: minimum K elements per split-K slice
_MIN_SPLIT_K_ELEMS = 512


def _split_plan(tiles: int, m: int, k: int, nunits: int, unit_k: int, device, split_k=None) -> tuple[int, int]:
    """(number of splits, units per split) over ``nunits`` K units of ``unit_k`` elements."""
    if split_k is None:
        target = _PROGRAMS_PER_SM * _num_sms(device)
        if tiles >= target:
            s = 1
        else:
            s = -(-target // tiles)
            s = min(s, max(1, nunits // max(1, -(-_MIN_SPLIT_K_ELEMS // unit_k))))
            # keep the float32 partials' traffic (2 * S * M * N * 4 B) well under the weights' (N * K / 2 B)
            s = min(s, max(1, k // (32 * max(1, m))))
    else:
        s = int(split_k)
    s = max(1, min(s, nunits))
    chunk = -(-nunits // s)
    return -(-nunits // chunk), chunk


def _grouping(k: int, g: int, group_size: int, cfg: dict) -> tuple[dict, int, int, int]:
    """How the packed kernels tile K for ``g`` groups of ``group_size`` (``<= 0``: per channel) with the launch
    configuration ``cfg``: ``(constexprs, units of K, elements per unit, group size)``: a unit is a group, or with
    one group per row a ``BLOCK_K`` tile (the split-K plan counts units); the constexprs are ``ONE_GROUP``,
    ``TILES_PER_GROUP``, ``BLOCK_N``, ``BLOCK_K``, ``EVEN_K`` (every tile inside K: unmasked loads) and the launch's
    ``num_warps`` / ``num_stages``."""
    one_group = g == 1
    gs = k if group_size <= 0 else group_size
    bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
    if not one_group and gs % bk:
        raise ValueError(f"BLOCK_K={bk} must divide group_size={gs}")
    flags = dict(ONE_GROUP=one_group, TILES_PER_GROUP=1 if one_group else gs // bk, BLOCK_N=bn, BLOCK_K=bk,
                 EVEN_K=k % (bk if one_group else gs) == 0, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    nunits, unit_k = (-(-k // bk), bk) if one_group else (g, gs)
    return flags, nunits, unit_k, gs


def _supported(group_size: int, k: int) -> bool:
    """Whether the grouped kernels handle this grouping (tiles must not straddle groups)."""
    if group_size <= 0 or -(-k // group_size) == 1:
        return True
    return group_size % 32 == 0


# ------------------------------------------------ shared jit helpers, split-K reduction
if HAS_TRITON:

    @triton.jit
    def _tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        # (pid_m, pid_n) of program ``pid``, grouped along M (GROUP_M row tiles share a column of B tiles, L2 reuse)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m
        return pid_m, pid_n

    @triton.jit
    def _scaled(acc, offs_m, offs_n, mask_m, mask_n, AS, BIAS, PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_SCALE: tl.constexpr = True):
        # acc * AS (per token [M] or per tensor; not read without HAS_SCALE: float activations) (+ bias [N]) in
        # float32; acc: float32 [BLOCK_M, BLOCK_N]
        if not HAS_SCALE:
            pass
        elif PER_TOKEN:
            sx = tl.load(AS + offs_m, mask=mask_m, other=0.0)
            acc = acc * sx[:, None]
        else:
            acc = acc * tl.load(AS)
        if HAS_BIAS:
            bias = tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc = acc + bias[None, :]
        return acc

    @triton.jit
    def _epilogue(acc, offs_m, offs_n, mask_m, mask_n, AS, BIAS, C, stride_cm,
                  PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr = True):
        # C = _scaled(acc), cast to C's dtype
        acc = _scaled(acc, offs_m, offs_n, mask_m, mask_n, AS, BIAS, PER_TOKEN, HAS_BIAS, HAS_SCALE)
        c_ptrs = C + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _splitk_reduce_kernel(
        P, CS, AS, BIAS, C,
        M, N, S, stride_cm,
        PER_TOKEN: tl.constexpr,
        HAS_COLSCALE: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HAS_SCALE: tl.constexpr = True,
    ):
        # C = (sum_s P[s]) (* CS[n]) (* AS) (+ bias), partials summed in a fixed order
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        mask = mask_m[:, None] & mask_n[None, :]
        p_ptrs = P + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for _s in range(0, S):
            acc += tl.load(p_ptrs, mask=mask, other=0).to(tl.float32)
            p_ptrs += M * N
        if HAS_COLSCALE:
            cs = tl.load(CS + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc = acc * cs[None, :]
        _epilogue(acc, offs_m, offs_n, mask_m, mask_n, AS, BIAS, C, stride_cm, PER_TOKEN, HAS_BIAS, HAS_SCALE)


def _reduce(partials, x_scale, per_token, bias, c, col_scale=None) -> torch.Tensor:
    """``c`` = the split-K ``partials`` summed in split order, times ``col_scale`` and ``x_scale`` (None: float
    activations, no activation scale), plus ``bias``."""
    s, m, n = partials.shape
    bm = min(16, triton.next_power_of_2(m))
    bn = max(128, 2048 // bm)
    has_bias = bias is not None
    unread = partials  # (pointers the flags say are not read)
    _splitk_reduce_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        partials, col_scale if col_scale is not None else unread, x_scale if x_scale is not None else unread,
        bias if has_bias else unread, c,
        m, n, s, c.stride(0),
        PER_TOKEN=per_token, HAS_COLSCALE=col_scale is not None, HAS_BIAS=has_bias,
        BLOCK_M=bm, BLOCK_N=bn, HAS_SCALE=x_scale is not None, num_warps=4,
    )
    return c


# ------------------------------------------------ the packed kernels' argument checks
def _check_grouped_args(xq, x_scale, qweight, w_scales, in_features, group_size):
    m, k = xq.shape
    if k != in_features:
        raise ValueError(f"xq has K={k}, expected {in_features}")
    if qweight.dtype != torch.uint8 or qweight.shape[1] != (k + 1) // 2:
        raise ValueError("qweight must be packed uint8 [N, ceil(K/2)]")
    if not _supported(group_size, k):
        raise ValueError(f"triton kernel needs group_size % 32 == 0 (or one group per row), got {group_size}")
    per_token = x_scale.dim() > 0
    x_scale = x_scale.to(torch.float32).contiguous()
    if per_token:
        if x_scale.numel() != m:
            raise ValueError(f"per-token x_scale must have M={m} elements, got {x_scale.numel()}")
        x_scale = x_scale.reshape(m)
    return xq.contiguous(), x_scale, per_token, qweight.contiguous(), w_scales.contiguous()


def _check_layers(x, x_scale, layers, in_features: int, group_size: int) -> tuple:
    """:func:`_check_grouped_args` of every layer (``(qweight, w_scales, bias or None, int_scales or None)``) of one
    launch on the same input: ``(x, x_scale, per_token, [(qweight, w_scales, bias, ints)] contiguous and checked,
    number of groups)``; the layers must all have a bias or none, integer scales or none, one number of groups."""
    if len({b is None for _, _, b, _ in layers}) > 1 or len({i is None for *_, i in layers}) > 1:
        raise ValueError("the layers of one launch must all have a bias or none, integer scales or none")
    lays = []
    for qweight, w_scales, bias, int_scales in layers:
        x, x_scale, per_token, qweight, w_scales = _check_grouped_args(
            x, x_scale, qweight, w_scales, in_features, group_size)
        lays.append((qweight, w_scales, None if bias is None else bias.contiguous(),
                     _check_int_scales(int_scales, w_scales, in_features)))
    g = lays[0][1].shape[1]
    if any(ws.shape[1] != g for _, ws, _, _ in lays):
        raise ValueError("the layers of one launch differ in their number of group scales")
    return x, x_scale, per_token, lays, g


def _layer_args(lay: tuple, out: torch.Tensor, x_scale: torch.Tensor) -> tuple:
    """A checked layer's (:func:`_check_layers`) kernel arguments: packed codes, group scales, bias (``out`` where
    there is none: unread), integer multipliers and base (the scales and ``x_scale`` where there are none: unread)."""
    qw, ws, b, i = lay
    return (qw, ws, out if b is None else b, *(i if i is not None else (ws, x_scale)))


def _check_int_scales(int_scales, w_scales, k):
    """``(multipliers int8 [N, G], base float32 [N])`` of :func:`fptq.kernels.triton_w4a8.integer_scales_device`, checked against the
    group scales; None for one group per row (a single accumulator already)."""
    if int_scales is None or w_scales.shape[1] == 1:
        return None
    base, mult = int_scales
    if (mult.dtype != torch.int8 or tuple(mult.shape) != tuple(w_scales.shape) or base.dtype != torch.float32
            or tuple(base.shape) != (w_scales.shape[0],)):
        raise ValueError("int_scales must be (base float32 [N], multipliers int8 [N, G]) matching w_scales")
    if k > INT_SUM_MAX_K:
        raise ValueError(f"integer group scales sum K in int32: K={k} is above {INT_SUM_MAX_K}")
    return mult.contiguous(), base.contiguous()

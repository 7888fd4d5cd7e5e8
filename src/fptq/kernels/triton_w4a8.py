"""Triton W4A8 kernels for CUDA (backends ``triton``, ``triton_grouped``, ``triton_perchannel``;
optional ``fptq[triton]``).

Paths (all numerics checked against :meth:`fptq.nn.QuantLinear.reference_forward`):

``triton_grouped`` -- **exact group-wise** (same maths as the reference, only the float
summation order differs).  Reads the packed int4 weights directly (0.5 byte/weight, no cache):

* ``_w4a8_gemv_kernel`` (M <= ``GEMV_MAX_M``, decode): no tensor cores; each program
  owns one token row, ``BLOCK_N`` output channels and a range of groups (split-K);
  nibbles are sign-extended with int32 shifts and multiplied with the even / odd
  activation codes in int32, reduced once per group, scaled by the fp16 group scale
  in float32.  With ``QUANT`` (:func:`w4a8_gemv_quant`, what the dispatch uses at decode
  while ``FUSED_GEMV_QUANT``) it reads the float activations and quantizes them itself:
  each program takes the row's absmax (per token) and rounds the codes it needs in
  registers, exactly as ``_quant_act_kernel`` does, so one launch replaces two and the
  output bits are those of the pair.
* ``_w4a8_gemm_kernel`` (tensor cores): ``tl.dot(..., out_dtype=int32)`` per group,
  the group scale applied in float32 at the end of each group (``BLOCK_K`` divides
  the group size). With float scales (``NIBBLE``) the packed bytes are not unpacked: read as int8,
  ``b << 4`` and ``b & 0xF0`` are 16 x the even and odd codes, multiplied with the activation tile's
  even and odd columns by two dots, the sum scaled by ``s / 16`` (the same bits; the byte split in PTX
  on CUDA once :func:`ptx_verified`). Weight tiles load unmasked along K when every tile lies inside
  K (``EVEN_K``), which lets them vectorize and pipeline.  With **integer group scales** (``fptq quantize --group-scales integer``:
  each group's scale is a channel base times an integer -15 .. 16, found again at first use by
  :func:`integer_scales_device`) both kernels multiply the unpacked codes by their group's
  integer (``q * m`` stays int8), sum all of K in one int32 accumulator and apply the base once:
  the tensor-core loop has no float step per group (QQQ's / QServe's reason for such scales),
  the values equal the per-group ones to float32 rounding.  For small M the operands are swapped (``SWAP_AB``: the unpacked
  weight tile is the MMA's M side, the tokens its N side, so M=1..64 does not waste a
  64-row MMA); optional split-K over groups.

  Split-K (both kernels): the ``SPLIT_K`` programs of an output tile write float32
  partials ``[SPLIT_K, M, N]`` to a workspace and ``_splitk_reduce_kernel`` sums them
  in a fixed order (deterministic, no atomics), then applies the activation scale and
  the bias and casts.  With ``SPLIT_K == 1`` the epilogue is fused.

``triton_dp4a`` (:func:`w4a8_gemv_dp4a`, what the dispatch runs at M <= ``GEMV_MAX_M`` while ``GEMV_DP4A``, where
:func:`dp4a_problem` finds nothing against the layer and :func:`ptx_verified` passed on the device): the same
maths as the GEMV above on the packed codes read as 32-bit words, four int8 products per ``dp4a``; each program
quantizes its share of the activations once into a scratch buffer. Same output bits as ``_w4a8_gemv_kernel`` for
the same tiling by whole groups and split-K.

``triton_perchannel`` -- **one extra rounding of the weights** (QQQ / OdysseyLLM approach,
the same conversion as the CPU ``int8_perchannel`` backend, computed by
:func:`fptq.kernels.cpu.perchannel_weight`): at first use the group-scaled int4 weights
become int8 codes with one float32 scale per output channel.  **Memory: the int8 weight
(1 byte/weight, i.e. twice the packed int4 size) and the [N] scales are cached on the
module** (``module._cache['triton_w8_perchannel']``).  A plain int8 x int8 -> int32 GEMM
over the whole K (``_int8_gemm_kernel``: B tiles loaded from the int8 cache by pointer,
so Hopper's wgmma gets shared-memory operands and one int32 accumulator), with the
per-token / per-tensor x per-channel scales and the bias fused in the epilogue; or
(``PERCHANNEL_IMPL = 'int_mm'``) ``torch._int_mm`` (cuBLASLt) + the Triton epilogue.
For per-channel layers (one group per row) the codes and scales are used unchanged and
this path is exact too; so it is with integer group scales (``W8 = q * m``, the channel's base).

``triton`` (default on CUDA) -- picks by M: ``triton_grouped`` for ``M <= GROUPED_MAX_M``
(memory-bound decode: reading 4-bit weights is what makes it fast, and it is exact),
``triton_perchannel`` above (compute-bound prefill).

Activation quantization (``_quant_act_kernel``): one program per token row, a single
pass over the row when ``K <= 16384`` (row held in registers): per-token absmax, the
scale, and int8 codes ``clamp(rint(x / s))`` with IEEE division (``tl.math.div_rn``)
and round-half-to-even -- bit-identical to :meth:`QuantLinear.quantize_input` *on the
same device*.  Note torch on CUDA computes ``amax / qmax`` (division by a Python
scalar) as ``amax * fp32(1 / qmax)`` (``div_true_kernel_cuda``'s reciprocal
optimisation), while on CPU it divides; the kernel reproduces whichever the device's
torch does (probed once per device, :func:`_scalar_div_mode`).

Launch configurations come from small heuristic tables (``pick_*_config``); every
entry point takes ``config=`` to override them (``bench/gpu_kernels.py`` sweeps them).
If a fast path fails to compile on some GPU / triton version, :func:`triton_forward`
warns once and falls back to the baseline grouped kernel.

This module imports without triton or CUDA (``HAS_TRITON`` is then False and the entry
points raise a clear error).  4-bit layers with float activations (W4A16) run
:func:`~fptq.kernels.triton_w4a16.w4a16_matmul`.  Layers the kernels do not cover (weights
other than 4-bit, except W8A8 per channel; group sizes that are not a multiple of 32 with
more than one group) fall back to the reference maths.

Layout: this module is the entry point (``triton_forward`` and the backends' dispatch) and
re-exports the public names of :mod:`.triton_common` (import guard, thresholds, launch
configurations, split-K reduction), :mod:`.triton_quant` (activation quantization),
:mod:`.triton_grouped` (exact grouped kernels) and :mod:`.triton_perchannel` (int8 per-channel
path).  On a machine without CUDA the same kernels run on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` set before this module is imported; the test suite does this itself).
"""
from __future__ import annotations

import warnings

import torch

from ..quant.intscales import INT_SUM_MAX_K, integer_scale_factors
from . import triton_common, triton_dp4a, triton_grouped, triton_perchannel, triton_quant
from .cpu import _cached
from .triton_dp4a import counters_needed, dp4a_problem, w4a8_gemv_dp4a
from .triton_common import (
    GEMV_MAX_M,
    GROUPED_MAX_M,
    HAS_TRITON,
    PATHS,
    PERCHANNEL_IMPL,
    _split_plan,
    _supported,
    pick_config,
    pick_gemv_config,
    pick_int8_config,
    require_triton,
    select_path,
)
from .triton_grouped import w4a8_gemv, w4a8_gemv_quant, w4a8_matmul
from .triton_perchannel import int8_perchannel_matmul, perchannel_weight_device, w8a8_perchannel
from .triton_quant import _scalar_div_mode, quantize_activations
from .triton_w4a16 import w4a16_matmul, w4a16_problem

# the public names of the four kernel modules, and this module's entry points
__all__ = [
    *triton_common.__all__, *triton_quant.__all__, *triton_grouped.__all__, *triton_perchannel.__all__,
    *triton_dp4a.__all__, "FUSED_GEMV_QUANT", "GEMV_DP4A", "SERIAL_SPLIT_K", "serial_split_verified", "ptx_verified", "integer_scales_device", "is_available", "triton_forward", "triton_grouped_forward", "triton_perchannel_forward",
]
# private helpers that the tests and bench/gpu_kernels.py reach through this module
_PRIVATE_REEXPORTS = (_split_plan, _scalar_div_mode)


def is_available() -> bool:
    """True when triton is importable and a CUDA device is present."""
    return HAS_TRITON and torch.cuda.is_available()


def integer_scales_device(module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(base float32 [N], multipliers int8 [N, G])`` of a 4-bit module whose group scales are integer multiples
    of one scale per output channel (``--group-scales integer``; :func:`fptq.quant.intscales.integer_scale_factors`),
    on the module's device and cached on it; None for other scales, one group per row, or K past
    :data:`~fptq.quant.intscales.INT_SUM_MAX_K`."""

    def build(m):
        ws = m.w_scales
        if m.wbits != 4 or ws.shape[1] == 1 or m.in_features > INT_SUM_MAX_K:
            return None
        factors = integer_scale_factors(ws.detach().cpu().t())
        if factors is None:
            return None
        base, mult = factors
        return base.to(ws.device).contiguous(), mult.t().contiguous().to(ws.device)

    return _cached(module, "triton_int_scales", build)


_VERIFIED: dict = {}


def _checked_once(results: dict, device, check, warning: str) -> bool:
    """``check(device)`` (a comparison of two kernel forms' bits), run once per CUDA device and remembered in
    ``results``; True off CUDA. A kernel that raises (does not build) counts as False, and False warns once."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return True
    key = (dev.type, dev.index if dev.index is not None else torch.cuda.current_device())
    if key not in results:
        try:
            results[key] = bool(check(dev))
        except Exception:  # noqa: BLE001 - a kernel that does not build here means: not verified
            results[key] = False
        if not results[key]:
            _warn_once(warning.format(dev=dev))
    return results[key]


def _random_packed(dev, k: int, n: int, gs: int, seed: int) -> tuple:
    """Random packed 4-bit weights ``[n, k / 2]``, float16 group scales and the generator that made them."""
    gen = torch.Generator().manual_seed(seed)
    qw = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8).to(dev)
    ws = (torch.rand(n, k // gs, generator=gen) * 0.02 - 0.01).to(torch.float16).to(dev)
    return qw, ws, gen


def _ptx_forms_agree(dev) -> bool:
    k, n, gs = 512, 96, 64
    qw, ws, gen = _random_packed(dev, k, n, gs, 2024)
    ints = (torch.rand(n, generator=gen).to(dev) * 0.01,
            torch.randint(-15, 17, (n, k // gs), generator=gen, dtype=torch.int8).to(dev))
    x = (torch.randn(2, k, generator=gen) * 3).to(torch.float16).to(dev)
    xq = torch.randint(-127, 128, (24, k), generator=gen, dtype=torch.int8).to(dev)
    same = True
    for static in (None, torch.tensor(0.05, device=dev)):
        for i in (None, ints):
            ys = [w4a8_gemv_dp4a(x, static, qw, ws, k, gs, int_scales=i, asm=a)[0] for a in (True, False)]
            same = same and bool(torch.equal(*ys))
    for swap in (False, True):
        ys = [w4a8_matmul(xq, torch.tensor(0.02, device=dev), qw, ws, k, gs, config={"SWAP_AB": swap}, asm=a)
              for a in (True, False)]
        same = same and bool(torch.equal(*ys))
    return same


def ptx_verified(device) -> bool:
    """Whether the kernels' inline PTX (the dp4a GEMV's ``dp4a``, the tensor-core kernel's byte split) gives, on
    ``device``, the bits of their plain-Triton forms compiled for the same device: checked once per device on a
    small random layer (per token and static, float and integer scales); True off CUDA, where only the plain forms
    run. A kernel that does not build counts as False; the dispatch then uses the plain forms."""
    return _checked_once(_VERIFIED, device, _ptx_forms_agree,
                         "fptq triton backend: the inline PTX kernels disagree with their plain forms on {dev} (or "
                         "do not build); using the plain forms")


_SERIAL_OK: dict = {}


def _serial_split_agrees(dev) -> bool:
    k, n, gs = 4096, 2048, 128
    qw, ws, gen = _random_packed(dev, k, n, gs, 7)
    cfg = {"SPLIT_K": 16}
    counters = torch.zeros(counters_needed(2, n, k, gs, cfg), dtype=torch.int32, device=dev)
    same = True
    for rep in range(4):
        x = (torch.randn(1 + rep % 2, k, generator=gen) * 3).to(torch.float16).to(dev)
        two = w4a8_gemv_dp4a(x, None, qw, ws, k, gs, config=cfg)[0]
        one = w4a8_gemv_dp4a(x, None, qw, ws, k, gs, config=cfg, counters=counters)[0]
        same = same and bool(torch.equal(one, two)) and not bool(counters.any())
    return same


def serial_split_verified(device) -> bool:
    """Whether the dp4a GEMV's one-launch split-K (each output tile reduced by its last program, counted with
    atomics) gives, on ``device``, the two-launch reduction's bits: checked once per device, several launches of
    a layer with many tiles and splits; True off CUDA (Triton's interpreter runs programs one after another)."""
    return _checked_once(_SERIAL_OK, device, _serial_split_agrees,
                         "fptq triton backend: the one-launch split-K GEMV disagrees with the two-launch one on {dev} "
                         "(or does not build); reducing in a second launch")


def _dp4a_counters(module, device, layers: tuple = (), key: str = "triton_dp4a_counters") -> torch.Tensor | None:
    """The split-K counters of a one-launch dp4a GEMV over ``layers`` (default: ``module`` alone), int32 zeros cached
    on ``module`` under ``key`` (one launch at a time uses them), or None where that reduction is off
    (:data:`SERIAL_SPLIT_K`) or did not check out on ``device``."""
    if not SERIAL_SPLIT_K or not serial_split_verified(device):
        return None
    return _cached(module, key, lambda m: torch.zeros(
        sum(counters_needed(GEMV_MAX_M, l.out_features, l.in_features, l.group_size) for l in layers or (m,)),
        dtype=torch.int32, device=m.qweight.device))


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    """The kernels' output dtype for activations ``x``: theirs where the kernels store it, else float32."""
    return x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def _asm(device) -> bool | None:
    """The tensor-core kernel's ``asm``: None (the PTX byte split on CUDA) where :func:`ptx_verified`, else False."""
    return None if ptx_verified(device) else False


def _dp4a_covers(module) -> bool:
    """Whether :func:`w4a8_gemv_dp4a` runs this layer's packed weights (cached on the module)."""
    return _cached(module, "triton_dp4a_ok",
                   lambda m: dp4a_problem(m.qweight, m.in_features, m.group_size) is None)


# ------------------------------------------------------------------ forward
#: decode (the GEMV path): quantize the activations inside the GEMV kernel instead of in a launch of their own
#: (bit-identical results; ``bench/gpu_kernels.py`` times both)
FUSED_GEMV_QUANT = True
#: decode: the GEMV on packed 32-bit words with dp4a (:mod:`.triton_dp4a`: ~2.6 instructions per weight byte where
#: the byte-wise GEMV compiles to ~25) where it covers the layer and its PTX checked out on the device
GEMV_DP4A = True
#: decode: a split-K dp4a GEMV reduces its partials in the same launch (the last program of each output tile adds
#: them in split order: the same bits) where that checked out on the device (:func:`serial_split_verified`): one
#: launch per Linear where split-K took two
SERIAL_SPLIT_K = True
_warned: set = set()
_broken: set = set()
#: the configuration validated on the first GPU run (no split-K, no operand swap)
_BASELINE_CONFIG = dict(SWAP_AB=False, SPLIT_K=1)


def _warn_once(why: str) -> None:
    if why not in _warned:
        _warned.add(why)
        warnings.warn(why, stacklevel=4)


def _fallback(module, x: torch.Tensor, why: str) -> torch.Tensor:
    _warn_once(f"fptq triton backend: {why}; using the reference path for this layer")
    return module.reference_forward(x)


def _guarded(name: str, fast, baseline, instead: str = "the baseline grouped kernel"):
    """Run ``fast()``; if it raises (e.g. a kernel that does not compile on this GPU /
    triton), warn once, remember it and use ``baseline()`` (``instead``) from then on."""
    if name in _broken:
        return baseline()
    try:
        return fast()
    except Exception as e:  # noqa: BLE001 - reported, then the validated kernel runs
        _broken.add(name)
        _warn_once(f"fptq triton backend: the {name!r} kernel failed ({e!r}); falling back to {instead}")
        return baseline()


def triton_forward(module, x: torch.Tensor, path: str = "auto", codes: tuple | None = None) -> torch.Tensor:
    """QuantLinear forward with the Triton kernels.

    ``codes``: ``(xq [M, K] int8, x_scale)``, the codes of ``x`` under the module's own quantizer (what
    :func:`quantize_activations` gives: a per-token ``[M]`` or its static 0-d scale), made by the caller, e.g. in
    the launch that normalized ``x`` for all the Linears that read it: used instead of quantizing here.

    ``path``: ``"auto"`` (backend ``triton``: :func:`select_path` by the number of
    tokens), ``"grouped"`` (backend ``triton_grouped``: exact, packed int4; GEMV kernel
    for M <= ``GEMV_MAX_M``, tensor-core kernel above) or ``"perchannel"`` (backend
    ``triton_perchannel``: int8 per-channel cache, one extra weight rounding unless the
    layer is per-channel or its group scales are integer multiples of a channel base).
    Integer group scales (:func:`integer_scales_device`) take the packed kernels' single-accumulator
    variant.
    """
    require_triton()
    if path not in PATHS:
        raise ValueError(f"unknown triton path {path!r}; choose one of {PATHS}")
    if x.shape[-1] != module.in_features:
        raise ValueError(f"expected input [..., {module.in_features}], got {tuple(x.shape)}")
    w8a8 = w8a8_perchannel(module)  # SmoothQuant's layers: the int8 per-channel GEMM on their codes, at every M
    if module.wbits != 4 and not w8a8:
        detail = " with group scales or float activations" if module.wbits == 8 else ""
        return _fallback(module, x, f"{module.wbits}-bit weights{detail} are not covered by the Triton kernels")
    if module.act_mode == "none":  # W4A16: the float-activation tensor-core kernel on the packed codes
        why = w4a16_problem(module.qweight, module.in_features, module.group_size)
        if why is None and x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            why = f"{x.dtype} activations"
        if why is not None:
            return _fallback(module, x, f"W4A16: {why}")
        x2 = x.reshape(-1, module.in_features)
        y = _guarded("w4a16", lambda: w4a16_matmul(x2, module.qweight, module.w_scales, module.in_features,
                                                   module.group_size, bias=module.bias),
                     lambda: module.reference_forward(x2), instead="the reference path")
        return y.to(x.dtype).reshape(*x.shape[:-1], module.out_features)
    if module.abits != 8:
        return _fallback(module, x, f"{module.abits}-bit activations are not covered")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, module.in_features)
    m = x2.shape[0]
    static = module.act_mode == "static_tensor"
    out_dtype = _out_dtype(x)
    if codes is not None:
        xq, sx = codes[0].reshape(-1, module.in_features), codes[1]
        if xq.shape[0] != m or xq.dtype != torch.int8:
            raise ValueError(f"codes must be int8 [{m}, {module.in_features}], got {xq.dtype} {tuple(xq.shape)}")
    if w8a8:  # exact: one int32 accumulator, the channel and activation scales after it
        if codes is None:
            xq, sx = quantize_activations(x2, module.act_scale if static else None, qmax=module.act_qmax())
        y = _guarded("w8a8", lambda: int8_perchannel_matmul(xq, sx, *perchannel_weight_device(module),
                                                             bias=module.bias, out_dtype=out_dtype),
                     lambda: module.reference_forward(x2), instead="the reference path")
        return y.to(x.dtype).reshape(*lead, module.out_features)
    kind = select_path(m) if path == "auto" else path
    if kind != "perchannel" and not _supported(module.group_size, module.in_features):
        if path == "grouped":
            return _fallback(module, x, f"group_size={module.group_size} is not a multiple of 32")
        kind = "perchannel"  # any grouping works once the weights are int8 per-channel
    gemv = kind == "gemv" or (kind == "grouped" and m <= GEMV_MAX_M)
    # integer group scales: the packed kernels sum all of K in one int32 accumulator (the per-channel cache is
    # exact for them without this: perchannel_weight)
    ints = integer_scales_device(module) if kind != "perchannel" else None
    tag = "" if ints is None else "_int"  # (a failed integer-scale kernel leaves the float-scale one in use)
    if gemv and GEMV_DP4A and _dp4a_covers(module) and ptx_verified(x2.device):
        y = _guarded("gemv_dp4a" + tag, lambda: w4a8_gemv_dp4a(
            x2 if codes is None else xq, (module.act_scale if static else None) if codes is None else sx,
            module.qweight, module.w_scales, module.in_features,
            module.group_size, qmax=module.act_qmax(), bias=module.bias, out_dtype=out_dtype, int_scales=ints,
            counters=_dp4a_counters(module, x2.device))[0],
            lambda: None, instead="the byte-wise GEMV")
        if y is not None:
            return y.to(x.dtype).reshape(*lead, module.out_features)
    if gemv and FUSED_GEMV_QUANT and codes is None:
        # decode: the activations are quantized inside the GEMV (one launch, the codes never stored); None once
        # that kernel has failed here: the two launches below
        y = _guarded("gemv_quant" + tag, lambda: w4a8_gemv_quant(
            x2, module.act_scale if static else None, module.qweight, module.w_scales, module.in_features,
            module.group_size, qmax=module.act_qmax(), bias=module.bias, out_dtype=out_dtype, int_scales=ints)[0],
            lambda: None,
            instead="a quantization launch before the GEMV")
        if y is not None:
            return y.to(x.dtype).reshape(*lead, module.out_features)
    if codes is None:
        xq, sx = quantize_activations(x2, module.act_scale if static else None, qmax=module.act_qmax())
    args = (xq, sx, module.qweight, module.w_scales, module.in_features, module.group_size)

    asm = _asm(x2.device)

    def baseline():
        if not _supported(module.group_size, module.in_features):
            raise RuntimeError("no Triton kernel covers this layer")
        return w4a8_matmul(*args, bias=module.bias, out_dtype=out_dtype, config=_BASELINE_CONFIG, asm=asm)

    if kind == "perchannel":
        y = _guarded("perchannel", lambda: int8_perchannel_matmul(
            xq, sx, *perchannel_weight_device(module), bias=module.bias, out_dtype=out_dtype), baseline)
    elif gemv:
        y = _guarded("gemv" + tag, lambda: w4a8_gemv(*args, bias=module.bias, out_dtype=out_dtype, int_scales=ints),
                     baseline)
    else:
        y = _guarded("grouped" + tag, lambda: w4a8_matmul(*args, bias=module.bias, out_dtype=out_dtype,
                                                    int_scales=ints, asm=asm), baseline)
    return y.to(x.dtype).reshape(*lead, module.out_features)


def triton_grouped_forward(module, x: torch.Tensor) -> torch.Tensor:
    """Backend ``triton_grouped``: exact group-wise kernels for every M."""
    return triton_forward(module, x, path="grouped")


def triton_perchannel_forward(module, x: torch.Tensor) -> torch.Tensor:
    """Backend ``triton_perchannel``: int8 per-channel GEMM for every M."""
    return triton_forward(module, x, path="perchannel")

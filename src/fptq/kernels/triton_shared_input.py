"""Which Linears of a decode step share one launch, and running them: :func:`shared_input_forward` (q, k and v) and
:func:`glu_forward` (gate, up and SiLU x up), what :class:`fptq.runtime.fused_step.FusedStep` calls with the int8
codes its norm launch wrote for all of them.

At M <= 2 (the dp4a GEMV): :func:`~fptq.kernels.triton_dp4a_layers.w4a8_gemv_dp4a_layers` and
:func:`~fptq.kernels.triton_dp4a_layers.w4a8_gemv_dp4a_glu` (split-K reduced in the launch: their one-launch
reductions are checked once per device against the launches they replace before use). At 3 <= M <=
``GROUPED_MAX_M`` (the tensor-core kernel): :func:`~fptq.kernels.triton_grouped_layers.w4a8_matmul_layers` and
:func:`~fptq.kernels.triton_grouped_layers.w4a8_matmul_glu`, the latter only where the Linear that reads SiLU x up
has a static scale (it then also writes that Linear's codes; per token, SiLU x up's own launch quantizes, and
the gate/up launch without SiLU is as short). Where the layers cannot share a launch
(:func:`shared_input_problem`: another path at this batch, group sizes, bias or integer group scales on some only),
where a check failed, or where the kernel failed once on this device, they return None and the step runs each
layer's own forward.
"""
from __future__ import annotations

import torch

from . import triton_w4a8 as tw
from .triton_dp4a import counters_needed
from .triton_dp4a_layers import MAX_LAYERS, w4a8_gemv_dp4a_glu, w4a8_gemv_dp4a_layers
from .triton_grouped_layers import w4a8_matmul_glu, w4a8_matmul_layers

__all__ = ["glu_forward", "glu_verified", "shared_input_forward", "shared_input_problem"]


def shared_input_problem(modules, m: int) -> str | None:
    """Why ``modules`` (QuantLinears on the Triton backend whose inputs quantize alike) cannot run in one launch on
    ``m`` rows (None where they can)."""
    from .triton_common import _supported
    from .triton_perchannel import w8a8_perchannel

    if not 2 <= len(modules) <= MAX_LAYERS:
        return f"{len(modules)} layers (one launch runs 2 to {MAX_LAYERS})"
    path = tw.select_path(m)
    if path == "perchannel" or (path == "gemv" and not tw.GEMV_DP4A):
        return f"{m} rows take a kernel that runs one layer per launch"
    first = modules[0]
    for mod in modules:
        if mod.wbits != 4 or w8a8_perchannel(mod):
            return "a layer without 4-bit weights"
        if (mod.in_features, mod.group_size) != (first.in_features, first.group_size):
            return "the layers' inputs or group sizes differ"
        if path == "gemv" and not tw._dp4a_covers(mod):
            return "a layer the dp4a GEMV does not cover"
        if path == "grouped" and not _supported(mod.group_size, mod.in_features):
            return "a grouping the tensor-core kernel does not cover"
        if (mod.bias is None) != (first.bias is None):
            return "a bias on some layers only"
    ints = [tw.integer_scales_device(mod) is None for mod in modules]
    if len(set(ints)) > 1:
        return "integer group scales on some layers only"
    return None


def _inputs(modules, x: torch.Tensor, codes: tuple) -> tuple:
    """(rows [M, K], codes [M, K], their scale, output dtype, the layers' kernel arguments)."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, sx = codes[0].reshape(x2.shape), codes[1]
    if xq.dtype != torch.int8:
        raise ValueError(f"codes must be int8 [{x2.shape[0]}, {x2.shape[1]}], got {xq.dtype}")
    layers = [(mod.qweight, mod.w_scales, mod.bias, tw.integer_scales_device(mod)) for mod in modules]
    return x2, xq, sx, tw._out_dtype(x), layers


def shared_input_forward(modules, x: torch.Tensor, codes: tuple) -> list[torch.Tensor] | None:
    """``[mod(x) for mod in modules]`` in one launch from ``codes = (xq, x_scale)`` (the int8 codes of ``x`` under
    the quantizer the modules share, as ``triton_forward(codes=...)`` takes them): each output what
    :func:`~fptq.kernels.triton_w4a8.triton_forward` of that module gives (its bits where both split K alike), in
    ``x``'s dtype and shape. None where :func:`shared_input_problem` names a reason or the launch failed (the
    caller then runs each module)."""
    m = x.reshape(-1, x.shape[-1]).shape[0]
    if shared_input_problem(modules, m) is not None:
        return None
    x2, xq, sx, out_dtype, layers = _inputs(modules, x, codes)
    first = modules[0]
    if tw.select_path(m) == "gemv":
        if not tw.ptx_verified(x2.device):
            return None
        ys = tw._guarded("gemv_dp4a_layers", lambda: w4a8_gemv_dp4a_layers(
            xq, sx, layers, first.in_features, first.group_size, qmax=first.act_qmax(), out_dtype=out_dtype,
            counters=tw._dp4a_counters(first, x2.device, modules, f"triton_dp4a_shared_counters_{len(modules)}"))[0],
            lambda: None, instead="one launch per layer")
    else:
        ys = tw._guarded("grouped_layers", lambda: w4a8_matmul_layers(
            xq, sx, layers, first.in_features, first.group_size, out_dtype=out_dtype, asm=tw._asm(x2.device)),
            lambda: None, instead="one launch per layer")
    if ys is None:
        return None
    return [y.to(x.dtype).reshape(*x.shape[:-1], mod.out_features) for y, mod in zip(ys, modules)]


_GLU_OK: dict = {}


def _glu_agrees(dev, k: int = 2048, n: int = 1024) -> bool:
    from .triton_decode import silu_mul_triton

    gs = 128
    layers = [tw._random_packed(dev, k, n, gs, seed)[:2] + (None, None) for seed in (5, 6)]
    gen = torch.Generator().manual_seed(8)
    cfg = {"SPLIT_K": 8}
    counters = torch.zeros(counters_needed(2, n, k, gs, cfg), dtype=torch.int32, device=dev)
    same = True
    for m in (1, 2, 1):
        xq = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8).to(dev)
        sx = (torch.rand(m, generator=gen) * 0.05).to(dev)
        g, u = w4a8_gemv_dp4a_layers(xq, sx, layers, k, gs, config=cfg)[0]
        one = w4a8_gemv_dp4a_glu(xq, sx, *layers, k, gs, counters, config=cfg)
        same = same and bool(torch.equal(one, silu_mul_triton(g, u))) and not bool(counters.any())
    return same


def glu_verified(device) -> bool:
    """Whether :func:`~fptq.kernels.triton_dp4a_layers.w4a8_gemv_dp4a_glu` gives, on ``device``, the bits of the three
    launches it replaces (checked once per device, batches of 1 and 2, K split 8 ways); True off CUDA."""
    return tw._checked_once(_GLU_OK, device, _glu_agrees,
                            "fptq decode step: gate/up with SiLU in one launch disagrees with three launches on {dev} "
                            "(or does not build); using gate/up in one launch, then SiLU x up")


def glu_forward(gate, up, x: torch.Tensor, codes: tuple, quant: tuple | None = None) -> tuple | None:
    """``(silu(gate(x)) * up(x), its codes or None)`` in one launch from ``codes`` (those of ``x`` under the
    quantizer gate and up share), in ``x``'s dtype and shape. ``quant``: the quantizer of the Linear that reads the
    result (``(static scale or None, activation bits)``, :func:`fptq.runtime.fused_step.shared_quantizer`'s), whose
    codes ``(codes, scale)`` come with it above M = 2 (at M <= 2 that Linear's GEMV quantizes its input itself: None).
    None where the pair cannot share such a launch (:func:`shared_input_problem`, shapes that differ, above M = 2 a
    reader without a static scale), where the one-launch reduction did not check out on the device, or where the
    launch failed: the caller then runs the two Linears and SiLU x up."""
    m = x.reshape(-1, x.shape[-1]).shape[0]
    if shared_input_problem((gate, up), m) is not None or gate.out_features != up.out_features:
        return None
    gemv = tw.select_path(m) == "gemv"
    if gemv and not (tw.ptx_verified(x.device) and glu_verified(x.device)):
        return None
    if not gemv and (quant is None or quant[0] is None):
        return None
    x2, xq, sx, out_dtype, (lg, lu) = _inputs((gate, up), x, codes)
    k, gs = gate.in_features, gate.group_size
    if gemv:
        counters = tw._dp4a_counters(gate, x2.device, key="triton_dp4a_glu_counters")
        if counters is None:  # (the one-launch reduction is off or did not check out on the device)
            return None
        got = tw._guarded("gemv_dp4a_glu", lambda: (w4a8_gemv_dp4a_glu(
            xq, sx, lg, lu, k, gs, counters, qmax=gate.act_qmax(), out_dtype=out_dtype), None),
            lambda: None, instead="gate/up in one launch, then SiLU x up")
    else:
        got = tw._guarded("grouped_glu", lambda: w4a8_matmul_glu(
            xq, sx, lg, lu, k, gs, out_dtype=out_dtype, quant=quant, asm=tw._asm(x2.device)), lambda: None,
            instead="gate/up in one launch, then SiLU x up")
        got = None if got is None else (got[0], got[1:])
    if got is None:
        return None
    act, act_codes = got
    return act.to(x.dtype).reshape(*x.shape[:-1], gate.out_features), act_codes

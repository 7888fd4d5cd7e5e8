"""Linears that share one input (q/k/v, gate/up), run by the runtime as one operation.

:func:`linear_group` picks the fastest exact way for the modules at hand:

* ``W4A8Group``: 4-bit QuantLinears with the same activation quantizer: the input is quantized once and every
  product runs in one native call (:class:`fptq.kernels.native.W4A8Gemm`);
* ``W4A16Group``: 4-bit QuantLinears with float activations: the native float kernel for a few tokens, a
  bfloat16 matrix product on weights dequantized into a temporary for many;
* ``Int8Group``: 8-bit per-channel QuantLinears with int8 activations (SmoothQuant W8A8): ``torch._int_mm``
  (oneDNN) on the int8 codes, scales applied after;
* ``FloatGroup``: ``nn.Linear`` (the float model), ``F.linear`` in the weights' dtype;
* ``ModuleGroup``: anything else: each module's own ``forward``.

Every group writes into caller-provided outputs (``[M, N_i]``, float32, unit column stride, e.g. column slices
of one buffer) or adds into them (``accumulate``: the residual stream).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import native
from ..kernels.cpu_native import W4A16_GEMV_MAX_TOKENS, NativeWeights, native_supports, prepare
from ..nn import QuantLinear

__all__ = ["linear_group", "W4A8Group", "W4A16Group", "Int8Group", "FloatGroup", "ModuleGroup"]


def _store(out: torch.Tensor, y: torch.Tensor, accumulate: bool) -> None:
    if accumulate:
        out.add_(y)
    else:
        out.copy_(y)


class ModuleGroup:
    kind = "module"

    def __init__(self, modules: list[nn.Module]):
        self.modules = modules
        self.out_features = [m.out_features for m in modules]

    def quant_out(self, m: int, buffers: tuple | None = None) -> "native.QuantOut | None":
        """The quantizer a fused stage (norm, SiLU-and-multiply) can run to write this group's quantized input
        for ``m`` tokens (into ``buffers`` when given); ``None``: the group takes float input (call the group
        itself)."""
        return None

    def quant_shape(self) -> tuple[int, int] | None:
        """``(Kp, groups)`` of the quantized input this group takes from a fused stage, or ``None``."""
        return None

    def __call__(self, x: torch.Tensor, outs: list[torch.Tensor], accumulate: bool = False) -> None:
        for m, out in zip(self.modules, outs):
            _store(out, m(x).float(), accumulate)


class FloatGroup(ModuleGroup):
    kind = "float"

    def __init__(self, modules: list[nn.Linear]):
        super().__init__(modules)
        self.dtype = modules[0].weight.dtype

    def __call__(self, x, outs, accumulate=False):
        xd = x.to(self.dtype)
        for m, out in zip(self.modules, outs):
            _store(out, F.linear(xd, m.weight, m.bias), accumulate)


class W4A8Group(ModuleGroup):
    kind = "w4a8"

    def __init__(self, modules: list[QuantLinear], weights: list[NativeWeights]):
        super().__init__(modules)
        self.w = weights[0]
        self.gemm = native.W4A8Gemm([w.spec() for w in weights], self.w.group_size)

        w = self.w
        # the input quantizer's arguments (kp, mode, static scale, qmax, group size, groups), as every call takes them
        self._qargs = (w.kp, w.act_mode, w.act_scale, w.qmax, w.group_size, w.groups)
        self._quant = native.QuantOut.params(*self._qargs)
        self._own_buffers: dict[int, tuple] = {}

    def __call__(self, x, outs, accumulate=False):
        xq, xs, sx = native.quantize(x, *self._qargs)
        self.gemm(xq, xs, sx, outs, accumulate=accumulate)

    def quant_out(self, m, buffers: tuple | None = None):
        """This group's input quantizer writing into ``buffers`` (:meth:`native.QuantOut.buffers` for ``m``
        tokens, e.g. a workspace shared by all layers), or into buffers of its own."""
        if buffers is None:
            buffers = self._own_buffers.get(m)
            if buffers is None:
                self._own_buffers = {m: native.QuantOut.buffers(m, self.w.kp, self.w.groups)}
                buffers = self._own_buffers[m]
        return self._quant.attach(*buffers)

    def quant_shape(self):
        return self.w.kp, self.w.groups

    def new_quant_out(self, buffers: tuple) -> "native.QuantOut":
        """A quantizer of its own for this group's input, writing into ``buffers`` (one that stays bound, unlike
        :meth:`quant_out`'s, which is re-pointed at each call)."""
        return native.QuantOut.params(*self._qargs).attach(*buffers)

    def run_quantized(self, q: "native.QuantOut", outs, accumulate=False) -> None:
        """The products for the input a fused stage quantized into ``q`` (from :meth:`quant_out`)."""
        xq, xs, sx = q.tensors
        self.gemm(xq, xs, sx, outs, accumulate=accumulate)

    @property
    def has_glu(self) -> bool:
        """Whether :meth:`run_glu` runs here (gate and up of one width, an AVX-512 build)."""
        return self.gemm.has_glu

    def run_glu(self, q: "native.QuantOut", outs, act: torch.Tensor | None,
                quant: "native.QuantOut | None" = None) -> torch.Tensor | None:
        """``act = silu(gate) * up`` for the input quantized into ``q``, with the bits of :meth:`run_quantized`
        into ``outs`` followed by :func:`fptq.kernels.native.silu_mul`; with a static ``quant``, its codes into
        ``quant`` instead (:meth:`W4A8Gemm.glu`)."""
        xq, xs, sx = q.tensors
        return self.gemm.glu(xq, xs, sx, outs, act, quant=quant)

    def quantize_into(self, x: torch.Tensor, q: "native.QuantOut") -> None:
        """Quantize float32 ``x`` for this group into ``q``'s buffers (from :meth:`quant_out`)."""
        fn, args = native.quantize_call(x, *self._qargs, q.tensors, torch.get_num_threads())
        fn(*args)


class W4A16Group(ModuleGroup):
    kind = "w4a16"

    def __init__(self, modules: list[QuantLinear], weights: list[NativeWeights]):
        super().__init__(modules)
        self.weights = weights
        self.gemm = native.W4A16Gemm([w.spec() for w in weights], weights[0].group_size)

    def __call__(self, x, outs, accumulate=False):
        w0 = self.weights[0]
        if x.shape[0] <= W4A16_GEMV_MAX_TOKENS:
            xp = F.pad(x.float(), (0, w0.kp - w0.k))
            self.gemm(xp, outs, accumulate=accumulate)
            return
        xb = x.to(torch.bfloat16)
        for w, out in zip(self.weights, outs):
            wb = native.dequantize_w4(w.qweight, w.ws_t, w.n, w.k, w.group_size)
            y = F.linear(xb, wb)
            if w.bias is not None:
                y = y + w.bias
            _store(out, y, accumulate)


class Int8Group(ModuleGroup):
    kind = "int8"

    def __init__(self, modules: list[QuantLinear]):
        super().__init__(modules)
        m0 = modules[0]
        self.mode, self.qmax, self.k = m0.act_mode, m0.act_qmax(), m0.in_features
        self.static = float(m0.act_scale) if m0.act_mode == "static_tensor" else None
        self.w = [m.qweight for m in modules]  # int8 [N, K]: _int_mm takes the transposed view
        self.sw = [m.w_scales.float()[:, 0].contiguous() for m in modules]
        self.bias = [None if m.bias is None else m.bias.float() for m in modules]

    def __call__(self, x, outs, accumulate=False):
        if native.available():
            xq, _, sx = native.quantize(x, self.k, self.mode, self.static, self.qmax, self.k, 1, with_sums=False)
        else:
            from ..kernels.cpu import quantize_activations

            xq, sx = quantize_activations(self.modules[0], x)
        sx = sx.float().reshape(-1, 1)
        for w, sw, b, out in zip(self.w, self.sw, self.bias, outs):
            y = torch._int_mm(xq, w.t()).float().mul_(sx).mul_(sw)
            if b is not None:
                y.add_(b)
            _store(out, y, accumulate)


def _same_quantizer(mods: list[QuantLinear]) -> bool:
    m0 = mods[0]
    key = lambda m: (m.in_features, m.wbits, m.abits, m.group_size, m.act_mode,  # noqa: E731
                     float(m.act_scale) if m.act_mode == "static_tensor" else None)
    return all(key(m) == key(m0) for m in mods)


def linear_group(modules: list[nn.Module]) -> ModuleGroup:
    """The fastest exact group for Linears ``modules`` that share one input (see the module docstring)."""
    if all(type(m) is nn.Linear for m in modules):
        return FloatGroup(modules)
    if not all(isinstance(m, QuantLinear) for m in modules) or not _same_quantizer(modules):
        return ModuleGroup(modules)
    m0 = modules[0]
    if m0.wbits == 4 and all(native_supports(m) for m in modules):
        weights = [prepare(m)[0] for m in modules]  # shared with the module's own native forward
        return W4A16Group(modules, weights) if m0.act_mode == "none" else W4A8Group(modules, weights)
    if m0.wbits == 8 and m0.act_mode != "none" and m0.w_scales.shape[1] == 1:
        return Int8Group(modules)
    return ModuleGroup(modules)

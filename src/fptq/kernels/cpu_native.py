"""The ``native`` backend of :class:`~fptq.nn.QuantLinear`: fptq's C kernels (:mod:`.native`; AVX-512 VNNI or AVX2).

* 4-bit weights with int8 activations (W4A8, static or dynamic): exact group-wise integer kernel reading the
  packed 4-bit codes (repacked once, in place, into the kernel's layout: no int8 copy is kept).
* 4-bit weights with float activations (W4A16): a float kernel on the same packed codes for a few tokens; for
  many tokens the weights are dequantized to bfloat16 into a temporary and multiplied by oneDNN.
* anything else (8-bit weights, group sizes that are not a multiple of 8): the exact ``int8_grouped`` path.

:func:`prepare` builds (and caches on the module) what the kernels need: the float16 group scales transposed to
``[G, Np]`` and the kernel's call object.
"""
from __future__ import annotations

import torch

from . import native
from .cpu import float_forward, int8_grouped_forward

__all__ = ["native_forward", "native_supports", "prepare", "NativeWeights"]

# Above this many tokens W4A16 dequantizes to bfloat16 and uses a matrix product instead of the float kernel.
W4A16_GEMV_MAX_TOKENS = 8


def native_supports(module) -> bool:
    """Whether the native kernels run this layer (4-bit weights in groups that are a multiple of 8)."""
    gs = module.group_size
    return module.wbits == 4 and (gs <= 0 or gs % 8 == 0) and native.available()


class NativeWeights:
    """What the native kernels read for one QuantLinear (its codes repacked in place)."""

    def __init__(self, module):
        module.use_vnni_layout()
        n, k = module.out_features, module.in_features
        self.n, self.k = n, k
        self.kp = module.qweight.shape[1] * 8
        np_ = module.qweight.shape[0] * 16
        self.group_size = self.kp if module.group_size <= 0 else module.group_size
        g = module.w_scales.shape[1]
        ws = torch.zeros(g, np_, dtype=torch.float16)
        ws[:, :n] = module.w_scales.t()
        self.ws_t = ws
        self.groups = g
        self.qweight = module.qweight
        self.bias = None if module.bias is None else module.bias.detach().float().contiguous()
        self.act_mode = module.act_mode
        self.qmax = module.act_qmax() if module.act_mode != "none" else 0
        self.act_scale = float(module.act_scale) if module.act_mode == "static_tensor" else None

    def spec(self) -> tuple:
        return (self.qweight, self.ws_t, self.bias, self.n)

    def same_input_as(self, other: "NativeWeights") -> bool:
        """Whether one quantized input serves both layers (same K, groups and activation quantizer)."""
        return (self.kp, self.groups, self.group_size, self.act_mode, self.qmax, self.act_scale) == (
            other.kp, other.groups, other.group_size, other.act_mode, other.qmax, other.act_scale)


def prepare(module) -> tuple[NativeWeights, object]:
    """``(weights, gemm)`` for ``module``, built once and cached on it."""
    hit = module._cache.get("native")
    if hit is not None and hit[0].qweight is module.qweight:
        return hit
    w = NativeWeights(module)
    cls = native.W4A16Gemm if module.act_mode == "none" else native.W4A8Gemm
    hit = (w, cls([w.spec()], w.group_size))
    module._cache["native"] = hit
    return hit


def quantize_input(w: NativeWeights, x2d: torch.Tensor):
    return native.quantize(x2d, w.kp, w.act_mode, w.act_scale, w.qmax, w.group_size, w.groups)


def w4a16_matmul(w: NativeWeights, gemm, x2d: torch.Tensor, out: torch.Tensor, accumulate: bool = False):
    """``out (+)= x2d @ W^T + bias`` for float activations ``x2d`` ``[M, K]``."""
    m = x2d.shape[0]
    if m <= W4A16_GEMV_MAX_TOKENS:
        xp = torch.nn.functional.pad(x2d.float(), (0, w.kp - w.k))
        gemm(xp, [out], accumulate=accumulate)
        return out
    wb = native.dequantize_w4(w.qweight, w.ws_t, w.n, w.k, w.group_size)
    y = torch.nn.functional.linear(x2d.to(torch.bfloat16), wb)
    if w.bias is not None:
        y = y + w.bias
    if accumulate:
        out.add_(y)
    else:
        out.copy_(y)
    return out


def native_forward(module, x: torch.Tensor) -> torch.Tensor:
    """``QuantLinear.forward`` with the native kernels (see the module docstring)."""
    if not native_supports(module):
        return float_forward(module, x) if module.act_mode == "none" else int8_grouped_forward(module, x)
    if x.device.type != "cpu":
        raise ValueError(f"the native backend needs CPU tensors, got a tensor on {x.device}")
    if x.shape[-1] != module.in_features:
        raise ValueError(f"expected input [..., {module.in_features}], got {tuple(x.shape)}")
    w, gemm = prepare(module)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, module.in_features)
    out_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
    out = torch.empty(x2.shape[0], module.out_features, dtype=out_dtype)
    if module.act_mode == "none":
        w4a16_matmul(w, gemm, x2, out)
    else:
        xq, xs, sx = quantize_input(w, x2)
        gemm(xq, xs, sx, [out])
    return out.to(x.dtype).reshape(*lead, module.out_features)

"""The quantized Linear used both during calibration (reference path, i.e.
simulated quantization) and at inference (integer kernels).

State (all stored in the checkpoint):

* ``qweight``: the weight codes; uint8 ``[N, ceil(K/2)]`` packed two per byte
  for 4-bit weights (layout in :mod:`fptq.quant.pack`), int8 ``[N, K]`` for
  other widths;
* ``w_scales``: float16 ``[N, G]`` group scales (``G = ceil(K / group_size)``,
  ``group_size <= 0`` means one group per row, i.e. per-channel);
* ``act_scale``: float32 scalar, the static per-tensor activation scale
  (unused for dynamic or float activations);
* ``bias``: optional, in the model's float dtype.

In memory, 4-bit ``qweight`` is in one of two layouts (``weight_layout``): ``rowpair``, the checkpoint's
(:func:`fptq.quant.pack_int4`), or ``vnni``, the blocked layout of the native CPU kernel
(:func:`fptq.quant.pack_int4_vnni`, same size), into which the ``native`` backend repacks the codes once, in
place, so that no second copy of the weights is kept. ``state_dict()`` always gives the checkpoint layout.

``act_mode`` is one of ``static_tensor`` (also used for LAE layers: the
equalization is already folded into the weights and the producer of ``x``),
``dynamic_token`` or ``none`` (float activations, e.g. W4A16).
"""
from __future__ import annotations

import torch
from torch import nn

from ..quant import (
    act_qmax,
    dequantize_weight,
    pack_int4,
    pack_int4_vnni,
    quantize_per_token,
    quantize_static,
    unpack_int4,
    unpack_int4_vnni,
)

ACT_MODES = ("static_tensor", "dynamic_token", "none")

__all__ = ["QuantLinear", "ACT_MODES", "set_act_mode"]


class QuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        wbits: int = 4,
        group_size: int = 128,
        abits: int = 8,
        act_mode: str = "static_tensor",
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if act_mode not in ACT_MODES:
            raise ValueError(f"act_mode must be one of {ACT_MODES}, got {act_mode!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.wbits = wbits
        self.abits = abits
        self.group_size = group_size
        self.act_mode = act_mode
        self.backend = "reference"
        self.weight_layout = "rowpair"
        g = 1 if group_size <= 0 else -(-in_features // group_size)
        if wbits == 4:
            qw = torch.zeros(out_features, (in_features + 1) // 2, dtype=torch.uint8, device=device)
        else:
            qw = torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        self.register_buffer("qweight", qw)
        self.register_buffer("w_scales", torch.ones(out_features, g, dtype=torch.float16, device=device))
        self.register_buffer("act_scale", torch.ones((), dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        self._cache: dict[str, object] = {}

    # ------------------------------------------------------------------ build
    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        *,
        wbits: int,
        group_size: int,
        abits: int,
        act_mode: str,
        act_scale: float | None = None,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> "QuantLinear":
        n, k = codes.shape
        m = cls(
            k, n, wbits=wbits, group_size=group_size, abits=abits, act_mode=act_mode,
            bias=bias is not None, dtype=dtype, device=codes.device,
        )
        m.qweight = pack_int4(codes) if wbits == 4 else codes.to(torch.int8).contiguous()
        m.w_scales = scales.to(torch.float16).contiguous()
        if act_scale is not None:
            m.act_scale = torch.tensor(float(act_scale), dtype=torch.float32, device=codes.device)
        if bias is not None:
            m.bias = bias.detach().to(dtype).clone()
        return m

    # -------------------------------------------------------------- accessors
    def _rowpair_shape(self) -> tuple[int, int]:
        return (self.out_features, (self.in_features + 1) // 2)

    def codes(self) -> torch.Tensor:
        """Weight codes as int8 ``[N, K]``."""
        if self.wbits == 4:
            if self.weight_layout == "vnni":
                return unpack_int4_vnni(self.qweight, self.out_features, self.in_features)
            return unpack_int4(self.qweight, self.in_features)
        return self.qweight

    def use_vnni_layout(self) -> None:
        """Repack 4-bit codes, in place, in the native CPU kernel's layout (no-op if already done)."""
        if self.wbits != 4 or self.weight_layout == "vnni":
            return
        packed = pack_int4_vnni(self.codes())
        self.qweight = packed
        self.weight_layout = "vnni"
        self._cache = {}

    def use_rowpair_layout(self) -> None:
        """Repack 4-bit codes, in place, back in the checkpoint's layout (no-op if already there)."""
        if self.wbits != 4 or self.weight_layout != "vnni":
            return
        self.qweight = pack_int4(self.codes())
        self.weight_layout = "rowpair"
        self._cache = {}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight_layout == "vnni":  # checkpoints always hold the rowpair layout
            destination[prefix + "qweight"] = pack_int4(self.codes())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.weight_layout == "vnni":  # the incoming tensor is in the checkpoint's layout
            self.qweight = torch.empty(self._rowpair_shape(), dtype=torch.uint8, device=self.qweight.device)
            self.weight_layout = "rowpair"
            self._cache = {}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def dequantized_weight(self) -> torch.Tensor:
        """Float32 ``[N, K]`` weight that the reference path multiplies by."""
        w = self._cache.get("w_ref")
        # a cache filled under torch.inference_mode() cannot be used where autograd records
        stale = w is not None and w.is_inference() and not torch.is_inference_mode_enabled()
        if w is None or stale or w.device != self.qweight.device:
            w = dequantize_weight(self.codes(), self.w_scales, self.group_size)
            self._cache["w_ref"] = w
        return w

    def clear_cache(self) -> None:
        self._cache.clear()

    def _apply(self, fn, recurse=True):  # device/dtype moves invalidate caches
        self._cache = {}
        return super()._apply(fn, recurse)

    # ---------------------------------------------------------------- compute
    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 codes of ``x`` (rows = tokens) and their scale(s) per ``act_mode``."""
        if self.act_mode == "static_tensor":
            return quantize_static(x, self.act_scale, self.abits), self.act_scale
        if self.act_mode == "dynamic_token":
            return quantize_per_token(x, self.abits)
        raise ValueError("quantize_input called on a layer with float activations")

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Simulated quantization in float32: the numerics every kernel is checked against."""
        if self.act_mode == "none":
            xq = x.float()
        else:
            # same values as quantize_input(x) codes times their scale, computed in place in float32
            qmax = act_qmax(self.abits)
            if self.act_mode == "static_tensor":
                s = self.act_scale
            else:
                s = (x.float().abs().amax(dim=-1, keepdim=True) / qmax).clamp_min(1e-8)
            xq = x.float() / s
            xq.round_().clamp_(-qmax, qmax).mul_(s)
        y = xq @ self.dequantized_weight().t()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "reference":
            return self.reference_forward(x)
        from ..kernels import run_backend

        return run_backend(self.backend, self, x)

    def set_backend(self, backend: str) -> "QuantLinear":
        self.backend = backend
        self._cache = {}
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, w{self.wbits}"
            f"{'' if self.act_mode == 'none' else f'a{self.abits}'} group_size={self.group_size}, "
            f"act_mode={self.act_mode}, backend={self.backend}"
        )

    def act_qmax(self) -> int:
        return act_qmax(self.abits)


def set_act_mode(model: nn.Module, act_mode: str) -> int:
    """Give every :class:`QuantLinear` of ``model`` the activation mode ``act_mode`` (e.g. ``dynamic_token``
    for all, as runtimes without static scales run a checkpoint; ``none`` for its weights alone). Returns
    how many layers were set."""
    if act_mode not in ACT_MODES:
        raise ValueError(f"act_mode must be one of {ACT_MODES}, got {act_mode!r}")
    n = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.act_mode = act_mode
            m.clear_cache()
            n += 1
    return n

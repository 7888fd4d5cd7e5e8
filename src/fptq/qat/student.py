"""The QAT student: fptq's quantized model with trainable latent float weights.

A PTQ run of the base method (``fptq`` or ``dynamic-w4a8``) decides the plan: each Linear's activation
strategy, its static scale, and the equalization folded into norms and producers. The student keeps that
plan and replaces each :class:`~fptq.nn.QuantLinear` by a :class:`QATLinear` holding the *float* weight the
PTQ run quantized (equalization already folded in), so training starts exactly at the PTQ result. After
training, :func:`to_quant_linears` turns the student back into QuantLinears with the same numerics: an
ordinary fptq model, saved with :func:`fptq.save` and loaded with :func:`fptq.load`.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QuantConfig
from ..errors import FptqError
from ..models.adapters import get_adapter
from ..nn import QuantLinear
from ..pipeline import quantize
from ..plan import Plan
from ..quant import dequantize_weight, quantize_weight, weight_scales
from ..quant.ste import fake_quantize_per_token_ste, fake_quantize_static_ste, fake_quantize_weight_ste

log = logging.getLogger(__name__)

__all__ = ["QATLinear", "quantize_keeping_latents", "build_student", "to_quant_linears", "trainable_parameters"]


class QATLinear(nn.Module):
    """A Linear under simulated W/A quantization with straight-through gradients.

    Forward: ``F.linear(fq_act(x), fq_weight(weight), bias)`` where ``fq_weight`` is fptq's round-to-nearest
    group quantizer (scales from the current weight) and ``fq_act`` the layer's activation quantizer
    (``dynamic_token``, ``static_tensor`` with ``act_scale``, or ``none``); see :mod:`fptq.quant.ste`.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, wbits: int, group_size: int, abits: int,
                 act_mode: str, act_scale: float | None = None, learn_act_scale: bool = False) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.wbits, self.group_size, self.abits, self.act_mode = wbits, group_size, abits, act_mode
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.bias = nn.Parameter(bias.detach().float().clone()) if bias is not None else None
        self.bias_dtype = bias.dtype if bias is not None else None
        if act_mode == "static_tensor":
            if act_scale is None or not act_scale > 0:
                raise FptqError(f"a static activation quantizer needs a positive scale, got {act_scale}")
            s = torch.tensor(float(act_scale), dtype=torch.float32, device=weight.device)
            if learn_act_scale:
                self.act_scale = nn.Parameter(s)
            else:
                self.register_buffer("act_scale", s)
        else:
            self.act_scale = None

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantized ``x`` in float32 (the reference path's numerics for any model dtype)."""
        x = x.float()
        if self.act_mode == "dynamic_token":
            return fake_quantize_per_token_ste(x, self.abits)
        if self.act_mode == "static_tensor":
            return fake_quantize_static_ste(x, self.act_scale.clamp_min(1e-8), self.abits)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = fake_quantize_weight_ste(self.weight, self.wbits, self.group_size)
        y = F.linear(self.quantize_input(x), w, self.bias)
        return y if torch.is_autocast_enabled(x.device.type) else y.to(x.dtype)

    def codes_and_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer codes and fp16 group scales of the current weight (what the forward multiplies by)."""
        w = self.weight.detach().float()
        scales = weight_scales(w, self.wbits, self.group_size)
        return quantize_weight(w, scales, self.wbits, self.group_size), scales

    def to_quant_linear(self, dtype: torch.dtype) -> QuantLinear:
        codes, scales = self.codes_and_scales()
        return QuantLinear.from_codes(
            codes, scales, wbits=self.wbits, group_size=self.group_size, abits=self.abits, act_mode=self.act_mode,
            act_scale=float(self.act_scale.detach()) if self.act_scale is not None else None,
            bias=None if self.bias is None else self.bias.detach().to(self.bias_dtype), dtype=dtype)

    def extra_repr(self) -> str:
        learn = isinstance(self.act_scale, nn.Parameter)
        return (f"in_features={self.in_features}, out_features={self.out_features}, w{self.wbits} "
                f"group_size={self.group_size}, act_mode={self.act_mode}{' (learned scale)' if learn else ''}")


def _check_qat_config(config: QuantConfig) -> None:
    if not config.quantize_weights:
        raise FptqError("quantization-aware training needs quantized weights (--wbits below 16)")
    if config.gptq or config.weight_clip_search:
        raise FptqError("quantization-aware training starts from round-to-nearest weights with absmax scales; "
                        "drop --gptq and --weight-clip for the QAT methods")


def quantize_keeping_latents(model: nn.Module, config: QuantConfig, calibration: torch.Tensor,
                             **quantize_kwargs) -> tuple[Plan, dict[str, nn.Linear]]:
    """Run the PTQ pipeline on ``model`` (in place, as :func:`fptq.quantize` does) and return its plan with
    the float Linears it replaced, by name: they hold the weights the pipeline quantized (equalization
    scales folded in, since the pipeline folds in place before quantizing). Checked: round-to-nearest of
    each latent weight gives the codes of its QuantLinear."""
    _check_qat_config(config)
    adapter = get_adapter(model)
    latents = {f"{adapter.layers_path}.{i}.{c}": lin for i, layer in enumerate(adapter.layers(model))
               for c, lin in adapter.quantizable_linears(layer).items()}
    plan = quantize(model, config, calibration, **quantize_kwargs)
    for name, lin in latents.items():
        q = model.get_submodule(name)
        if not isinstance(q, QuantLinear):
            raise FptqError(f"internal error: {name} was not quantized by the PTQ pass")
        w = lin.weight.detach().float()
        codes = quantize_weight(w, weight_scales(w, q.wbits, q.group_size), q.wbits, q.group_size)
        if not torch.equal(codes, q.codes()):
            raise FptqError(f"internal error: the float weight kept for {name} does not reproduce its quantized "
                            "codes (the pipeline no longer folds equalization into the Linears in place)")
    return plan, latents


def build_student(model: nn.Module, plan: Plan, latents: dict[str, nn.Linear],
                  learn_act_scales: bool = False) -> dict[str, QATLinear]:
    """Replace every QuantLinear named in ``plan`` by a :class:`QATLinear` on its latent float weight (in
    place); returns the QATLinears by name."""
    out = {}
    for name, lp in plan.layers.items():
        q = model.get_submodule(name)
        if not isinstance(q, QuantLinear):
            continue  # float layers stay float
        lin = latents[name]
        m = QATLinear(lin.weight, lin.bias, wbits=q.wbits, group_size=q.group_size, abits=q.abits,
                      act_mode=q.act_mode, act_scale=float(q.act_scale) if q.act_mode == "static_tensor" else None,
                      learn_act_scale=learn_act_scales).to(q.qweight.device)
        _set(model, name, m)
        out[name] = m
    return out


def to_quant_linears(model: nn.Module, plan: Plan, dtype: torch.dtype | None = None) -> None:
    """Replace every :class:`QATLinear` by the QuantLinear of its current weight (in place) and record the
    trained activation scales and weight errors in ``plan``."""
    for name, m in list(model.named_modules()):
        if not isinstance(m, QATLinear):
            continue
        q = m.to_quant_linear(dtype or m.weight.dtype)
        _set(model, name, q)
        lp = plan.layers.get(name)
        if lp is None:
            continue
        w = m.weight.detach().float()
        deq = dequantize_weight(q.codes(), q.w_scales, q.group_size)
        lp.weight_error = float((deq - w).norm() / w.norm().clamp_min(1e-12))
        lp.weight_method = "rtn-qat"
        if isinstance(m.act_scale, nn.Parameter):  # trained; a kept scale stays as the plan recorded it
            lp.act_scale = float(m.act_scale.detach())


def trainable_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(weights, activation scales)`` that distillation trains: every parameter but the input embedding and
    the output head (frozen here; fptq keeps them in float); the rest of the model is set not to need
    gradients."""
    frozen = set()
    for mod in (model.get_input_embeddings(), model.get_output_embeddings()):
        if mod is not None:
            frozen.update(id(p) for p in mod.parameters())
    scales = [m.act_scale for m in model.modules()
              if isinstance(m, QATLinear) and isinstance(m.act_scale, nn.Parameter)]
    scale_ids = {id(p) for p in scales}
    weights = []
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
        if id(p) not in frozen and id(p) not in scale_ids:
            weights.append(p)
    return weights, scales


def _set(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)

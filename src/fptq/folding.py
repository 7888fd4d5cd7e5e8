"""Equalization of one group of Linears that share an input: whether it is equalized, its scales
(LAE or SmoothQuant), and folding them exactly into the group's producer and consumers."""
from __future__ import annotations

import logging

import torch
from torch import nn

from .config import ActPolicy, Equalization, QuantConfig, Strategy
from .errors import FptqError
from .models.adapters import Adapter, FoldGroup
from .quant.reorder import channel_order, permute_linear_inputs, permute_linear_outputs
from .quant import (
    expand_kv_scales,
    fold_into_fused_qkv_v,
    fold_into_linear_outputs,
    fold_into_norm,
    lae_scales,
    norm_fold_is_exact,
    reduce_to_kv_channels,
    scale_linear_inputs,
    smoothquant_scales,
)

log = logging.getLogger(__name__)

__all__ = ["wants_equalization", "wants_reorder", "equalization_scales", "fold_group", "reorder_group"]


def wants_equalization(config: QuantConfig, strategy: Strategy, group: FoldGroup) -> bool:
    """Whether the group's input is equalized. FPTQ (``lae_scope="band"``): only in the LAE band.
    ``lae_scope="all"``: every static layer too, and dynamic layers fed by a norm (a Linear-fed dynamic
    layer has max|x| of hundreds or more: its scales would spoil the weight groups of the consumers)."""
    if config.equalization == Equalization.NONE:
        return False
    if config.act_policy == ActPolicy.THRESHOLDS:
        if config.lae_scope == "all":
            return strategy in (Strategy.STATIC, Strategy.LAE_STATIC) or (
                strategy == Strategy.DYNAMIC and group.kind == "norm")
        return strategy == Strategy.LAE_STATIC
    return config.act_policy in (ActPolicy.STATIC, ActPolicy.DYNAMIC)


def wants_reorder(config: QuantConfig, group: FoldGroup) -> bool:
    """Whether the channels of the group's input are sorted (``config.channel_order``; only where the
    adapter says a permutation is exact, :attr:`FoldGroup.reorderable`)."""
    return config.channel_order != "none" and group.reorderable


def equalization_scales(
    config: QuantConfig, group: FoldGroup, layer: nn.Module, act_absmax: torch.Tensor, heads: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales per consumer input channel, scales per producer output channel)."""
    h, kv = heads
    if config.equalization == Equalization.LAE:
        if group.kv_grouped:
            s_kv = lae_scales(reduce_to_kv_channels(act_absmax, h, kv))
            return expand_kv_scales(s_kv, h, kv), s_kv
        s = lae_scales(act_absmax)
        return s, s
    # SmoothQuant
    w_absmax = torch.stack(
        [layer.get_submodule(c).weight.detach().float().abs().amax(dim=0) for c in group.consumers]
    ).amax(dim=0).to(act_absmax.device)
    if group.kv_grouped:
        s_kv = smoothquant_scales(
            reduce_to_kv_channels(act_absmax, h, kv), reduce_to_kv_channels(w_absmax, h, kv), config.smoothquant_alpha
        )
        return expand_kv_scales(s_kv, h, kv), s_kv
    s = smoothquant_scales(act_absmax, w_absmax, config.smoothquant_alpha)
    return s, s


def warn_offset_rounding(before: torch.Tensor, after: torch.Tensor, s: torch.Tensor, offset: float,
                          name: str) -> None:
    """A norm that scales by ``offset + weight`` stores ``(offset + w) / s - offset``: in 16-bit floats
    that loses the small gains of strongly scaled channels. Warn when a gain moves by over 1%."""
    want = (before + offset) / s
    err = float(((after + offset - want).abs() / want.abs().clamp_min(1e-12)).max())
    if err > 0.01:
        log.warning("%s: storing the folded weight (gain offset + weight, offset %g) in 16 bits changes the gain of "
                    "some channels by up to %.1f%%; quantize a float32 copy of the model for exact folds",
                    name, offset, 100 * err)


def fold_group(adapter: Adapter, group: FoldGroup, layer: nn.Module, layer_prefix: str, s_in: torch.Tensor,
          s_out: torch.Tensor, heads: tuple[int, int]) -> None:
    """Fold ``s_out`` into the group's producer and ``s_in`` into its consumers (exact, in place)."""
    producer = layer.get_submodule(group.producer)
    s_out = s_out.to(producer.weight.device)
    if group.kind == "norm":
        if not norm_fold_is_exact(producer, s_out, adapter.norm_weight_offset):
            raise FptqError(
                f"{layer_prefix}.{group.producer} ({type(producer).__name__}) does not scale its output by "
                f"{'1 + weight' if adapter.norm_weight_offset else 'its weight'} as the {adapter.name} table assumes; "
                "fptq cannot fold equalization scales into it (use a method without equalization, e.g. "
                "dynamic-w4a8)")
        off = adapter.norm_weight_offset
        before = producer.weight.detach().float().clone() if off and producer.weight.dtype != torch.float32 else None
        fold_into_norm(producer, s_out, off)
        if before is not None:
            warn_offset_rounding(before, producer.weight.detach().float(), s_out.float(), off,
                                  f"{layer_prefix}.{group.producer}")
    elif group.kind == "linear":
        fold_into_linear_outputs(producer, s_out)
    elif group.kind == "fused_qkv_v":
        fold_into_fused_qkv_v(producer, s_out, heads[0])
    else:  # pragma: no cover - unfoldable groups never get here
        raise FptqError(f"internal error: cannot fold into a group of kind {group.kind!r}")
    for c in group.consumers:
        cm = layer.get_submodule(c)
        scale_linear_inputs(cm, s_in.to(cm.weight.device))


def reorder_group(group: FoldGroup, layer: nn.Module) -> torch.Tensor:
    """Sort the channels of the group's input by the size of its consumers' weight columns
    (:func:`~fptq.quant.reorder.channel_order`), permuting the producer's and partners' output rows and the
    consumers' input columns alike (exact). Returns the permutation (new channel ``j`` is old ``perm[j]``)."""
    if not group.reorderable:
        raise FptqError(f"internal error: the channels feeding {group.consumers} cannot be reordered")
    consumers = [layer.get_submodule(c) for c in group.consumers]
    perm = channel_order([c.weight.detach() for c in consumers])
    for name in (group.producer, *group.partners):
        permute_linear_outputs(layer.get_submodule(name), perm)
    for c in consumers:
        permute_linear_inputs(c, perm)
    return perm

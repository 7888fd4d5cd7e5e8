"""Sorting the channels of the residual stream (``QuantConfig.residual_order``).

LAE multiplies the weight columns of a norm's outlier channels by their scale (10x and more on
Qwen2.5); in groups of 128 along the input, every weight group that holds such a column loses the
resolution of its other columns. The inputs of q/k/v and gate/up are the residual stream's channels,
normalized: permuting the whole stream (the embedding's columns, every norm's weight, the input
columns of the Linears that read it, the output rows of those that write it, ``lm_head``'s columns)
leaves the float model's function unchanged (RMSNorm and LayerNorm commute with a permutation of their
channels) and costs nothing at run time, and sorting the channels by size puts the outlier channels of
every layer into as few weight groups as possible. On Qwen2.5-Coder-0.5B that lowered the KL divergence
of the ``fptq`` W4A8 model by a fifth (bench/results/qwen_residual_order.md).

The order comes from a float pass over a few calibration windows, layer by layer: each channel's
largest ``max|x|`` at the output of any norm that feeds Linears.
"""
from __future__ import annotations

import torch
from torch import nn

from .calibrate import capture_layer0_inputs, run_layer
from .errors import FptqError
from .models import Adapter
from .quant.reorder import permute_linear_inputs, permute_linear_outputs

__all__ = ["RESIDUAL_ORDER_WINDOWS", "residual_channel_maxima", "residual_order", "residual_problem",
           "permute_residual"]

RESIDUAL_ORDER_WINDOWS = 16  # calibration windows the order is measured on (evenly strided)


def _hidden(model: nn.Module) -> int:
    return int(model.config.hidden_size)


def residual_problem(model: nn.Module, adapter: Adapter) -> str | None:
    """Why the residual stream of ``model`` cannot be permuted exactly by ``adapter``'s table, or None: a
    parameter with a dimension of the hidden size outside the tensors the table names (it might index
    the stream's channels and would be left behind)."""
    spec = adapter.residual
    if spec is None:
        return f"fptq has no residual-stream table for {adapter.name}"
    h = _hidden(model)
    layers = adapter.layers_path + "."
    known_layer = (*spec.norms, *spec.readers, *spec.writers)
    known_model = (spec.embeddings, spec.final_norm, spec.head)
    for name, p in model.named_parameters():
        if h not in p.shape:
            continue
        module = name.rsplit(".", 1)[0]
        if name.startswith(layers):
            rel = module[len(layers):].split(".", 1)
            if len(rel) == 2 and rel[1] in known_layer:
                continue
        elif module in known_model:
            continue
        return f"{name} {list(p.shape)} has a dimension of the hidden size ({h}) that fptq's table does not place"
    return None


@torch.no_grad()
def residual_channel_maxima(model: nn.Module, adapter: Adapter, calibration: torch.Tensor, device: torch.device,
                            batch_size: int = 8, windows: int = RESIDUAL_ORDER_WINDOWS) -> torch.Tensor:
    """``[hidden]``: per channel, the largest ``|x|`` at the output of every norm that feeds Linears
    (the producers of the ``norm`` fold groups), over ``windows`` calibration windows, evenly strided,
    run through the float layers one at a time on ``device``."""
    ids = calibration[:: max(1, -(-len(calibration) // windows))]
    best = torch.zeros(_hidden(model))
    norms = [g.producer for g in adapter.groups if g.kind == "norm"]

    def hook(_m, _i, out):
        out = out[0] if isinstance(out, tuple) else out
        best.copy_(torch.maximum(best, out.detach().abs().reshape(-1, out.shape[-1]).amax(0).float().cpu()))

    inputs = capture_layer0_inputs(model, adapter, ids, batch_size, device)
    for i, layer in enumerate(adapter.layers(model)):
        home = next(layer.parameters()).device
        layer.to(device)
        handles = [layer.get_submodule(n).register_forward_hook(hook) for n in norms]
        try:
            inputs.layer_index = i
            run_layer(layer, inputs, device, name=f"{adapter.layers_path}.{i}", replace=True)
        finally:
            for h in handles:
                h.remove()
            layer.to(home)
    return best


def residual_order(maxima: torch.Tensor) -> torch.Tensor:
    """The permutation that sorts the channels by decreasing ``maxima`` (ties keep their order)."""
    return torch.argsort(maxima, descending=True, stable=True)


@torch.no_grad()
def permute_residual(model: nn.Module, adapter: Adapter, perm: torch.Tensor) -> None:
    """Permute the residual stream's channels of ``model`` in place by ``perm`` (channel ``j`` becomes
    old channel ``perm[j]``): the model computes the same function. Refuses a model with a parameter the
    table does not place (:func:`residual_problem`) before changing anything."""
    problem = residual_problem(model, adapter)
    if problem:
        raise FptqError(f"cannot sort the residual stream's channels: {problem}; use residual_order='none'")
    spec = adapter.residual
    h = _hidden(model)
    if tuple(perm.shape) != (h,) or not torch.equal(torch.sort(perm.cpu()).values, torch.arange(h)):
        raise FptqError(f"a residual permutation must be a permutation of the {h} hidden channels")

    def norm(m: nn.Module) -> None:
        for p in (getattr(m, "weight", None), getattr(m, "bias", None)):
            if isinstance(p, torch.Tensor):
                p.copy_(p.index_select(0, perm.to(p.device)))

    emb = model.get_submodule(spec.embeddings).weight
    head = model.get_submodule(spec.head).weight
    emb.copy_(emb.index_select(1, perm.to(emb.device)))
    if head.data_ptr() != emb.data_ptr():  # tied: the same tensor, already permuted
        head.copy_(head.index_select(1, perm.to(head.device)))
    norm(model.get_submodule(spec.final_norm))
    for layer in adapter.layers(model):
        for name in spec.norms:
            norm(layer.get_submodule(name))
        for name in spec.readers:
            permute_linear_inputs(layer.get_submodule(name), perm)
        for name in spec.writers:
            permute_linear_outputs(layer.get_submodule(name), perm)

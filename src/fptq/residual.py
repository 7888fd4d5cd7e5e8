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

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from .calibrate import LayerInputs, run_layer
from .errors import FptqError
from .models import Adapter
from .quant.reorder import permute_linear_inputs, permute_linear_outputs
from .stored_head import TRANSFORM_LEAF

__all__ = ["RESIDUAL_ORDER_WINDOWS", "residual_inputs", "residual_channel_maxima", "float_pass_maxima", "residual_order",
           "residual_problem", "residual_axes", "permute_residual", "permute_residual_outside",
           "permute_residual_layer"]

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


def residual_inputs(inputs: LayerInputs, windows: int = RESIDUAL_ORDER_WINDOWS) -> LayerInputs:
    """Whole batches of the captured layer-0 ``inputs``, evenly strided, holding about ``windows`` calibration
    windows: what the order is measured on. Shares the tensors; running it with ``replace`` leaves ``inputs``
    as it is."""
    n = len(inputs.hidden)
    rows = max(1, int(inputs.hidden[0].shape[0])) if n else 1
    need = min(n, -(-windows // rows))
    pick = list(range(0, n, max(1, n // max(need, 1))))[:need]
    layer_kwargs = None if inputs.layer_kwargs is None else [[kw[b] for b in pick] for kw in inputs.layer_kwargs]
    return LayerInputs(hidden=[inputs.hidden[b] for b in pick], kwargs=[inputs.kwargs[b] for b in pick],
                       layer_kwargs=layer_kwargs, layer_index=inputs.layer_index)


@torch.no_grad()
def residual_channel_maxima(model: nn.Module, adapter: Adapter, inputs: LayerInputs, device: torch.device, *,
                            load_layer: Callable[[int, nn.Module], None] | None = None,
                            release_layer: Callable[[int, nn.Module], None] | None = None,
                            compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[hidden]``: per channel, the largest ``|x|`` at the output of every norm that feeds Linears
    (the producers of the ``norm`` fold groups): :func:`float_pass_maxima`'s first result."""
    return float_pass_maxima(model, adapter, inputs, device, load_layer=load_layer, release_layer=release_layer,
                             compute_dtype=compute_dtype)[0]


def float_pass_maxima(model: nn.Module, adapter: Adapter, inputs: LayerInputs, device: torch.device, *,
                      load_layer: Callable[[int, nn.Module], None] | None = None,
                      release_layer: Callable[[int, nn.Module], None] | None = None,
                      compute_dtype: torch.dtype | None = None,
                      ) -> tuple[torch.Tensor, list[list[float]]]:
    """One float pass of ``inputs`` (layer 0's, see :func:`residual_inputs`; replaced as they go) through the
    layers, one at a time on ``device``: ``[hidden]`` per channel, the largest ``|x|`` at the output of every
    norm that feeds Linears (the producers of the ``norm`` fold groups), and per layer, per fold group of the
    adapter, the largest ``|x|`` at the group's input (what FPTQ's thresholds read). A model loaded layer by
    layer passes ``load_layer(i, layer)`` (materialise layer ``i``) and ``release_layer(i, layer)`` (drop it
    again); otherwise each layer goes back where it was. ``compute_dtype``: run the layers under autocast to
    that dtype (None: in the layers' own dtype)."""
    best = torch.zeros(_hidden(model))
    norms = [g.producer for g in adapter.groups if g.kind == "norm"]
    groups: list[list[float]] = []

    def hook(_m, _i, out):
        out = out[0] if isinstance(out, tuple) else out
        best.copy_(torch.maximum(best, out.detach().abs().reshape(-1, out.shape[-1]).amax(0).float().cpu()))

    def input_hook(j):
        def record(_m, args):
            groups[-1][j] = max(groups[-1][j], float(args[0].detach().abs().max()))
        return record

    for i, layer in enumerate(adapter.layers(model)):
        if load_layer is not None:
            load_layer(i, layer)
        home = next(layer.parameters()).device
        layer.to(device)
        groups.append([0.0] * len(adapter.groups))
        handles = [layer.get_submodule(n).register_forward_hook(hook) for n in norms]
        handles += [layer.get_submodule(g.consumers[0]).register_forward_pre_hook(input_hook(j))
                    for j, g in enumerate(adapter.groups)]
        try:
            inputs.layer_index = i
            with (torch.autocast(device.type, dtype=compute_dtype) if compute_dtype is not None
                  else contextlib.nullcontext()):
                run_layer(layer, inputs, device, name=f"{adapter.layers_path}.{i}", replace=True)
        finally:
            for h in handles:
                h.remove()
            layer.to(home)
            if release_layer is not None:
                release_layer(i, layer)
    return best, groups


def residual_order(maxima: torch.Tensor) -> torch.Tensor:
    """The permutation that sorts the channels by decreasing ``maxima`` (ties keep their order)."""
    return torch.argsort(maxima, descending=True, stable=True)


def _check_perm(model: nn.Module, adapter: Adapter, perm: torch.Tensor) -> None:
    problem = residual_problem(model, adapter)
    if problem:
        raise FptqError(f"cannot sort the residual stream's channels: {problem}; use residual_order='none'")
    h = _hidden(model)
    if tuple(perm.shape) != (h,) or not torch.equal(torch.sort(perm.cpu()).values, torch.arange(h)):
        raise FptqError(f"a residual permutation must be a permutation of the {h} hidden channels")


def _take(p: torch.Tensor | None, dim: int, perm: torch.Tensor) -> None:
    if isinstance(p, torch.Tensor) and not p.is_meta:  # a tensor still on disk is permuted when it is written
        p.copy_(p.index_select(dim, perm.to(p.device)))


def residual_axes(adapter: Adapter) -> dict[str, int]:
    """The tensors outside the decoder layers that index the residual stream, by full name, and the dimension
    that does: what a writer copying them from the source files must permute (:func:`fptq.st.permuted_entry`)."""
    spec = adapter.residual
    return {f"{spec.embeddings}.weight": 1, f"{spec.head}.weight": 1,
            f"{spec.final_norm}.weight": 0, f"{spec.final_norm}.bias": 0}


@torch.no_grad()
def permute_residual_outside(model: nn.Module, adapter: Adapter, perm: torch.Tensor) -> None:
    """Permute the tensors of ``model`` outside its decoder layers (:func:`residual_axes`) by ``perm``; those
    still on the meta device (not loaded) are left to the writer. Refuses what :func:`permute_residual` refuses."""
    _check_perm(model, adapter, perm)
    params = dict(model.named_parameters(remove_duplicate=False))
    done: set[int] = set()
    for name, dim in residual_axes(adapter).items():
        p = params.get(name)
        if p is None or p.is_meta or p.data_ptr() in done:  # absent (no bias), still on disk, or tied: done
            continue
        done.add(p.data_ptr())
        _take(p, dim, perm)
    # a rotated tied head's transform (fptq.stored_head): both of its axes index the stream
    transform = getattr(model.get_submodule(adapter.residual.head), TRANSFORM_LEAF, None)
    if isinstance(transform, torch.Tensor):
        _take(transform, 0, perm)
        _take(transform, 1, perm)


@torch.no_grad()
def permute_residual_layer(layer: nn.Module, adapter: Adapter, perm: torch.Tensor) -> None:
    """Permute one decoder layer's side of the residual stream by ``perm``: its norms, the input columns of
    the Linears that read the stream, the output rows of those that write it."""
    spec = adapter.residual
    for name in spec.norms:
        m = layer.get_submodule(name)
        for p in (getattr(m, "weight", None), getattr(m, "bias", None)):
            _take(p, 0, perm)
    for name in spec.readers:
        permute_linear_inputs(layer.get_submodule(name), perm)
    for name in spec.writers:
        permute_linear_outputs(layer.get_submodule(name), perm)


def permute_residual(model: nn.Module, adapter: Adapter, perm: torch.Tensor) -> None:
    """Permute the residual stream's channels of ``model`` in place by ``perm`` (channel ``j`` becomes
    old channel ``perm[j]``): the model computes the same function. Refuses a model with a parameter the
    table does not place (:func:`residual_problem`) before changing anything."""
    permute_residual_outside(model, adapter, perm)
    for layer in adapter.layers(model):
        permute_residual_layer(layer, adapter, perm)

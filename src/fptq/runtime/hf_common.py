"""What fptq's runtimes behind the transformers interface share: the module that stands in for the decoder
stack, the checks of a call, and a transformers cache whose layers are views of a runtime's own buffers.

fptq's runtimes behind the transformers interface (:mod:`fptq.runtime.hf_fast` on the CPU,
:mod:`fptq.runtime.hf_graph` on a GPU) keep keys and values in preallocated buffers ``[B, H, capacity, D]``
of their own. After each call they set the layers of the transformers cache the caller passed to views of the
filled positions (:func:`publish`), so that ``get_seq_length()``, cropping, beam reordering and a call that
falls back to transformers' forward see a normal cache; at the next call :func:`shows` tells whether the
cache still shows those buffers (continue in place, also after a crop) or was changed outside (copy it in).
"""
from __future__ import annotations

import inspect
import logging

import torch
from torch import nn

from ..nn import QuantLinear

__all__ = ["StandInDecoder", "cache_kw", "cache_layers", "cache_length", "call_problem", "shows", "publish"]


def cache_kw(forward) -> str:
    """The keyword under which a transformers ``forward`` takes its cache: ``cache`` since transformers 5.2x,
    ``past_key_values`` before (fptq supports both)."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def cache_layers(cache) -> list | None:
    """The cache's per-layer objects if they are plain full-attention key/value layers, else ``None``."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        return None
    for layer in layers:
        if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys") or not hasattr(layer, "values"):
            return None
    return layers


def cache_length(cache) -> int:
    """Positions held by ``cache`` (0 for ``None``)."""
    return 0 if cache is None else int(cache.get_seq_length())


def shows(cache, keys: list[torch.Tensor], values: list[torch.Tensor], n: int, filled: int) -> bool:
    """Whether every layer of ``cache`` is still a view of the buffers ``keys``/``values`` (one per layer, of
    which ``filled`` positions hold data) holding ``n <= filled`` positions."""
    if n > filled:
        return False
    layers = cache_layers(cache)
    if layers is None or len(layers) != len(keys):
        return False
    for layer, k, v in zip(layers, keys, values):
        if n == 0:
            continue
        if layer.keys is None or layer.keys.data_ptr() != k.data_ptr() or layer.keys.stride() != k.stride() \
                or layer.values.data_ptr() != v.data_ptr():
            return False
    return True


def publish(cache, keys: list[torch.Tensor], values: list[torch.Tensor], n: int) -> None:
    """Set ``cache``'s layers to views of the first ``n`` positions of ``keys``/``values`` (adding layers
    that a new cache lacks)."""
    from transformers.cache_utils import DynamicLayer

    layers = cache.layers
    while len(layers) < len(keys):
        layers.append(DynamicLayer())
    for layer, k, v in zip(layers, keys, values):
        layer.keys = k[:, :, :n]
        layer.values = v[:, :, :n]
        layer.device = k.device
        layer.is_initialized = True


def call_problem(causal_lm, modules: list, input_ids, attention_mask, position_ids, inputs_embeds, cache,
                 kwargs: dict) -> str | None:
    """Why a call of a decoder stack cannot run on a runtime that computes what transformers would for token
    ids that continue ``cache`` (``None`` if it can): what both runtimes need. ``modules``: the decoder's
    modules (forward hooks on them would not be called). The mask and positions are checked with one read
    from their device."""
    if inputs_embeds is not None or input_ids is None:
        return "inputs_embeds were given instead of token ids"
    if input_ids.dim() != 2:
        return f"token ids of shape {list(input_ids.shape)}, not [batch, tokens]"
    if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
        return "attention weights or hidden states were asked for"
    if torch.is_grad_enabled() and any(p.requires_grad for p in causal_lm.parameters()):
        return "gradients are enabled and the model has parameters that require them"
    if any(m._forward_hooks or m._forward_pre_hooks for m in modules):
        return "forward hooks are registered on the decoder's modules, which the runtime would not call"
    if attention_mask is not None and attention_mask.dim() != 2:
        return "the attention mask has padding (or is not 2-D)"
    if cache is not None and cache_layers(cache) is None:
        return f"the cache ({type(cache).__name__}) is not one of plain full-attention layers"
    t = input_ids.shape[1]
    if position_ids is not None and position_ids.shape[-1] != t:
        return "position_ids do not continue the cache"
    flags = []
    if attention_mask is not None:
        flags.append(attention_mask.all())
    if position_ids is not None:
        start = cache_length(cache)
        flags.append((position_ids == torch.arange(start, start + t, device=position_ids.device)).all())
    if flags:
        ok = torch.stack(flags).tolist()
        if attention_mask is not None and not ok[0]:
            return "the attention mask has padding (or is not 2-D)"
        if not ok[-1]:
            return "position_ids do not continue the cache"
    return None


class StandInDecoder(nn.Module):
    """A module standing in for a causal LM's decoder stack (``model.model``): it holds the same submodules under
    the same names (state dict, tied weights and parameter counts unchanged); ``transformers_module`` is the
    module it replaced, which answers the attributes this one lacks and runs the calls a runtime cannot
    (:meth:`_fallback`, the reason logged once on ``_log``)."""

    _log = logging.getLogger(__name__)
    _who = "fptq runtime"

    def __init__(self, causal_lm: nn.Module, inner: nn.Module):
        super().__init__()
        for name, child in inner.named_children():  # same objects, same names
            self.add_module(name, child)
        self.config = inner.config
        # not registered as submodules: the parent is not a child, and the inner module's children are ours
        object.__setattr__(self, "transformers_module", inner)
        object.__setattr__(self, "_causal_lm", causal_lm)
        self._layer_modules = list(self.layers.modules())  # looked at on every call: listed once
        self._qlinears = [m for m in self._layer_modules if isinstance(m, QuantLinear)]
        self._logged: set[str] = set()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("transformers_module")
            if inner is None:
                raise
            return getattr(inner, name)

    def _modes(self) -> tuple:
        """The QuantLinears' ``(backend, act_mode)``: what a runtime built from them computes with."""
        return tuple((getattr(m, "backend", "auto"), m.act_mode) for m in self._qlinears)

    def _fallback(self, reason: str, **kw):
        if reason not in self._logged:
            self._logged.add(reason)
            self._log.warning("%s: this call runs on transformers' forward instead (%s)", self._who, reason)
        return self.transformers_module(**kw)

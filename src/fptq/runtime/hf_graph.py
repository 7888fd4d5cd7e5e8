"""fptq's GPU runtime behind the transformers interface: ``model(...)`` and ``model.generate(...)`` of a model
that :func:`fptq.load` puts on a CUDA device decode on a static KV cache, each one-token step replayed as one
CUDA graph (issue 28).

On a GPU a decode step of a small batch is launch-bound: transformers' eager forward issues a few hundred
kernels per step (per Linear a GEMV that quantizes its own input, plus norms, rotary embedding, attention and
cache writes), each a few microseconds of host time for microseconds of GPU work. :mod:`fptq.runtime.graphs`
replays such a step as one CUDA graph for ``fptq generate`` and ``fptq bench``; :class:`GraphDecoder` does it
behind the transformers API. It stands in for the model's decoder stack (``model.model``), holding the same
submodules under the same names, and runs a call on a transformers ``StaticCache`` of its own:

* a call of several tokens (a prompt) runs the transformers decoder eagerly on the static cache;
* a one-token call (a decode step) writes the token ids and the position into fixed input buffers and replays
  the step's graph, captured at the first such call on that cache (where a capture fails, the reason is in
  ``graph_reason`` and the steps run eagerly on the static cache).

As on the CPU (:mod:`fptq.runtime.hf_fast`), after each call the layers of the transformers cache the caller
passed (``generate``'s ``DynamicCache``) are set to views of the static cache's filled positions
(:mod:`fptq.runtime.hf_common`): ``get_seq_length()``, cropping, beam reordering and a call that falls back to
the transformers decoder see a normal cache. A cache changed outside (reordered) is copied back in; one only
cropped is continued in place (the static cache's mask hides the positions beyond); one that outgrows its static
cache continues in one twice as long. The static cache is reused by the next sequence of the same batch size
while it fits and is at most twice the length that sequence needs (a step's attention reads all of it), so
that its graph is captured once: a cache that still shows it then gets copies of its keys and values first,
so nothing it holds is lost.

Calls the static cache cannot compute exactly as transformers would (padding in the attention mask,
``inputs_embeds``, attention weights or hidden states asked for, gradients, hooks, a ``StaticCache`` passed by
the caller) run on the transformers decoder, the reason logged once. The numerics are transformers' own
modules' (the static cache's masked attention over its whole length sums in another order than a dynamic
cache's, as :class:`~fptq.runtime.graphs.StaticDecoder`'s do).
"""
from __future__ import annotations

import inspect
import logging
import weakref

import torch
from torch import nn

from .graphs import capture_step
from .hf_common import StandInDecoder, cache_layers, cache_length, call_problem, publish, shows

log = logging.getLogger(__name__)

__all__ = ["GraphDecoder", "attach_graph_runtime", "graph_runtime_unsupported_reason", "uses_graph_runtime",
           "SLACK"]

# Positions a new static cache holds beyond its first call. Small, because a step's attention reads the whole
# static cache (the positions not yet filled are masked, not skipped): a LLaMA-7B-shaped layer caches 16 KiB
# per position and sequence, so at batch 64 a slack of 256 would read ~9 GB per step over 32 layers, more than
# the 4-bit weights. A sequence that outgrows its cache gets one twice as long (a copy and a new capture).
SLACK = 64


def graph_runtime_unsupported_reason(model: nn.Module) -> str | None:
    """Why ``model``'s decoder cannot run on :class:`GraphDecoder` (``None`` if it can)."""
    from transformers import StaticCache

    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        return "the model has no model.layers / lm_head"
    cfg = getattr(model, "config", None)
    if getattr(cfg, "sliding_window", None) and (getattr(cfg, "use_sliding_window", True)
                                                 or getattr(cfg, "model_type", "") == "mistral"):
        return "sliding-window attention is not supported by the static cache runtime"
    if set(getattr(cfg, "layer_types", None) or ["full_attention"]) != {"full_attention"}:
        return "layers other than full attention"
    params = inspect.signature(inner.forward).parameters
    if "cache" not in params and "past_key_values" not in params:
        return "the decoder takes no cache"
    if not any(hasattr(layer, "cumulative_length") for layer in StaticCache(config=cfg, max_cache_len=2).layers):
        return "this transformers version's StaticCache keeps no position counter (transformers >= 5 needed)"
    return None


def uses_graph_runtime(model: nn.Module) -> bool:
    """Whether :func:`attach_graph_runtime` put the static-cache runtime behind ``model``'s forward."""
    return isinstance(getattr(model, "model", None), GraphDecoder)


def attach_graph_runtime(model: nn.Module, graph: bool | None = None, slack: int = SLACK) -> str | None:
    """Run ``model``'s forward (and ``generate``) on :class:`GraphDecoder` where it can (see the module
    docstring). ``graph``: capture decode steps as CUDA graphs (default: when the model is on a CUDA device;
    ``False`` runs them eagerly on the static cache, which is how the CPU tests check it). Returns ``None`` when
    attached (or already attached), else the reason it cannot be, and changes nothing."""
    if uses_graph_runtime(model):
        return None
    reason = graph_runtime_unsupported_reason(model)
    if reason is not None:
        return reason
    model.model = GraphDecoder(model, model.model, graph=graph, slack=slack)
    return None


def detach_graph_runtime(model: nn.Module) -> nn.Module:
    """Put the transformers decoder back (undoes :func:`attach_graph_runtime`); returns ``model``."""
    if uses_graph_runtime(model):
        model.model = model.model.transformers_module
    return model


class _Slot:
    """A static cache for ``batch`` sequences of up to ``capacity`` positions, the input buffers of a decode
    step on it and that step's CUDA graph; ``length``: the positions its counters say are filled."""

    def __init__(self, config, batch: int, capacity: int, device: torch.device):
        from transformers import StaticCache

        self.cache = StaticCache(config=config, max_cache_len=capacity)
        self.batch, self.capacity = batch, capacity
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.hidden: torch.Tensor | None = None  # the graph's output buffer
        self.length = 0
        self.owner: weakref.ref | None = None  # the transformers cache whose layers show this one

    @property
    def initialized(self) -> bool:
        return all(getattr(layer, "is_initialized", False) for layer in self.cache.layers)

    @property
    def keys(self) -> list[torch.Tensor]:
        return [layer.keys for layer in self.cache.layers]

    @property
    def values(self) -> list[torch.Tensor]:
        return [layer.values for layer in self.cache.layers]

    def set_length(self, n: int, force: bool = False) -> None:
        """Point the counters (where the next keys and values are written) at position ``n``."""
        if force or n != self.length:
            for layer in self.cache.layers:
                layer.cumulative_length.fill_(n)
            self.length = n

    def load(self, keys: list[torch.Tensor], values: list[torch.Tensor], n: int) -> None:
        """Copy ``n`` positions per layer in (allocating the static tensors at the first)."""
        for layer, k, v in zip(self.cache.layers, keys, values):
            if not layer.is_initialized:
                layer.lazy_initialization(k, v)
            layer.keys[:, :, :n].copy_(k[:, :, :n])
            layer.values[:, :, :n].copy_(v[:, :, :n])
        self.set_length(n)


class GraphDecoder(StandInDecoder):
    """The decoder stack of a causal LM, decoding on a static cache with CUDA graphs (see the module docstring);
    ``transformers_module`` is the module it stands in for, which also runs what the static cache cannot.
    ``uses_graph`` / ``graph_reason``: whether the current static cache's steps replay a graph, and why not."""

    _log = log
    _who = "fptq GPU runtime"

    def __init__(self, causal_lm: nn.Module, inner: nn.Module, graph: bool | None = None, slack: int = SLACK,
                 warmup: int = 2):
        super().__init__(causal_lm, inner)
        device = next(causal_lm.parameters()).device
        if graph and device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device; it is on {device} (graph=False or None)")
        self.graph_wanted = device.type == "cuda" if graph is None else graph
        self.slack, self.warmup = slack, warmup
        params = inspect.signature(inner.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._slot: _Slot | None = None
        self._graph_modes: tuple | None = None  # the QuantLinears' (backend, act_mode) the graph was captured with
        self._pool = None
        self.graph_reason: str | None = None if self.graph_wanted else "not asked for (no CUDA device, or graph=False)"

    @property
    def uses_graph(self) -> bool:
        return self._slot is not None and self._slot.graph is not None

    # ------------------------------------------------------------------ dispatch
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, past_key_values=None, **kwargs):
        from transformers import DynamicCache
        from transformers.modeling_outputs import BaseModelOutputWithPast

        cache = cache if cache is not None else past_key_values
        kwargs.pop("cache_position", None)  # transformers 4's; the static cache keeps its own position
        if use_cache is None:
            use_cache = getattr(self.config, "use_cache", True)
        reason = None
        if not use_cache:
            reason = "use_cache=False"
        elif cache is not None and not isinstance(cache, DynamicCache):
            reason = f"the caller's cache is a {type(cache).__name__}, not a DynamicCache"
        if reason is None:
            reason = call_problem(self._causal_lm, self._layer_modules, input_ids, attention_mask, position_ids,
                                  inputs_embeds, cache, kwargs)
        if reason is not None:
            kw = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
            kw[self._cache_kw] = cache
            return self._fallback(reason, **kw)
        modes = self._modes()
        if modes != self._graph_modes and self._slot is not None:  # set_act_mode / set_backend since the capture
            self._slot.graph = self._slot.hidden = None
        self._graph_modes = modes
        if cache is None:
            cache = DynamicCache(config=self.config)
        b, t = input_ids.shape
        slot = self._slot_for(cache, b, t)
        n = slot.length
        if t == 1:
            hidden = self._step(slot, input_ids, n)
        else:
            pos = torch.arange(n, n + t, device=slot.ids.device).view(1, t)
            hidden = self._run(input_ids, pos, slot.cache)
            slot.length = n + t
        publish(cache, slot.keys, slot.values, slot.length)
        return BaseModelOutputWithPast(last_hidden_state=hidden, **{self._cache_kw: cache})

    def _run(self, ids: torch.Tensor, pos: torch.Tensor, static) -> torch.Tensor:
        return self.transformers_module(input_ids=ids, position_ids=pos, use_cache=True,
                                        **{self._cache_kw: static}).last_hidden_state

    # --------------------------------------------------------------------- cache
    def _release(self, slot: _Slot, keep_for=None) -> None:
        """Before ``slot``'s buffers hold another sequence: a transformers cache other than ``keep_for`` that
        still shows them gets its own copies."""
        owner = slot.owner() if slot.owner is not None else None
        if owner is not None and owner is not keep_for and shows(owner, slot.keys, slot.values,
                                                                  cache_length(owner), slot.length):
            for layer in cache_layers(owner):
                layer.keys, layer.values = layer.keys.clone(), layer.values.clone()
        slot.owner = None

    def _slot_for(self, cache, batch: int, t: int) -> _Slot:
        """The static cache holding what ``cache`` holds, with room for ``t`` more positions: the current one if
        ``cache`` still shows it (continued from ``cache``'s length; grown to twice its length when full), else
        the current one reused if its batch matches and its length is at most twice what the call needs (a step
        reads all of it), else a new one; ``cache``'s keys and values are copied in."""
        n, slot = cache_length(cache), self._slot
        need = n + t
        continuing = (slot is not None and slot.batch == batch and slot.owner is not None and slot.owner() is cache
                      and slot.initialized and shows(cache, slot.keys, slot.values, n, slot.length))
        if continuing and need <= slot.capacity:
            slot.set_length(n)
            return slot
        if continuing:  # full: a static cache twice as long, this one's positions copied in
            src_k, src_v, capacity = slot.keys, slot.values, max(need + self.slack, 2 * slot.capacity)
        else:
            layers = cache_layers(cache) if n else []
            src_k, src_v, capacity = [la.keys for la in layers], [la.values for la in layers], need + self.slack
        if not continuing and slot is not None and slot.batch == batch and need <= slot.capacity <= 2 * capacity:
            self._release(slot, keep_for=cache)  # reused: its graph too
        else:
            if slot is not None:
                self._release(slot, keep_for=cache if continuing else None)
            slot = self._slot = _Slot(self.config, batch, capacity, slot_device(self))
        if n:
            slot.load(src_k, src_v, n)
        else:
            slot.set_length(0)
        slot.owner = weakref.ref(cache)
        return slot

    # ---------------------------------------------------------------------- step
    def _step(self, slot: _Slot, ids: torch.Tensor, n: int) -> torch.Tensor:
        slot.ids.copy_(ids)
        slot.pos.fill_(n)
        if self.graph_wanted and slot.graph is None and slot.initialized and self.graph_reason is None:
            self._capture(slot)
        if slot.graph is not None:
            slot.graph.replay()  # advances the static cache's counters by one, as an eager step does
            out = slot.hidden.clone()
        else:
            out = self._run(slot.ids, slot.pos, slot.cache)
        slot.length = n + 1
        return out

    def _step_fns(self, slot: _Slot):
        """The step on ``slot``'s input buffers, and what points its counters back at the current position."""
        n = slot.length
        return (lambda: self._run(slot.ids, slot.pos, slot.cache)), (lambda: slot.set_length(n, force=True))

    def _capture(self, slot: _Slot) -> None:
        """Capture the step at the current position (:func:`~fptq.runtime.graphs.capture_step`: warm-up runs
        first, each writing the same keys and values, the counters put back); the replay that follows performs
        the step."""
        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            slot.graph, slot.hidden = capture_step(*self._step_fns(slot), slot.ids.device, self.warmup, self._pool)
        except Exception as e:  # noqa: BLE001 -- any failure to capture falls back to eager steps, with the reason
            slot.graph = slot.hidden = None
            self.graph_reason = f"CUDA graph capture failed: {type(e).__name__}: {e}"
            log.warning("fptq GPU runtime: decoding without CUDA graphs: %s", self.graph_reason)


def slot_device(decoder: GraphDecoder) -> torch.device:
    return next(decoder._causal_lm.parameters()).device

"""fptq's GPU runtime behind the transformers interface: ``model(...)`` and ``model.generate(...)`` of a model
that :func:`fptq.load` puts on a CUDA device decode on a static KV cache, each one-token step replayed as one
CUDA graph (issue 28).

On a GPU a decode step of a small batch is launch-bound: transformers' eager forward issues a few hundred
kernels per step (per Linear a GEMV that quantizes its own input, plus norms, rotary embedding, attention and
cache writes), each a few microseconds of host time for microseconds of GPU work. :mod:`fptq.runtime.graphs`
replays such a step as one CUDA graph for ``fptq generate`` and ``fptq bench``; :class:`GraphDecoder` does it
behind the transformers API. It stands in for the model's decoder stack (``model.model``), holding the same
submodules under the same names:

* a prompt (several tokens) on a new cache runs the transformers decoder on the caller's ``DynamicCache``, as
  transformers would;
* a one-token call (a decode step) runs on a transformers ``StaticCache`` of its own (the prompt's keys and
  values copied in at the first step): the token ids and the position go into fixed input buffers and the
  step's graph, captured at the first step on that static cache, is replayed (where a capture fails, the reason
  is in ``graph_reason`` and the steps run eagerly on the static cache); more tokens appended to a cache that
  is on a static cache (a chat's next turn) run eagerly there.

As on the CPU (:mod:`fptq.runtime.hf_fast`), after each call on a static cache the layers of the caller's
cache are set to views of its filled positions (:mod:`fptq.runtime.hf_common`): ``get_seq_length()``,
cropping, beam reordering and a call that falls back to the transformers decoder see a normal cache. A cache
changed outside (reordered) is copied back in; one only cropped is continued in place (the static cache's mask
hides the positions beyond); one that outgrows its static cache continues in one twice as long. Up to
:data:`MAX_SLOTS` static caches are kept, each with its graph: the next sequence of the same batch size reuses
one that fits and is at most twice the length it needs (a step's attention reads all of it), so a graph is
captured once per batch size and length class; a cache that still shows a reused static cache gets copies of
its keys and values first, so nothing it holds is lost.

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

from .fused_step import FusedStep, advance, attempt, cache_tensors, step_reason
from .graphs import capture_step
from .hf_common import StandInDecoder, cache_kw, cache_layers, cache_length, call_problem, publish, shows

log = logging.getLogger(__name__)

__all__ = ["GraphDecoder", "attach_graph_runtime", "graph_runtime_unsupported_reason", "uses_graph_runtime",
           "SLACK"]

# Positions a new static cache holds beyond its first call. Small, because a step's attention reads the whole
# static cache (the positions not yet filled are masked, not skipped): a LLaMA-7B-shaped layer caches 16 KiB
# per position and sequence, so at batch 64 a slack of 256 would read ~9 GB per step over 32 layers, more than
# the 4-bit weights. A sequence that outgrows its cache gets one twice as long (a copy and a new capture).
SLACK = 64
MAX_SLOTS = 4  # static caches kept (each with its graph) for the batch sizes and lengths in use


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


def attach_graph_runtime(model: nn.Module, graph: bool | None = None, slack: int = SLACK,
                         compile: bool = False, fused: bool | None = None) -> str | None:
    """Run ``model``'s forward (and ``generate``) on :class:`GraphDecoder` where it can (see the module
    docstring). ``graph``: capture decode steps as CUDA graphs (default: when the model is on a CUDA device;
    ``False`` runs them eagerly on the static cache, which is how the CPU tests check it). ``compile``: run the
    decode step through ``torch.compile`` (see :class:`GraphDecoder`); ``fused``: through fptq's fused decode step
    (default: where the model allows it). Returns ``None`` when attached (or already
    attached), else the reason it cannot be, and changes nothing."""
    if uses_graph_runtime(model):
        return None
    reason = graph_runtime_unsupported_reason(model)
    if reason is not None:
        return reason
    model.model = GraphDecoder(model, model.model, graph=graph, slack=slack, compile=compile, fused=fused)
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
        self.fused: FusedStep | None = None  # the fused decode step on this cache, built at its first step
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

    @property
    def counters(self) -> list[torch.Tensor]:
        return [layer.cumulative_length for layer in self.cache.layers]

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
    ``uses_graph`` / ``graph_reason``: whether the current static cache's steps replay a graph, and why not.

    ``compile``: the decode step runs the decoder through ``torch.compile`` (Inductor), which fuses the
    elementwise operations between the Linears (RMSNorm, rotary embedding, residual adds, SiLU times up) into a
    few kernels; the Linears' own kernels stay as they are (graph breaks, which a CUDA graph replays at no cost).
    A LLaMA layer's eager decode step is about 50 kernels (counted on the CPU: 52 non-view aten operations), each
    at least a microsecond or two of GPU time even when replayed from a graph: ~1600 per step of a 32-layer
    model, as long as reading the 4-bit weights of a 7B model. The first step of each batch size compiles
    (seconds to a minute); a failure to compile is logged and the steps run uncompiled (``compile_reason``).

    ``fused`` (default: where :func:`~fptq.runtime.fused_step.fused_step_problem` allows it, unless ``compile``
    asks for Inductor's fusion instead): a decode step is
    :class:`~fptq.runtime.fused_step.FusedStep` on the static cache's tensors instead (five launches between the
    Linears of a layer, no compiling); ``step_reason`` says why not where it is not used."""

    _log = log
    _who = "fptq GPU runtime"

    def __init__(self, causal_lm: nn.Module, inner: nn.Module, graph: bool | None = None, slack: int = SLACK,
                 warmup: int = 2, compile: bool = False, fused: bool | None = None, kernels: str = "auto"):
        super().__init__(causal_lm, inner)
        self.step_reason = step_reason(causal_lm, fused, "not asked for (compile=True)" if compile else None)
        self.kernels = kernels
        # not a submodule (its parameters are the decoder's own, and the state dict stays the model's)
        object.__setattr__(self, "_compiled", torch.compile(inner, dynamic=False) if compile else None)
        self.compile_reason: str | None = None if compile else "not asked for"
        device = next(causal_lm.parameters()).device
        if graph and device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device; it is on {device} (graph=False or None)")
        self.graph_wanted = device.type == "cuda" if graph is None else graph
        self.slack, self.warmup = slack, warmup
        self._cache_kw = cache_kw(inner.forward)
        self._slots: list[_Slot] = []  # least recently used first
        self._graph_modes: tuple | None = None  # the QuantLinears' (backend, act_mode) the graph was captured with
        self._pool = None
        self.graph_reason: str | None = None if self.graph_wanted else "not asked for (no CUDA device, or graph=False)"

    @property
    def uses_graph(self) -> bool:
        """Whether the static cache used last replays its decode steps as a CUDA graph."""
        return bool(self._slots) and self._slots[-1].graph is not None

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
        if modes != self._graph_modes:  # set_act_mode / set_backend since the captures
            for slot in self._slots:
                slot.graph = slot.hidden = None
        self._graph_modes = modes
        if cache is None:
            cache = DynamicCache(config=self.config)
        b, t = input_ids.shape
        n = cache_length(cache)
        if t > 1 and self._continued(cache, b, n) is None:  # a prompt: on the DynamicCache, as transformers runs it
            return self.transformers_module(input_ids=input_ids, position_ids=position_ids, use_cache=True,
                                            **{self._cache_kw: cache}, **kwargs)
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

    def _run(self, ids: torch.Tensor, pos: torch.Tensor, static, step: bool = False) -> torch.Tensor:
        """The transformers decoder on the static cache; a decode ``step`` through ``torch.compile`` if asked."""
        kw = dict(input_ids=ids, position_ids=pos, use_cache=True, **{self._cache_kw: static})
        if step and self._compiled is not None:
            try:
                return self._compiled(**kw).last_hidden_state
            except Exception as e:  # noqa: BLE001 -- a decoder torch.compile cannot handle runs uncompiled
                if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                    raise  # inside a capture: the capture fails and says why
                self._compiled = None
                self.compile_reason = f"torch.compile failed: {type(e).__name__}: {e}"
                log.warning("fptq GPU runtime: decoding uncompiled: %s", self.compile_reason)
                for layer in static.layers:  # layers the failed run reached have advanced: back to the step's
                    layer.cumulative_length.copy_(pos.view(-1)[0])
        return self.transformers_module(**kw).last_hidden_state

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

    def _continued(self, cache, batch: int, n: int) -> _Slot | None:
        """The static cache that ``cache`` (``n`` positions) still shows, if any."""
        for slot in self._slots:
            if slot.batch == batch and slot.owner is not None and slot.owner() is cache and slot.initialized \
                    and shows(cache, slot.keys, slot.values, n, slot.length):
                return slot
        return None

    def _slot_for(self, cache, batch: int, t: int) -> _Slot:
        """The static cache holding what ``cache`` holds, with room for ``t`` more positions: the one ``cache``
        still shows (continued from ``cache``'s length; twice as long when full), else a kept one of the same
        batch size at most twice the length the call needs (a step reads all of it), else a new one (the least
        recently used beyond :data:`MAX_SLOTS` dropped); ``cache``'s keys and values are copied in."""
        n = cache_length(cache)
        need = n + t
        slot = self._continued(cache, batch, n)
        if slot is not None and need <= slot.capacity:
            slot.set_length(n)
            return self._touch(slot)
        if slot is not None:  # full: a static cache twice as long, this one's positions copied in
            capacity = max(need + self.slack, 2 * slot.capacity)
            src_k, src_v = slot.keys, slot.values
            self._slots.remove(slot)
            slot = self._add(_Slot(self.config, batch, capacity, slot_device(self)))
        else:
            layers = cache_layers(cache) if n else []
            src_k, src_v, capacity = [la.keys for la in layers], [la.values for la in layers], need + self.slack
            fits = [s for s in self._slots if s.batch == batch and need <= s.capacity <= 2 * capacity]
            if fits:
                slot = min(fits, key=lambda s: s.capacity)
                self._release(slot, keep_for=cache)  # reused, its graph too
            else:
                slot = self._add(_Slot(self.config, batch, capacity, slot_device(self)))
        if n:
            slot.load(src_k, src_v, n)
        else:
            slot.set_length(0)
        slot.owner = weakref.ref(cache)
        return self._touch(slot)

    def _touch(self, slot: _Slot) -> _Slot:
        self._slots.remove(slot)
        self._slots.append(slot)
        return slot

    def _add(self, slot: _Slot) -> _Slot:
        self._slots.append(slot)
        while len(self._slots) > MAX_SLOTS:
            self._release(self._slots.pop(0))
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
            out = self._decode(slot)
        slot.length = n + 1
        return out

    def _decode(self, slot: _Slot) -> torch.Tensor:
        """One step on ``slot``'s input buffers: the fused step where it runs (advancing the counters as a
        transformers step does), else the transformers decoder."""
        if self.step_reason is None and slot.fused is None and slot.initialized:
            slot.fused, self.step_reason = attempt(
                lambda: FusedStep(self._causal_lm, cache_tensors(slot.cache), self.kernels))
        if slot.fused is not None:
            hidden, self.step_reason = attempt(lambda: slot.fused.hidden(slot.ids, slot.pos.view(-1)))
            if hidden is not None:
                advance(slot.counters)
                return hidden.unsqueeze(1)
            for s in self._slots:
                s.fused = None
        return self._run(slot.ids, slot.pos, slot.cache, step=True)

    @property
    def step_path(self) -> str:
        """What runs the decode steps of the static cache used last."""
        if self._slots and self._slots[-1].fused is not None:
            return self._slots[-1].fused.label
        return "transformers decoder" + (f" ({self.step_reason})" if self.step_reason else "")

    def _step_fns(self, slot: _Slot):
        """The step on ``slot``'s input buffers, and what points its counters back at the current position."""
        n = slot.length
        return (lambda: self._decode(slot)), (lambda: slot.set_length(n, force=True))

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

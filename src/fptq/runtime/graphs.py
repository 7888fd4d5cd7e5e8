"""Decoding a transformers causal LM with a static KV cache, each single-token step captured once in a CUDA
graph and replayed: fptq's GPU decode path (issue 28).

On a GPU a decode step of a small batch is launch-bound: transformers' eager forward of a W4A8 model issues
one activation quantization and one GEMM launch per Linear, plus the norms, rotary embedding, attention and
cache updates, each a few microseconds of CPU time for microseconds of GPU work. A CUDA graph replays the
whole step's kernels with one launch. That needs every tensor the step touches at a fixed address, hence
transformers' ``StaticCache`` (keys and values preallocated for ``max_len`` positions, written at
``cache_position``) and fixed input buffers for the token ids and the position.

:class:`StaticDecoder` runs the same calls eagerly where there is no CUDA (or with ``graph=False``), which
is how the CPU tests check its logits against transformers' own ``DynamicCache`` path. Where a capture
fails (an operation that synchronizes with the host inside the step), it says why in ``graph_reason`` and
goes on eagerly on the static cache.

A prompt is prefilled by transformers' forward; each decode step runs, where the model allows it,
:class:`~fptq.runtime.fused_step.FusedStep` on the same cache tensors (five launches between the Linears of a
layer instead of transformers' ~50), else transformers' forward (``step_reason`` says why).
"""
from __future__ import annotations

import inspect
import logging
from collections.abc import Callable

import torch
from torch import nn

from .engine import decode_loop
from .fused_step import FusedStep, advance, attempt, cache_tensors, step_reason
from .hf_common import cache_kw

__all__ = ["StaticDecoder", "capture_step", "static_generate", "warm_up"]

log = logging.getLogger(__name__)


class StaticDecoder:
    """Prefill and single-token decode steps of ``model`` (a transformers causal LM) for ``batch`` sequences of
    up to ``max_len`` tokens, on a static KV cache. ``graph``: capture the decode step in a CUDA graph (default:
    when the model is on a CUDA device; True elsewhere is refused). The logits returned by :meth:`step` live in
    a buffer the next step overwrites (clone them to keep them). ``fused``: decode steps through
    :class:`~fptq.runtime.fused_step.FusedStep` (default: where the model allows it; True refuses a model it
    cannot run, False keeps transformers' forward); ``kernels``: its kernels (``"auto"``: Triton on CUDA)."""

    def __init__(self, model: nn.Module, batch: int, max_len: int, graph: bool | None = None, warmup: int = 2,
                 fused: bool | None = None, kernels: str = "auto"):
        from transformers import StaticCache

        if batch < 1 or max_len < 2:
            raise ValueError(f"a static decoder needs batch >= 1 and max_len >= 2, got {batch}, {max_len}")
        p = next(model.parameters())
        self.model, self.device, self.batch, self.max_len = model.eval(), p.device, batch, max_len
        if graph and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device; it is on {self.device} "
                             "(use graph=False or None)")
        self.graph_wanted = self.device.type == "cuda" if graph is None else graph
        self.warmup = warmup
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self._cache_kw = cache_kw(model.forward)
        # transformers 4 writes the cache at cache_position
        self._takes_cache_position = "cache_position" in inspect.signature(model.forward).parameters
        self._ids = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self._pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self._graph = None
        self._logits: torch.Tensor | None = None
        self.graph_reason: str | None = None if self.graph_wanted else "not asked for (no CUDA device, or graph=False)"
        self.length = 0
        self.kernels = kernels
        self._fused: FusedStep | None = None
        self._counts: list[torch.Tensor] = []  # the static cache's position counters (transformers 5)
        self.step_reason = step_reason(model, fused)

    @property
    def uses_graph(self) -> bool:
        return self._graph is not None

    @property
    def step_path(self) -> str:
        """What runs a decode step: the fused step, or transformers' forward (with the reason)."""
        if self._fused is not None:
            return self._fused.label
        return "transformers forward" + (f" ({self.step_reason})" if self.step_reason else "")

    def _decode(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self._fused is None and self.step_reason is None:
            kv = cache_tensors(self.cache)
            if kv is None:
                self.step_reason = "the static cache holds no key/value tensors after the prompt"
            else:
                self._fused, self.step_reason = attempt(lambda: FusedStep(self.model, kv, self.kernels))
                self._counts = [c for c, _ in self._counters()]
        if self._fused is not None:
            out, self.step_reason = attempt(lambda: self._fused(ids, pos))
            if out is not None:
                advance(self._counts)  # as a transformers step does: the two can follow each other
                return out
            self._fused = None
        return self._forward(ids, pos)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        kw = {self._cache_kw: self.cache, "position_ids": pos.view(1, -1)}
        if self._takes_cache_position:
            kw["cache_position"] = pos
        return self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **kw).logits[:, -1]

    def _counters(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The cache layers' own write positions (transformers 5 keeps one per layer as a device tensor that
        each update advances), with a copy of their values."""
        out = []
        for layer in getattr(self.cache, "layers", []):
            c = getattr(layer, "cumulative_length", None)
            if isinstance(c, torch.Tensor):
                out.append((c, c.clone()))
        return out

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Start over with the prompts ``ids`` ``[batch, T]``: the cache is cleared and filled with them. Returns
        the logits of their last position ``[batch, vocab]``."""
        if ids.dim() != 2 or ids.shape[0] != self.batch:
            raise ValueError(f"prompts must be [{self.batch}, T] for this decoder, got {list(ids.shape)}")
        t = ids.shape[1]
        if not 0 < t < self.max_len:
            raise ValueError(f"a prompt of {t} tokens does not leave room to decode in a cache of {self.max_len}; "
                             "make max_len larger")
        if self.length:
            self.cache.reset()
        out = self._forward(ids.to(self.device), torch.arange(t, device=self.device))
        self.length = t
        return out

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per sequence (``tokens`` ``[batch]`` or ``[batch, 1]``) and return the next logits
        ``[batch, vocab]``."""
        if self.length == 0:
            raise RuntimeError("prefill a prompt before decoding")
        if self.length >= self.max_len:
            raise RuntimeError(f"the static cache is full ({self.max_len} positions); make max_len larger")
        self._ids.copy_(tokens.reshape(self.batch, 1))
        self._pos.fill_(self.length)
        if self.graph_wanted and self._graph is None and self.graph_reason is None:
            self._capture()
        if self._graph is not None:
            self._graph.replay()
            out = self._logits
        else:
            out = self._decode(self._ids, self._pos)
        self.length += 1
        return out

    def _step_fns(self) -> tuple[Callable[[], torch.Tensor], Callable[[], None]]:
        """The step on the input buffers, and what puts back the cache's own position counters (transformers 5)
        that a step advances."""
        counters = self._counters()

        def reset():
            for c, start in counters:
                c.copy_(start)

        return (lambda: self._decode(self._ids, self._pos)), reset

    def _warm(self) -> None:
        """The warm-up runs that precede a capture (:func:`warm_up`)."""
        warm_up(*self._step_fns(), self.warmup)

    def _capture(self) -> None:
        """Capture the step at the current position (:func:`capture_step`); the replay that follows performs
        the step."""
        try:
            self._graph, self._logits = capture_step(*self._step_fns(), self.device, self.warmup)
        except Exception as e:  # noqa: BLE001 -- any failure to capture falls back to eager steps, with the reason
            self._graph, self._logits = None, None
            self.graph_reason = f"CUDA graph capture failed: {type(e).__name__}: {e}"
            log.warning("decoding without CUDA graphs: %s", self.graph_reason)


def warm_up(run: Callable[[], torch.Tensor], reset: Callable[[], None], times: int) -> None:
    """``run()`` a step ``times`` times, each followed by ``reset()``: every run writes the same keys and values
    at the same position, and ``reset`` puts back what a run advances (a cache's position counters), so the
    cache is left as one step would leave it."""
    for _ in range(times):
        run()
        reset()


def capture_step(run: Callable[[], torch.Tensor], reset: Callable[[], None], device: torch.device, warmup: int = 2,
                 pool=None) -> tuple["torch.cuda.CUDAGraph", torch.Tensor]:
    """A CUDA graph of ``run()`` (a decode step reading fixed input buffers) and the tensor it writes its output
    to at each replay. ``warmup`` runs go first on a side stream (:func:`warm_up`), so that lazy initialisation
    and kernel autotuning happen outside the capture; the capture itself executes nothing, and ``reset()`` runs
    after it too. ``pool``: a memory pool shared with other graphs (:func:`torch.cuda.graph_pool_handle`).
    Raises what a failing capture raises."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        warm_up(run, reset, warmup)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, pool=pool):
            out = run()
    finally:
        reset()
    return graph, out


@torch.inference_mode()
def static_generate(model: nn.Module, ids: torch.Tensor, max_new_tokens: int = 64, *, do_sample: bool = False,
                    temperature: float = 1.0, top_p: float = 1.0, eos_token_id: int | list[int] | None = None,
                    generator: torch.Generator | None = None, on_token: Callable[[torch.Tensor], None] | None = None,
                    graph: bool | None = None) -> tuple[torch.Tensor, StaticDecoder]:
    """:meth:`fptq.runtime.Engine.generate` for any transformers causal LM, on a :class:`StaticDecoder`
    (CUDA graphs on a GPU). Returns ``[B, T + n]`` token ids (on the CPU) and the decoder (``uses_graph``,
    ``graph_reason``)."""
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    dec = StaticDecoder(model, ids.shape[0], ids.shape[1] + max_new_tokens, graph=graph)
    out = decode_loop(ids, dec.prefill(ids), lambda nxt: dec.step(nxt.to(dec.device)), max_new_tokens,
                      do_sample=do_sample, temperature=temperature, top_p=top_p, eos_token_id=eos_token_id,
                      generator=generator, on_token=on_token)
    return out, dec

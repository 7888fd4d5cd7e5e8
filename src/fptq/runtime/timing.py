"""What ``fptq bench`` times: prefill and decode of one model, through transformers or fptq's runtime.

Every runner does the same work: *prefill n* processes an ``n``-token prompt into an empty cache and returns
the logits of the last position (what generation does); *decode b* prefills a ``b x prompt_len`` prompt and
makes one greedy step (untimed: where a GPU path sets up its static cache and captures its graph), then times
``steps`` greedy single-token steps of the ``b`` sequences.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from ..nn import QuantLinear
from .engine import Engine
from .hf_common import cache_kw

__all__ = ["HFRunner", "StaticRunner", "EngineRunner", "StageTimer", "linear_weight_bytes", "tensor_bytes"]


def _tensors_of(module: nn.Module, recurse: bool = True) -> list[torch.Tensor]:
    ts = list(module.parameters(recurse=recurse)) + list(module.buffers(recurse=recurse))
    mods = module.modules() if recurse else [module]
    for m in mods:
        cache = getattr(m, "_cache", None)
        if isinstance(cache, dict):
            for v in cache.values():
                stack = [v]
                while stack:
                    x = stack.pop()
                    if isinstance(x, torch.Tensor):
                        ts.append(x)
                    elif isinstance(x, (tuple, list)):
                        stack.extend(x)
                    elif hasattr(x, "__dict__") and not isinstance(x, nn.Module):
                        stack.extend(v for v in vars(x).values() if isinstance(v, (torch.Tensor, tuple, list)))
    return ts


def _unique_bytes(ts: list[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in ts:
        if t.is_meta:
            continue
        key = (t.untyped_storage().data_ptr(), t.data_ptr(), t.numel())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters, buffers and kernel caches (tied tensors once)."""
    return _unique_bytes(_tensors_of(model))


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the decoder layers' Linears: weights, scales, biases and any kernel caches derived from them
    (``lm_head`` and embeddings excluded)."""
    layers = model.get_submodule("model.layers")
    ts: list[torch.Tensor] = []
    for m in layers.modules():
        if isinstance(m, (QuantLinear, nn.Linear)):
            ts += _tensors_of(m, recurse=False)
    return _unique_bytes(ts)


class HFRunner:
    """A transformers model, its own forward and ``DynamicCache`` (what ``generate`` uses by default)."""

    def __init__(self, model: nn.Module):
        self.model = model.eval()
        p = next(model.parameters(), None)
        self.device = p.device if p is not None else torch.device("cpu")
        self._cache_kw = cache_kw(model.forward)

    def _call(self, ids, cache):
        return self.model(ids, use_cache=True, logits_to_keep=1, **{self._cache_kw: cache}).logits

    def _sync(self) -> None:
        """Wait for the device: CUDA kernels run asynchronously, a timer read before they finish measures
        only their launch."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> float:
        from transformers import DynamicCache

        ids = ids.to(self.device)  # the prompts are made on the CPU
        self._sync()
        t = time.perf_counter()
        self._call(ids, DynamicCache(config=self.model.config))
        self._sync()
        return time.perf_counter() - t

    @torch.inference_mode()
    def decode(self, prompt: torch.Tensor, steps: int) -> float:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        nxt = self._call(prompt.to(self.device), cache)[:, -1].argmax(-1, keepdim=True)
        # untimed, as StaticRunner's: the first step of a sequence is where fptq's GPU runtime behind the
        # transformers API (fptq.runtime.hf_graph) moves it onto a static cache and may capture a graph
        nxt = self._call(nxt, cache)[:, -1].argmax(-1, keepdim=True)
        self._sync()
        t = time.perf_counter()
        for _ in range(steps):
            nxt = self._call(nxt, cache)[:, -1].argmax(-1, keepdim=True)
        self._sync()
        return time.perf_counter() - t

    def memory(self) -> dict[str, int]:
        return {"linear_weight_bytes": linear_weight_bytes(self.model), "model_bytes": tensor_bytes(self.model)}


class StaticRunner(HFRunner):
    """A transformers model decoding on a static KV cache, each step a CUDA graph replay on a GPU
    (:class:`~fptq.runtime.graphs.StaticDecoder`; eager elsewhere). Prefill is :class:`HFRunner`'s. The
    decoder of each (batch, length) is built, and its graph captured, on the first untimed step of its first
    call; later calls reuse it."""

    def __init__(self, model: nn.Module, graph: bool | None = None, what: str = "transformers forward"):
        super().__init__(model)
        self.graph, self.what = graph, what
        self._decoders: dict[tuple[int, int], object] = {}

    @property
    def path(self) -> str:
        """What ran, for the table: the prompt's forward; what ran the decode steps (the fused step, or
        transformers' forward with the reason), as graphs or eager with the reason."""
        decs = list(self._decoders.values())
        steps = "; ".join(sorted({d.step_path for d in decs})) or "none run"
        if decs and all(d.uses_graph for d in decs):
            how = "replayed as CUDA graphs"
        else:
            reasons = sorted({d.graph_reason for d in decs if d.graph_reason})
            how = "eager" + (f" ({'; '.join(reasons)})" if reasons else "")
        return f"{self.what} (prompts); decode steps on a static KV cache: {steps}, {how}"

    def decoder(self, batch: int, max_len: int):
        from .graphs import StaticDecoder

        key = (batch, max_len)
        if key not in self._decoders:
            self._decoders[key] = StaticDecoder(self.model, batch, max_len, graph=self.graph)
        return self._decoders[key]

    @torch.inference_mode()
    def decode(self, prompt: torch.Tensor, steps: int) -> float:
        dec = self.decoder(prompt.shape[0], prompt.shape[1] + steps + 1)
        nxt = dec.prefill(prompt.to(self.device)).argmax(-1)
        nxt = dec.step(nxt).argmax(-1)  # untimed: the first step of a decoder captures its graph
        self._sync()
        t = time.perf_counter()
        for _ in range(steps):
            nxt = dec.step(nxt).argmax(-1)
        self._sync()
        return time.perf_counter() - t


class EngineRunner:
    """fptq's runtime (:class:`~fptq.runtime.Engine`) over a model."""

    def __init__(self, model: nn.Module, **engine_kw):
        self.model = model
        self.engine = Engine(model, **engine_kw)

    def prefill(self, ids: torch.Tensor) -> float:
        cache = self.engine.new_cache(ids.shape[0], ids.shape[1])
        t = time.perf_counter()
        self.engine.forward(ids, cache)
        return time.perf_counter() - t

    def decode(self, prompt: torch.Tensor, steps: int) -> float:
        cache = self.engine.new_cache(prompt.shape[0], prompt.shape[1] + steps + 1)
        nxt = self.engine.forward(prompt, cache).argmax(-1, keepdim=True)
        nxt = self.engine.forward(nxt, cache).argmax(-1, keepdim=True)  # untimed, as every runner's first step
        t = time.perf_counter()
        for _ in range(steps):
            nxt = self.engine.forward(nxt, cache).argmax(-1, keepdim=True)
        return time.perf_counter() - t

    def memory(self) -> dict[str, int]:
        return {"linear_weight_bytes": linear_weight_bytes(self.model), "model_bytes": tensor_bytes(self.model)}


class StageTimer:
    """Wall time per stage of :meth:`Engine.forward` (``engine.forward(..., timer=t)``): each ``mark(stage)``
    charges the time since the previous mark to ``stage``. The native kernels run synchronously, so the
    times are those of the stages."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._last = time.perf_counter()

    def start(self) -> None:
        self._last = time.perf_counter()

    def mark(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._last
        self.calls[stage] = self.calls.get(stage, 0) + 1
        self._last = now

    def __bool__(self) -> bool:
        return True

"""fptq's runtime behind the transformers interface: ``model(...)`` and ``model.generate(...)`` at the
runtime's speed, for the model that :func:`fptq.load` (and ``from_pretrained`` after ``import fptq``) returns.

:func:`attach_runtime` puts a :class:`RuntimeDecoder` in place of the model's decoder stack (``model.model``
of a LLaMA-shaped causal LM). It holds the same submodules under the same names (state dict, tied weights and
parameter counts are unchanged) and runs a call on :class:`~fptq.runtime.Engine` when the runtime can compute it
exactly as transformers would:

* token ids on the CPU, no ``inputs_embeds``, no padding in ``attention_mask`` (``None`` or all ones),
  positions that continue the cache, no attention weights or hidden states asked for, no gradient needed;
* the cache is ``None``, empty, or a transformers ``Cache`` of plain full-attention layers.

Everything else goes to the transformers decoder it replaced (the reason is logged once per model), so every
call gives an answer. transformers' own forward still runs around it (``lm_head``, ``logits_to_keep``, the
loss), and ``generate`` keeps all its options.

The keys and values live in the runtime's preallocated bfloat16 buffers (:class:`~fptq.runtime.KVCache`), and
after each call the transformers cache's layers are set to views of them: ``cache.get_seq_length()``, cropping,
beam reordering and a fall-back call in the middle of a sequence see a normal cache. A cache changed outside the
runtime (its tensors replaced, e.g. reordered) is copied into new buffers at the next call; one only shortened
(cropped) is continued in place.
"""
from __future__ import annotations

import logging
import weakref
from pathlib import Path

import torch
from torch import nn

from ..kernels import native
from ..nn import QuantLinear
from .attention import check_prefill_attention
from .engine import Engine, KVCache, engine_unsupported_reason
from .hf_common import StandInDecoder, cache_layers, cache_length, call_problem, publish, shows
from .head import check_head, runtime_head
from .loading import keep_stored_dtypes

log = logging.getLogger(__name__)

__all__ = ["RuntimeDecoder", "RuntimeHead", "attach_runtime", "detach_runtime", "runtime_unsupported_reason", "uses_runtime",
           "use_runtime", "load", "RUNTIMES"]

_NATIVE_BACKENDS = ("auto", "native")
RUNTIMES = ("auto", "off")
_SLACK = 256  # positions a new cache holds beyond its first call (a generation's new tokens, typically)


def runtime_unsupported_reason(model: nn.Module) -> str | None:
    """Why ``model``'s forward cannot run on fptq's runtime (``None`` if it can)."""
    reason = engine_unsupported_reason(model)
    if reason is not None:
        return reason
    if not native.available():
        return f"fptq's native kernels are unavailable ({native.unavailable_reason()})"
    p = next(model.parameters(), None)
    if p is not None and p.device.type != "cpu":
        return f"the runtime runs on the CPU; the model is on {p.device}"
    return None


def uses_runtime(model: nn.Module) -> bool:
    """Whether :func:`attach_runtime` put fptq's runtime behind ``model``'s forward."""
    return isinstance(getattr(model, "model", None), RuntimeDecoder)


def attach_runtime(model: nn.Module, prefill_attention: str = "auto", head: str = "auto") -> str | None:
    """Run ``model``'s forward (and ``generate``) on fptq's runtime where it can (see the module docstring).
    Returns ``None`` when attached (or already attached), else the reason it cannot be, and changes nothing.

    ``prefill_attention``: the Engine's attention over a prompt (:func:`fptq.runtime.attention.prefill_attention_path`):
    ``"auto"`` (default): fptq's kernel on AMX-BF16 tiles where the CPU has AMX (a bfloat16 KV cache; PyTorch's
    in bfloat16 for an int8 one), else fptq's flash-attention kernel with bfloat16 dot products where it has
    AVX512-BF16; ``"native"``, ``"sdpa_bf16"``, or ``"sdpa"`` (PyTorch's in
    float32, which made the attention of a 512-token prompt 2.2x slower than the native kernel on an AVX-512
    CPU). Perplexity against ``fptq eval`` (the modules path, float32 attention) on the default model, 8 + 8
    windows: +0.22 % / +0.01 % (WikiText-2 / C4) with the native kernel, -0.01 % / -0.32 % with ``"sdpa"``
    (bench/transformers_api.py, docs/results/speed.md).

    ``head``: the output head's product (:class:`~fptq.runtime.Engine`'s ``head``; ``"auto"``: int8 for up to
    64 rows of a quantized model)."""
    check_head(head)
    check_prefill_attention(prefill_attention)  # an unknown choice: the error now, not at the first call
    if uses_runtime(model):
        return None
    reason = runtime_unsupported_reason(model)
    if reason is not None:
        return reason
    model.model = RuntimeDecoder(model, model.model, prefill_attention)
    if type(model.lm_head) is nn.Linear:
        quantized = any(isinstance(m, QuantLinear) for m in model.model.modules())
        model.lm_head = RuntimeHead.of(model.lm_head, head, quantized)
    return None


def detach_runtime(model: nn.Module) -> nn.Module:
    """Put the transformers decoder and head back (undoes :func:`attach_runtime`); returns ``model``."""
    if uses_runtime(model):
        model.model = model.model.transformers_module
    if isinstance(getattr(model, "lm_head", None), RuntimeHead):
        model.lm_head = model.lm_head.linear()
    return model


class RuntimeHead(nn.Linear):
    """``lm_head`` (the same weight and bias Parameters) taking its input as one contiguous 2-D matrix.

    transformers hands the head ``hidden[:, -1:, :]`` (``logits_to_keep``), a strided view; PyTorch's CPU
    bfloat16 ``linear`` takes a slow path on such a view (measured for SmolLM2's 49152 x 576 head: 63 ms at
    batch 1, 870 ms at batch 16, against 4 and 6 ms for the same rows made contiguous). The copy of the rows
    costs nothing next to that. The product is :func:`~fptq.runtime.head.runtime_head`'s (``choice``; built
    at the first call): the int8 head, or :func:`~fptq.runtime.head.head_logits` of the stored weight (float32
    blocks for many rows where bfloat16 is emulated). Its logits keep the dtype of the product that made them:
    float32 from the int8 head (decoding: greedy tokens are the Engine's), the stored weight's dtype from the
    stored head (a prompt's logits at every position, bfloat16 as transformers' own bfloat16 model gives them:
    no float32 copy, which cost SmolLM2's 512 positions 100 MB and about 25 ms on the AMX Xeon)."""

    @classmethod
    def of(cls, linear: nn.Linear, choice: str = "auto", quantized: bool = True) -> "RuntimeHead":
        head = cls.__new__(cls)
        nn.Module.__init__(head)
        head.in_features, head.out_features = linear.in_features, linear.out_features
        head.weight, head.bias = linear.weight, linear.bias  # shared: tied embeddings stay tied
        head.choice, head.quantized, head._product = choice, quantized, None
        return head

    @property
    def product(self):
        """The head's product (:func:`~fptq.runtime.head.runtime_head`), built once."""
        if self._product is None:
            self._product = runtime_head(self, self.choice, self.quantized)
        return self._product

    def linear(self) -> nn.Linear:
        out = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(out)
        out.in_features, out.out_features = self.in_features, self.out_features
        out.weight, out.bias = self.weight, self.bias
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        if x.device.type != "cpu" or self.weight.device.type != "cpu":  # moved off the CPU: no runtime head
            return nn.functional.linear(x, self.weight, self.bias)
        y = self.product(x.reshape(-1, x.shape[-1]).contiguous(), dtype=None)
        return y.view(*lead, self.out_features)


def _output_class():
    from transformers.modeling_outputs import BaseModelOutputWithPast

    return BaseModelOutputWithPast


class RuntimeDecoder(StandInDecoder):
    """The decoder stack of a LLaMA-shaped causal LM, run by :class:`~fptq.runtime.Engine` (see the module
    docstring); ``transformers_module`` is the module it stands in for, which runs what the runtime cannot."""

    _log = log

    def __init__(self, causal_lm: nn.Module, inner: nn.Module, prefill_attention: str = "auto"):
        super().__init__(causal_lm, inner)
        self.prefill_attention = prefill_attention
        self._engine: Engine | None = None
        self._engine_modes: tuple | None = None  # the Linears' (backend, act_mode) the engine was built from
        self._kv: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # transformers cache -> KVCache
        fields = getattr(_output_class(), "__dataclass_fields__", {})
        self._cache_field = "cache" if "cache" in fields else "past_key_values"

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine(self._causal_lm, prefill_attention=self.prefill_attention)
        return self._engine

    # ------------------------------------------------------------------ dispatch
    def _unsupported_call(self, input_ids, attention_mask, position_ids, inputs_embeds, cache, kwargs,
                          modes: tuple) -> str | None:
        if input_ids is not None and input_ids.device.type != "cpu":
            return f"token ids on {input_ids.device} (the runtime runs on the CPU)"
        for backend, _ in modes:
            if backend not in _NATIVE_BACKENDS:
                return f"the QuantLinear backend is {backend!r} (the runtime runs the native kernels)"
        return call_problem(self._causal_lm, self._layer_modules, input_ids, attention_mask, position_ids,
                            inputs_embeds, cache, kwargs)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        modes = self._modes()  # the Linears' backends and activation modes, read once per call
        reason = self._unsupported_call(input_ids, attention_mask, position_ids, inputs_embeds, cache, kwargs, modes)
        if reason is not None:
            kw = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
            kw[self._cache_field] = cache
            return self._fallback(reason, **kw)
        if modes != self._engine_modes:  # changed since the Engine was built (fptq.nn.set_act_mode, set_backend):
            self._engine, self._engine_modes = None, modes  # rebuilt, so that it computes what the modules would
        if use_cache is None:
            use_cache = getattr(self.config, "use_cache", True)
        if cache is None and use_cache:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.config)
        kv = self._sync(cache, input_ids.shape[0], input_ids.shape[1])
        engine = self.engine
        engine.grow_cache(kv, kv.length + input_ids.shape[1])
        hidden = engine.forward(input_ids, kv, logits="hidden")
        if cache is not None:
            publish(cache, kv.keys, kv.values, kv.length)
        return _output_class()(last_hidden_state=hidden, **{self._cache_field: cache if use_cache else None})

    # --------------------------------------------------------------------- cache
    def _sync(self, cache, batch: int, new: int) -> KVCache:
        """The runtime cache holding what ``cache`` holds: the one made for it if ``cache`` still shows its
        buffers (shortened: continued from there), else a new one (``cache``'s keys and values copied in) with
        room for the ``new`` positions of this call and :data:`_SLACK` more."""
        engine = self.engine
        n = cache_length(cache)
        kv = self._kv.get(cache) if cache is not None else None
        if kv is not None and kv.batch == batch and shows(cache, kv.keys, kv.values, n, kv.length):
            kv.length = n
            return kv
        kv = engine.new_cache(batch, n + new + _SLACK)
        if n:
            for li, layer in enumerate(cache_layers(cache)):
                kv.keys[li][:, :, :n].copy_(layer.keys)
                kv.values[li][:, :, :n].copy_(layer.values)
            kv.length = n
        if cache is not None:
            self._kv[cache] = kv
        return kv


def use_runtime(model: nn.Module, out: str | Path | None = None, head: str = "auto", compile: bool = False) -> str | None:
    """Put fptq's runtime behind ``model``'s forward and ``generate``: on the CPU
    :func:`fptq.runtime.hf_fast.attach_runtime` (the model's unquantized tensors, given its checkpoint ``out``,
    kept in the 16-bit dtype they are stored in, as the runtime computes with them), on a CUDA device the
    static-cache runtime with CUDA graphs (:func:`fptq.runtime.hf_graph.attach_graph_runtime`). The model becomes
    inference-only (``requires_grad`` off). ``compile``: on a GPU, decode steps through ``torch.compile``
    (:class:`~fptq.runtime.hf_graph.GraphDecoder`). Returns ``None`` when attached, else the reason it could not
    be (the model is then unchanged)."""
    p = next(model.parameters(), None)
    if p is not None and p.device.type == "cuda":
        from .hf_graph import attach_graph_runtime

        reason = attach_graph_runtime(model, compile=compile)
        if reason is None:
            model.requires_grad_(False)
        return reason
    reason = attach_runtime(model, head=head)
    if reason is not None:
        return reason
    model.requires_grad_(False)
    if out is not None:
        keep_stored_dtypes(model, out)
    return None


def load(out: str | Path, device: str | torch.device = "cpu", backend: str = "auto", verify: bool = True,
         dtype: torch.dtype | None = None, runtime: str = "auto", head: str = "auto", compile: bool = False):
    """Load an fptq checkpoint as a Hugging Face causal LM (``fptq.load``).

    ``runtime="auto"`` (default): on the CPU, for the architectures fptq's runtime covers (LLaMA-shaped, see
    :func:`fptq.runtime.engine_unsupported_reason`) and the integer kernels (``backend`` ``auto``/``native``),
    ``model(...)`` and ``model.generate(...)`` run on :class:`~fptq.runtime.Engine`
    (:mod:`fptq.runtime.hf_fast`): same logits up to float rounding, several times faster. The model is then
    inference-only and its unquantized tensors stay in the 16-bit dtype the checkpoint stores them in (unless
    ``dtype`` is given). Elsewhere, or with ``runtime="off"``, the model runs transformers' forward with fptq's
    kernels in each Linear (:func:`fptq.io.load`: the checkpoint's numerics module by module, as ``fptq eval``
    measures them). ``head``: the runtime's output head (``"auto"``: requantized to int8 for up to 64 rows,
    perplexity within 0.2 % of the stored head's, half its bytes per decoded token; ``"int8"`` for every call;
    ``"stored"``: the checkpoint's own; see :class:`~fptq.runtime.Engine`). On a CUDA device (``device="cuda"``)
    it decodes on a static KV cache, each one-token step replayed as a CUDA graph of the modules' own kernels
    (:mod:`fptq.runtime.hf_graph`; any ``backend``); ``compile=True`` also runs those steps through
    ``torch.compile``, which fuses the operations between the Linears (the first step of each batch size
    compiles). The other arguments are :func:`fptq.io.load`'s."""
    from ..errors import FptqError
    from ..io import load as load_modules

    if runtime not in RUNTIMES:
        raise FptqError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    check_head(head)
    model = load_modules(out, device=device, backend=backend, verify=verify, dtype=dtype)
    if runtime == "off":
        return model
    if compile and torch.device(device).type != "cuda":
        log.info("fptq.load: compile=True applies to the GPU runtime; on %s fptq's runtime runs its native kernels",
                 device)
    if torch.device(device).type != "cuda" and backend not in ("auto", "native"):
        log.info("fptq.load: transformers' forward with the %r backend (the runtime runs the native kernels)", backend)
        return model
    reason = use_runtime(model, out if dtype is None else None, head=head, compile=compile)
    if reason is not None:
        log.info("fptq.load: transformers' forward with fptq's kernels (fptq's runtime: %s)", reason)
    return model

"""fptq's fused decode step on a static KV cache: a LLaMA-shaped model's single-token step as a short, fixed
sequence of launches, what :class:`~fptq.runtime.graphs.StaticDecoder` captures in a CUDA graph (issue 28).

transformers' eager forward of a decode step issues about 50 kernels per layer (the norm alone is five: ``pow``,
``mean``, ``add``, ``rsqrt``, two ``mul``; the rotary embedding a dozen; the cache write, the mask, attention,
the residual adds), each a microsecond or two of GPU time even when replayed from a graph: for a 32-layer model
~1600 kernels per step, 2-3 ms, more than reading its 4-bit weights (~0.75 ms on an H200). This step issues, per
layer, the seven Linears (one launch each at decode sizes with fptq's Triton backend: its GEMV reduces a split K
itself) and five launches for what lies between them (:mod:`fptq.kernels.decode_ops`)::

    x = add_rmsnorm(h, delta, ln1)        h += delta (the previous layer's down_proj output); RMSNorm
    q, k, v = q_proj(x), k_proj(x), v_proj(x)
    q = rope_write_kv(q, k, v, pos)       rotary on q and k; k, v written into the static cache at pos
    a = decode_attention(q, cache, pos)   over positions 0..pos only (its splits combined in the same launch)
    x = add_rmsnorm(h, o_proj(a), ln2)
    delta = down_proj(silu_mul(gate_proj(x), up_proj(x)))

then the final norm and ``lm_head``. Where the W4A8 Linears reading a norm's (SiLU x up's, or, with a static
scale, the attention's) output share one activation quantizer (:func:`shared_quantizer`), that launch also writes
their int8 codes, which their kernels take (``triton_forward(codes=...)``) instead of quantizing in a launch of
their own above M = 2. q, k and v then run in one launch
(:func:`~fptq.kernels.triton_shared_input.shared_input_forward`: the dp4a GEMV at M <= 2, the tensor-core kernel
at 3..16), and gate, up and SiLU x up in another (:func:`~fptq.kernels.triton_shared_input.glu_forward`; at M <= 2
down_proj quantizes its input in its own GEMV, above the launch writes down_proj's codes where its scale is static;
with a per-token one gate and up share a launch and SiLU x up quantizes in its own): 8 launches per layer (9 at
batch 3-16 before a per-token down_proj). The Linears are the
model's own modules (a float model's run cuBLAS: the
fp16 row of ``fptq bench --device cuda`` runs the same step), the keys and values the transformers
``StaticCache``'s tensors (its prompt is prefilled by transformers). Numerics: the operations of transformers'
modules in the model's dtype (:mod:`fptq.kernels.decode_ops`); with the PyTorch forms the same bits as the
transformers step on a static cache up to the attention's summation order, with the Triton forms float rounding.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..kernels import decode_ops as ops
from .engine import engine_unsupported_reason

__all__ = ["FusedStep", "KERNELS", "advance", "attempt", "cache_tensors", "fused_step_problem", "shared_quantizer",
           "step_reason"]

log = logging.getLogger(__name__)

KERNELS = ("auto", "triton", "torch")  # FusedStep's ``kernels`` choices


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def fused_step_problem(model: nn.Module) -> str | None:
    """Why :class:`FusedStep` cannot run ``model``'s decode steps (``None`` if it can)."""
    reason = engine_unsupported_reason(model)
    if reason is not None:
        return reason
    inner = model.model
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is None:
        return "the model has no shared rotary embedding (model.model.rotary_emb)"
    if "dynamic" in str(getattr(rotary, "rope_type", "default")):
        return f"its rotary embedding ({rotary.rope_type}) changes with the sequence length"
    widths = set()
    for layer in inner.layers:
        at = layer.self_attn
        if (getattr(at, "q_norm", None) is None) != (getattr(at, "k_norm", None) is None):
            return "a query norm without a key norm (or the reverse)"
        for mod in (layer, at, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm,
                    getattr(at, "q_norm", None), getattr(at, "k_norm", None)):
            if mod is None:
                continue
            if _hooked(mod):
                return f"a forward hook on {type(mod).__name__}"
        widths.add((at.q_proj.out_features, at.k_proj.out_features, at.v_proj.out_features))
    if len(widths) != 1:
        return "its decoder layers differ in width"
    if any(_hooked(m) for m in (model, inner, inner.norm, inner.embed_tokens)):
        return "a forward hook on the model"
    d = _head_dim(model)
    if d % 2:
        return f"an odd head size ({d})"
    return None


def step_reason(model: nn.Module, fused: bool | None, off: str | None = None) -> str | None:
    """Why a decoder's steps do not run :class:`FusedStep` (None: they do), for its ``fused`` argument: ``off`` (a
    reason of the caller's not to, unless ``fused`` is True), "not asked for" with ``fused=False``, else
    :func:`fused_step_problem`; ``fused=True`` on a model it names raises."""
    from ..errors import FptqError

    if off is not None and not fused:
        return off
    if fused is False:
        return "not asked for (fused=False)"
    reason = fused_step_problem(model)
    if fused and reason is not None:
        raise FptqError(f"the fused decode step cannot run this model: {reason}")
    return reason


def _head_dim(model: nn.Module) -> int:
    cfg, at = model.config, model.model.layers[0].self_attn
    return int(getattr(at, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The keys and values ``[B, Hkv, L, D]`` of each layer of a prefilled transformers ``StaticCache``
    (transformers 5: ``cache.layers[i].keys``; 4: ``cache.key_cache[i]``); ``None`` if it has none."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        if not all(getattr(l, "is_initialized", False) and isinstance(getattr(l, "keys", None), torch.Tensor)
                   for l in layers):
            return None
        return [(l.keys, l.values) for l in layers]
    keys, values = getattr(cache, "key_cache", None), getattr(cache, "value_cache", None)
    if keys is None or values is None:
        return None
    return list(zip(keys, values))


@dataclass
class _Layer:
    ln1: nn.Module
    ln2: nn.Module
    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module
    gate: nn.Module
    up: nn.Module
    down: nn.Module
    keys: torch.Tensor
    values: torch.Tensor
    qk_norm: tuple | None  # ((q weight, eps), (k weight, eps)): Qwen3's per-head norms


def _qk_norm(attention: nn.Module) -> tuple | None:
    qn, kn = getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)
    return None if qn is None else ((qn.weight, _eps(qn)), (kn.weight, _eps(kn)))


def _eps(norm: nn.Module) -> float:
    eps = getattr(norm, "variance_epsilon", None)
    return float(getattr(norm, "eps", 1e-6) if eps is None else eps)


class FusedStep:
    """``step = FusedStep(model, kv)``; ``step(ids, pos)``: the logits ``[B, vocab]`` of one new token per sequence (``ids`` ``[B, 1]``) at position
    ``pos`` (a one-element int64 tensor on the model's device, read there: a CUDA graph of the call replays at
    any position), its keys and values written into ``kv`` (:func:`cache_tensors` of the static cache the prompt
    was prefilled into). ``kernels``: ``"triton"`` (one launch per operation; CUDA, or Triton's interpreter on
    the CPU), ``"torch"`` (transformers' own operations), ``"auto"`` (Triton on CUDA where installed). Refuses,
    with the reason, a model :func:`fused_step_problem` names."""

    def __init__(self, model: nn.Module, kv: list[tuple[torch.Tensor, torch.Tensor]], kernels: str = "auto"):
        from ..errors import FptqError

        reason = fused_step_problem(model)
        if reason is not None:
            raise FptqError(f"the fused decode step cannot run this model: {reason}")
        if kernels not in KERNELS:
            raise FptqError(f"kernels must be one of {', '.join(KERNELS)}, not {kernels!r}")
        inner = model.model
        if len(kv) != len(inner.layers):
            raise FptqError(f"the cache has {len(kv)} layers, the model {len(inner.layers)}")
        self.embed, self.norm, self.lm_head = inner.embed_tokens, inner.norm, model.lm_head
        self.dtype = self.embed.weight.dtype
        self.device = self.embed.weight.device
        self.use_triton = (self.device.type == "cuda" and _triton_installed()) if kernels == "auto" else \
            kernels == "triton"
        at0 = inner.layers[0].self_attn
        self.head_dim = _head_dim(model)
        self.scaling = float(getattr(at0, "scaling", self.head_dim ** -0.5))
        self.layers = [
            _Layer(l.input_layernorm, l.post_attention_layernorm, l.self_attn.q_proj, l.self_attn.k_proj,
                   l.self_attn.v_proj, l.self_attn.o_proj, l.mlp.gate_proj, l.mlp.up_proj, l.mlp.down_proj, k, v,
                   _qk_norm(l.self_attn))
            for l, (k, v) in zip(inner.layers, kv)]
        length = kv[0][0].shape[2]
        with torch.no_grad():  # the rotary tables of every cache position, as the model computes them per step
            probe = torch.zeros(1, dtype=self.dtype, device=self.device)
            cos, sin = inner.rotary_emb(probe, torch.arange(length, device=self.device)[None])
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()
        self._specs: dict = {}  # modes of a set of Linears -> their shared quantizer (see _quant)
        if self.use_triton:
            from ..kernels.triton_shared_input import glu_forward, shared_input_forward
            from ..kernels.triton_w4a8 import triton_forward

            self._triton_forward, self._shared_input_forward = triton_forward, shared_input_forward
            self._glu_forward = glu_forward
        self._attention_counters: torch.Tensor | None = None

    @property
    def label(self) -> str:
        return "fptq fused decode step (" + ("Triton" if self.use_triton else "PyTorch") + " norms, rotary, attention)"

    def _quant(self, readers: tuple) -> tuple | None:
        """The activation quantizer the Linears ``readers`` share (:func:`shared_quantizer`), for the launch that
        makes their input to quantize it too; None: each quantizes its own (the PyTorch forms always)."""
        if not self.use_triton:
            return None
        key = tuple(_mode_key(m) for m in readers)
        if key not in self._specs:  # compared once per set of modes (a static scale's comparison reads the device)
            self._specs[key] = shared_quantizer(readers, self.device)
        return self._specs[key]

    def _norm(self, h: torch.Tensor, delta: torch.Tensor | None, norm: nn.Module, readers: tuple = ()) -> tuple:
        """``(rmsnorm(h += delta), codes or None)``; the codes for ``readers``."""
        spec = self._quant(readers) if readers else None
        out = ops.add_rmsnorm(h, delta, norm.weight, _eps(norm), self.use_triton, spec)
        return (out, None) if spec is None else (out[0], out[1:])

    def _run(self, linear: nn.Module, x: torch.Tensor, codes: tuple | None) -> torch.Tensor:
        """``linear(x)``, or its Triton kernels on ``codes`` (only given where :meth:`_quant` found a shared
        quantizer, so only with the Triton kernels)."""
        return linear(x) if codes is None else self._triton_forward(linear, x, codes=codes)

    def _run_all(self, linears: tuple, x: torch.Tensor, codes: tuple | None) -> list:
        """``[linear(x) for linear in linears]``: one launch for all where they share ``codes`` and
        :func:`~fptq.kernels.triton_shared_input.shared_input_forward` runs them (decode batches of 1-16: q, k and
        v; gate and up where their launch with SiLU x up could not run), else one :meth:`_run` each."""
        if codes is not None:
            ys = self._shared_input_forward(linears, x, codes)
            if ys is not None:
                return ys
        return [self._run(linear, x, codes) for linear in linears]

    def _counters(self, heads: int) -> torch.Tensor | None:
        """The Triton attention's counters (one per query head of the batch: its splits combined in the same
        launch), where that checked out on the device; one buffer for every layer (their launches follow each
        other, each leaves it at zero)."""
        from ..kernels.triton_decode import serial_attention_verified

        if not self.use_triton or not serial_attention_verified(self.device):
            return None
        if self._attention_counters is None or self._attention_counters.numel() < heads:
            self._attention_counters = torch.zeros(heads, dtype=torch.int32, device=self.device)
        return self._attention_counters

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden(ids, pos))

    def hidden(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The final hidden states ``[B, hidden]`` (after the model's final norm) of the step: what the decoder
        stack returns to the head."""
        tri = self.use_triton
        b = ids.shape[0]
        h = self.embed(ids.reshape(b))  # [B, hidden], the residual stream (the model's dtype)
        delta = None
        run = self._run
        for layer in self.layers:
            x, c = self._norm(h, delta, layer.ln1, (layer.q, layer.k, layer.v))
            q = ops.rope_write_kv(*self._run_all((layer.q, layer.k, layer.v), x, c), self.cos, self.sin, pos,
                                  layer.keys, layer.values, tri, layer.qk_norm)
            spec = self._quant((layer.o,))
            spec = spec if spec is not None and spec[0] is not None else None  # static only: heads quantize apart
            a = ops.decode_attention(q, layer.keys, layer.values, pos, self.scaling, tri, quant=spec,
                                     counters=self._counters(q.shape[0] * q.shape[1]) if tri else None)
            o = layer.o(a) if spec is None else run(layer.o, a[0], a[1:])
            x, c = self._norm(h, o, layer.ln2, (layer.gate, layer.up))
            spec = self._quant((layer.down,))
            glu = None if c is None else self._glu_forward(layer.gate, layer.up, x, c, spec)
            if glu is not None:  # SiLU x up in the gate/up launch (with down_proj's codes, or down_proj makes them)
                act, codes = glu
                delta = layer.down(act) if codes is None else run(layer.down, act, codes)
                continue
            act = ops.silu_mul(*self._run_all((layer.gate, layer.up), x, c), tri, spec)
            delta = layer.down(act) if spec is None else run(layer.down, act[0], act[1:])
        return self._norm(h, delta, self.norm)[0]


def _mode_key(m: nn.Module) -> tuple:
    """What :func:`shared_quantizer`'s answer for ``m`` depends on, read without touching the device."""
    scale = getattr(m, "act_scale", None)
    return (id(m), type(m), getattr(m, "backend", None), getattr(m, "act_mode", None), getattr(m, "wbits", None),
            getattr(m, "abits", None), None if scale is None else (scale.data_ptr(), scale._version), _hooked(m))


def shared_quantizer(linears: tuple, device: torch.device) -> tuple | None:
    """``(static scale or None, activation bits)`` where every module of ``linears`` is a QuantLinear with 8-bit
    activations the Triton backend multiplies as integers (4-bit weights, or 8-bit per-channel ones: W8A8), on that
    backend (no hooks: the step calls its kernels, not the module), and all quantize their input alike (both per
    token, or both with equal static scales): the launch that makes their input can quantize it for all of them, as
    :func:`~fptq.kernels.triton_quant.quantize_activations` would. Else None."""
    from ..kernels import resolve_backend
    from ..kernels.triton_perchannel import w8a8_perchannel
    from ..nn import QuantLinear

    first = linears[0]
    for m in linears:
        if not isinstance(m, QuantLinear) or _hooked(m) or m.abits != 8:
            return None
        if not (m.wbits == 4 or w8a8_perchannel(m)):
            return None
        if m.act_mode not in ("static_tensor", "dynamic_token") or m.act_mode != first.act_mode:
            return None
        try:
            if resolve_backend(m.backend, device) != "triton":
                return None
        except Exception:  # noqa: BLE001 -- a backend that cannot run here: the module's own call says so
            return None
        if m.act_mode == "static_tensor" and not torch.equal(m.act_scale, first.act_scale):
            return None
    static = first.act_mode == "static_tensor"
    return (first.act_scale if static else None, first.abits)


def attempt(fn):
    """``(fn(), None)``, or ``(None, reason)`` when setting up or running the fused step raised: the decoder then
    gives it up for transformers' forward, the reason logged (once per decoder: it does not try again). Inside a
    CUDA graph capture the exception propagates: the capture fails and says why."""
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 -- any failure hands the steps to transformers, with the reason
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise
        why = f"the fused step failed ({type(e).__name__}: {e})"
        log.warning("fptq decode steps: %s; using transformers' forward", why)
        return None, why


def advance(counters: list[torch.Tensor]) -> None:
    """Move a transformers ``StaticCache``'s position counters (transformers 5: one device tensor per layer) one
    position on, as a transformers step's cache update does (one launch)."""
    if counters:
        torch._foreach_add_(counters, 1)


def _triton_installed() -> bool:
    from ..kernels.triton_common import HAS_TRITON

    return HAS_TRITON

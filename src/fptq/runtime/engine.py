"""fptq's decoding runtime for LLaMA-shaped models (LLaMA/SmolLM2, Mistral, Qwen2, Qwen3).

transformers' ``generate`` spends most of a decode step of a small model in Python: masks, cache objects,
hooks, dispatch through many small modules. :class:`Engine` runs the same model with a short, fixed sequence of
operations per layer on preallocated key/value caches, the Linears that share an input fused into one native
call (:mod:`fptq.runtime.linear`), the output projections adding straight into the residual stream:

    h = embed(ids)                                  (float32 residual stream)
    per layer:  x = rmsnorm(h);  q, k, v = qkv(x);  rope(q, k);  cache <- k, v
                h += o(attention(q, cache));  x = rmsnorm(h);  g, u = gate_up(x);  h += down(silu(g) * u)
    logits = lm_head(rmsnorm(h))                    (only the positions asked for)

Keys and values are cached in bfloat16 by default (``kv_dtype``; what a bf16 model caches too): decoding a
batch reads the whole cache every step, so its size sets the speed of large batches. ``kv_dtype=torch.int8``
halves that again: int8 codes with a float32 scale per (sequence, head, position), dynamic (``absmax / 127``). A new token's attention
is fptq's native kernel (float32 arithmetic on the bfloat16 cache); a prompt's (causal) attention
(``prefill_attention``, :func:`fptq.runtime.attention.prefill_attention_path`) is, by default,
fptq's native kernel on AMX-BF16 tiles where the CPU has them and the cache is bfloat16, else PyTorch's
scaled_dot_product_attention in bfloat16 where the CPU has AMX (oneDNN's tiles), else fptq's flash-attention kernel
with bfloat16 dot products and float32 softmax and accumulation where it has AVX512-BF16, else PyTorch's in
float32. The weights stay those of the model (nothing is copied). Numerics: the same quantizers as :class:`~fptq.nn.QuantLinear`'s reference path, so logits match the
transformers model up to float rounding (tests/runtime).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FptqError
from ..kernels import native
from .attention import prefill_attention_path
from .decode import DecodeProgram, program_problem
from .head import check_head, runtime_head
from .linear import ModuleGroup, W4A8Group, linear_group
from .prefill import PREFILL_CHUNK_ROWS, prefill_spans

__all__ = ["Engine", "EngineLM", "KVCache", "engine_unsupported_reason", "pick_tokens", "decode_loop"]

_SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


def engine_unsupported_reason(model: nn.Module) -> str | None:
    """Why :class:`Engine` cannot run ``model`` (``None`` if it can)."""
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt not in _SUPPORTED:
        return f"the runtime supports {', '.join(_SUPPORTED)} models, not {mt!r}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"the runtime supports SiLU MLPs, not {cfg.hidden_act!r}"
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not hasattr(model, "lm_head"):
        return "the model has no model.layers / lm_head"
    layer = layers[0]
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"):
        try:
            layer.get_submodule(name)
        except AttributeError:
            return f"decoder layers lack {name}"
    if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
        return "sliding-window attention is not supported by the runtime"
    if mt == "mistral" and getattr(cfg, "sliding_window", None):
        return "sliding-window attention is not supported by the runtime"
    return None


@dataclass
class KVCache:
    """Keys and values of every layer, ``[B, Hkv, max_len, head_dim]``; ``length`` positions are filled.
    An int8 cache also holds a float32 scale per (sequence, head, position), ``[B, Hkv, max_len]``."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0
    key_scales: list[torch.Tensor] | None = None
    value_scales: list[torch.Tensor] | None = None
    program: object = field(default=None, repr=False, compare=False)  # the engine's bound decode step on it

    def scales(self, layer: int) -> dict:
        if self.key_scales is None:
            return {}
        return {"kscale": self.key_scales[layer], "vscale": self.value_scales[layer]}

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def nbytes(self) -> int:
        extra = (self.key_scales or []) + (self.value_scales or [])
        return sum(t.numel() * t.element_size() for t in self.keys + self.values + extra)


def _norm_weight(norm: nn.Module) -> tuple[torch.Tensor, float]:
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    return norm.weight.detach().float(), float(eps)


def _rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps)) * w


class _Layer:
    def __init__(self, layer: nn.Module):
        at, mlp = layer.self_attn, layer.mlp
        self.ln1, self.eps1 = _norm_weight(layer.input_layernorm)
        self.ln2, self.eps2 = _norm_weight(layer.post_attention_layernorm)
        self.qkv = linear_group([at.q_proj, at.k_proj, at.v_proj])
        self.o = linear_group([at.o_proj])
        self.gate_up = linear_group([mlp.gate_proj, mlp.up_proj])
        self.down = linear_group([mlp.down_proj])
        self.q_norm = _norm_weight(at.q_norm) if getattr(at, "q_norm", None) is not None else None
        self.k_norm = _norm_weight(at.k_norm) if getattr(at, "k_norm", None) is not None else None
        self.dq, self.dkv = at.q_proj.out_features, at.k_proj.out_features
        self.ffn = mlp.gate_proj.out_features
        # gate/up's products go straight into SiLU-and-multiply (W4A8Gemm.glu) where the build has it; down_proj
        # then takes its static codes from the same kernel, or the float product (quantized by its own group
        # when that is W4A8 with a dynamic quantizer)
        self.glu = (isinstance(self.gate_up, W4A8Group) and self.gate_up.has_glu
                    and (isinstance(self.down, W4A8Group) or self.down.quant_shape() is None))

    def groups(self) -> list[ModuleGroup]:
        return [self.qkv, self.o, self.gate_up, self.down]


class Engine:
    """Prefill and decode of a LLaMA-shaped causal LM (quantized by fptq or float) with preallocated caches.

    ``engine = Engine(model)``; ``cache = engine.new_cache(batch, max_len)``;
    ``logits = engine.forward(ids, cache)`` (``ids`` ``[B, T]`` continue the cached sequence; logits of the last
    position by default); ``engine.generate(ids, max_new_tokens=...)``.

    ``head``: the output head (:func:`fptq.runtime.head.runtime_head`): ``"auto"`` (default) multiplies a
    quantized model's logits for up to 64 rows (decoding) with the head requantized to int8
    (:class:`~fptq.runtime.head.Int8Head`: half the bytes per decoded token, perplexity within 0.2 % of the
    stored head's), more rows and a float model's with the stored head; ``"int8"`` (every call) or
    ``"stored"`` choose one.

    ``prefill_chunk``: a prompt of at least twice this many rows (tokens x sequences) runs in equal chunks of
    this many rows or more (up to twice as many), one after the other (:mod:`fptq.runtime.prefill`: faster, smaller buffers, the same logits); 0 runs it whole.
    """

    def __init__(self, model: nn.Module, kv_dtype: torch.dtype = torch.bfloat16, prefill_attention: str = "auto",
                 head: str = "auto", prefill_chunk: int = PREFILL_CHUNK_ROWS):
        reason = engine_unsupported_reason(model)
        if reason is not None:
            raise FptqError(f"cannot run this model with fptq's runtime: {reason}; use the transformers model "
                            "(fptq.load(OUT)) instead")
        if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 0:
            raise FptqError(f"prefill_chunk must be a whole number of rows >= 0 (0: a prompt at once), "
                            f"not {prefill_chunk!r}")
        self.prefill_chunk = prefill_chunk
        cfg = model.config
        self.model = model
        self.config = cfg
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        at0 = model.model.layers[0].self_attn
        self.head_dim = getattr(at0, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.scaling = float(getattr(at0, "scaling", 1.0 / math.sqrt(self.head_dim)))
        if kv_dtype not in (torch.float32, torch.bfloat16, torch.int8):
            raise FptqError(f"KV cache dtype must be float32, bfloat16 or int8, not {kv_dtype}")
        if kv_dtype == torch.int8 and not (native.available() and self.head_dim % 16 == 0 and self.head_dim <= 128):
            raise FptqError("an int8 KV cache needs fptq's native kernels and a head size that is a multiple of 16 "
                            f"(at most 128): {native.unavailable_reason() or f'head size {self.head_dim}'}")
        self.kv_dtype = kv_dtype
        self.head_choice = check_head(head)
        self._head = None  # built at the first logits (runtime_head), not for a caller that only wants hidden states
        self.layers = [_Layer(layer) for layer in model.model.layers]
        if len({(l.dq, l.dkv, l.ffn) for l in self.layers}) != 1:
            raise FptqError("cannot run this model with fptq's runtime: its decoder layers differ in width; use the "
                            "transformers model (fptq.load(OUT)) instead")
        self.embed = model.model.embed_tokens
        self.final_norm, self.final_eps = _norm_weight(model.model.norm)
        self.lm_head = model.lm_head
        self.rotary = model.model.rotary_emb
        self._rope_len = 0
        self._cos = self._sin = None
        self._native = native.available()
        self._workspaces: dict[tuple[int, int], dict] = {}  # (batch, tokens) -> reused buffers (see _workspace)
        self._attn_work: torch.Tensor | None = None
        self.prefill_path = prefill_attention_path(prefill_attention, self._native and native.has_bf16(),
                                                   self.head_dim, "amx_bf16" in native.cpu_flags(),
                                                   float32_cache=kv_dtype == torch.float32,
                                                   native_amx=self._native and kv_dtype == torch.bfloat16
                                                   and native.has_amx_attention())
        # decode steps as one bound program of native calls (fptq.runtime.decode) where it covers the model;
        # False runs them through the same loop as a prompt (same numerics, ~10 us of Python per call more)
        self.decode_program = program_problem(self) is None

    @property
    def head(self):
        """What multiplies the final hidden states into logits (:func:`fptq.runtime.head.runtime_head` of the
        ``head`` choice), built at the first logits."""
        if self._head is None:
            quantized = any(g.kind != "float" for layer in self.layers for g in layer.groups())
            self._head = runtime_head(self.lm_head, self.head_choice, quantized)
        return self._head

    @classmethod
    def from_checkpoint(cls, out, **kw) -> "Engine":
        """An engine over the fptq checkpoint ``out`` (loaded with its 16-bit tensors kept 16-bit, see
        :func:`fptq.runtime.load_for_runtime`)."""
        from .loading import load_for_runtime

        return cls(load_for_runtime(out), **kw)

    # ----------------------------------------------------------------- state
    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty cache for ``batch`` sequences of up to ``max_len`` positions. Its buffers are not cleared:
        nothing reads a position before it is written (the attention reads ``0 .. end-1``; the native kernels
        are tested with NaN past it), and memory never written is never touched (a long capacity costs no
        page faults: zeroing SmolLM2's 768 positions took 3-4 ms of a 512-token prompt's call)."""
        shape = (batch, self.n_kv, max_len, self.head_dim)
        n = len(self.layers)
        cache = KVCache([torch.empty(shape, dtype=self.kv_dtype) for _ in range(n)],
                        [torch.empty(shape, dtype=self.kv_dtype) for _ in range(n)])
        if self.kv_dtype == torch.int8:
            cache.key_scales = [torch.empty(shape[:3]) for _ in range(n)]
            cache.value_scales = [torch.empty(shape[:3]) for _ in range(n)]
        return cache

    def grow_cache(self, cache: KVCache, min_len: int) -> None:
        """Make ``cache`` hold at least ``min_len`` positions (at least twice as many as before: amortised
        copies), keeping what it holds."""
        if min_len <= cache.max_len:
            return
        new_len = max(min_len, 2 * cache.max_len)
        grown = self.new_cache(cache.batch, new_len)
        n = cache.length
        for name in ("keys", "values", "key_scales", "value_scales"):
            old, new = getattr(cache, name), getattr(grown, name)
            if old is None:
                continue
            for o, g in zip(old, new):
                g[:, :, :n].copy_(o[:, :, :n])
            setattr(cache, name, new)

    def _rope(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        if end > self._rope_len:
            n = max(end, 2 * self._rope_len, 256)
            pos = torch.arange(n).unsqueeze(0)
            dummy = torch.zeros(1, dtype=torch.float32)
            cos, sin = self.rotary(dummy, pos)
            self._cos, self._sin = cos[0].float().contiguous(), sin[0].float().contiguous()
            self._rope_len = n
        return self._cos, self._sin

    def linear_kinds(self) -> dict[str, int]:
        """How many Linear groups run on each path (``w4a8``, ``w4a16``, ``int8``, ``float``, ``module``)."""
        out: dict[str, int] = {}
        for layer in self.layers:
            for g in layer.groups():
                out[g.kind] = out.get(g.kind, 0) + 1
        return out

    # --------------------------------------------------------------- compute
    def _apply_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, T, H, D]``; cos/sin ``[T, D]``."""
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        rot = torch.cat((-x2, x1), dim=-1)
        return x * cos[:, None, :] + rot * sin[:, None, :]

    def _attention(self, q, cache: KVCache, li: int, start: int, t: int, out: torch.Tensor | None = None,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
        """q ``[B, H, T, D]`` float32 at positions ``start .. start+T-1`` over the cached keys ``0 .. start+T-1``;
        returns ``[B, H, T, D]`` (float32, or bfloat16 from the ``sdpa_bf16`` path), or, from the native prompt
        path when ``rows`` (float32 ``[B*T, H*D]``) is given, ``rows`` filled in token-major order."""
        end = start + t
        if t == 1 and self._native and self.head_dim % 16 == 0 and self.head_dim <= 128:
            return native.decode_attention(q.view(q.shape[0], q.shape[1], -1), cache.keys[li], cache.values[li],
                                           end, self.scaling, out=None if out is None else out.view(q.shape[0], q.shape[1], -1),
                                           **cache.scales(li)).view(q.shape)
        if self.prefill_path == "native":
            need = native.prefill_attention_work_bytes(q.shape[0], self.n_kv, self.head_dim, end)
            if self._attn_work is None or self._attn_work.numel() < need:
                self._attn_work = torch.empty(need, dtype=torch.uint8)
            if rows is not None:
                native.prefill_attention(q, cache.keys[li], cache.values[li], start, self.scaling,
                                         out=rows.view(q.shape[0], t, q.shape[1], q.shape[3]), work=self._attn_work,
                                         tokens_major=True, **cache.scales(li))
                return rows
            return native.prefill_attention(q, cache.keys[li], cache.values[li], start, self.scaling, out=out,
                                            work=self._attn_work, **cache.scales(li))
        k = cache.keys[li][:, :, :end]
        v = cache.values[li][:, :, :end]
        if cache.key_scales is not None:
            k = k.float() * cache.key_scales[li][:, :, :end, None]
            v = v.float() * cache.value_scales[li][:, :, :end, None]
        if t > 1 and self.prefill_path == "sdpa_bf16":  # bfloat16 out: the caller's copy converts it
            return self._sdpa(q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16), start, t)
        if k.dtype != q.dtype:
            k, v = k.to(q.dtype), v.to(q.dtype)
        return self._sdpa(q, k, v, start, t)

    def _sdpa(self, q, k, v, start: int, t: int) -> torch.Tensor:
        gqa = self.n_kv != self.n_heads
        if t == 1:
            return F.scaled_dot_product_attention(q, k, v, scale=self.scaling, enable_gqa=gqa)
        if start == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling, enable_gqa=gqa)
        mask = (torch.arange(t)[:, None] + start) >= torch.arange(start + t)[None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling, enable_gqa=gqa)

    def _workspace(self, b: int, t: int) -> dict:
        """Buffers reused by every layer and call with ``b x t`` tokens: large fresh tensors cost a page fault per
        4 KiB on first touch, which for a prompt is as slow as the matrix products. The two latest shapes (a
        decode step and a prompt, typically) are kept."""
        ws = self._workspaces.get((b, t))
        if ws is None:
            if len(self._workspaces) >= 2:
                self._workspaces.pop(next(iter(self._workspaces)))
            m, l0 = b * t, self.layers[0]
            ws = {"qkv": torch.empty(m, l0.dq + 2 * l0.dkv), "q": torch.empty(b, self.n_heads, t, self.head_dim),
                  "attn": torch.empty(b, self.n_heads, t, self.head_dim), "a": torch.empty(m, l0.dq),
                  "gu": torch.empty(m, 2 * l0.ffn), "x": torch.empty(m, self.config.hidden_size),
                  "act": torch.empty(m, l0.ffn), "quant": {}}
            self._workspaces[(b, t)] = ws
        return ws

    @staticmethod
    def _quant_buffers(ws: dict, group, m: int) -> tuple | None:
        shape = group.quant_shape()
        if shape is None:
            return None
        buf = ws["quant"].get(shape)
        if buf is None:
            buf = ws["quant"][shape] = native.QuantOut.buffers(m, *shape)
        return buf

    def _norm_into(self, h, w, eps, group, m, ws):
        """rmsnorm of the residual stream, quantized straight for ``group`` where it can take that."""
        if not self._native:
            return _rmsnorm(h, w, eps), None
        q = group.quant_out(m, self._quant_buffers(ws, group, m))
        return native.rmsnorm(h, w, eps, out=None if q is not None else ws["x"], quant=q), q

    @staticmethod
    def _run(group, x, q, outs, accumulate=False):
        if q is not None:
            group.run_quantized(q, outs, accumulate=accumulate)
        else:
            group(x, outs, accumulate=accumulate)

    def _layers(self, ids, cache: KVCache, start: int, cos_all, sin_all, timer) -> torch.Tensor:
        """Every decoder layer for ``ids`` ``[B, T]`` at positions ``start ..``: the residual stream after the
        last layer, float32 ``[B*T, hidden]``."""
        b, t = ids.shape
        cos, sin = cos_all[start:start + t], sin_all[start:start + t]
        m = b * t
        ws = self._workspace(b, t)
        h = self.embed(ids).float().reshape(m, -1)
        hd, nh, nkv = self.head_dim, self.n_heads, self.n_kv
        if timer:
            timer.mark("embedding")
        for li, layer in enumerate(self.layers):
            dq, dkv, ffn = layer.dq, layer.dkv, layer.ffn
            x, q8 = self._norm_into(h, layer.ln1, layer.eps1, layer.qkv, m, ws)
            if timer:
                timer.mark("rmsnorm (+quantize)")
            qkv = ws["qkv"]
            self._run(layer.qkv, x, q8, [qkv[:, :dq], qkv[:, dq:dq + dkv], qkv[:, dq + dkv:]])
            if timer:
                timer.mark(f"q/k/v {layer.qkv.kind}")
            if self._native and layer.q_norm is None:
                q = ws["q"]
                native.rope_cache(qkv, b, t, nh, nkv, hd, cos, sin, q, cache.keys[li], cache.values[li], start,
                                  **cache.scales(li))
            else:  # (an int8 cache needs the native path: checked in __init__, except with q/k norms)
                if cache.key_scales is not None:
                    raise FptqError("an int8 KV cache is not supported for models with q/k norms (Qwen3)")
                q = qkv[:, :dq].view(b, t, nh, hd)
                k = qkv[:, dq:dq + dkv].view(b, t, nkv, hd)
                v = qkv[:, dq + dkv:].view(b, t, nkv, hd)
                if layer.q_norm is not None:
                    q = _rmsnorm(q, *layer.q_norm)
                    k = _rmsnorm(k, *layer.k_norm)
                q = self._apply_rope(q, cos, sin).transpose(1, 2)
                k = self._apply_rope(k, cos, sin)
                cache.keys[li][:, :, start:start + t] = k.transpose(1, 2)
                cache.values[li][:, :, start:start + t] = v.transpose(1, 2)
            if timer:
                timer.mark("rope + cache write")
            if t > 1 and self.prefill_path == "native":  # written straight as o_proj's input rows
                a = self._attention(q, cache, li, start, t, rows=ws["a"])
            else:
                a = self._attention(q, cache, li, start, t, out=ws["attn"])
                if t == 1:
                    a = a.reshape(m, dq)
                else:
                    a = ws["a"].view(b, t, nh, hd).copy_(a.transpose(1, 2)).view(m, dq)
            if timer:
                timer.mark("attention")
            layer.o(a, [h], accumulate=True)
            if timer:
                timer.mark(f"o_proj {layer.o.kind} (quantize + GEMM)")
            x, q8 = self._norm_into(h, layer.ln2, layer.eps2, layer.gate_up, m, ws)
            if timer:
                timer.mark("rmsnorm (+quantize)")
            gu = ws["gu"]
            if q8 is not None and layer.glu:  # silu(gate) * up as the products leave the kernel (same bits)
                # down_proj's codes straight from the kernel for a static quantizer (in down_proj's own buffers
                # where the workspace's would be those of gate/up's input, which the kernel is still reading)
                distinct = layer.down.quant_shape() != layer.gate_up.quant_shape()
                qd = layer.down.quant_out(m, self._quant_buffers(ws, layer.down, m) if distinct else None)
                static = qd is not None and qd.mode == 0
                act = layer.gate_up.run_glu(q8, [gu[:, :ffn], gu[:, ffn:]], ws["act"], quant=qd if static else None)
                if timer:
                    timer.mark(f"gate/up {layer.gate_up.kind} (+ silu * up)")
                if qd is not None and not static:
                    layer.down.quantize_into(act, qd)
                q8 = qd
                if timer:
                    timer.mark("silu * up (+quantize)")
            else:
                self._run(layer.gate_up, x, q8, [gu[:, :ffn], gu[:, ffn:]])
                if timer:
                    timer.mark(f"gate/up {layer.gate_up.kind}")
                if self._native:
                    q8 = layer.down.quant_out(m, self._quant_buffers(ws, layer.down, m))
                    act = native.silu_mul(gu, ffn, out=None if q8 is not None else ws["act"], quant=q8)
                else:
                    q8, act = None, F.silu(gu[:, :ffn]).mul_(gu[:, ffn:])
                if timer:
                    timer.mark("silu * up (+quantize)")
            self._run(layer.down, act, q8, [h], accumulate=True)
            if timer:
                timer.mark(f"down_proj {layer.down.kind}")
        return h

    def _prefill(self, ids, cache: KVCache, start: int, cos_all, sin_all, timer, keep_all: bool) -> torch.Tensor:
        """:meth:`_layers` over ``ids`` in the chunks of :func:`~fptq.runtime.prefill.prefill_spans`, each
        continuing the cache; the residual stream of every position (``keep_all``) or of the last chunk's."""
        b, t = ids.shape
        spans = prefill_spans(b, t, self.prefill_chunk)
        parts = []
        for a, e in spans:
            h = self._layers(ids[:, a:e], cache, start + a, cos_all, sin_all, timer)
            if keep_all or e == t:
                parts.append(h.view(b, e - a, -1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: KVCache, logits: str = "last", timer=None) -> torch.Tensor | None:
        """Run ``ids`` ``[B, T]`` (positions ``cache.length ..``), append their keys/values to ``cache``.

        ``logits``: ``"last"`` (``[B, V]``, what generation needs), ``"all"`` (``[B, T, V]``), ``"none"``, or
        ``"hidden"``: the final norm's output ``[B, T, hidden]`` in the ``lm_head``'s dtype, for a caller that
        applies the head itself (transformers' forward, :mod:`fptq.runtime.hf_fast`).
        ``timer``: an object whose ``mark(stage)`` is called after each stage (a profile, see
        :class:`fptq.runtime.timing.StageTimer`)."""
        b, t = ids.shape
        start = cache.length
        if b != cache.batch:
            raise ValueError(f"ids have batch {b}, the cache {cache.batch}")
        if start + t > cache.max_len:
            raise FptqError(f"the sequence would reach {start + t} tokens, the cache holds {cache.max_len}; "
                            "make a longer cache")
        cos_all, sin_all = self._rope(start + t)
        if t == 1 and timer is None and self.decode_program:
            prog = cache.program
            if prog is None or not prog.fits(self, cache, b):
                prog = cache.program = DecodeProgram(self, cache, b)
            h = prog.run(ids, start, cos_all, sin_all)  # its buffer: the norm below makes a new tensor
        else:
            h = self._prefill(ids, cache, start, cos_all, sin_all, timer, keep_all=logits in ("all", "hidden"))
        cache.length = start + t
        if logits == "none":
            return None
        h = h.view(b, -1, h.shape[-1])
        if logits == "last":
            h = h[:, -1]
        h = _rmsnorm(h, self.final_norm, self.final_eps)
        if logits == "hidden":
            return h.to(self.lm_head.weight.dtype)
        head = self.head
        out = head(h).float()
        if timer:
            timer.mark(f"final norm + lm_head ({head.label})")
        return out

    # -------------------------------------------------------------- generate
    @torch.inference_mode()
    def generate(self, ids: torch.Tensor, max_new_tokens: int = 64, *, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, eos_token_id: int | list[int] | None = None,
                 generator: torch.Generator | None = None, on_token=None) -> torch.Tensor:
        """Continue ``ids`` ``[B, T]`` by up to ``max_new_tokens`` tokens (greedy, or sampled with
        ``temperature``/``top_p``); stops when every row has produced an EOS token. ``on_token(tokens [B])`` is
        called after each step (streaming). Returns ``[B, T + n]``."""
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        cache = self.new_cache(ids.shape[0], ids.shape[1] + max_new_tokens)
        return decode_loop(ids, self.forward(ids, cache), lambda nxt: self.forward(nxt[:, None], cache),
                           max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                           eos_token_id=eos_token_id, generator=generator, on_token=on_token)


def decode_loop(ids: torch.Tensor, logits: torch.Tensor, step, max_new_tokens: int, *, do_sample: bool = False,
                temperature: float = 1.0, top_p: float = 1.0, eos_token_id: int | list[int] | None = None,
                generator: torch.Generator | None = None, on_token=None) -> torch.Tensor:
    """The token loop of a generation: from the prompts ``ids`` ``[B, T]`` and their last logits, pick a token per
    row (:func:`pick_tokens`, on the CPU), hand it to ``on_token``, and get the next logits from ``step(tokens
    [B])``; rows that produced an EOS token keep emitting it, and the loop ends when all have. ``[B, T + n]``."""
    eos = sorted(set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or [])))
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    out = [ids.cpu()]
    for i in range(max_new_tokens):
        nxt = pick_tokens(logits.float().cpu(), do_sample, temperature, top_p, generator)
        if eos:
            nxt = torch.where(done, torch.tensor(eos[0]), nxt)
            done |= torch.isin(nxt, torch.tensor(eos))
        out.append(nxt[:, None])
        if on_token is not None:
            on_token(nxt)
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        logits = step(nxt)
    return torch.cat(out, dim=1)


def pick_tokens(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row of ``logits`` ``[B, V]``: the argmax, or a sample at ``temperature`` from the
    smallest set of tokens whose probability reaches ``top_p``."""
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits / max(temperature, 1e-5), dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True)
        keep = sp.cumsum(-1) - sp < top_p
        sp = sp * keep
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class EngineLM:
    """An :class:`Engine` seen as a causal LM for evaluation code: ``lm(ids).logits`` (``[B, T, V]``) runs
    ``ids`` through a fresh cache; ``parameters()`` are the model's."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def parameters(self):
        return self.engine.model.parameters()

    def __call__(self, ids: torch.Tensor, **_: object) -> SimpleNamespace:
        cache = self.engine.new_cache(ids.shape[0], ids.shape[1])
        return SimpleNamespace(logits=self.engine.forward(ids, cache, logits="all"))

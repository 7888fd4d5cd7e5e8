"""A decode step of the runtime bound once (:class:`DecodeProgram`).

Decoding one token per sequence is memory-bound and short: SmolLM2's step reads 86 MiB of weights in about
5 ms on two AVX2 cores, and the ~300 native calls of a step cost about 10 us each in Python (argument
conversion, output descriptors, quantizer buffers, views): 3 ms more (measured with ``cProfile`` and against
the bare calls). A :class:`DecodeProgram` builds every call of a step once -- the ``*_call`` builders of
:mod:`fptq.kernels.native`, pointing into buffers that stay put: the engine's workspace for that batch, the
KV cache, quantizer buffers of its own -- and a step only writes the position into the rotary-embedding and
attention calls before making them. The numerics are those of :meth:`fptq.runtime.Engine.forward`'s loop (the
same calls in the same order).

It covers what the fused loop covers with native kernels only: every Linear group W4A8, no q/k norms, head
size a multiple of 16 up to 128 (:func:`program_problem`); the engine uses its loop otherwise.
"""
from __future__ import annotations

import torch

from ..kernels import native

__all__ = ["DecodeProgram", "program_problem"]


def program_problem(engine) -> str | None:
    """Why ``engine``'s decode steps cannot run as a :class:`DecodeProgram` (``None`` if they can)."""
    if not engine._native:
        return "the native kernels are unavailable"
    if engine.head_dim % 16 or engine.head_dim > 128:
        return f"head size {engine.head_dim}"
    for layer in engine.layers:
        if layer.q_norm is not None:
            return "q/k norms"
        kinds = {g.kind for g in layer.groups()}
        if kinds != {"w4a8"}:
            return f"Linear groups of kind {', '.join(sorted(kinds - {'w4a8'}))}"
    return None


class DecodeProgram:
    """The native calls of one decode step (one token per sequence, ``batch`` sequences) of ``engine`` on
    ``cache``, bound once; :meth:`run` makes a step and returns the residual stream after the last layer
    (float32 ``[batch, hidden]``, a buffer of the program: the next step overwrites it)."""

    def __init__(self, engine, cache, batch: int):
        b, nt = batch, torch.get_num_threads()
        self.engine, self.batch, self.threads = engine, b, nt
        self.keys, self.values, self.key_scales = cache.keys, cache.values, cache.key_scales
        ws = engine._workspace(b, 1)
        self._ws = ws  # keeps the buffers alive if the engine drops this workspace
        nh, nkv, hd = engine.n_heads, engine.n_kv, engine.head_dim
        self.h = torch.empty(b, engine.config.hidden_size, dtype=torch.float32)
        shared: dict[tuple[int, int], tuple] = {}  # quantized inputs of one shape, used by the stages in turn

        def buffers(group) -> tuple:
            shape = group.quant_shape()
            if shape not in shared:
                shared[shape] = native.QuantOut.buffers(b, *shape)
            return shared[shape]

        self._quants = []  # the QuantOut structures the calls point at
        calls, self._rope, self._attn = [], [], []
        q4, a4 = ws["q"], ws["attn"]  # [b, nh, 1, hd]
        q3, a3, a2 = q4.view(b, nh, hd), a4.view(b, nh, hd), a4.view(b, nh * hd)
        for li, layer in enumerate(engine.layers):
            dq, dkv, ffn = layer.dq, layer.dkv, layer.ffn
            scales = cache.scales(li)
            ks, vs = scales.get("kscale"), scales.get("vscale")
            qin = layer.qkv.new_quant_out(buffers(layer.qkv))
            calls.append(native.rmsnorm_call(self.h, layer.ln1, layer.eps1, None, qin, nt))
            qkv = ws["qkv"]
            calls.append(layer.qkv.gemm.call(*qin.tensors, [qkv[:, :dq], qkv[:, dq:dq + dkv], qkv[:, dq + dkv:]],
                                             False, nt))
            call = native.rope_cache_call(qkv, b, 1, nh, nkv, hd, 0, 0, q4, cache.keys[li], cache.values[li], 0, ks,
                                          vs, nt)
            self._rope.append(call[1])
            calls.append(call)
            call = native.decode_attention_call(q3, cache.keys[li], cache.values[li], 1, engine.scaling, a3, ks, vs,
                                                nt)
            self._attn.append(call[1])
            calls.append(call)
            o = layer.o.w
            ob = buffers(layer.o)
            calls.append(native.quantize_call(a2, o.kp, o.act_mode, o.act_scale, o.qmax, o.group_size, o.groups, ob,
                                              nt))
            calls.append(layer.o.gemm.call(*ob, [self.h], True, nt))
            qgu = layer.gate_up.new_quant_out(buffers(layer.gate_up))
            calls.append(native.rmsnorm_call(self.h, layer.ln2, layer.eps2, None, qgu, nt))
            gu = ws["gu"]
            calls.append(layer.gate_up.gemm.call(*qgu.tensors, [gu[:, :ffn], gu[:, ffn:]], False, nt))
            qdn = layer.down.new_quant_out(buffers(layer.down))
            calls.append(native.silu_mul_call(gu, ffn, None, qdn, nt))
            calls.append(layer.down.gemm.call(*qdn.tensors, [self.h], True, nt))
            self._quants += [qin, qgu, qdn]
        self.calls = calls

    def fits(self, engine, cache, batch: int) -> bool:
        """Whether this program still runs ``engine`` on ``cache`` (the same cache tensors, batch and threads)."""
        return (self.engine is engine and self.batch == batch and self.keys is cache.keys
                and self.values is cache.values and self.key_scales is cache.key_scales
                and self.threads == torch.get_num_threads())

    def run(self, ids: torch.Tensor, start: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """One step for token ids ``[batch, 1]`` at position ``start``; ``cos``/``sin``: the engine's rotary
        tables ``[n, hd]`` (float32, contiguous) with ``n > start``."""
        self.h.copy_(self.engine.embed(ids).view(self.batch, -1))
        row = cos.stride(0) * cos.element_size()
        cp, sp = cos.data_ptr() + start * row, sin.data_ptr() + start * row
        for args in self._rope:
            args[native.ROPE_COS], args[native.ROPE_SIN], args[native.ROPE_START] = cp, sp, start
        for args in self._attn:
            args[native.ATTENTION_LENGTH] = start + 1
        for fn, args in self.calls:
            fn(*args)
        return self.h

"""The operations between the Linears of a LLaMA-shaped decode step, one launch each on a GPU: fptq's fused decode
step (:mod:`fptq.runtime.fused_step`) calls these instead of transformers' modules, which issue ~50 kernels per
layer where these issue 5 (issue 28: a graph-replayed decode step of a small batch pays a microsecond or two per
kernel, as much as reading a 7B model's 4-bit weights).

Each operation has a PyTorch form (the exact operations of transformers' LLaMA modules, so the same bits as
them on the same device) and a Triton form (:mod:`fptq.kernels.triton_decode`: one kernel, the same rounding
steps in the model's dtype, float32 sums in another order). ``use_triton``: the Triton form (CUDA tensors, or
CPU tensors under Triton's interpreter, how the tests run it); otherwise PyTorch's.

* :func:`add_rmsnorm`: ``h += delta`` (the residual add, in the model's dtype) then RMSNorm of ``h``;
* :func:`rope_write_kv`: rotary embedding of the new token's queries and keys, keys and values written into a
  static cache at the position held in a device tensor (so a CUDA graph replays it at every position);
* :func:`decode_attention`: each query head over its key/value head's cached positions ``0..pos`` (the Triton
  form reads only those; the PyTorch form masks the rest of the static cache, as transformers does);
* :func:`silu_mul`: ``silu(gate) * up``.

:func:`add_rmsnorm` and :func:`silu_mul` also quantize their output when asked (``quant``, :func:`quantize_rows`):
the int8 input of the W4A8 Linears that read it, made in the same launch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import quantize_per_token, quantize_static

__all__ = ["add_rmsnorm", "decode_attention", "quantize_rows", "rope_write_kv", "rotate_half", "silu_mul"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[-x2, x1]`` for the halves ``x1, x2`` of the last dimension (transformers' LLaMA rotation)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def quantize_rows(x: torch.Tensor, quant: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes ``[M, K]`` of the rows of ``x`` and their scale for ``quant`` = ``(static scale or None, activation
    bits)``: a 0-d static scale as given, or per-token scales ``[M]`` -- QuantLinear's quantizers
    (:func:`fptq.quant.quantize_static`, :func:`fptq.quant.quantize_per_token`)."""
    scale, bits = quant
    if scale is None:
        q, s = quantize_per_token(x, bits)
        return q, s.reshape(-1)
    return quantize_static(x, scale, bits), scale


def add_rmsnorm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                use_triton: bool = False, quant: tuple | None = None):
    """RMSNorm of the residual stream ``h`` ``[M, K]`` after ``h += delta`` (in place, ``h``'s dtype; no add
    when ``delta`` is None): ``weight * (h * rsqrt(mean(h^2) + eps))``, the mean in float32 and the normalized
    rows rounded to ``h``'s dtype before the weight, as transformers' ``LlamaRMSNorm``. Returns a new tensor;
    with ``quant`` (:func:`quantize_rows`'s) ``(out, codes, scale)``: the int8 input of the W4A8 Linears that read
    it, quantized in the same launch."""
    if use_triton:
        from .triton_decode import add_rmsnorm_triton

        return add_rmsnorm_triton(h, delta, weight, eps, quant)
    if delta is not None:
        h.add_(delta.view_as(h))
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * x.to(h.dtype)
    return out if quant is None else (out, *quantize_rows(out, quant))


def rope_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, use_triton: bool = False,
                  qk_norm: tuple | None = None) -> torch.Tensor:
    """One new token per sequence: queries ``q`` ``[B, Hq * D]``, keys and values ``k``, ``v`` ``[B, Hkv * D]``
    (the projections' outputs); ``cos``, ``sin`` ``[L, D]`` the rotary tables of every cache position (the
    model's dtype); ``pos`` a one-element int64 tensor, the position. Writes the rotated keys and the values into
    ``k_cache``, ``v_cache`` ``[B, Hkv, L, D]`` at ``pos`` and returns the rotated queries ``[B, Hq, D]``
    (``x * cos + rotate_half(x) * sin``, each product rounded to the model's dtype, as transformers does).
    ``qk_norm``: ``((q_weight, q_eps), (k_weight, k_eps))``, per-head RMSNorms of the queries and keys before the
    rotation (Qwen3's ``q_norm`` / ``k_norm``)."""
    b, hkv, _, d = k_cache.shape
    if use_triton:
        from .triton_decode import rope_write_kv_triton

        return rope_write_kv_triton(q, k, v, cos, sin, pos, k_cache, v_cache, qk_norm)
    c, s = cos.index_select(0, pos), sin.index_select(0, pos)  # [1, D]: no host read of pos
    qh, kh = q.view(b, -1, d), k.view(b, hkv, d)
    if qk_norm is not None:
        (qw, q_eps), (kw, k_eps) = qk_norm
        qh, kh = add_rmsnorm(qh, None, qw, q_eps), add_rmsnorm(kh, None, kw, k_eps)
    k_cache.index_copy_(2, pos, (kh * c + rotate_half(kh) * s).unsqueeze(2))
    v_cache.index_copy_(2, pos, v.view(b, hkv, 1, d))
    return qh * c + rotate_half(qh) * s


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     scaling: float, use_triton: bool = False, splits: int | None = None, quant: tuple | None = None,
                     counters: torch.Tensor | None = None):
    """Softmax attention of one query per sequence and head, ``q`` ``[B, Hq, D]``, over the cached positions
    ``0..pos`` of ``k_cache``, ``v_cache`` ``[B, Hkv, L, D]`` (query head ``h`` reads key/value head
    ``h // (Hq / Hkv)``); scores scaled by ``scaling``, softmax in float32. Returns ``[B, Hq * D]`` in ``q``'s
    dtype (what the output projection takes). ``splits``: the Triton form's split of the positions among
    programs (default: :func:`fptq.kernels.triton_decode.attention_splits`). ``quant`` (a static scale only):
    ``(out, codes, scale)`` as :func:`add_rmsnorm`. ``counters``: the Triton form's, to combine the splits in
    the same launch (:func:`~fptq.kernels.triton_decode.decode_attention_triton`)."""
    if use_triton:
        from .triton_decode import decode_attention_triton

        return decode_attention_triton(q, k_cache, v_cache, pos, scaling, splits, quant, counters)
    if quant is not None and quant[0] is None:
        raise ValueError("decode_attention quantizes its output with a static scale only")
    b, hq, d = q.shape
    hkv, length = k_cache.shape[1], k_cache.shape[2]
    keys = k_cache.repeat_interleave(hq // hkv, dim=1)
    values = v_cache.repeat_interleave(hq // hkv, dim=1)
    scores = torch.matmul(q.unsqueeze(2), keys.transpose(2, 3)).float() * scaling  # [B, Hq, 1, L]
    hidden = torch.arange(length, device=q.device) > pos  # positions not yet written
    scores = scores.masked_fill(hidden, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = torch.matmul(probs, values).reshape(b, hq * d)
    return out if quant is None else (out, *quantize_rows(out, quant))


def silu_mul(gate: torch.Tensor, up: torch.Tensor, use_triton: bool = False, quant: tuple | None = None):
    """``silu(gate) * up`` (each step rounded to the inputs' dtype, as PyTorch's two operations are); with
    ``quant`` ``(out, codes, scale)`` as :func:`add_rmsnorm`."""
    if use_triton:
        from .triton_decode import silu_mul_triton

        return silu_mul_triton(gate, up, quant)
    out = F.silu(gate) * up
    return out if quant is None else (out, *quantize_rows(out, quant))

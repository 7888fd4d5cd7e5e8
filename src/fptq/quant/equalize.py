"""Activation equalization scales and the exact folds that apply them.

For a Linear ``y = x W^T`` and per-input-channel scales ``s > 0``:
``y = (x / s) (W * s)^T``. The division is folded into whatever produces ``x``
so that it costs nothing at run time:

* an RMSNorm/LayerNorm: divide its weight (and bias) by ``s``;
* a Linear whose output rows are ``x``'s channels: divide those rows (and the
  bias entries) by ``s``;
* a fused query/key/value Linear with per-head interleaved rows (BLOOM) whose
  value rows, through attention, become ``x``'s channels: divide those rows.
"""
from __future__ import annotations

import copy

import torch

__all__ = [
    "lae_scales",
    "smoothquant_scales",
    "scale_linear_inputs",
    "fold_into_norm",
    "fold_into_linear_outputs",
    "fold_into_fused_qkv_v",
    "norm_fold_is_exact",
    "expand_kv_scales",
    "reduce_to_kv_channels",
]


def lae_scales(act_absmax: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Logarithmic activation equalization: ``s_j = m_j / log2(2 + m_j)``.

    Channels that never fire (``m_j == 0``) get scale 1 (no change).
    """
    m = act_absmax.float().clamp_min(0)
    s = m / torch.log2(2 + m)
    return torch.where(m > eps, s, torch.ones_like(s))


def smoothquant_scales(
    act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float = 0.5, eps: float = 1e-5
) -> torch.Tensor:
    """SmoothQuant: ``s_j = max|x_j|^alpha / max|w_j|^(1 - alpha)``.

    ``weight_absmax`` is the max over all output rows of every Linear that
    shares this input (per input channel).
    """
    a = act_absmax.float().clamp_min(eps)
    w = weight_absmax.float().clamp_min(eps)
    s = a.pow(alpha) / w.pow(1 - alpha)
    return s.clamp_min(eps)


def scale_linear_inputs(linear: torch.nn.Linear, s: torch.Tensor) -> None:
    """Multiply the input columns of ``linear.weight`` by ``s`` (in place)."""
    with torch.no_grad():
        linear.weight.mul_(s.to(linear.weight.dtype).view(1, -1))


def fold_into_norm(norm: torch.nn.Module, s: torch.Tensor, weight_offset: float = 0.0) -> None:
    """Divide the norm's output channels by ``s`` (in place).

    ``weight_offset`` handles norms that scale by ``offset + weight`` (Gemma:
    1): the effective gain ``offset + w`` is divided by ``s``.
    """
    with torch.no_grad():
        w = norm.weight
        new = (w.float() + weight_offset) / s.float() - weight_offset
        w.copy_(new.to(w.dtype))
        bias = getattr(norm, "bias", None)
        if bias is not None:
            bias.copy_((bias.float() / s.float()).to(bias.dtype))


def fold_into_linear_outputs(linear: torch.nn.Linear, s: torch.Tensor) -> None:
    """Divide the output rows (and bias) of ``linear`` by ``s`` (in place)."""
    with torch.no_grad():
        linear.weight.div_(s.to(linear.weight.dtype).view(-1, 1))
        if linear.bias is not None:
            linear.bias.div_(s.to(linear.bias.dtype))


def fold_into_fused_qkv_v(linear: torch.nn.Linear, s: torch.Tensor, num_heads: int) -> None:
    """Divide the value rows of a fused QKV Linear by ``s`` (in place).

    The rows are laid out ``[num_heads, 3, head_dim]`` (query, key, value of
    each head: BLOOM's ``query_key_value``); attention output channel
    ``h * head_dim + j`` is a convex combination of value row ``j`` of head
    ``h``, so dividing that row (and its bias) by ``s[h * head_dim + j]``
    divides the attention output channel by it. Query and key rows are untouched.
    """
    d = s.numel() // num_heads
    if linear.out_features != 3 * num_heads * d:
        raise ValueError(f"a fused QKV Linear of {num_heads} heads of size {d} has {3 * num_heads * d} outputs, "
                         f"not {linear.out_features}")
    full = torch.ones(num_heads, 3, d, dtype=torch.float32, device=s.device)
    full[:, 2, :] = s.float().view(num_heads, d)
    fold_into_linear_outputs(linear, full.reshape(-1))  # dividing by 1 leaves q and k rows bit-identical


def norm_fold_is_exact(norm: torch.nn.Module, s: torch.Tensor, weight_offset: float = 0.0,
                       rtol: float = 1e-3) -> bool:
    """Whether :func:`fold_into_norm` with ``weight_offset`` divides ``norm``'s output by ``s``.

    Checked on a copy in float32 with a fixed random input: it catches a norm
    that does not scale by ``weight_offset + weight`` (e.g. a Gemma-style norm
    taken for a LLaMA one). ``norm`` itself is not changed.
    """
    probe = copy.deepcopy(norm).float()
    w = probe.weight
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, w.numel(), generator=g).to(w.device)
    s = s.float().to(w.device)
    with torch.no_grad():
        ref = probe(x)
        fold_into_norm(probe, s, weight_offset)
        out = probe(x) * s
    return bool(torch.allclose(out, ref, rtol=rtol, atol=rtol * float(ref.abs().max().clamp_min(1e-6))))


def reduce_to_kv_channels(o_absmax: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Max over the query heads that share a KV head.

    ``o_absmax`` has one entry per o_proj input channel (``num_heads * d``);
    the result has one per v_proj output channel (``num_kv_heads * d``).
    """
    d = o_absmax.numel() // num_heads
    groups = num_heads // num_kv_heads
    return o_absmax.view(num_kv_heads, groups, d).amax(dim=1).reshape(-1)


def expand_kv_scales(s_kv: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Inverse layout of :func:`reduce_to_kv_channels`: one scale per o_proj input."""
    d = s_kv.numel() // num_kv_heads
    groups = num_heads // num_kv_heads
    return s_kv.view(num_kv_heads, 1, d).expand(num_kv_heads, groups, d).reshape(-1)

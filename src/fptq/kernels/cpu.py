"""CPU integer paths for :class:`~fptq.nn.QuantLinear`, built on ``torch._int_mm``.

``torch._int_mm`` (int8 x int8 -> int32, oneDNN; AMX / AVX512-VNNI on recent
Xeons) is many times faster than an fp32 GEMM on the same shape. Two variants:

``int8_perchannel`` (fast, approximate; the QQQ / OdysseyLLM approach)
    At first use the group-scaled 4-bit weights are re-expressed as int8 codes
    with ONE scale per output channel::

        s_c[n]   = max_g s_g[n, g] * 2**(wbits-1) / 127
        W8[n, k] = clamp(round(q[n, k] * s_g[n, g(k)] / s_c[n]), -127, 127)

    (one more rounding, ``|W8| <= 127``), then ``y = int_mm(x_q, W8^T) * (s_x *
    s_c) + bias`` -- a single integer GEMM over the whole K.  When the layer is
    already per-channel (one group per row) the original codes and scales are
    used unchanged and the result is exact (same maths as the reference); so
    is it when the group scales are integer multiples of one scale per channel
    (``--group-scales integer``, :mod:`fptq.quant.intscales`): then
    ``W8 = q * m`` and ``s_c`` is the channel's base, without a rounding.
    **Memory:** the int8 weight (1 byte per weight, i.e. twice the packed int4
    size) and the ``[N]`` scales are cached on the module (``module._cache``).

``int8_grouped`` (exact group-wise)
    ``y = s_x * sum_g s_g[:, g] * (x_q[:, g] @ q[g, :]^T)``: one int32 partial
    product per group (``torch._int_mm`` on the group's K slice), its scale
    applied in float32.  Mathematically identical to the reference; only the
    float summation order differs.  The output is blocked along N so that each
    block's partials stay in L2.  **Memory:** the int8 codes, laid out
    group-major (1 byte per weight), are cached on the module.

Activation quantization follows the module's ``act_mode`` (static per-tensor
scale, or dynamic per-token ``absmax(row)/qmax``) and produces codes
bit-identical to :meth:`QuantLinear.quantize_input`.

Other layers get a sensible path: 8-bit weights (int8 ``[N, K]``, per-channel
or grouped) go through the same two variants; ``act_mode='none'`` (float
activations, e.g. W4A16) dequantizes the weight block by block and uses a
float32 matmul (``float_forward``).
"""
from __future__ import annotations

import torch

from ..quant.activations import act_qmax
from ..quant.intscales import integer_weight_codes

__all__ = [
    "quantize_activations",
    "int8_perchannel_forward",
    "int8_grouped_forward",
    "float_forward",
    "perchannel_weight",
    "grouped_weight",
    "clear_cpu_cache",
]

# Rows of weight dequantized/requantized at once (bounds transient memory).
_ROW_BLOCK = 1024


# --------------------------------------------------------------------- helpers
def _version(t: torch.Tensor) -> int:
    # inference tensors have no version counter (in-place edits of them are not tracked)
    return -1 if t.is_inference() else t._version


def _weight_key(module) -> tuple:
    qw, ws = module.qweight, module.w_scales
    return (qw.data_ptr(), _version(qw), tuple(qw.shape), ws.data_ptr(), _version(ws), qw.device)


def _cached(module, name: str, build):
    key = _weight_key(module)
    hit = module._cache.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = build(module)
    module._cache[name] = (key, value)
    return value


def clear_cpu_cache(module) -> None:
    """Drop the derived weights this module caches for the CPU kernels."""
    for name in ("cpu_w8_perchannel", "cpu_w8_grouped", "cpu_codes"):
        module._cache.pop(name, None)


def _group_size(module) -> int:
    return module.in_features if module.group_size <= 0 else module.group_size


def _codes(module) -> torch.Tensor:
    """int8 ``[N, K]`` weight codes (unpacked once, cached: 1 byte per weight)."""
    return _cached(module, "cpu_codes", lambda m: m.codes().contiguous())


# ----------------------------------------------------------- activations
def quantize_activations(module, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes ``[M, K]`` and scale (0-d, or ``[M, 1]`` per token) of ``x2d``.

    Bit-identical to :meth:`QuantLinear.quantize_input` (same float32 division
    and round-half-to-even), with fewer temporaries.
    """
    qmax = act_qmax(module.abits)
    xf = x2d.float()
    if module.act_mode == "static_tensor":
        scale = module.act_scale
    elif module.act_mode == "dynamic_token":
        scale = xf.abs().amax(dim=-1, keepdim=True).div_(qmax).clamp_min_(1e-8)
    else:
        raise ValueError("quantize_activations called on a layer with float activations (act_mode='none')")
    t = torch.div(xf, scale)
    t.round_().clamp_(-qmax, qmax)
    return t.to(torch.int8), scale


def _finish(y: torch.Tensor, module, x: torch.Tensor, lead: tuple) -> torch.Tensor:
    if module.bias is not None:
        y.add_(module.bias.float())
    return y.to(x.dtype).reshape(*lead, module.out_features)


def _check_input(module, x: torch.Tensor) -> None:
    if x.device.type != "cpu":
        raise ValueError(f"CPU kernels need CPU tensors, got a tensor on {x.device}")
    if x.shape[-1] != module.in_features:
        raise ValueError(f"expected input [..., {module.in_features}], got {tuple(x.shape)}")


# ------------------------------------------------------------ per-channel
def perchannel_weight(module) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 ``[N, K]`` codes with one float32 scale per output channel ``[N]`` (cached): exact for per-channel
    scales and integer group scales, one more rounding otherwise."""

    def build(m):
        codes = _codes(m)
        s = m.w_scales.float()
        if s.shape[1] == 1:  # already per-channel: exact, no requantization
            return codes, s[:, 0].contiguous()
        n, k = codes.shape
        gs = _group_size(m)
        exact = integer_weight_codes(codes, m.w_scales, gs, _ROW_BLOCK) if m.wbits == 4 else None
        if exact is not None:  # integer group scales: q * m over the channel's base, no rounding
            return exact
        lim = 2 ** (m.wbits - 1)  # largest |code|
        sc = s.abs().amax(dim=1) * (lim / 127.0)  # scales may be negative (signed-extreme rule)
        w8 = torch.empty(n, k, dtype=torch.int8)
        for r0 in range(0, n, _ROW_BLOCK):
            r1 = min(n, r0 + _ROW_BLOCK)
            se = s[r0:r1].repeat_interleave(gs, dim=1)[:, :k]
            t = codes[r0:r1].float() * se
            t.div_(sc[r0:r1, None]).round_().clamp_(-127, 127)
            w8[r0:r1] = t.to(torch.int8)
        return w8, sc

    return _cached(module, "cpu_w8_perchannel", build)


def int8_perchannel_forward(module, x: torch.Tensor) -> torch.Tensor:
    """``y = int_mm(x_q, W8^T) * (s_x * s_c) + bias`` (see module docstring)."""
    _check_input(module, x)
    if module.act_mode == "none":
        return float_forward(module, x)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, module.in_features)
    w8, sc = perchannel_weight(module)
    xq, sx = quantize_activations(module, x2)
    acc = torch._int_mm(xq, w8.t())
    if sx.dim() == 0:  # static: one combined vector
        y = acc.float().mul_(sc * sx)
    else:
        y = torch.mul(acc, sx).mul_(sc)
    return _finish(y, module, x, lead)


# ---------------------------------------------------------------- grouped
def grouped_weight(module) -> tuple[list[tuple[int, int]], list[torch.Tensor], torch.Tensor]:
    """Group-major int8 codes (cached): K ranges, ``[N, k1-k0]`` contiguous codes per
    group, and float32 scales ``[G, N]``."""

    def build(m):
        codes = _codes(m)
        k = m.in_features
        gs = _group_size(m)
        ranges = [(k0, min(k, k0 + gs)) for k0 in range(0, k, gs)]
        blocks = [codes[:, a:b].contiguous() for a, b in ranges] if len(ranges) > 1 else [codes]
        return ranges, blocks, m.w_scales.float().t().contiguous()

    return _cached(module, "cpu_w8_grouped", build)


def _n_block(m: int, n: int) -> int:
    # Keep one [M, nb] int32 partial + the float32 block accumulator in L2.
    if m <= 64:
        return n
    nb = max(128, (1 << 19) // (4 * m))  # ~512 KiB per [M, nb] buffer
    nb = 1 << (nb.bit_length() - 1)
    return min(n, nb)


def int8_grouped_forward(module, x: torch.Tensor) -> torch.Tensor:
    """Exact group-wise W·A integer path (see module docstring)."""
    _check_input(module, x)
    if module.act_mode == "none":
        return float_forward(module, x)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, module.in_features)
    ranges, blocks, sT = grouped_weight(module)
    xq, sx = quantize_activations(module, x2)
    m, n = xq.shape[0], module.out_features
    xs = [xq[:, a:b] for a, b in ranges] if len(ranges) > 1 else [xq]
    nb = _n_block(m, n)
    y = None if nb >= n else torch.empty(m, n, dtype=torch.float32)
    for n0 in range(0, n, nb):
        n1 = min(n, n0 + nb)
        yb = None
        for g, (xg, wg) in enumerate(zip(xs, blocks)):
            p = torch._int_mm(xg, wg[n0:n1].t())
            if yb is None:
                yb = p.float().mul_(sT[g, n0:n1])
            else:
                yb.addcmul_(p, sT[g, n0:n1])
        if y is None:
            y = yb
        else:
            y[:, n0:n1] = yb
    y.mul_(sx)
    return _finish(y, module, x, lead)


# ------------------------------------------------------------------ float
def float_forward(module, x: torch.Tensor) -> torch.Tensor:
    """Float activations (``act_mode='none'``, W4A16) or the fallback of the
    integer paths: dequantize the cached int8 codes ``_ROW_BLOCK`` rows at a time
    and multiply in float32 (same numerics as the reference up to summation
    order; only the int8 codes are kept, not a float32 copy of the weight)."""
    _check_input(module, x)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, module.in_features).float()
    if module.act_mode != "none":
        q, s = quantize_activations(module, x2)
        x2 = q.float() * s
    codes = _codes(module)
    s = module.w_scales.float()
    k = module.in_features
    gs = _group_size(module)
    n = module.out_features
    y = None if n <= _ROW_BLOCK else torch.empty(x2.shape[0], n, dtype=torch.float32)
    for r0 in range(0, n, _ROW_BLOCK):
        r1 = min(n, r0 + _ROW_BLOCK)
        w = codes[r0:r1].float().mul_(s[r0:r1].repeat_interleave(gs, dim=1)[:, :k])
        if y is None:
            y = x2 @ w.t()
        else:
            y[:, r0:r1] = x2 @ w.t()
    return _finish(y, module, x, lead)

"""GPTQ (Frantar et al., 2022): group-wise weight quantization with
second-order error feedback, on one Linear at a time.

The Hessian ``H = 2/n * sum x x^T`` is accumulated from the same calibration
inputs that the rest of the pipeline uses.
"""
from __future__ import annotations

import logging

import torch

from .weights import hessian_group_blocks, num_groups, qrange, weight_scales

log = logging.getLogger(__name__)

__all__ = ["HessianAccumulator", "gptq_quantize", "token_cap_weights"]


class HessianAccumulator:
    """``2/n * sum x x^T`` over rows of calibration inputs.

    ``dtype="float32"`` keeps a running average in float32 (the GPTQ reference code's way);
    ``"float64"`` adds each batch's float32 product into a float64 sum and divides once at the end
    (llm-compressor sums in float32 and divides at the end), so the result does not depend on how
    the rows were split into batches beyond float32 rounding of each product."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu", dtype: str = "float32") -> None:
        if dtype not in ("float32", "float64"):
            raise ValueError(f"Hessian dtype must be float32 or float64, not {dtype!r}")
        self.dtype = dtype
        self._acc = torch.zeros(in_features, in_features, dtype=getattr(torch, dtype), device=device)
        self.n = 0

    @property
    def h(self) -> torch.Tensor:
        """The Hessian ``2/n * sum x x^T`` as float32."""
        if self.dtype == "float32":
            return self._acc
        return (self._acc * (2.0 / max(self.n, 1))).float()

    def add(self, x: torch.Tensor, row_weights: torch.Tensor | None = None) -> None:
        """Add the rows of ``x``; ``row_weights`` (one per row, in [0, 1]) scale each row's
        contribution (a row of weight ``w`` counts as ``w`` rows)."""
        x = x.reshape(-1, x.shape[-1]).float().to(self._acc.device)
        m = x.shape[0]
        if m == 0:
            return
        if self.dtype == "float64":
            if row_weights is not None:
                x = x * row_weights.reshape(-1, 1).float().to(x.device).sqrt()
            self.n += m
            self._acc.add_(x.t() @ x)
            return
        # float32: the same operations in the same order as before the float64 option existed,
        # so default results stay bit-identical
        self._acc.mul_(self.n / (self.n + m))
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        if row_weights is not None:
            x = x * row_weights.reshape(-1, 1).float().to(x.device).sqrt()
        self._acc.addmm_(x.t(), x)


def token_cap_weights(x: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-row Hessian weights that cap every row's contribution at that of a row ``cap`` times
    the median row norm: ``min(1, (cap * median|x| / |x_t|)**2)``.

    A few tokens (the attention sink at the start of every window) reach norms hundreds of
    times the median at the input of some ``down_proj`` layers; uncapped, they make up almost
    the whole Hessian and GPTQ then fits those tokens at the expense of all others."""
    x = x.reshape(-1, x.shape[-1]).float()
    norms = x.norm(dim=1)
    limit = cap * norms.median()
    return torch.clamp(limit / norms.clamp_min(1e-12), max=1.0).pow(2)


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    clip_search: bool = False,
    scale_rounding: str = "nearest",
    clip_objective: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Quantize ``w`` (``[N, K]``) with GPTQ.

    Returns ``(codes int8 [N, K], fp16 scales [N, G], used_gptq)``. Scales are
    chosen per group from the *updated* weights when the group is reached
    (unless ``static_groups``), as in the reference implementation; with
    ``act_order`` columns are processed by decreasing Hessian diagonal (the
    group of each column stays its original group, so the checkpoint layout is
    unchanged; this implies ``static_groups``). If the Cholesky factorisation
    fails even after extra dampening, falls back to round-to-nearest and
    returns ``used_gptq=False``. ``scale_rounding``: how the float16 scales are
    rounded (:func:`~fptq.quant.weights.weight_scales`; nearest, what GPTQ measured best with; the
    round-to-nearest fallback rounds down, as round-to-nearest weights do). ``clip_objective``: what
    the clip search (``clip_search``) scores a group's scale on: ``"weight"`` (the group's squared weight
    error) or ``"output"`` (the error it adds to the Linear's output, ``d^T H_g d`` with ``H_g`` the
    group's diagonal block of ``h``: activation-aware clipping from the Hessian GPTQ already has).
    """
    from .weights import quantize_weight

    if clip_objective not in ("weight", "output"):
        raise ValueError(f"clip_objective must be 'weight' or 'output', not {clip_objective!r}")
    qmin, qmax = qrange(bits)
    w = w.float().clone()
    n, k = w.shape
    gs = k if group_size <= 0 else group_size
    g = num_groups(k, gs)
    h = h.float().clone()

    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    blocks = hessian_group_blocks(h, gs) if clip_search and clip_objective == "output" else None

    if act_order:
        static_groups = True
    scales = torch.zeros(n, g, dtype=torch.float16)
    if static_groups:
        scales = weight_scales(w, bits, gs, clip_search=clip_search, gram=blocks, rounding=scale_rounding)

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w = w[:, perm]
        h = h[perm][:, perm]

    hinv = None
    mean_diag = torch.mean(torch.diag(h))
    for attempt, factor in enumerate((1.0, 10.0, 100.0)):
        hd = h.clone()
        idx = torch.arange(k)
        hd[idx, idx] += damp * factor * mean_diag
        try:
            lchol = torch.linalg.cholesky(hd)
            hinv = torch.cholesky_inverse(lchol)
            hinv = torch.linalg.cholesky(hinv, upper=True)
            break
        except torch.linalg.LinAlgError:
            continue
    if hinv is None:
        log.warning("GPTQ: Cholesky factorisation failed; falling back to round-to-nearest")
        w0 = w if perm is None else w[:, torch.argsort(perm)]
        sc = weight_scales(w0, bits, gs, clip_search=clip_search)  # rounded down, as round-to-nearest's are
        return quantize_weight(w0, sc, bits, gs), sc, False

    col_group = torch.arange(k) // gs
    if perm is not None:
        col_group = col_group[perm]
    groups = col_group.tolist()
    # the column loop works on the transposed weights: a column is then one contiguous row, and the
    # few small ops per column (the loop's cost is their overhead) run on contiguous memory
    wt = w.t().contiguous()  # [K, N]
    qt = torch.empty(k, n)  # codes, as floats, transposed
    s, s_grp = None, -1
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wt[i1:i2]  # a view: updates land in wt
        err1 = torch.empty_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        neg_d = (-torch.diagonal(hinv1)).tolist()
        for i in range(i2 - i1):
            col = i1 + i
            grp = groups[col]
            if not static_groups and col % gs == 0:
                # the group starts here (columns are in original order): its scale from the updated weights
                end = min(col + gs, k)
                block = torch.cat([w1[i:], wt[i2:end]])[: end - col]
                gram = blocks[grp:grp + 1] if blocks is not None else None  # zero-padded as weight_scales pads
                scales[:, grp] = weight_scales(block.t(), bits, gs, clip_search=clip_search, gram=gram,
                                               rounding=scale_rounding)[:, 0]
                s_grp = -1
            if grp != s_grp:
                s, s_grp = scales[:, grp].float(), grp
            wc = w1[i]
            qc = qt[col]
            torch.div(wc, s, out=qc).round_().clamp_(qmin, qmax)
            e = err1[i]
            torch.mul(qc, s, out=e)
            e.sub_(wc).div_(neg_d[i])  # (w - q s) / d
            if i + 1 < i2 - i1:
                w1[i + 1:].addr_(hinv1[i, i + 1:], e, alpha=-1.0)
        if i2 < k:
            wt[i2:].sub_(hinv[i1:i2, i2:].t() @ err1)
    q = qt.t().to(torch.int8).contiguous()

    if perm is not None:
        inv = torch.argsort(perm)
        q = q[:, inv].contiguous()
    return q, scales, True

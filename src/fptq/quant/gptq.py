"""GPTQ (Frantar et al., 2022): group-wise weight quantization with
second-order error feedback, on one Linear at a time.

The Hessian ``H = 2/n * sum x x^T`` is accumulated from the same calibration
inputs that the rest of the pipeline uses.
"""
from __future__ import annotations

import logging

import torch

from .intscales import integer_group_scales
from .weights import dequantize_weight, hessian_group_blocks, num_groups, qrange, weight_scales

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


def _working_hessian(h: torch.Tensor, perm: torch.Tensor | None, chunk: int = 1024) -> torch.Tensor:
    """A copy of ``h`` (``h[perm][:, perm]`` with ``perm``) laid out column-major, the layout LAPACK works in
    without copying. Made without a second temporary: the rows of the buffer (columns of the result)
    gathered, then each chunk of them permuted in place. (``h`` need not be exactly symmetric: the copy has
    its values at the same indices.)"""
    k = h.shape[0]
    buf = torch.empty(k, k, device=h.device)  # row-major; the result is its transpose
    src = h.t()
    if perm is None:
        buf.copy_(src)
    else:
        torch.index_select(src, 0, perm, out=buf)
        for i in range(0, k, chunk):
            buf[i:i + chunk] = buf[i:i + chunk].index_select(1, perm)
    return buf.t()


def _inverse_factor(h: torch.Tensor, perm: torch.Tensor | None, damp: float,
                    damping: list[float] | None = None) -> torch.Tensor | None:
    """The upper Cholesky factor of the inverse of ``h`` (permuted by ``perm``) dampened by ``damp`` times its
    mean diagonal (10x and 100x more if the factorisation fails); ``None`` if it still fails. The value
    added to the diagonal is appended to ``damping`` when given.

    Everything happens in one ``K x K`` buffer, column-major (the result too): the dampened Hessian,
    overwritten by its Cholesky factor, then by the inverse, then by the inverse's factor (LAPACK's
    in-place routines; the same bits as out-of-place). A retry rebuilds the buffer from ``h``, which is
    never written."""
    mean_diag = None
    for factor in (1.0, 10.0, 100.0):
        # column-major: LAPACK works in the buffer itself (a row-major one it copies for each call)
        f = _working_hessian(h, perm)
        if mean_diag is None:
            mean_diag = torch.mean(torch.diag(f))
        f.diagonal().add_(damp * factor * mean_diag)
        try:
            torch.linalg.cholesky(f, out=f)
            torch.cholesky_inverse(f, out=f)
            torch.linalg.cholesky(f, upper=True, out=f)
            if damping is not None:
                damping.append(float(damp * factor * mean_diag))
            return f
        except torch.linalg.LinAlgError:
            del f
    return None


def _transposed(parts: list[torch.Tensor], perm: torch.Tensor | None, chunk: int = 1024) -> torch.Tensor:
    """``cat(parts).t()`` (``[K, N]``) with its rows in ``perm``'s order, written piece by piece into one new
    tensor (no stacked or permuted intermediate the size of the weights)."""
    k = parts[0].shape[1]
    out = torch.empty(k, sum(p.shape[0] for p in parts), device=parts[0].device)
    off = 0
    for p in parts:
        pt = p.t()
        for c in range(0, k, chunk):
            out[c:c + chunk, off:off + p.shape[0]] = pt[c:c + chunk] if perm is None else pt[perm[c:c + chunk]]
        off += p.shape[0]
    return out


def gptq_quantize(
    w: torch.Tensor | list[torch.Tensor],
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
    scale_sign: str = "positive",
    clip_rows: str = "all",
    group_scales: str = "float",
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Quantize ``w`` (``[N, K]``, or a list of matrices with the same input, as if stacked: every output
    row is independent given ``h``) with GPTQ.

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
    ``scale_sign``: "positive" or "signed" scales (:func:`~fptq.quant.weights.weight_scales`'s ``sign``).
    ``clip_rows`` (with ``clip_search``): ``"all"``, every row takes the searched clip; ``"best"``, every row is
    quantized twice, with the searched clip and without (scales from the group's extreme), in one column loop
    over the rows stacked twice, and keeps the result with the smaller error on the calibration outputs,
    ``(w - q) H (w - q)^T``: GPTQ's loss ``sum (w - q)^2 / d^2`` over the row's columns is exactly that error
    for the dampened ``H + lam I``, so the error is the loss less ``lam |w - q|^2``. The clip is kept only
    where it lowers the error GPTQ minimises. Twice the column loop's work and its working copy of the weights.

    ``group_scales="integer"``: every group's scale from :func:`~fptq.quant.intscales.integer_group_scales` of
    the weights before GPTQ (static groups; the clip search and ``scale_sign`` do not apply).

    Memory: one ``K x K`` float32 matrix besides the caller's ``h`` (:func:`_inverse_factor`), one float32
    copy of the weights (transposed, updated in place; two with ``clip_rows="best"``) and their int8 codes;
    the caller's ``w`` and ``h`` are never written.
    """
    from .weights import quantize_weight

    if clip_objective not in ("weight", "output"):
        raise ValueError(f"clip_objective must be 'weight' or 'output', not {clip_objective!r}")
    if clip_rows not in ("all", "best"):
        raise ValueError(f"clip_rows must be 'all' or 'best', not {clip_rows!r}")
    qmin, qmax = qrange(bits)
    parts = [x.float() for x in (w if isinstance(w, (list, tuple)) else [w])]
    del w
    n, k = sum(x.shape[0] for x in parts), parts[0].shape[1]
    gs = k if group_size <= 0 else group_size
    g = num_groups(k, gs)
    h = h.float()  # the caller's, never written: a retry rebuilds the working copy from it

    dead = torch.diag(h) == 0
    if bool(dead.any()):
        h = h.clone()
        h[dead, dead] = 1
        parts = [x.clone() for x in parts]
        for x in parts:
            x[:, dead] = 0
    blocks = hessian_group_blocks(h, gs) if clip_search and clip_objective == "output" else None

    integer = group_scales == "integer"
    if act_order or integer:
        static_groups = True
    if integer:
        clip_search = False
    dev = parts[0].device  # every buffer on the weights' device (the caller's choice: CPU or GPU)
    # the clip search of each stack of the rows: "best" runs them twice, rows [0, n) with the search, [n, 2n)
    # without
    two = clip_search and clip_rows == "best"
    halves = (clip_search, False) if two else (clip_search,)
    rows = n * len(halves)
    scales = torch.zeros(rows, g, dtype=torch.float16, device=dev)
    if integer:
        scales = torch.cat([integer_group_scales(x, gs, bits) for x in parts]).to(dev)
    elif static_groups:
        scales = torch.cat([weight_scales(x, bits, gs, clip_search=c, gram=blocks, rounding=scale_rounding,
                                          sign=scale_sign)
                            for c in halves for x in parts])

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)

    damping: list[float] = []
    hinv = _inverse_factor(h, perm, damp, damping)
    del h
    if hinv is None:
        log.warning("GPTQ: Cholesky factorisation failed; falling back to round-to-nearest")
        sc = scales if integer else \
            torch.cat([weight_scales(x, bits, gs, clip_search=clip_search, sign=scale_sign) for x in parts])  # rounded down,
        return torch.cat([quantize_weight(x, sc_x, bits, gs)  # as round-to-nearest's are
                          for x, sc_x in zip(parts, sc.split([x.shape[0] for x in parts]))]), sc, False

    col_group = torch.arange(k, device=perm.device if perm is not None else "cpu") // gs
    if perm is not None:
        col_group = col_group[perm]
    groups = col_group.tolist()
    # the column loop works on the transposed weights: a column is then one contiguous row, and the
    # few small ops per column (the loop's cost is their overhead) run on contiguous memory
    wt = _transposed(parts * len(halves), perm)  # [K, rows], columns in processing order
    if not two:  # "best" needs the weights as they came for the rows' errors (no copy: the caller's)
        del parts
    qt = torch.empty(k, rows, dtype=torch.int8, device=dev)  # codes, transposed
    qc = torch.empty(rows, device=dev)  # the column being quantized, its codes as floats
    loss = torch.zeros(rows, device=dev) if two else None  # each row's sum of (w - q)^2 / d^2
    s, s_grp = None, -1
    rows_per_update = max(1, (1 << 22) // max(rows, 1))
    hrow = torch.empty(min(block_size, k), k, device=dev)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wt[i1:i2]  # a view: updates land in wt
        err1 = torch.empty_like(w1)
        # this block's rows of the (column-major) factor, copied row-major with the row stride of a
        # row-major K x K matrix: the loop's products then see exactly the layout they were written for
        hb = hrow[: i2 - i1]
        hb[:, i1:].copy_(hinv[i1:i2, i1:])
        hinv1 = hb[:, i1:i2]
        neg_d = (-torch.diagonal(hinv1)).tolist()
        for i in range(i2 - i1):
            col = i1 + i
            grp = groups[col]
            if not static_groups and col % gs == 0:
                # the group starts here (columns are in original order): its scale from the updated weights
                end = min(col + gs, k)
                block = torch.cat([w1[i:], wt[i2:end]])[: end - col]
                gram = blocks[grp:grp + 1] if blocks is not None else None  # zero-padded as weight_scales pads
                bt = block.t()
                scales[:, grp] = torch.cat([
                    weight_scales(bt[r:r + n], bits, gs, clip_search=c, gram=gram, rounding=scale_rounding,
                                  sign=scale_sign)[:, 0]
                    for r, c in zip(range(0, rows, n), halves)])
                s_grp = -1
            if grp != s_grp:
                s, s_grp = scales[:, grp].float(), grp
            wc = w1[i]
            torch.div(wc, s, out=qc).round_().clamp_(qmin, qmax)
            qt[col].copy_(qc)
            e = err1[i]
            torch.mul(qc, s, out=e)
            e.sub_(wc).div_(neg_d[i])  # (w - q s) / d
            if i + 1 < i2 - i1:
                w1[i + 1:].addr_(hinv1[i, i + 1:], e, alpha=-1.0)
        if loss is not None:
            loss.add_(err1.square().sum(0))
        # the error fed forward to the columns not yet quantized, a block of rows at a time: the product's
        # temporary stays small (same values as the whole product at once)
        for r in range(i2, k, rows_per_update):
            wt[r:r + rows_per_update].sub_(hb[:, r:r + rows_per_update].t() @ err1)
    del wt
    q = qt.t().contiguous()
    del qt
    if perm is not None:
        inv = torch.argsort(perm)
        q = q[:, inv].contiguous()
    if loss is not None:
        # the loss is each row's error under the dampened Hessian, (w - q) (H + lam I) (w - q)^T: less
        # lam |w - q|^2 it is the row's error on the calibration outputs, what the choice is made on
        loss.sub_(_row_weight_error(parts, q, scales, gs), alpha=damping[0])
        keep = (loss[:n] <= loss[n:]).unsqueeze(1)  # the clipped result unless the unclipped one's is smaller
        log.debug("GPTQ: the weight clip kept on %d of %d rows", int(keep.sum()), n)
        q = torch.where(keep, q[:n], q[n:])
        scales = torch.where(keep, scales[:n], scales[n:])
    return q, scales, True


def _row_weight_error(parts: list[torch.Tensor], q: torch.Tensor, scales: torch.Tensor, group_size: int,
                      rows: int = 1024) -> torch.Tensor:
    """``sum (w - q s)^2`` along each row of ``q`` (codes, ``[c * N, K]``, ``scales`` ``[c * N, G]``) for the
    weights ``parts`` stacked ``c`` times (``N`` rows), a block of rows at a time."""
    w = [p[r:r + rows] for _ in range(q.shape[0] // sum(p.shape[0] for p in parts))
         for p in parts for r in range(0, p.shape[0], rows)]
    out, off = [], 0
    for wb in w:
        m = wb.shape[0]
        out.append((dequantize_weight(q[off:off + m], scales[off:off + m], group_size) - wb).square().sum(1))
        off += m
    return torch.cat(out)

"""Rotating the residual stream and the attention heads' values by orthogonal matrices (QuaRot / SpinQuant's
offline rotations ``R1`` and ``R2``), folded into the weights: the float model computes the same function and
keeps its architecture, so the kernels and exports need nothing new.

* ``R1`` (the residual stream, ``[hidden, hidden]``): every norm's weight is first folded into the Linears it
  feeds (and the final norm's into ``lm_head``, which is untied from the embedding), which leaves the norms a
  plain ``x / rms(x)``; that commutes with any orthogonal ``R``. Then the embedding's rows and the writers'
  outputs are turned by ``R`` and the readers' inputs by ``R`` as well. A randomized Hadamard ``R`` spreads each
  outlier channel over all channels: the inputs of q/k/v and gate/up lose their outliers.
* ``R2`` (one ``[head_dim, head_dim]`` for every head): turns ``v_proj``'s output rows and ``o_proj``'s input
  columns head by head, which flattens ``o_proj``'s inputs.

Only RMS norms (no bias, no mean) can be folded this way; :func:`rotation_problem` says why a model cannot.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .models import Adapter
from .quant.hadamard import hadamard_order_factors, kron_apply, random_hadamard, random_hadamard_factors
from .residual import residual_problem
from .st import TensorEntry, computed_entry, torch_dtype
from .stored_head import TRANSFORM_LEAF, head_transform, untie_config

__all__ = ["ROTATIONS", "FACTORED_MIN_HIDDEN", "Rotation", "random_rotation", "rotation_for", "rotation_problem", "rotate_layer",
           "rotate_embedding", "rotate_model", "rotated_outside_entries", "prepare_rotation"]

log = logging.getLogger(__name__)

ROTATIONS = ("none", "residual", "residual+heads")  # QuantConfig.rotation
#: hidden sizes from which the residual rotation multiplies by the Hadamard matrix's Kronecker factors
#: (:meth:`Rotation.turn`). Below, the dense float64 product costs seconds for a whole model and is kept: the
#: factored one differs by float64 rounding, which moves a few weights by one ulp and, through GPTQ's rounding
#: decisions, the results by run-to-run amounts (SmolLM2-135M, hidden 576: WikiText-2 24.045 against 23.964,
#: C4 37.803 against 38.174, bench/results/fptq_kron14_smol_20.md); the published results of the two real
#: models (hidden 576 and 896) were measured with the dense one. A 7B model's (4096) dense rotation took 20 s
#: per layer on 2 cores, the factored one 6.5 s with the layer's loading (bench/results/quantize_time_7b_cpu.md).
FACTORED_MIN_HIDDEN = 2048


@dataclass(frozen=True)
class Rotation:
    """The orthogonal matrices of one run (float64): the residual stream's ``[hidden, hidden]`` matrix
    (:attr:`residual`), given whole (``dense``) or as ``factors``, and ``heads`` ``[head_dim, head_dim]`` or None.
    ``factors``: the matrix as ``diag(scale) @ kron(*matrices)`` (a randomized Hadamard matrix,
    :func:`fptq.quant.hadamard.random_hadamard_factors`), with which :meth:`turn` multiplies in
    ``hidden * sum(orders)`` operations per row instead of ``hidden**2`` (4096: 128 instead of 4096); without
    them, dense products."""

    dense: torch.Tensor | None = None
    heads: torch.Tensor | None = None
    factors: tuple[torch.Tensor, list[torch.Tensor]] | None = None

    def __post_init__(self) -> None:
        if self.dense is None and self.factors is None:
            raise ValueError("a Rotation needs its residual matrix (dense) or its Hadamard factors")

    @property
    def shape(self) -> tuple[int, int]:
        """The residual matrix's shape (without building it)."""
        if self.dense is not None:
            return tuple(self.dense.shape)
        n = int(self.factors[0].numel())
        return n, n

    @functools.cached_property
    def residual(self) -> torch.Tensor:
        """The residual stream's matrix: ``dense``, or built from ``factors`` the first time it is asked for (on the
        factored path only a tied head's stored transform needs it: 128 MiB of float64 at hidden 4096, 512 MiB at
        8192, not held otherwise)."""
        if self.dense is not None:
            return self.dense
        return self.turn(torch.eye(self.shape[0], dtype=torch.float64))  # I @ residual

    def turn(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ residual`` for float64 rows ``x`` ``[..., hidden]``."""
        if self.factors is None:
            return x @ self.dense.to(torch.float64)
        scale, matrices = self.factors
        return kron_apply(x * scale, matrices)

    def turn_t(self, w: torch.Tensor) -> torch.Tensor:
        """``residual.T @ w`` for a float64 ``[hidden, c]`` block ``w`` (a writer's output rows)."""
        if self.factors is None:
            return self.dense.to(torch.float64).T @ w
        return self.turn(w.T).T


def random_rotation(n: int, seed: int) -> torch.Tensor:
    """A randomized Hadamard matrix of order ``n`` (:func:`fptq.quant.hadamard.random_hadamard`) where one can
    be built, else a random orthogonal matrix (the Q of a seeded Gaussian's QR, signs fixed): float64."""
    if hadamard_order_factors(n) is not None:
        return random_hadamard(n, seed)
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).view(1, -1)


def _head_dim(model: nn.Module) -> int:
    cfg = model.config
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def rotation_for(model: nn.Module, rotation: str, seed: int = 0) -> Rotation | None:
    """The matrices ``rotation`` (:data:`ROTATIONS`) asks for on ``model``, drawn with ``seed``; None for "none"."""
    if rotation not in ROTATIONS:
        raise ValueError(f"rotation must be one of {ROTATIONS}, not {rotation!r}")
    if rotation == "none":
        return None
    heads = random_rotation(_head_dim(model), seed + 1) if rotation == "residual+heads" else None
    h = int(model.config.hidden_size)
    if h >= FACTORED_MIN_HIDDEN and hadamard_order_factors(h) is not None:
        return Rotation(None, heads, random_hadamard_factors(h, seed))
    return Rotation(random_rotation(h, seed), heads)


def _head_pair(adapter: Adapter) -> tuple[str, str] | None:
    for g in adapter.groups:
        if g.kind == "linear" and g.kv_grouped and len(g.consumers) == 1:
            return g.producer, g.consumers[0]
    return None


def rotation_problem(model: nn.Module, adapter: Adapter) -> str | None:
    """Why ``model`` cannot be rotated exactly with ``adapter``'s table, or None. Reads only module types and
    names, so a model loaded layer by layer (weights still on disk) is judged as well."""
    problem = residual_problem(model, adapter)
    if problem:
        return problem
    spec = adapter.residual
    if list(spec.norms) != ["input_layernorm", "post_attention_layernorm"]:
        return f"{adapter.name}: norms after the sublayers ({', '.join(spec.norms)}) do not fold into the readers"
    norms = [adapter.layers(model)[0].get_submodule(n) for n in spec.norms] + [model.get_submodule(spec.final_norm)]
    for m in norms:
        if getattr(m, "bias", None) is not None or isinstance(m, nn.LayerNorm):
            return f"{type(m).__name__} subtracts the mean or adds a bias; only RMS norms fold into a rotation"
        if getattr(m, "weight", None) is None:
            return f"{type(m).__name__} has no weight to fold"
    return None


def _as64(p: torch.Tensor) -> torch.Tensor:
    return p.detach().to(torch.float64)


def _readers_of(adapter: Adapter, norm: str) -> tuple[str, ...]:
    return next(g.consumers for g in adapter.groups if g.kind == "norm" and g.producer == norm)


def _set(p: torch.Tensor, value: torch.Tensor) -> None:
    p.copy_(value.to(p.dtype))


@torch.no_grad()
def _fold_head(model: nn.Module, adapter: Adapter, rot: Rotation) -> None:
    """Untie ``lm_head`` and fold the final norm's weight into it, turned by ``rot`` in the same float64 product
    (one rounding, as :func:`rotated_outside_entries` writes it)."""
    spec = adapter.residual
    emb, head = model.get_submodule(spec.embeddings), model.get_submodule(spec.head)
    final = model.get_submodule(spec.final_norm)
    g = _as64(final.weight) + adapter.norm_weight_offset
    if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
        # what fptq.save writes instead of the untied head (fptq.stored_head): the turned embedding times it
        head.register_buffer(TRANSFORM_LEAF, head_transform(rot.residual.to(torch.float64), g).to(torch.float32))
    untie_config(model)
    _turn_inputs(head.weight, rot.turn, g)
    final.weight.fill_(1.0 - adapter.norm_weight_offset)


@torch.no_grad()
def _turn_inputs(w: torch.Tensor, turn: Callable[[torch.Tensor], torch.Tensor], g: torch.Tensor | None = None,
                 rows: int = 1024) -> None:
    """``w[:, :] = turn(w * g)`` in place (``turn``: :meth:`Rotation.turn`, ``x @ R``; ``g`` a column scale or
    None), ``rows`` rows at a time in float64 (a few MiB of temporaries, whatever the matrix)."""
    for a in range(0, w.shape[0], rows):
        piece = _as64(w[a:a + rows])
        piece = piece if g is None else piece * g.view(1, -1)
        _set(w[a:a + rows], turn(piece))


@torch.no_grad()
def _rotate_layer_heads(layer: nn.Module, adapter: Adapter, rh: torch.Tensor) -> None:
    v, o = (layer.get_submodule(n) for n in _head_pair(adapter))
    d = rh.shape[0]
    wv = _as64(v.weight)
    kv = wv.shape[0] // d
    _set(v.weight, torch.einsum("ji,kjc->kic", rh, wv.view(kv, d, -1)).reshape(wv.shape))
    if v.bias is not None:
        _set(v.bias, (_as64(v.bias).view(kv, d) @ rh).reshape(-1))
    wo = _as64(o.weight)
    _set(o.weight, (wo.view(wo.shape[0], -1, d) @ rh).reshape(wo.shape))


def _check(model: nn.Module, adapter: Adapter, rot: Rotation) -> None:
    problem = rotation_problem(model, adapter)
    if problem:
        raise ValueError(f"cannot rotate the residual stream: {problem}")
    h = int(model.config.hidden_size)
    if tuple(rot.shape) != (h, h):
        raise ValueError(f"the residual rotation must be [{h}, {h}], got {list(rot.shape)}")
    if rot.heads is not None:
        if _head_pair(adapter) is None:
            raise ValueError(f"{adapter.name}: no v_proj -> o_proj pair to rotate")
        d = _head_dim(model)
        if tuple(rot.heads.shape) != (d, d):
            raise ValueError(f"the head rotation must be [{d}, {d}], got {list(rot.heads.shape)}")


def rotate_layer(layer: nn.Module, adapter: Adapter, rot: Rotation) -> None:
    """One decoder layer's part of ``rot`` (its weights in memory): its norms folded into their readers, the
    readers' inputs and the writers' outputs turned by ``rot.residual``, the heads' values by ``rot.heads``."""
    spec, offset = adapter.residual, adapter.norm_weight_offset
    with torch.no_grad():
        for norm_name in spec.norms:  # fold and turn in one float64 product: one rounding to the weights' dtype
            norm = layer.get_submodule(norm_name)
            g = _as64(norm.weight) + offset
            for name in _readers_of(adapter, norm_name):
                _turn_inputs(layer.get_submodule(name).weight, rot.turn, g)
            norm.weight.fill_(1.0 - offset)
        for name in spec.writers:
            lin = layer.get_submodule(name)
            for a in range(0, lin.weight.shape[1], 1024):  # R.T @ W = (W.T @ R).T, a block of columns at a time
                _set(lin.weight[:, a:a + 1024], rot.turn_t(_as64(lin.weight[:, a:a + 1024])))
            if lin.bias is not None:
                _set(lin.bias, rot.turn(_as64(lin.bias)))
    if rot.heads is not None:
        _rotate_layer_heads(layer, adapter, rot.heads.to(torch.float64))


@torch.no_grad()
def rotate_embedding(model: nn.Module, adapter: Adapter, rot: Rotation) -> None:
    """Turn the embedding's rows by ``rot.residual`` (in memory) and untie ``lm_head`` in the config; the final
    norm and ``lm_head`` are left as they are (a model loaded layer by layer has them on disk:
    :func:`rotated_outside_entries` turns them as they are written)."""
    spec = adapter.residual
    emb, head = model.get_submodule(spec.embeddings), model.get_submodule(spec.head)
    if head.weight is emb.weight:  # untie: the head is written from the files (it stays on the meta device here)
        head.weight = nn.Parameter(torch.empty_like(emb.weight, device="meta"), requires_grad=False)
    _turn_inputs(emb.weight, rot.turn)
    untie_config(model)


def rotate_model(model: nn.Module, adapter: Adapter, rot: Rotation) -> None:
    """Apply ``rot`` to the whole ``model`` in memory: the same function, every norm scaling by one,
    ``lm_head`` untied. Refuses what :func:`rotation_problem` refuses and matrices of the wrong size."""
    _check(model, adapter, rot)
    _fold_head(model, adapter, rot)
    _turn_inputs(model.get_submodule(adapter.residual.embeddings).weight, rot.turn)
    for layer in adapter.layers(model):
        rotate_layer(layer, adapter, rot)


def rotated_outside_entries(entries: Iterable[TensorEntry], adapter: Adapter, rot: Rotation,
                            norm_weight_offset: float = 0.0, tied: bool = False) -> list[TensorEntry]:
    """The entries of the tensors outside the decoder layers (copied from a model's files) as the rotated
    model has them: the embedding turned, the final norm scaling by one, ``lm_head`` = the source's head (or
    its embedding, if tied) times the final norm's weight, turned. Each is computed when it is written.
    ``tied`` (a model whose head is its embedding): no head, but the ``[hidden, hidden]`` float32 matrix that
    turns the written embedding into it (:mod:`fptq.stored_head`, a third of SmolLM2-135M's checkpoint)."""
    spec = adapter.residual
    by_name = {e.name: e for e in entries}
    emb_name, head_name = f"{spec.embeddings}.weight", f"{spec.head}.weight"
    norm_name = f"{spec.final_norm}.weight"
    if emb_name not in by_name or norm_name not in by_name:
        raise ValueError(f"cannot rotate: {emb_name} or {norm_name} is not among the model's tensors")
    emb, norm = by_name[emb_name], by_name[norm_name]
    head_src = by_name.get(head_name, emb)

    def turned(src: TensorEntry, fold_norm: bool):
        def read() -> torch.Tensor:
            w = src.read().clone()  # never turn a tensor the entry shares in place
            _turn_inputs(w, rot.turn, _as64(norm.read()) + norm_weight_offset if fold_norm else None)
            return w
        return read

    out = []
    for e in entries:
        if e.name == emb_name:
            out.append(computed_entry(emb_name, emb.dtype, emb.shape, turned(emb, False)))
        elif e.name == norm_name:
            out.append(computed_entry(norm_name, norm.dtype, norm.shape, lambda: torch.full(
                norm.shape, 1.0 - norm_weight_offset, dtype=torch_dtype(norm.dtype))))
        elif e.name == head_name:
            continue
        else:
            out.append(e)
    if tied:
        h = emb.shape[1]
        out.append(computed_entry(f"{spec.head}.{TRANSFORM_LEAF}", "F32", (h, h), lambda: head_transform(
            rot.residual.to(torch.float64), _as64(norm.read()) + norm_weight_offset).to(torch.float32)))
    else:
        out.append(computed_entry(head_name, head_src.dtype, head_src.shape, turned(head_src, True)))
    return out


def prepare_rotation(model: nn.Module, adapter: Adapter, rotation: str, seed: int,
                     load_layer: Callable[[int, nn.Module], None] | None
                     ) -> tuple[Rotation | None, Callable[[int, nn.Module], None] | None]:
    """What a quantization run does for ``QuantConfig.rotation``: ``(rot, load_layer)``. A model in memory
    (``load_layer`` None) is rotated whole now; one loaded layer by layer has its embedding turned now and each
    decoder layer as it is loaded (the returned ``load_layer`` does that after the given one), and its final
    norm and ``lm_head`` when they are written (:func:`rotated_outside_entries`). ``(None, load_layer)``, with a
    warning, where the architecture cannot be rotated exactly; also for "none"."""
    if rotation == "none":
        return None, load_layer
    problem = rotation_problem(model, adapter)
    if problem:
        log.warning("rotation %r skipped: %s", rotation, problem)
        return None, load_layer
    if rotation == "residual+heads" and _head_pair(adapter) is None:
        log.warning("rotation 'residual+heads': %s has no v_proj -> o_proj pair to turn head by head; only the "
                    "residual stream is rotated", adapter.name)
        rotation = "residual"
    rot = rotation_for(model, rotation, seed)
    if load_layer is None:
        rotate_model(model, adapter, rot)
        return rot, None
    _check(model, adapter, rot)
    rotate_embedding(model, adapter, rot)

    def load_and_rotate(i: int, layer: nn.Module) -> None:
        load_layer(i, layer)
        rotate_layer(layer, adapter, rot)

    return rot, load_and_rotate

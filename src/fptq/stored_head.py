"""A tied model's output head stored as its embedding times one ``[hidden, hidden]`` matrix.

The residual rotation (:mod:`fptq.rotation`) folds the final norm's weight ``g`` into ``lm_head`` and turns it:
``lm_head = E diag(g) R``, where the embedding becomes ``E R``. A model whose head was tied to its embedding
would then need a second ``[vocab, hidden]`` matrix (SmolLM2-135M: +54 MB in bfloat16, a third of its
checkpoint). Both are the same rows times an orthogonal change of basis: ``lm_head = (E R) T`` with
``T = R^T diag(g) R``. So the checkpoint stores ``T`` (float32, ``hidden^2`` numbers) under
``<head>.embedding_transform`` instead of the head, keeps ``tie_word_embeddings`` as the source had it, and
says so in its ``quantization_config`` (``head_from_embedding``: the three tensor names, ``format_version`` 2).
Every reader computes the head when it loads (:func:`materialize_head` for a state dict,
:class:`CheckpointIndex` for the exports, which read tensor by tensor): the stored embedding's rows times ``T``
in float32, rounded once to the embedding's dtype. A model rotated in memory carries ``T`` as that buffer of
its (untied) head until :func:`fptq.save` writes it.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from .errors import FptqError
from .st import TensorEntry, WeightIndex, computed_entry, file_entries, torch_dtype

__all__ = ["TRANSFORM_LEAF", "FORMAT_VERSION", "head_transform", "head_from_embedding", "head_spec",
           "head_config", "materialize_head", "untie_stored_head", "CheckpointIndex",
           "set_tied", "untie_config"]

TRANSFORM_LEAF = "embedding_transform"
FORMAT_VERSION = 2  # quantization_config["format_version"] of a checkpoint that stores its head this way
_ROWS = 4096  # rows of the embedding multiplied at a time (a few MiB of float32 temporaries)


def head_transform(r: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``T = R^T diag(g) R`` (float64): the embedding turned by ``R`` times ``T`` is the head ``E diag(g) R``."""
    r = r.to(torch.float64)
    return r.T @ (g.to(torch.float64).view(-1, 1) * r)


def head_from_embedding(embedding: torch.Tensor, transform: torch.Tensor, dtype: torch.dtype | None = None
                        ) -> torch.Tensor:
    """``embedding @ transform`` computed in float32 a block of rows at a time, rounded once to ``dtype``
    (default: the embedding's)."""
    if transform.dim() != 2 or transform.shape[0] != transform.shape[1] or transform.shape[0] != embedding.shape[1]:
        raise FptqError(f"the stored head transform {list(transform.shape)} does not fit the embedding "
                        f"{list(embedding.shape)}: the checkpoint is damaged")
    t = transform.to(torch.float32)
    out = torch.empty(embedding.shape, dtype=dtype or embedding.dtype)
    for a in range(0, embedding.shape[0], _ROWS):
        out[a:a + _ROWS] = (embedding[a:a + _ROWS].to(torch.float32) @ t).to(out.dtype)
    return out


def head_config(head: str, embedding: str) -> dict[str, str]:
    """The ``quantization_config["head_from_embedding"]`` of a head module ``head`` computed from the
    embedding module ``embedding`` (module names, e.g. ``lm_head``, ``model.embed_tokens``)."""
    return {"head": f"{head}.weight", "embedding": f"{embedding}.weight", "transform": f"{head}.{TRANSFORM_LEAF}"}


def head_spec(qcfg: dict[str, Any] | None) -> dict[str, str] | None:
    """The checkpoint's ``head_from_embedding`` (tensor names ``head``, ``embedding``, ``transform``), or None
    when it stores its head (or ties it) as transformers does."""
    spec = (qcfg or {}).get("head_from_embedding")
    if spec is None:
        return None
    if not isinstance(spec, dict) or not {"head", "embedding", "transform"} <= set(spec):
        raise FptqError(f"quantization_config.head_from_embedding is malformed ({spec!r}): the checkpoint is damaged")
    return spec


def set_tied(cfg_dict: dict[str, Any], tied: bool) -> None:
    """In place: a config dict's ``tie_word_embeddings``, its text config's too (multimodal configs)."""
    cfg_dict["tie_word_embeddings"] = tied
    text = cfg_dict.get("text_config")
    if isinstance(text, dict):
        text["tie_word_embeddings"] = tied


def untie_config(model: torch.nn.Module) -> None:
    """Mark ``model``'s config as having its own head (a rotation folds the final norm into it)."""
    model.config.tie_word_embeddings = False
    text = getattr(model.config, "get_text_config", None)
    if callable(text):
        text().tie_word_embeddings = False


def materialize_head(sd: dict[str, torch.Tensor], cfg_dict: dict[str, Any], qcfg: dict[str, Any] | None) -> None:
    """In place: a state dict read from a checkpoint that stores its head as the embedding times a transform
    gets the head instead of the transform, and its config dict an untied head. Nothing for other checkpoints."""
    spec = head_spec(qcfg)
    if spec is None:
        return
    missing = [spec[k] for k in ("embedding", "transform") if spec[k] not in sd]
    if missing:
        raise FptqError(f"the checkpoint lacks {', '.join(missing)}, which its head is computed from: it is damaged")
    sd[spec["head"]] = head_from_embedding(sd[spec["embedding"]], sd.pop(spec["transform"]))
    set_tied(cfg_dict, False)


def untie_stored_head(model: torch.nn.Module, spec: dict[str, str]) -> None:
    """A model loaded tied from a checkpoint that stores its head as the embedding times a transform (loaded
    into the head module's buffer of that name): the head gets its own weight, the buffer goes, the config
    says untied."""
    head_module, _, leaf = spec["transform"].rpartition(".")
    head = model.get_submodule(head_module)
    transform = getattr(head, leaf)
    emb = model.get_parameter(spec["embedding"])
    with torch.no_grad():
        weight = head_from_embedding(emb.detach().cpu(), transform.detach().cpu(), emb.dtype).to(emb.device)
    delattr(head, leaf)
    head.weight = torch.nn.Parameter(weight, requires_grad=False)
    untie_config(model)


class CheckpointIndex(WeightIndex):
    """The tensors of an fptq checkpoint as the model has them, read tensor by tensor: a head stored as the
    embedding times a transform is listed under its own name (computed when read) and the transform is not;
    :meth:`config` gives the config dict to go with them (the head untied)."""

    def __init__(self, root: str | Path, qcfg: dict[str, Any] | None):
        super().__init__(root)
        self.spec = head_spec(qcfg)
        if self.spec is not None:
            for k in ("embedding", "transform"):
                if self.spec[k] not in self.weight_map:
                    raise FptqError(f"{self.root} lacks {self.spec[k]}, which its head is computed from: the "
                                    "checkpoint is damaged")
            self.weight_map[self.spec["head"]] = self.weight_map[self.spec["embedding"]]
            del self.weight_map[self.spec["transform"]]

    def config(self, cfg_dict: dict[str, Any]) -> dict[str, Any]:
        out = copy.deepcopy(cfg_dict)
        if self.spec is not None:
            set_tied(out, False)
        return out

    def entries(self, names) -> list[TensorEntry]:
        names = list(names)
        if self.spec is None or self.spec["head"] not in names:
            return super().entries(names)
        head = self.spec["head"]
        emb, = WeightIndex.entries(self, [self.spec["embedding"]])
        tr, = self._transform()

        def read() -> torch.Tensor:
            return head_from_embedding(emb.read(), tr.read(), torch_dtype(emb.dtype))

        found = {head: computed_entry(head, emb.dtype, tuple(emb.shape), read)}
        rest = [n for n in names if n != head]
        found.update(zip(rest, super().entries(rest)))
        return [found[n] for n in names]

    def _transform(self) -> list[TensorEntry]:
        name = self.spec["transform"]
        fname = next(f for f, h in self.headers.items() if name in h)
        return file_entries(self.root / fname, [name])

    def load(self, prefix: str = "", exclude: str | None = None) -> dict[str, torch.Tensor]:
        keys = [k for k in self.weight_map if k.startswith(prefix) and not (exclude and k.startswith(exclude))]
        return {e.name: e.read() for e in self.entries(keys)}

    def nonfinite(self, name: str) -> bool:
        if self.spec is not None and name == self.spec["head"]:
            return not bool(torch.isfinite(self.entries([name])[0].read()).all())
        return super().nonfinite(name)

"""Per-architecture tables: where the decoder layers are and which producer
(a norm or a Linear) feeds which Linears, so that equalization scales can be
folded exactly. Everything else in fptq is architecture-agnostic.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import FptqError

__all__ = ["FoldGroup", "Adapter", "ADAPTERS", "get_adapter", "supported_architectures"]


@dataclass(frozen=True)
class FoldGroup:
    """``producer`` makes the input of every Linear in ``consumers``.

    Names are relative to a decoder layer. ``kind`` is ``norm`` (divide its
    weight/bias) or ``linear`` (divide its output rows). ``kv_grouped`` marks
    v_proj -> o_proj under grouped-query attention: one scale per v_proj
    output channel, repeated for the query heads that share it.
    """

    producer: str
    kind: str
    consumers: tuple[str, ...]
    kv_grouped: bool = False


@dataclass(frozen=True)
class Adapter:
    name: str
    model_types: tuple[str, ...]
    layers_path: str = "model.layers"
    # modules to place on the device to run the embedding stage
    pre_modules: tuple[str, ...] = ("model.embed_tokens", "model.rotary_emb")
    groups: tuple[FoldGroup, ...] = ()
    norm_weight_offset: float = 0.0

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def quantizable_linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """The Linears of a decoder layer, in execution order of the table."""
        out: dict[str, nn.Linear] = {}
        for g in self.groups:
            for c in g.consumers:
                out[c] = layer.get_submodule(c)
        return out


_LLAMA_GROUPS = (
    FoldGroup("input_layernorm", "norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    FoldGroup("self_attn.v_proj", "linear", ("self_attn.o_proj",), kv_grouped=True),
    FoldGroup("post_attention_layernorm", "norm", ("mlp.gate_proj", "mlp.up_proj")),
    FoldGroup("mlp.up_proj", "linear", ("mlp.down_proj",)),
)

ADAPTERS: tuple[Adapter, ...] = (
    Adapter("llama", ("llama",), groups=_LLAMA_GROUPS),
    Adapter("mistral", ("mistral",), groups=_LLAMA_GROUPS),
    Adapter("qwen2", ("qwen2",), groups=_LLAMA_GROUPS),
    Adapter("qwen3", ("qwen3",), groups=_LLAMA_GROUPS),
)


def supported_architectures() -> list[str]:
    return sorted({t for a in ADAPTERS for t in a.model_types})


def get_adapter(model_or_type: nn.Module | str) -> Adapter:
    model_type = model_or_type if isinstance(model_or_type, str) else getattr(
        getattr(model_or_type, "config", None), "model_type", None
    )
    for a in ADAPTERS:
        if model_type in a.model_types:
            return a
    raise FptqError(
        f"unsupported architecture {model_type!r}; fptq supports: {', '.join(supported_architectures())}"
    )


def attention_heads(model: nn.Module) -> tuple[int, int]:
    cfg = model.config
    h = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or h
    return h, kv

"""Per-architecture tables: where the decoder layers are and which producer
(a norm or a Linear) feeds which Linears, so that equalization scales can be
folded exactly. Everything else in fptq is architecture-agnostic.

A model type outside the table whose decoder layers are shaped like LLaMA's
(see :func:`llama_shape_problem`) gets the LLaMA table (``generic=True``);
anything else is refused.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import FptqError

__all__ = ["FoldGroup", "ResidualStream", "Adapter", "ADAPTERS", "get_adapter", "supported_architectures", "llama_shape_problem",
           "FOLD_KINDS"]

FOLD_KINDS = ("norm", "linear", "fused_qkv_v", "none")


@dataclass(frozen=True)
class FoldGroup:
    """``producer`` makes the input of every Linear in ``consumers``.

    Names are relative to a decoder layer. ``kind`` says how a per-channel
    scale is folded into the producer:

    * ``norm``: divide its weight (and bias), see ``Adapter.norm_weight_offset``;
    * ``linear``: divide its output rows (and bias entries);
    * ``fused_qkv_v``: the producer is a fused query/key/value Linear with
      BLOOM's per-head interleaved rows ``[head, (q, k, v), head_dim]``: divide
      the value rows (the consumer's input channel ``h * head_dim + j`` is the
      value row ``j`` of head ``h``);
    * ``none``: no exact fold exists (``note`` says why); a Linear that would
      get LAE + static gets dynamic per-token activations instead.

    ``kv_grouped`` marks v_proj -> o_proj under grouped-query attention: one
    scale per v_proj output channel, repeated for the query heads that share it.

    ``partners`` (``None``: the channels cannot be reordered): the other Linears whose output rows are
    combined element by element with the producer's (gate_proj beside up_proj), so that permuting the
    rows of the producer and the partners and the input columns of the consumers leaves the layer's
    function unchanged (``QuantConfig.channel_order``).
    """

    producer: str | None
    kind: str
    consumers: tuple[str, ...]
    kv_grouped: bool = False
    note: str = ""
    partners: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in FOLD_KINDS:
            raise ValueError(f"fold kind must be one of {FOLD_KINDS}, got {self.kind!r}")
        if (self.kind == "none") != (self.producer is None):
            raise ValueError("a fold group has a producer exactly when its kind is not 'none'")

    @property
    def foldable(self) -> bool:
        return self.kind != "none"

    @property
    def reorderable(self) -> bool:
        """Whether the channels of the consumers' input can be permuted (see ``partners``)."""
        return self.kind == "linear" and self.partners is not None

    def unfoldable(self, note: str) -> "FoldGroup":
        """The same consumers without a fold (e.g. a config where the producer's output is also the residual)."""
        return FoldGroup(None, "none", self.consumers, note=note)


@dataclass(frozen=True)
class ResidualStream:
    """Every tensor that indexes the channels of the residual stream, so that they can be permuted
    (exactly: RMSNorm and LayerNorm commute with a permutation of their channels).

    Model-level names: ``embeddings`` (``[vocab, hidden]``: columns), ``final_norm`` and ``head``
    (``lm_head``, columns; it may be tied to the embedding). Names relative to a decoder layer:
    ``norms`` (weights, and biases if any), ``readers`` (Linears that take the normalized stream:
    input columns) and ``writers`` (Linears whose output is added to it: output rows and bias)."""

    embeddings: str
    final_norm: str
    head: str
    norms: tuple[str, ...]
    readers: tuple[str, ...]
    writers: tuple[str, ...]


@dataclass(frozen=True)
class Adapter:
    name: str
    model_types: tuple[str, ...]
    layers_path: str = "model.layers"
    # modules to place on the device to run the embedding stage (absent ones are skipped, e.g. OPT's project_in)
    pre_modules: tuple[str, ...] = ("model.embed_tokens", "model.rotary_emb")
    groups: tuple[FoldGroup, ...] = ()
    # norms that scale by ``offset + weight`` (Gemma: 1)
    norm_weight_offset: float = 0.0
    # decoder layers return ``(hidden, ...)`` rather than ``hidden`` (BLOOM)
    layer_returns_tuple: bool = False
    # a model type outside the table, handled with the LLaMA table
    generic: bool = False
    # ``(adapter, config) -> adapter`` for one model config: refuses configs fptq cannot handle and
    # marks the groups that a config makes unfoldable; None: the table as is
    specialize: Callable[["Adapter", Any], "Adapter"] | None = field(default=None, compare=False, repr=False)
    # what a permutation of the residual stream's channels touches; None: not supported for this table
    # (QuantConfig.residual_order then leaves the model as it is)
    residual: ResidualStream | None = None

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def present_pre_modules(self, model: nn.Module) -> tuple[str, ...]:
        """The names of :attr:`pre_modules` that this model has."""
        out = []
        for name in self.pre_modules:
            try:
                model.get_submodule(name)
            except AttributeError:  # missing, or None (OPT without project_in)
                continue
            out.append(name)
        return tuple(out)

    def quantizable_linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """The Linears of a decoder layer, in execution order of the table."""
        out: dict[str, nn.Linear] = {}
        for g in self.groups:
            for c in g.consumers:
                out[c] = layer.get_submodule(c)
        return out

    def with_unfoldable(self, producers: set[str], note: str) -> "Adapter":
        """This adapter with the groups fed by ``producers`` marked unfoldable."""
        groups = tuple(g.unfoldable(note) if g.producer in producers else g for g in self.groups)
        return dataclasses.replace(self, groups=groups)


_LLAMA_GROUPS = (
    FoldGroup("input_layernorm", "norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    FoldGroup("self_attn.v_proj", "linear", ("self_attn.o_proj",), kv_grouped=True),
    FoldGroup("post_attention_layernorm", "norm", ("mlp.gate_proj", "mlp.up_proj")),
    FoldGroup("mlp.up_proj", "linear", ("mlp.down_proj",), partners=("mlp.gate_proj",)),
)

# Gemma 2/3: post_attention_layernorm and post_feedforward_layernorm act on outputs going to the
# residual and feed no Linear; pre_feedforward_layernorm feeds gate/up. gelu(gate) * up is linear in up.
_GEMMA2_GROUPS = (
    FoldGroup("input_layernorm", "norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    FoldGroup("self_attn.v_proj", "linear", ("self_attn.o_proj",), kv_grouped=True),
    FoldGroup("pre_feedforward_layernorm", "norm", ("mlp.gate_proj", "mlp.up_proj")),
    FoldGroup("mlp.up_proj", "linear", ("mlp.down_proj",), partners=("mlp.gate_proj",)),
)

_LLAMA_RESIDUAL = ResidualStream(
    "model.embed_tokens", "model.norm", "lm_head", ("input_layernorm", "post_attention_layernorm"),
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"),
    ("self_attn.o_proj", "mlp.down_proj"))
_GEMMA2_RESIDUAL = dataclasses.replace(_LLAMA_RESIDUAL, norms=(
    "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"))

_OPT_GROUPS = (
    FoldGroup("self_attn_layer_norm", "norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    FoldGroup("self_attn.v_proj", "linear", ("self_attn.out_proj",)),
    FoldGroup("final_layer_norm", "norm", ("fc1",)),
    FoldGroup("fc1", "linear", ("fc2",), partners=()),  # relu(x / s) = relu(x) / s for s > 0
)

_BLOOM_GROUPS = (
    FoldGroup("input_layernorm", "norm", ("self_attention.query_key_value",)),
    FoldGroup("self_attention.query_key_value", "fused_qkv_v", ("self_attention.dense",)),
    FoldGroup("post_attention_layernorm", "norm", ("mlp.dense_h_to_4h",)),
    FoldGroup(None, "none", ("mlp.dense_4h_to_h",), note="its input is GELU(dense_h_to_4h(x)), and GELU does not "
              "commute with a per-channel scale"),
)


def _opt_for_config(adapter: Adapter, cfg: Any) -> Adapter:
    norms = {"self_attn_layer_norm", "final_layer_norm"}
    if not getattr(cfg, "do_layer_norm_before", True):
        adapter = adapter.with_unfoldable(norms, "post-LN OPT (do_layer_norm_before=False): the input is also the "
                                                 "residual stream")
    elif not getattr(cfg, "layer_norm_elementwise_affine", True):
        adapter = adapter.with_unfoldable(norms, "the LayerNorm has no weight to fold into "
                                                 "(layer_norm_elementwise_affine=False)")
    act = getattr(cfg, "activation_function", "relu")
    if act != "relu":
        adapter = adapter.with_unfoldable({"fc1"}, f"its input is {act}(fc1(x)), which does not commute with a "
                                                   "per-channel scale")
    return adapter


def _bloom_for_config(adapter: Adapter, cfg: Any) -> Adapter:
    if getattr(cfg, "pretraining_tp", 1) > 1 and getattr(cfg, "slow_but_exact", False):
        raise FptqError("BLOOM with slow_but_exact=true and pretraining_tp > 1 multiplies by the Linear weights "
                        "directly and cannot run quantized Linears; set slow_but_exact to false in config.json")
    if getattr(cfg, "apply_residual_connection_post_layernorm", False):
        adapter = adapter.with_unfoldable(
            {"input_layernorm", "post_attention_layernorm"},
            "apply_residual_connection_post_layernorm=True: the norm's output is also the residual")
    return adapter


ADAPTERS: tuple[Adapter, ...] = (
    Adapter("llama", ("llama",), groups=_LLAMA_GROUPS, residual=_LLAMA_RESIDUAL),
    Adapter("mistral", ("mistral",), groups=_LLAMA_GROUPS, residual=_LLAMA_RESIDUAL),
    Adapter("qwen2", ("qwen2",), groups=_LLAMA_GROUPS, residual=_LLAMA_RESIDUAL),
    Adapter("qwen3", ("qwen3",), groups=_LLAMA_GROUPS, residual=_LLAMA_RESIDUAL),
    Adapter("gemma", ("gemma",), groups=_LLAMA_GROUPS, norm_weight_offset=1.0, residual=_LLAMA_RESIDUAL),
    Adapter("gemma2", ("gemma2",), groups=_GEMMA2_GROUPS, norm_weight_offset=1.0, residual=_GEMMA2_RESIDUAL),
    Adapter("gemma3", ("gemma3_text",), groups=_GEMMA2_GROUPS, norm_weight_offset=1.0,
            residual=_GEMMA2_RESIDUAL),
    Adapter("opt", ("opt",), layers_path="model.decoder.layers",
            pre_modules=("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"),
            groups=_OPT_GROUPS, specialize=_opt_for_config),
    Adapter("bloom", ("bloom",), layers_path="transformer.h",
            pre_modules=("transformer.word_embeddings", "transformer.word_embeddings_layernorm"),
            groups=_BLOOM_GROUPS, layer_returns_tuple=True, specialize=_bloom_for_config),
)

_LLAMA = ADAPTERS[0]


def supported_architectures() -> list[str]:
    """The model types of the table, in table order (LLaMA first)."""
    return [t for a in ADAPTERS for t in a.model_types]


def _unsupported(model_type: Any, problem: str | None = None) -> FptqError:
    return FptqError(
        f"unsupported architecture {model_type!r}; fptq supports: {', '.join(supported_architectures())} "
        "(and other model types whose decoder layers are shaped like LLaMA's"
        + (f"; this one is not: {problem})" if problem else ")")
    )


_LLAMA_LAYER_CHILDREN = {"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"}
_LLAMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _children_with_params(module: nn.Module) -> set[str]:
    """Children holding tensors (parameters, or buffers: a quantized Linear holds only buffers)."""
    return {n for n, m in module.named_children()
            if next(m.parameters(), None) is not None or next(m.buffers(), None) is not None}


def _is_linear(module: nn.Module) -> bool:
    from ..nn import QuantLinear

    return isinstance(module, (nn.Linear, QuantLinear))


def llama_shape_problem(model: nn.Module) -> str | None:
    """``None`` if ``model`` is shaped like LLaMA (so the LLaMA table applies), else what differs.

    LLaMA-shaped: the config has hidden_size, num_attention_heads and
    intermediate_size; ``model.layers`` holds decoder layers whose children with
    parameters are exactly input_layernorm, self_attn, post_attention_layernorm
    and mlp; self_attn has q/k/v/o_proj (and optionally q_norm/k_norm acting on
    their outputs), mlp exactly gate/up/down_proj, all ``nn.Linear``; both
    norms have a weight per hidden channel. Works on meta-device skeletons.
    """
    cfg = getattr(model, "config", None)
    for attr in ("hidden_size", "num_attention_heads", "intermediate_size"):
        if getattr(cfg, attr, None) is None:
            return f"its config has no {attr}"
    try:
        layers = model.get_submodule("model.layers")
    except AttributeError:
        return "it has no model.layers"
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return "model.layers is not a list of decoder layers"
    for i, layer in enumerate(layers):
        children = _children_with_params(layer)
        if children != _LLAMA_LAYER_CHILDREN:
            return f"decoder layer {i} has the parts {sorted(children)}, not {sorted(_LLAMA_LAYER_CHILDREN)}"
        for name in _LLAMA_LINEARS:
            try:
                mod = layer.get_submodule(name)
            except AttributeError:
                return f"decoder layer {i} has no {name}"
            if not _is_linear(mod):
                return f"{name} of decoder layer {i} is a {type(mod).__name__}, not a Linear"
        if not _children_with_params(layer.self_attn) <= {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"}:
            return f"self_attn of decoder layer {i} has other parts than q/k/v/o_proj"
        if _children_with_params(layer.mlp) != {"gate_proj", "up_proj", "down_proj"}:
            return f"mlp of decoder layer {i} has other parts than gate/up/down_proj"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            w = getattr(layer.get_submodule(norm), "weight", None)
            if not isinstance(w, nn.Parameter) or tuple(w.shape) != (cfg.hidden_size,):
                return f"{norm} of decoder layer {i} has no weight per hidden channel"
    return None


def get_adapter(model_or_type: nn.Module | str | Any) -> Adapter:
    """The adapter of a model, a model config, or a model type (a string).

    Given a model or a config, the table entry is specialized to that config
    (e.g. post-LN OPT: the norms are not foldable). A model type outside the
    table is accepted only given a model (the generic LLaMA-shaped path).
    """
    if isinstance(model_or_type, str):
        model, cfg, model_type = None, None, model_or_type
    elif isinstance(model_or_type, nn.Module):
        model, cfg = model_or_type, getattr(model_or_type, "config", None)
        model_type = getattr(cfg, "model_type", None)
    else:
        model, cfg, model_type = None, model_or_type, getattr(model_or_type, "model_type", None)
    for a in ADAPTERS:
        if model_type in a.model_types:
            return a.specialize(a, cfg) if a.specialize is not None and cfg is not None else a
    problem = llama_shape_problem(model) if model is not None and model_type else None
    if model is not None and model_type and problem is None:
        # a model outside the table may keep per-channel state fptq does not know of: its residual is left alone
        return dataclasses.replace(_LLAMA, name=f"llama-like ({model_type})", model_types=(model_type,), generic=True,
                                   residual=None)
    raise _unsupported(model_type, problem)


def attention_heads(model: nn.Module) -> tuple[int, int]:
    cfg = model.config
    h = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or h
    return h, kv

"""The tensors of a GGUF export: for every tensor of an fptq checkpoint (or a float model directory) its
GGUF name and type and a function computing its data (one tensor in memory at a time), and the checks that the
checkpoint fits: quantized Linears ``Q4_0`` holds exactly (:func:`check_layers`), equalization folded into
tensors of the checkpoint (:func:`check_folds`), nothing but codes, scales, activation scale and bias in a
quantized Linear. The writer is :mod:`fptq.export.gguf`."""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import FptqError
from ..io import quantized_linears
from ..plan import LayerPlan, Plan
from ..quant.pack import Q4_0_BLOCK, pack_q4_0, q4_0_problem, unpack_int4
from ..st import WeightIndex
from .gguf_meta import GGUFArch

EMBEDDING_TYPES = ("f16", "bf16", "f32", "q8_0", "q4_0")
FLOAT_TYPES = ("f16", "bf16", "f32")
_QLINEAR_TENSORS = ("qweight", "w_scales", "act_scale", "bias")

__all__ = ["GGUFTensor", "gguf_tensors", "check_layers", "check_folds", "rope_rows_to_ggml", "EMBEDDING_TYPES",
           "FLOAT_TYPES"]


def rope_rows_to_ggml(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q_proj / k_proj weight (or bias, scales, Q4_0 blocks: anything with one row per output
    channel) reordered from Hugging Face LLaMA's rotate-half layout to GGML's: within each head of
    ``d`` rows, GGML's row ``2 i + j`` is Hugging Face's row ``j * d / 2 + i`` (``j`` in 0, 1)."""
    n = t.shape[0]
    if n % n_head or (n // n_head) % 2:
        raise ValueError(f"rope_rows_to_ggml: {n} rows do not split into {n_head} heads of an even size")
    half = n // n_head // 2
    return t.reshape(n_head, 2, half, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the file: its GGUF name and type, its element shape (rows, columns), the checkpoint
    tensor it comes from, and a function computing its data when it is written (one tensor in memory)."""

    name: str
    source: str
    qtype: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    make: Callable[[], np.ndarray]

    @property
    def elements(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        from gguf import GGML_QUANT_SIZES

        block, size = GGML_QUANT_SIZES[self.qtype]
        return self.elements // block * size


def _qtype(name: str):
    from gguf import GGMLQuantizationType as T

    return {"f16": T.F16, "bf16": T.BF16, "f32": T.F32, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[name]


def _encode(t: torch.Tensor, kind: str, name: str) -> np.ndarray:
    """``t`` (float) as the bytes (or float array) of GGUF type ``kind``."""
    from gguf.quants import quantize

    t = t.detach().float().contiguous()
    if kind == "f32":
        return t.numpy()
    if kind == "f16":
        big = float(t.abs().max()) if t.numel() else 0.0
        if big > float(torch.finfo(torch.float16).max):
            raise FptqError(f"{name} has values up to {big:g}, beyond float16's range; write it as bf16 or f32 "
                            "(e.g. --gguf-embeddings bf16)")
        return t.to(torch.float16).numpy()
    if kind == "bf16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
    if kind in ("q8_0", "q4_0"):
        if t.shape[-1] % Q4_0_BLOCK:
            raise FptqError(f"{name} has rows of {t.shape[-1]} values; {kind.upper()} needs a multiple of 32: "
                            "choose f16")
        return quantize(t.numpy(), _qtype(kind))
    raise FptqError(f"unknown GGUF tensor type {kind!r}")  # pragma: no cover - callers check


def _rope_heads(kind, cfg: dict[str, Any], arch: GGUFArch) -> int | None:
    """Heads of a q/k tensor whose rows are reordered, else None."""
    from gguf import MODEL_TENSOR

    if not arch.rope_permute:
        return None
    n_head = cfg["num_attention_heads"]
    return {MODEL_TENSOR.ATTN_Q: n_head, MODEL_TENSOR.ATTN_K: cfg.get("num_key_value_heads") or n_head}.get(kind)


def _natural(key: str) -> list:
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", key)]


def check_layers(plan: Plan) -> dict[str, LayerPlan]:
    """The quantized Linears of ``plan``, refusing any that ``Q4_0`` cannot hold exactly."""
    layers = {}
    for name in quantized_linears(plan):
        lp = plan.layers[name]
        problem = q4_0_problem(lp.in_features, lp.group_size, lp.wbits)
        if lp.wbits != 4:
            raise FptqError(f"{name}: {problem}; GGUF export writes 4-bit weights as Q4_0: quantize with a 4-bit "
                            "method (fptq, gptq-w4a16, rtn-w4a16) and --group-size 32")
        if problem:
            raise FptqError(f"{name}: {problem}. Q4_0 holds 4-bit codes with one float16 scale per 32 weights, so "
                            "fptq writes groups of 32 or any multiple of 32 exactly and would have to round this "
                            "checkpoint again: re-quantize with --group-size 32 (or 64, 128)")
        layers[name] = lp
    if not layers:
        raise FptqError("the plan quantizes no layer: nothing to export as Q4_0")
    return layers


def check_folds(plan: Plan, index: WeightIndex) -> list[str]:
    """Layers with equalization: each must name a producer whose weights the checkpoint holds (folded)."""
    out = []
    for name, lp in plan.layers.items():
        if lp.equalization == "none":
            continue
        target = lp.equalization_folded_into
        if not target or not any(f"{target}.{t}" in index.weight_map for t in ("weight", "qweight")):
            raise FptqError(f"{name}: its {lp.equalization} equalization is not recorded as folded into a norm or "
                            f"Linear of the checkpoint (folded into {target!r}); llama.cpp cannot apply it at run "
                            "time, so this checkpoint cannot be exported to GGUF")
        out.append(name)
    return sorted(out)


def gguf_tensors(index: WeightIndex, cfg: dict[str, Any], arch: GGUFArch, quantized: dict[str, LayerPlan],
             embeddings: str, output: str, linears: str) -> list[GGUFTensor]:
    """Every tensor of the file, in the order of the checkpoint's names (layer by layer)."""
    from gguf import MODEL_ARCH_NAMES, MODEL_TENSOR, get_tensor_name_map

    arch_enum = next(a for a, n in MODEL_ARCH_NAMES.items() if n == arch.name)
    names = get_tensor_name_map(arch_enum, cfg["num_hidden_layers"])
    owned = {}
    for key in index.weight_map:
        layer, _, leaf = key.rpartition(".")
        if layer in quantized:
            if leaf not in _QLINEAR_TENSORS:
                raise FptqError(f"{layer} holds a tensor {leaf!r} that a GGUF file cannot apply (a quantized Linear "
                                f"of fptq holds only {', '.join(_QLINEAR_TENSORS)}); this checkpoint cannot be "
                                "exported to GGUF")
            owned[key] = layer
    out = []
    for layer in sorted(quantized, key=_natural):
        out.append(_q4_0_tensor(index, layer, quantized[layer], names, cfg, arch))
    for key in index.weight_map:
        if (key in owned and not key.endswith(".bias")) or key.endswith("rotary_emb.inv_freq"):
            continue
        found = names.get_type_and_name(key, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise FptqError(f"{key} has no tensor name in llama.cpp's {arch.name} architecture; fptq cannot "
                            "export this model to GGUF")
        kind, gname = found
        entry = index.entries([key])[0]
        shape = tuple(entry.shape)
        if kind == MODEL_TENSOR.TOKEN_EMBD:
            ftype = embeddings
        elif kind == MODEL_TENSOR.OUTPUT:
            ftype = output
        else:
            ftype = linears if len(shape) == 2 else "f32"
        heads = _rope_heads(kind, cfg, arch)

        def make(entry=entry, ftype=ftype, heads=heads, gname=gname) -> np.ndarray:
            t = entry.read()
            return _encode(rope_rows_to_ggml(t, heads) if heads else t, ftype, gname)

        out.append(GGUFTensor(gname, key, _qtype(ftype), shape, make))
    return sorted(out, key=lambda t: _natural(t.source))


def _q4_0_tensor(index: WeightIndex, layer: str, lp: LayerPlan, names, cfg, arch: GGUFArch) -> GGUFTensor:
    qkey, skey = f"{layer}.qweight", f"{layer}.w_scales"
    for key in (qkey, skey):
        if key not in index.weight_map:
            raise FptqError(f"{index.root} lacks {key}, which the plan needs: the checkpoint is damaged")
    found = names.get_type_and_name(f"{layer}.weight", try_suffixes=(".weight",))
    if found is None:
        raise FptqError(f"{layer} has no tensor name in llama.cpp's {arch.name} architecture")
    kind, gname = found
    qentry, sentry = index.entries([qkey, skey])
    n, k = lp.out_features, lp.in_features
    groups = 1 if lp.group_size <= 0 else -(-k // lp.group_size)
    if tuple(qentry.shape) != (n, (k + 1) // 2) or tuple(sentry.shape) != (n, groups) or \
            (qentry.dtype, sentry.dtype) != ("U8", "F16"):
        raise FptqError(f"{qkey} / {skey} are {qentry.dtype} {list(qentry.shape)} / {sentry.dtype} "
                        f"{list(sentry.shape)}; the plan says [{n}, {k}] int4 in groups of {lp.group_size} with "
                        "float16 scales: the checkpoint is damaged")
    heads = _rope_heads(kind, cfg, arch)

    def make() -> np.ndarray:
        blocks = pack_q4_0(unpack_int4(qentry.read(), k), sentry.read(), lp.group_size)
        return (rope_rows_to_ggml(blocks, heads) if heads else blocks).numpy()

    return GGUFTensor(gname, f"{layer}.weight", _qtype("q4_0"), (n, k), make)



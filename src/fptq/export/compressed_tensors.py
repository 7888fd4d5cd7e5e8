"""Export an fptq checkpoint in the compressed-tensors format (read by vLLM and transformers).

What is written, per quantized Linear ``L`` of the plan (all 4-bit, symmetric, group-wise):

* activations ``int8`` (default; W4A8): the compressed-tensors ``int-quantized`` format, the one
  compressed-tensors itself picks for an integer scheme with quantized activations and the one
  vLLM's W4A8 integer scheme (``CompressedTensorsW4A8Int``) reads: ``L.weight`` int8 ``[N, K]``
  (the int4 codes, -8..7, one per byte) and ``L.weight_scale`` ``[N, G]``; input activations
  int8, symmetric, **dynamic per token** for every layer (vLLM's integer W4A8 path has no static
  activation scales), so FPTQ's static and LAE+static layers become dynamic: the export report
  lists them;
* activations ``none`` (W4A16): the ``pack-quantized`` format, ``L.weight_packed`` int32
  ``[N, K/8]`` (:func:`fptq.quant.pack.pack_int32_offset`), ``L.weight_shape`` and
  ``L.weight_scale``; no activation quantization. Plan layers with float activations
  (``rtn-w4a16``) are always written this way.

The int4 codes and the fp16 group scales are fptq's own, unchanged (``weight_scale`` is stored in
float16, exactly fptq's values; runtimes cast it to the model's dtype). LAE equalization is already
folded into the weights and the preceding norms, so it is kept exactly. The plan's static activation
scales are dropped (recorded in the report). Layers the plan keeps in float and ``lm_head`` are
listed in ``ignore``. The rest of the model (embeddings, norms, ``lm_head``) is copied byte for byte.
Each config group targets its layers by exact module name; layers with the same settings share one.

compressed-tensors needs ``group_size`` to divide ``in_features`` (its dequantization raises
otherwise, and vLLM checks it per tensor-parallel shard): a ragged last group is refused, naming
the layer.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import FptqError
from ..io import (
    DEFAULT_MAX_SHARD_BYTES,
    INDEX_NAME,
    PLAN_NAME,
    REPORT_NAME,
    WEIGHTS_NAME,
    check_is_checkpoint,
    check_output_dir,
    file_sha256,
    finish,
    read_plan,
    read_quantization_config,
    staging_dir,
    verify_files,
    weight_files,
    write_weights,
)
from ..plan import LayerPlan, Plan
from ..quant.pack import pack_int32_offset, unpack_int4
from ..st import TensorEntry, WeightIndex, read_tensors, tensor_entry
from ..stored_head import CheckpointIndex

EXPORT_REPORT_NAME = "fptq_export_report.json"
ACTIVATIONS = ("int8", "none")
INT_QUANTIZED = "int-quantized"
PACK_QUANTIZED = "pack-quantized"
_STATIC = ("static_tensor", "lae_static_tensor")

__all__ = ["export_compressed_tensors", "compressed_tensors_config", "layer_schemes", "EXPORT_REPORT_NAME",
           "ACTIVATIONS"]


def _dividing_group_size(plan: Plan) -> int | None:
    """The largest of 128, 64, 32, 16 dividing every quantized layer's in_features."""
    ks = {lp.in_features for lp in _quantized(plan).values()}
    return next((g for g in (128, 64, 32, 16) if all(k % g == 0 for k in ks)), None)


def _check_layer(name: str, lp: LayerPlan, plan: Plan) -> None:
    if lp.wbits != 4:
        raise FptqError(f"{name}: {lp.wbits}-bit weights cannot be exported to compressed-tensors by fptq "
                        "(only 4-bit weights are supported)")
    if lp.strategy != "float" and lp.abits != 8:
        raise FptqError(f"{name}: {lp.abits}-bit activations cannot be exported (vLLM's integer W4A8 path "
                        "takes 8-bit activations); use --activations none for a weight-only export")
    if lp.group_size > 0 and lp.in_features % lp.group_size:
        g = _dividing_group_size(plan)
        hint = f" (e.g. --group-size {g}, which divides every layer's)" if g else ""
        raise FptqError(
            f"{name}: group size {lp.group_size} does not divide in_features {lp.in_features} (the last group "
            f"is ragged); compressed-tensors requires whole groups, so this checkpoint cannot be exported. "
            f"Re-quantize with a --group-size that divides {lp.in_features}{hint}")


def _quantized(plan: Plan) -> dict[str, LayerPlan]:
    """The plan's layers that have quantized weights."""
    return {n: lp for n, lp in plan.layers.items() if not (lp.strategy == "float" and lp.wbits == 16)}


def layer_schemes(plan: Plan, activations: str = "int8") -> dict[str, dict[str, Any]]:
    """For every quantized layer: its compressed-tensors ``weights`` and ``input_activations`` args
    and ``format``. Refuses what compressed-tensors or vLLM cannot represent."""
    if activations not in ACTIVATIONS:
        raise FptqError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    out = {}
    for name, lp in _quantized(plan).items():
        _check_layer(name, lp, plan)
        weights = {"num_bits": 4, "type": "int", "symmetric": True, "dynamic": False,
                   "strategy": "group" if lp.group_size > 0 else "channel",
                   "group_size": lp.group_size if lp.group_size > 0 else None}
        act = None
        if activations == "int8" and lp.strategy != "float":
            act = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True, "strategy": "token",
                   "group_size": None}
        out[name] = {"weights": weights, "input_activations": act,
                     "format": INT_QUANTIZED if act is not None else PACK_QUANTIZED}
    if not out:
        raise FptqError("the plan quantizes no layer: nothing to export")
    return out


def compressed_tensors_config(schemes: dict[str, dict[str, Any]], ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` of ``config.json``: one config group per distinct scheme, each
    targeting its layers by exact module name."""
    groups: dict[str, dict[str, Any]] = {}
    by_key: dict[str, str] = {}
    for name in sorted(schemes):
        s = schemes[name]
        key = json.dumps(s, sort_keys=True)
        if key not in by_key:
            by_key[key] = f"group_{len(by_key)}"
            groups[by_key[key]] = {"targets": [], "weights": s["weights"], "input_activations": s["input_activations"],
                                   "output_activations": None, "format": s["format"]}
        groups[by_key[key]]["targets"].append(name)
    formats = {g["format"] for g in groups.values()}
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def _linear_names(cfg_dict: dict[str, Any]) -> list[str]:
    """Names of every ``nn.Linear`` of the model (built on the meta device, no memory used)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**cfg_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _lazy_entry(name: str, dtype: str, shape: tuple[int, ...], nbytes: int, make: Callable[[], torch.Tensor]) -> TensorEntry:
    """An entry whose tensor is computed only when the file is written (one layer in memory at a time)."""
    def write(f) -> None:
        t = make()
        if tuple(t.shape) != shape:  # pragma: no cover - guards the header written before the data
            raise FptqError(f"internal error: {name} has shape {tuple(t.shape)}, header says {shape}")
        tensor_entry(name, t).write(f)
    return TensorEntry(name, dtype, shape, nbytes, write)


def _layer_entries(index: WeightIndex, name: str, lp: LayerPlan, fmt: str) -> list[TensorEntry]:
    n, k = lp.out_features, lp.in_features
    qkey, skey = f"{name}.qweight", f"{name}.w_scales"
    for key in (qkey, skey):
        if key not in index.weight_map:
            raise FptqError(f"{index.root} lacks {key}, which the plan needs: the checkpoint is damaged")
    path = index.root / index.weight_map[qkey]

    def codes() -> torch.Tensor:
        (_, packed), = read_tensors(path, [qkey])
        if tuple(packed.shape) != (n, (k + 1) // 2) or packed.dtype != torch.uint8:
            raise FptqError(f"{qkey} has shape {tuple(packed.shape)} and dtype {packed.dtype}, the plan says "
                            f"[{n}, {k}] int4: the checkpoint is damaged")
        return unpack_int4(packed, k)

    scale = dataclasses.replace(index.entries([skey])[0], name=f"{name}.weight_scale")  # fp16, copied as is
    if fmt == INT_QUANTIZED:
        weight = [_lazy_entry(f"{name}.weight", "I8", (n, k), n * k, codes)]
    else:
        words = -(-k // 8)
        weight = [_lazy_entry(f"{name}.weight_packed", "I32", (n, words), n * words * 4,
                              lambda: pack_int32_offset(codes(), 4)),
                  tensor_entry(f"{name}.weight_shape", torch.tensor([n, k], dtype=torch.int64))]
    bias = [f"{name}.bias"] if f"{name}.bias" in index.weight_map else []
    return weight + [scale] + index.entries(bias)


def _unit_of(key: str) -> str:
    m = re.match(r"^(.*?\.layers\.\d+)\.", key)
    return m.group(1) if m else ""


def _report(plan: Plan, schemes: dict[str, dict[str, Any]], ignore: list[str], src: Path, activations: str,
            qcfg: dict[str, Any]) -> dict[str, Any]:
    static_to_dynamic = sorted(n for n, s in schemes.items()
                               if s["input_activations"] is not None and plan.layers[n].strategy in _STATIC)
    act_dropped = sorted(n for n, s in schemes.items()
                         if s["input_activations"] is None and plan.layers[n].strategy != "float")
    lae = sorted(n for n, lp in plan.layers.items() if lp.equalization != "none" and n in schemes)
    layers = {}
    for n, s in sorted(schemes.items()):
        lp = plan.layers[n]
        a = s["input_activations"]
        layers[n] = {"fptq_strategy": lp.strategy, "export_activations": "int8 dynamic per-token" if a else "float",
                     "format": s["format"], "group_size": lp.group_size,
                     **({"dropped_static_act_scale": lp.act_scale} if lp.strategy in _STATIC else {}),
                     **({"equalization_kept": lp.equalization} if lp.equalization != "none" else {})}
    in_features = sorted({plan.layers[n].in_features for n in schemes})
    gs = sorted({plan.layers[n].group_size for n in schemes if plan.layers[n].group_size > 0})
    # conservative: only row-parallel layers (o_proj, down_proj, ...) are split along in_features
    tp_ok = [t for t in range(1, 17) if all(k % (t * g) == 0 for k in in_features for g in gs)]
    return {
        "format": "compressed-tensors",
        "activations": "int8 dynamic per-token" if activations == "int8" else "none (weight-only W4A16)",
        "source": str(src),
        "source_method": qcfg.get("method"),
        "source_weights_sha256": {n: file_sha256(src / n) for n in weight_files(src)},
        "layers_static_to_dynamic": static_to_dynamic,
        "layers_activation_quantization_dropped": act_dropped,
        "kept": {
            "weights": "exact: the same int4 codes and fp16 group scales (weight_scale stored as float16)",
            "equalization": "exact: LAE/SmoothQuant scales are folded into the weights and the preceding "
                            "norms/linears, which are copied unchanged",
            "layers_with_folded_equalization": lae,
            "float_layers": sorted(ignore),
        },
        "lost": {
            "static_activation_scales": f"{len(static_to_dynamic)} layers quantized their input with a static "
                                        "per-tensor scale in fptq and are dynamic per-token here"
            if activations == "int8" else "all activation quantization is dropped (weight-only export)",
            "fptq_plan": "the plan is copied as fptq_plan.json for reference; runtimes do not read it",
        },
        "tensor_parallel_sizes_with_whole_groups": tp_ok,
        "layers": layers,
    }


def export_compressed_tensors(src: str | Path, out: str | Path, *, activations: str = "int8", force: bool = False,
                              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write the fptq checkpoint ``src`` to ``out`` in the compressed-tensors format (atomically:
    a temporary sibling directory renamed into place; an existing non-empty ``out`` is refused
    unless ``force``). Returns ``out``; ``out/fptq_export_report.json`` says what changed."""
    src, out = Path(src), Path(out)
    check_is_checkpoint(src)
    if out.resolve() == src.resolve():
        raise FptqError(f"-o {out} is the checkpoint being exported; choose another output directory")
    verify_files(src)
    plan = read_plan(src / PLAN_NAME)
    cfg_dict, qcfg = read_quantization_config(src)
    schemes = layer_schemes(plan, activations)
    ignore = [n for n in _linear_names(cfg_dict) if n not in schemes]
    out = check_output_dir(out, force)
    index = CheckpointIndex(src, qcfg)  # a head stored as the embedding times a transform: written whole
    cfg_dict = index.config(cfg_dict)

    units: dict[str, list[TensorEntry]] = {}
    owner = {f"{n}.{suffix}": n for n in schemes for suffix in ("qweight", "w_scales", "act_scale", "bias")}
    for key in index.weight_map:
        if key in owner:
            continue
        units.setdefault(_unit_of(key), []).extend(index.entries([key]))
    for name in schemes:
        units.setdefault(_unit_of(name + "."), []).extend(_layer_entries(index, name, plan.layers[name],
                                                                         schemes[name]["format"]))
    ordered = [units[u] for u in sorted(units, key=lambda u: (u == "", [int(x) if x.isdigit() else x
                                                                       for x in re.split(r"(\d+)", u)]))]

    with staging_dir(out) as tmp:
        write_weights(tmp, ordered, max_shard_bytes)
        cfg = dict(cfg_dict)
        cfg["quantization_config"] = compressed_tensors_config(schemes, ignore)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
        skip = {"config.json", WEIGHTS_NAME, INDEX_NAME, REPORT_NAME, *weight_files(src)}
        for p in sorted(src.iterdir()):  # tokenizer, generation config, chat template, the plan
            if p.is_file() and p.name not in skip and not p.name.startswith("."):
                shutil.copy2(p, tmp / p.name)
        finish(tmp, out, _report(plan, schemes, ignore, src, activations, qcfg), EXPORT_REPORT_NAME)
    return out

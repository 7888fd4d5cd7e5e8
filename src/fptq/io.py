"""Saving and loading fptq checkpoints (safetensors + JSON only; nothing is unpickled).

An output directory holds ``model.safetensors`` (or, for large models,
``model-0000i-of-0000n.safetensors`` shards and ``model.safetensors.index.json``; packed int4 codes as uint8,
fp16 group scales, fp32 static activation scales, and the unquantized tensors -- embeddings, ``lm_head``,
norms, biases -- in 16 bits: the model's dtype when it is 16-bit, bfloat16 for a float32 model, unless
``keep_dtype``, see :func:`unquantized_dtype`), ``config.json`` with a ``quantization_config`` (its
``dtype`` is the model's compute dtype, which loading restores), the
tokenizer files, ``fptq_plan.json`` and ``quantize_report.json``. It is
written into a temporary sibling directory and renamed into place at the
end, so an interrupted run never leaves an ``OUT`` that looks complete.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import FptqError
from .nn import QuantLinear
from .plan import Plan
from .st import TensorEntry, cast_entry, tensor_entry, write_safetensors
from .stored_head import FORMAT_VERSION, TRANSFORM_LEAF, head_config, materialize_head, set_tied

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
PLAN_NAME = "fptq_plan.json"
REPORT_NAME = "quantize_report.json"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
QUANT_METHOD = "fptq"

__all__ = ["save", "save_streaming", "load", "check_output_dir", "check_output_file", "file_sha256", "quantized_state_dict", "weight_files",
           "verify_files", "replace_linears", "act_mode_of", "read_plan", "read_quantization_config", "staging_dir",
           "finish", "write_weights", "check_is_checkpoint", "unquantized_dtype", "quantized_linears",
           "exact_tensor_names", "storage_entries", "saved_entries", "stored_head_of", "model_dtype"]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_output_dir(out: str | Path, force: bool) -> Path:
    """Refuse an existing non-empty ``out`` unless ``force``; check it can be written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FptqError(f"output path {out} exists and is a file; choose another -o")
    if out.exists() and any(out.iterdir()) and not force:
        raise FptqError(f"output directory {out} exists and is not empty; pass --force to replace it or choose another -o")
    _check_parent(out)
    return out


def check_output_file(out: str | Path, force: bool) -> Path:
    """Refuse an existing ``out`` file unless ``force`` (a directory always); check it can be written."""
    out = Path(out)
    if out.is_dir():
        raise FptqError(f"output path {out} is a directory; give a file name for -o")
    if out.exists() and not force:
        raise FptqError(f"output file {out} exists; pass --force to replace it or choose another -o")
    _check_parent(out)
    return out


def _check_parent(out: Path) -> None:
    """Create the parent directory of ``out`` if needed and check it can be written."""
    parent = out.resolve().parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as e:
            raise FptqError(f"cannot create the parent directory of {out}: {e.strerror}") from e
    if not os.access(parent, os.W_OK):
        raise FptqError(f"cannot write to {parent}: permission denied; choose another -o")
    _probe_writable(parent)


def _probe_writable(parent: Path) -> None:
    """Create and remove a file in ``parent`` (``os.access`` says yes to root, even on read-only mounts)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".fptq-write-test-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise FptqError(f"no space left on device in {parent}; free some space or choose another -o") from e
        raise FptqError(f"cannot write to {parent}: {e.strerror or e}; choose another -o") from e


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The persistent tensors of ``model``, tied duplicates removed, contiguous."""
    sd = model.state_dict()
    seen: dict[tuple, str] = {}
    out = {}
    for k, v in sd.items():
        key = (v.data_ptr(), v.dtype, tuple(v.shape)) if v.numel() else None
        if key is not None and key in seen:
            continue  # tied weight (e.g. lm_head = embed_tokens)
        if key is not None:
            seen[key] = k
        out[k] = v.detach().contiguous().cpu()
    return out


_16_BIT = (torch.float16, torch.bfloat16)


def unquantized_dtype(model_dtype: torch.dtype, keep_dtype: bool = False) -> torch.dtype | None:
    """The dtype the unquantized float tensors (embeddings, ``lm_head``, norms, biases, Linears the plan
    keeps in float) are written in: the model's own when it is 16-bit, bfloat16 for a float32 model
    (e.g. a GGUF dequantized to float32); ``None`` (as they are) with ``keep_dtype``."""
    if keep_dtype:
        return None
    return model_dtype if model_dtype in _16_BIT else torch.bfloat16


def quantized_linears(plan: Plan) -> dict[str, int]:
    """The Linears ``plan`` quantizes (those :func:`replace_linears` swaps), with their number of weights."""
    return {n: lp.in_features * lp.out_features for n, lp in plan.layers.items()
            if not (lp.strategy == "float" and lp.wbits == 16)}


def exact_tensor_names(linears: Iterable[str]) -> set[str]:
    """Tensors written exactly as computed whatever :func:`unquantized_dtype` says: the codes, group
    scales and static activation scale of every quantized Linear in ``linears``."""
    return {f"{n}.{b}" for n in linears for b in ("qweight", "w_scales", "act_scale")}


def storage_entries(entries: list[TensorEntry], dtype: torch.dtype | None, exact: set[str]) -> list[TensorEntry]:
    """``entries`` with every float32 tensor outside ``exact`` written as ``dtype`` (``None``: unchanged)."""
    if dtype is None:
        return entries
    return [cast_entry(e, dtype) if e.dtype == "F32" and e.name not in exact else e for e in entries]


def stored_head_of(model: nn.Module) -> dict[str, str] | None:
    """:func:`fptq.stored_head.head_config` of a model whose untied head carries the transform that turns its
    embedding into it (a rotated tied model, :func:`fptq.rotation.rotate_model`), else None."""
    names = {id(m): n for n, m in model.named_modules()}
    for name, m in model.named_modules():
        if TRANSFORM_LEAF in dict(m.named_buffers(recurse=False)):
            emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            if emb is None or id(emb) not in names:
                return None
            return head_config(name, names[id(emb)])
    return None


def saved_entries(model: nn.Module, quantized: Iterable[str], keep_dtype: bool = False,
                  stored_head: dict[str, str] | None = None) -> list[TensorEntry]:
    """The tensors :func:`save` writes for ``model`` whose quantized Linears are ``quantized``: its
    :func:`quantized_state_dict`, unquantized float32 tensors as :func:`unquantized_dtype` says;
    ``stored_head`` (:func:`stored_head_of`): the head's transform in float32 instead of the head."""
    dtype = unquantized_dtype(model_dtype(model), keep_dtype)
    sd = quantized_state_dict(model)
    exact = exact_tensor_names(quantized)
    if stored_head is not None:
        sd.pop(stored_head["head"])
        sd[stored_head["transform"]] = sd[stored_head["transform"]].float()
        exact.add(stored_head["transform"])
    else:  # a transform the checkpoint does not use (e.g. a model whose head was changed after the rotation)
        sd = {k: v for k, v in sd.items() if not k.endswith("." + TRANSFORM_LEAF)}
    entries = [tensor_entry(k, v) for k, v in sd.items()]
    return storage_entries(entries, dtype, exact)


def _dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _hf_config_dict(model: nn.Module, plan: Plan, stored_head: dict[str, str] | None = None) -> dict[str, Any]:
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("torch_dtype", None)
    # the compute dtype: loading builds the model in it (16-bit stored tensors of a float32 model are upcast)
    cfg["dtype"] = _dtype_str(model_dtype(model))
    cfg["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "plan_file": PLAN_NAME,
        "format_version": 1,
        **{k: v for k, v in plan.config.items() if k in ("method", "wbits", "abits", "group_size", "thresholds")},
    }
    if stored_head is not None:  # the head is computed from the embedding at load (fptq.stored_head): a loader
        cfg["quantization_config"].update(format_version=FORMAT_VERSION, head_from_embedding=stored_head)
        set_tied(cfg, True)  # a loader that knows nothing of it ties it; fptq's loaders untie it
    return cfg


@contextmanager
def staging_dir(out: Path):
    """A hidden temporary sibling of ``out``, removed on any failure; disk errors become FptqError."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.incomplete-", dir=out.resolve().parent))
    try:
        yield tmp
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise FptqError(f"no space left on device while writing {out}; free some space or choose another -o "
                            "(nothing was written)") from e
        raise FptqError(f"could not write {out}: {e.strerror or e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_metadata(tmp: Path, model: nn.Module, plan: Plan, tokenizer,
                    stored_head: dict[str, str] | None = None) -> None:
    """config.json (with the quantization_config), generation config, tokenizer, plan."""
    (tmp / "config.json").write_text(json.dumps(_hf_config_dict(model, plan, stored_head), indent=2, default=str))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(tmp)
        except Exception:  # pragma: no cover - generation config is optional
            log.debug("could not save generation_config", exc_info=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    plan.save(tmp / PLAN_NAME)


def finish(tmp: Path, out: Path, report: dict[str, Any] | None, report_name: str = REPORT_NAME) -> None:
    """Record every file's size and sha256 in the report (``report_name``), then rename ``tmp`` to ``out``."""
    report = dict(report or {})
    report["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                       for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / report_name).write_text(json.dumps(report, indent=2, default=str))
    backup = None
    if out.exists():
        backup = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(backup)
    tmp.rename(out)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating-point dtype of the model's parameters (its compute dtype)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def save(
    model: nn.Module,
    plan: Plan,
    out: str | Path,
    tokenizer=None,
    report: dict[str, Any] | None = None,
    force: bool = False,
    keep_dtype: bool = False,
) -> Path:
    """Write the quantized ``model`` and its ``plan`` to ``out`` (atomically, one weights file).

    The unquantized tensors are written in 16 bits (:func:`unquantized_dtype`); ``keep_dtype``
    writes them in the model's dtype, float32 included."""
    out = check_output_dir(out, force)
    stored_head = stored_head_of(model)  # a rotated tied head: stored as the embedding times a transform
    with staging_dir(out) as tmp:
        sd = {e.name: e.read() for e in saved_entries(model, quantized_linears(plan), keep_dtype, stored_head)}
        save_file(sd, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "producer": "fptq"})
        _write_metadata(tmp, model, plan, tokenizer, stored_head)
        finish(tmp, out, report)
    return out


def rest_entries(model: nn.Module, layers_prefix: str) -> list[TensorEntry]:
    """Entries for the tensors outside the decoder layers (tied duplicates removed)."""
    seen: set[tuple] = set()
    entries = []
    for k, v in model.state_dict().items():
        if k.startswith(layers_prefix):
            continue
        key = (v.data_ptr(), v.dtype, tuple(v.shape)) if v.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        entries.append(tensor_entry(k, v))
    return entries


def write_weights(tmp: Path, units: list[list[TensorEntry]], max_shard_bytes: int) -> None:
    """``model.safetensors`` if everything fits in ``max_shard_bytes``, else Hugging Face shards
    (``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``). A unit (one decoder
    layer, or the rest of the model) is never split across shards."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for unit in units:
        n = sum(e.nbytes for e in unit)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(unit)
        size += n
    meta = {"format": "pt", "producer": "fptq"}
    if len(shards) == 1:
        write_safetensors(tmp / WEIGHTS_NAME, shards[0], meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(tmp / name, shard, meta)
        weight_map.update({e.name: name for e in shard})
    total = sum(e.nbytes for shard in shards for e in shard)
    (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def save_streaming(
    model: nn.Module,
    plan: Plan,
    out: str | Path,
    units: list[list[TensorEntry]],
    tokenizer=None,
    report: dict[str, Any] | None = None,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    stored_head: dict[str, str] | None = None,
) -> Path:
    """Write a checkpoint whose tensors come from ``units`` (e.g. one per decoder layer, copied
    tensor by tensor from the files of a resumable run, and one for the rest of the model), and
    whose config comes from ``model``: the quantized model is never whole in memory. Atomic
    like :func:`save`. ``stored_head``: ``units`` hold the head as the embedding times a transform
    (:func:`fptq.stored_head.head_config`), which the config then records."""
    out = check_output_dir(out, force)
    names = {e.name for unit in units for e in unit}
    if stored_head is not None and (stored_head["head"] in names or stored_head["transform"] not in names):
        raise FptqError(f"internal error: the tensors to write do not store the head as {stored_head}")
    with staging_dir(out) as tmp:
        write_weights(tmp, units, max_shard_bytes)
        _write_metadata(tmp, model, plan, tokenizer, stored_head)
        finish(tmp, out, report)
    return out


def weight_files(out: str | Path) -> list[str]:
    """The weights files of a checkpoint: ``model.safetensors`` or the shards its index lists."""
    out = Path(out)
    if (out / INDEX_NAME).is_file():
        try:
            return sorted(set(json.loads((out / INDEX_NAME).read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise FptqError(f"{out / INDEX_NAME} is damaged: the checkpoint is corrupt") from e
    return [WEIGHTS_NAME]


def verify_files(out: Path) -> None:
    """Check the size and sha256 of every weights file against the report."""
    rp = out / REPORT_NAME
    if not rp.is_file():
        return
    try:
        files = json.loads(rp.read_text()).get("files", {})
    except json.JSONDecodeError as e:
        raise FptqError(f"{rp} is not valid JSON: the checkpoint is damaged") from e
    for name in [*weight_files(out), INDEX_NAME]:
        info = files.get(name)
        if not info:
            continue
        path = out / name
        if not path.is_file():
            raise FptqError(f"{path} is missing: the checkpoint is incomplete")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise FptqError(f"{path} has {size} bytes, the report recorded {info['bytes']}: the checkpoint is truncated or was modified")
        if file_sha256(path) != info["sha256"]:
            raise FptqError(f"{path} does not match the sha256 recorded in {REPORT_NAME}: the checkpoint was modified or is corrupt")


def _read_weights(out: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for name in weight_files(out):
        try:
            sd.update(load_file(str(out / name)))
        except (SafetensorError, OSError) as e:
            raise FptqError(f"cannot read {out / name}: {e}; the file is corrupt or truncated") from e
    return sd


def act_mode_of(strategy: str) -> str:
    """The :class:`~fptq.nn.QuantLinear` activation mode of a plan strategy (LAE layers run static:
    their equalization is already folded into the weights and the producer of ``x``)."""
    return {"static_tensor": "static_tensor", "lae_static_tensor": "static_tensor",
            "dynamic_token": "dynamic_token", "float": "none"}[strategy]


def replace_linears(model: nn.Module, plan: Plan) -> nn.Module:
    """Swap every Linear that ``plan`` quantizes for an empty :class:`~fptq.nn.QuantLinear` of the
    same dtype and device (``meta`` included), ready to receive a checkpoint's tensors. Linears the
    plan keeps in float (``strategy == "float"`` with 16-bit weights) are left alone."""
    for name in quantized_linears(plan):
        lp = plan.layers[name]
        try:
            lin = model.get_submodule(name)
        except AttributeError as e:
            raise FptqError(f"the plan names {name}, which this model does not have") from e
        w = lin.weight
        q = QuantLinear(lp.in_features, lp.out_features, wbits=lp.wbits, group_size=lp.group_size,
                        abits=lp.abits if lp.abits < 16 else 8, act_mode=act_mode_of(lp.strategy),
                        bias=lin.bias is not None, dtype=w.dtype, device=w.device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
    return model


def read_plan(path: Path) -> Plan:
    """The plan in ``path`` (a ``fptq_plan.json``); a damaged file is an :class:`FptqError`."""
    try:
        return Plan.load(path)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise FptqError(f"{path} is not a valid fptq plan: {e}") from e


def read_quantization_config(out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``config.json`` of a checkpoint split into (model config, fptq quantization_config)."""
    cfg_dict = json.loads((out / "config.json").read_text())
    qcfg = cfg_dict.pop("quantization_config", None)
    if not qcfg or qcfg.get("quant_method") != QUANT_METHOD:
        raise FptqError(f"{out}/config.json has no fptq quantization_config")
    version = qcfg.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FptqError(f"{out} is an fptq checkpoint of format {version!r}, newer than this fptq reads "
                        f"({FORMAT_VERSION}): update fptq to read it")
    return cfg_dict, qcfg


def check_is_checkpoint(out: Path) -> None:
    """Raise :class:`FptqError` unless ``out`` holds a plan and weights files."""
    if not (out / PLAN_NAME).is_file() or not ((out / WEIGHTS_NAME).is_file() or (out / INDEX_NAME).is_file()):
        raise FptqError(f"{out} is not an fptq checkpoint (missing {PLAN_NAME} or {WEIGHTS_NAME})")


def _compute_dtype(cfg_dict: dict[str, Any], sd: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype the checkpoint's model computes in: ``dtype`` of its config.json (16-bit tensors stored
    for a float32 model are upcast), else that of its unquantized float tensors."""
    name = cfg_dict.get("dtype") or cfg_dict.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    scales = (".w_scales", ".act_scale")
    return next((v.dtype for k, v in sd.items() if v.is_floating_point() and not k.endswith(scales)), torch.float32)


def load(out: str | Path, device: str | torch.device = "cpu", backend: str = "auto", verify: bool = True,
         dtype: torch.dtype | None = None):
    """Load an fptq checkpoint as a Hugging Face causal LM whose Linears are
    :class:`~fptq.nn.QuantLinear` (``backend``: ``auto`` (default) = the fastest integer kernels for the
    device, see :mod:`fptq.kernels`; ``reference`` = simulated quantization in float32, the numerics the
    kernels are tested against; or a kernel name).

    The model is built in the dtype of the checkpoint's ``config.json`` (the source model's): the
    unquantized tensors of a float32 model, stored in bfloat16, are upcast to float32 exactly; the
    codes, group scales and static activation scales keep their stored dtypes.

    ``dtype`` overrides that compute dtype (e.g. ``torch.bfloat16`` to keep 16-bit stored tensors as they are:
    what :mod:`fptq.runtime` runs).

    ``transformers.AutoModelForCausalLM.from_pretrained(out)`` gives the same model once
    :mod:`fptq` is imported (see :mod:`fptq.hf`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out)
    check_is_checkpoint(out)
    if verify:
        verify_files(out)
    plan = read_plan(out / PLAN_NAME)
    cfg_dict, qcfg = read_quantization_config(out)
    sd = _read_weights(out)
    materialize_head(sd, cfg_dict, qcfg)  # a head stored as the embedding times a transform: computed now
    config = AutoConfig.for_model(**cfg_dict)
    dtype = dtype or _compute_dtype(cfg_dict, sd)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    replace_linears(model, plan)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = set()
    if getattr(config, "tie_word_embeddings", False):
        tied = {"lm_head.weight"}
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise FptqError(f"{out} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if tied:
        model.tie_weights()
    model.eval()
    model.to(device)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.set_backend(backend)
    model.fptq_plan = plan
    return model

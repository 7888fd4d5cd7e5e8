"""Saving and loading fptq checkpoints (safetensors + JSON only; nothing is unpickled).

An output directory holds ``model.safetensors`` (packed int4 codes as uint8,
fp16 group scales, fp32 static activation scales, the float tensors of the
rest of the model), ``config.json`` with a ``quantization_config``, the
tokenizer files, ``fptq_plan.json`` and ``quantize_report.json``. It is
written into a temporary sibling directory and renamed into place at the
end, so an interrupted run never leaves an ``OUT`` that looks complete.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import FptqError
from .nn import QuantLinear
from .plan import Plan

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
PLAN_NAME = "fptq_plan.json"
REPORT_NAME = "quantize_report.json"
QUANT_METHOD = "fptq"

__all__ = ["save", "load", "check_output_dir", "file_sha256", "quantized_state_dict"]


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
    parent = out.resolve().parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as e:
            raise FptqError(f"cannot create the parent directory of {out}: {e.strerror}") from e
    if not os.access(parent, os.W_OK):
        raise FptqError(f"cannot write to {parent}: permission denied; choose another -o")
    return out


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


def _hf_config_dict(model: nn.Module, plan: Plan) -> dict[str, Any]:
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "plan_file": PLAN_NAME,
        "format_version": 1,
        **{k: v for k, v in plan.config.items() if k in ("method", "wbits", "abits", "group_size", "thresholds")},
    }
    return cfg


def save(
    model: nn.Module,
    plan: Plan,
    out: str | Path,
    tokenizer=None,
    report: dict[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Write the quantized ``model`` and its ``plan`` to ``out`` (atomically)."""
    out = check_output_dir(out, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.incomplete-", dir=out.resolve().parent))
    try:
        sd = quantized_state_dict(model)
        save_file(sd, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "producer": "fptq"})
        (tmp / "config.json").write_text(json.dumps(_hf_config_dict(model, plan), indent=2, default=str))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(tmp)
            except Exception:  # pragma: no cover - generation config is optional
                log.debug("could not save generation_config", exc_info=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        plan.save(tmp / PLAN_NAME)
        report = dict(report or {})
        files = {}
        for p in sorted(tmp.iterdir()):
            if p.is_file():
                files[p.name] = {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        report["files"] = files
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2, default=str))
        backup = None
        if out.exists():
            backup = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(backup)
        tmp.rename(out)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FptqError(f"could not write {out}: {e.strerror or e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _verify_files(out: Path) -> None:
    rp = out / REPORT_NAME
    if not rp.is_file():
        return
    try:
        files = json.loads(rp.read_text()).get("files", {})
    except json.JSONDecodeError as e:
        raise FptqError(f"{rp} is not valid JSON: the checkpoint is damaged") from e
    info = files.get(WEIGHTS_NAME)
    if info:
        size = (out / WEIGHTS_NAME).stat().st_size
        if size != info["bytes"]:
            raise FptqError(f"{out / WEIGHTS_NAME} has {size} bytes, the report recorded {info['bytes']}: the checkpoint is truncated or was modified")
        if file_sha256(out / WEIGHTS_NAME) != info["sha256"]:
            raise FptqError(f"{out / WEIGHTS_NAME} does not match the sha256 recorded in {REPORT_NAME}: the checkpoint was modified or is corrupt")


def load(out: str | Path, device: str | torch.device = "cpu", backend: str = "reference", verify: bool = True):
    """Load an fptq checkpoint as a Hugging Face causal LM whose Linears are
    :class:`~fptq.nn.QuantLinear` (``backend``: ``reference`` = simulated
    quantization, or a kernel name, see :mod:`fptq.kernels`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out)
    if not (out / PLAN_NAME).is_file() or not (out / WEIGHTS_NAME).is_file():
        raise FptqError(f"{out} is not an fptq checkpoint (missing {PLAN_NAME} or {WEIGHTS_NAME})")
    if verify:
        _verify_files(out)
    plan = Plan.load(out / PLAN_NAME)
    cfg_dict = json.loads((out / "config.json").read_text())
    qcfg = cfg_dict.pop("quantization_config", None)
    if not qcfg or qcfg.get("quant_method") != QUANT_METHOD:
        raise FptqError(f"{out}/config.json has no fptq quantization_config")
    config = AutoConfig.for_model(**cfg_dict)
    try:
        sd = load_file(str(out / WEIGHTS_NAME))
    except (SafetensorError, OSError) as e:
        raise FptqError(f"cannot read {out / WEIGHTS_NAME}: {e}; the file is corrupt or truncated") from e
    dtype = next((v.dtype for k, v in sd.items() if v.is_floating_point() and "w_scales" not in k and "act_scale" not in k), torch.float32)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, lp in plan.layers.items():
        if lp.strategy == "float" and lp.wbits == 16:
            continue
        lin = model.get_submodule(name)
        act_mode = {"static_tensor": "static_tensor", "lae_static_tensor": "static_tensor",
                    "dynamic_token": "dynamic_token", "float": "none"}[lp.strategy]
        q = QuantLinear(lp.in_features, lp.out_features, wbits=lp.wbits, group_size=lp.group_size, abits=lp.abits if lp.abits < 16 else 8,
                        act_mode=act_mode, bias=lin.bias is not None, dtype=dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
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

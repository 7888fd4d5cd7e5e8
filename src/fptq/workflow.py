"""End-to-end jobs behind the CLI, usable from Python too."""
from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import QuantConfig
from .data import calibration_windows, read_text, text_hash
from .errors import FptqError
from .io import check_output_dir, save
from .models.loading import load_float_model
from .nn import QuantLinear
from .pipeline import quantize
from .plan import Plan

log = logging.getLogger(__name__)

__all__ = ["quantize_to_dir", "versions", "model_sizes", "load_any"]


def versions() -> dict[str, str]:
    import transformers

    return {"fptq": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def model_sizes(model, float_bytes_per_param: int | None = None) -> dict[str, Any]:
    """Sizes of the float model and of the quantized Linears (bits per weight incl. scales)."""
    q_bytes, q_params, q_float_bytes = 0, 0, 0
    other = 0
    seen = set()
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            n = mod.in_features * mod.out_features
            q_params += n
            q_bytes += mod.qweight.numel() * mod.qweight.element_size() + mod.w_scales.numel() * 2 + 4
            if mod.bias is not None:
                q_bytes += mod.bias.numel() * mod.bias.element_size()
            q_float_bytes += n * (float_bytes_per_param or 4)
    for p in list(model.parameters()) + [b for b in model.buffers()]:
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if not any(p is b for m in model.modules() if isinstance(m, QuantLinear) for b in m.buffers()):
            other += p.numel() * p.element_size()
    return {
        "quantized_params": q_params,
        "quantized_linear_bytes": q_bytes,
        "float_linear_bytes": q_float_bytes,
        "bits_per_weight": 8 * q_bytes / max(q_params, 1),
        "other_bytes": other,
    }


def quantize_to_dir(
    model: str | None,
    out: str | Path,
    config: QuantConfig,
    *,
    calib: str | None = None,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    device: str | None = None,
    batch_size: int = 8,
    offload: bool = False,
    force: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> tuple[Plan, dict[str, Any]]:
    """Load ``model``, quantize it with ``config`` on calibration windows, save to ``out``."""
    t_start = time.perf_counter()
    out = check_output_dir(out, force)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FptqError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    fmodel, tok, src = load_float_model(model, trust_remote_code=trust_remote_code)
    t_load = time.perf_counter() - t0
    float_bytes = sum(p.numel() * p.element_size() for p in {p.data_ptr(): p for p in fmodel.parameters()}.values())
    bpp = next(fmodel.parameters()).element_size()

    text = read_text(calib)
    windows = calibration_windows(tok, text, nsamples, seqlen, seed)
    t0 = time.perf_counter()
    plan = quantize(fmodel, config, windows, device=device, batch_size=batch_size, offload=offload, seed=seed,
                    progress=progress)
    t_quant = time.perf_counter() - t0

    sizes = model_sizes(fmodel, bpp)
    report: dict[str, Any] = {
        "source_model": src,
        "model_arg": model,
        "output": str(Path(out).resolve()),
        "config": config.to_dict(),
        "calibration": {"source": calib or "bundled C4 sample", "nsamples": nsamples, "seqlen": seqlen,
                        "seed": seed, "text_sha256": text_hash(text),
                        "windows_sha256": __import__("hashlib").sha256(windows.numpy().tobytes()).hexdigest()},
        "device": device,
        "counts": dict(plan.counts()),
        "counts_by_projection": {k: dict(v) for k, v in plan.counts_by_projection().items()},
        "versions": versions(),
        "timings_s": {"load": t_load, "quantize": t_quant},
    }
    t0 = time.perf_counter()
    save(fmodel, plan, out, tokenizer=tok, report=report, force=force)
    t_save = time.perf_counter() - t0
    ckpt = sum(p.stat().st_size for p in Path(out).iterdir() if p.is_file())
    report["timings_s"].update({"save": t_save, "total": time.perf_counter() - t_start})
    report["sizes"] = {"float_model_bytes": float_bytes, "checkpoint_bytes": ckpt, **sizes}
    # rewrite the report with the final timings and sizes (files' hashes unchanged)
    rp = Path(out) / "quantize_report.json"
    saved = json.loads(rp.read_text())
    saved.update({"timings_s": report["timings_s"], "sizes": report["sizes"]})
    rp.write_text(json.dumps(saved, indent=2, default=str))
    report["files"] = saved.get("files", {})
    return plan, report


def load_any(spec: str | None, device: str = "cpu", backend: str = "reference"):
    """``(model, tokenizer, kind)`` for a float model spec or an fptq output directory."""
    from transformers import AutoTokenizer

    from .io import PLAN_NAME, load

    if spec is not None and (Path(spec) / PLAN_NAME).is_file():
        model = load(spec, device=device, backend=backend)
        tok = AutoTokenizer.from_pretrained(spec)
        return model, tok, "fptq"
    model, tok, _ = load_float_model(spec)
    return model.to(device), tok, "float"

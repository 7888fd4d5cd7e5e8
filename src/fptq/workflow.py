"""End-to-end jobs behind the CLI, usable from Python too."""
from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import QuantConfig
from .data import calibration_windows, read_text, text_hash
from .errors import FptqError
from .io import (
    DEFAULT_MAX_SHARD_BYTES,
    check_output_dir,
    exact_tensor_names,
    model_dtype,
    quantized_linears,
    rest_entries,
    save_streaming,
    saved_entries,
    stored_head_of,
    storage_entries,
    unquantized_dtype,
)
from .memory import process_memory, trim_heap
from .models.adapters import get_adapter
from .models.loading import LazyWeights, load_float_model, load_float_model_lazy, model_fingerprint
from .nn import QuantLinear
from .pipeline import LayerResult, quantize
from .plan import Plan
from .resume import PartialRun, QuantizeInterrupted, partial_dir
from .residual import permute_residual_outside, residual_axes
from .rotation import prepare_rotation, rotated_outside_entries, rotation_for, rotation_problem
from .st import TensorEntry, file_entries, permuted_entry, tensor_entry, torch_dtype
from .stored_head import head_config, untie_config

log = logging.getLogger(__name__)

__all__ = ["quantize_to_dir", "run_settings", "versions", "model_sizes", "stored_sizes", "load_any"]


def versions() -> dict[str, str]:
    import transformers

    return {"fptq": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


_QUANTIZED_PARTS = {"qweight": "codes", "w_scales": "group_scales", "act_scale": "static_act_scales", "bias": "biases"}


def stored_sizes(entries: Iterable[TensorEntry], quantized: dict[str, int], float_bytes_per_param: int = 4
                 ) -> dict[str, Any]:
    """Sizes of what a checkpoint stores, from its tensors' entries and ``quantized`` (the quantized
    Linears and their number of weights, see :func:`fptq.io.quantized_linears`).

    ``quantized_linear_bytes`` (codes, group scales, static activation scales and biases of the
    quantized Linears) gives ``bits_per_weight``; ``other_bytes`` is the rest (embeddings,
    ``lm_head``, norms, Linears kept in float). ``stored`` says, for each kind of tensor, how many
    bytes it takes in which dtype, so which tensors are 16-bit is explicit."""
    stored: dict[str, dict[str, int]] = {}
    q_bytes = other = 0
    for e in entries:
        owner, _, part = e.name.rpartition(".")
        kind = _QUANTIZED_PARTS.get(part) if owner in quantized else None
        if kind is None:
            kind = "unquantized"
            other += e.nbytes
        else:
            q_bytes += e.nbytes
        by_dtype = stored.setdefault(kind, {})
        dtype = str(torch_dtype(e.dtype)).removeprefix("torch.")
        by_dtype[dtype] = by_dtype.get(dtype, 0) + e.nbytes
    q_params = sum(quantized.values())
    return {
        "quantized_params": q_params,
        "quantized_linear_bytes": q_bytes,
        "float_linear_bytes": q_params * float_bytes_per_param,
        "bits_per_weight": 8 * q_bytes / max(q_params, 1),
        "other_bytes": other,
        "stored": {k: {"bytes": sum(v.values()), "dtypes": v} for k, v in stored.items()},
    }


def model_sizes(model, float_bytes_per_param: int | None = None, keep_dtype: bool = False) -> dict[str, Any]:
    """:func:`stored_sizes` of the checkpoint :func:`fptq.save` writes for the quantized ``model``."""
    quantized = {n: m.in_features * m.out_features for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    return stored_sizes(saved_entries(model, quantized, keep_dtype), quantized, float_bytes_per_param or 4)


def run_settings(config: QuantConfig, *, src: str, text: str, windows: torch.Tensor, nsamples: int, seqlen: int,
                 seed: int, batch_size: int, device: str) -> dict[str, Any]:
    """Everything that decides a run's numbers: a resumed run must match these exactly."""
    v = versions()
    return {
        "config": config.to_dict(), "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "batch_size": batch_size,
        "device": torch.device(device).type, "calibration_text_sha256": text_hash(text),
        "calibration_windows_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest(),
        "model": str(src), "model_fingerprint": model_fingerprint(src),
        "fptq_version": v["fptq"], "torch_version": v["torch"], "transformers_version": v["transformers"],
    }


def _open_run(partial: Path, settings: dict[str, Any], layers_total: int, resume: bool, force: bool,
              out: Path) -> PartialRun:
    """The saved run to continue (``resume``) or a fresh one; an unfinished run is never overwritten silently."""
    existing = PartialRun.find(partial)
    if existing is not None and resume:
        existing.check(settings, layers_total)
        log.warning("resuming %s after %d of %d layers", out, existing.layers_done, layers_total)
        return existing
    if existing is not None and not force:
        raise FptqError(f"an unfinished run for {out} is saved in {partial} ({existing.layers_done} of "
                        f"{existing.manifest.get('layers_total')} layers done); pass --resume to continue or "
                        "--force to start over")
    if resume:
        log.warning("nothing to resume for %s: starting from the first layer", out)
    return PartialRun.create(partial, settings, layers_total)


def _dynamic_budget_spent(run: PartialRun) -> dict[str, Any]:
    """What the layers an unfinished run has done did with its dynamic budget (``config.dynamic_share``): the
    prediction it spread the budget by (saved with layer 0), its dynamic Linears and how many of them were
    chosen by error, as :func:`~fptq.pipeline.quantize` takes them."""
    if not run.layers_done:
        return {}
    entries = [e for i in range(run.layers_done) for e in run.layer_info(i)["entries"].values()]
    return {"dynamic_prediction": run.layer_info(0).get("dynamic_prediction"),
            "dynamic_spent": (sum(e.strategy == "dynamic_token" for e in entries),
                              sum(e.chosen_dynamic for e in entries))}


def _layer_loader(weights: LazyWeights | None) -> Callable[[int, torch.nn.Module], None] | None:
    """Load each decoder layer from disk right before it is processed; the embedding stage's
    weights are dropped then (the first layer's inputs are captured by that time)."""
    if weights is None:
        return None

    def load(i: int, layer: torch.nn.Module) -> None:
        weights.release_pre_modules()
        weights.load_layer(i, layer)
    return load


def _layer_releaser(weights: LazyWeights | None) -> Callable[[int, torch.nn.Module], None] | None:
    """Drop a decoder layer loaded for a float pass (``residual_order``) until it is processed, and hand the
    freed heap back to the OS, as after each quantized layer (memory.py: otherwise tensors of a few MiB freed
    by one layer stay resident beside the next)."""
    if weights is None:
        return None

    def release(i: int, layer: torch.nn.Module) -> None:
        LazyWeights.release_layer(layer)
        trim_heap()

    return release


def _phase_totals(layer_infos: list[dict]) -> dict[str, float]:
    """Seconds spent in each phase of the layers (load, statistics, weights, propagate), summed over layers."""
    out: dict[str, float] = {}
    for info in layer_infos:
        for k, v in (info.get("phases") or {}).items():
            out[k] = out.get(k, 0.0) + v
    return out


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
    offload: bool | str = False,
    force: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
    resume: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_BYTES,
    on_layer_done: Callable[[LayerResult], None] | None = None,
    keep_dtype: bool = False,
) -> tuple[Plan, dict[str, Any]]:
    """Load ``model``, quantize it with ``config`` on calibration windows, save to ``out``.

    A local model directory of safetensors files is read one decoder layer at a
    time, and every finished layer is saved (with the activations feeding the
    next one) to a hidden sibling of ``out`` (:func:`fptq.resume.partial_dir`):
    ``resume=True`` continues an interrupted run there, giving the same bytes as
    an uninterrupted run. The checkpoint is assembled from those files at the
    end (shards of at most ``max_shard_size`` bytes), so neither the float nor
    the quantized model is ever whole in memory. Ctrl-C raises
    :class:`~fptq.resume.QuantizeInterrupted`. ``on_layer_done`` is called after
    each layer is saved.

    Calibration runs in the model's dtype; the unquantized tensors (embeddings,
    ``lm_head``, norms, biases) are written in 16 bits: the model's dtype when it
    is 16-bit, bfloat16 for a float32 model (:func:`fptq.io.unquantized_dtype`).
    ``keep_dtype`` writes them in the model's dtype, float32 included.
    """
    t_start = time.perf_counter()
    events: list[dict[str, Any]] = []  # phase boundaries: Unix time and resident memory, in the report

    def event(name: str) -> None:
        events.append({"event": name, "unix_time": time.time(), **process_memory()})

    event("start")
    out = check_output_dir(out, force)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FptqError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    torch.manual_seed(seed)
    text = read_text(calib)
    t0 = time.perf_counter()
    if config.quantize_weights:
        fmodel, tok, src, weights = load_float_model_lazy(model, trust_remote_code=trust_remote_code)
    else:
        (fmodel, tok, src), weights = load_float_model(model, trust_remote_code=trust_remote_code), None
    t_load = time.perf_counter() - t0
    event("loaded")
    float_bytes = sum(p.numel() * p.element_size() for p in fmodel.parameters())
    float_dtype = model_dtype(fmodel)
    bpp = float_dtype.itemsize
    windows = calibration_windows(tok, text, nsamples, seqlen, seed)
    adapter = get_adapter(fmodel)
    layers_prefix = adapter.layers_path + "."
    n_layers = len(adapter.layers(fmodel))

    settings = run_settings(config, src=src, text=text, windows=windows, nsamples=nsamples, seqlen=seqlen, seed=seed,
                            batch_size=batch_size, device=device)
    partial = partial_dir(out)
    run = _open_run(partial, settings, n_layers, resume, force, out) if config.quantize_weights else None
    resumed_at = run.layers_done if run is not None and run.layers_done else None

    def checkpoint(res: LayerResult) -> None:
        extra = {"seconds": res.seconds, "phases": res.phases, "sizes": model_sizes(res.layer, bpp, keep_dtype)}
        if res.index == 0 and res.dynamic_prediction is not None:  # what a resumed run spreads its budget by
            extra["dynamic_prediction"] = res.dynamic_prediction
        run.save_layer(res.index, f"{layers_prefix}{res.index}.", res.layer, res.entries, res.inputs.hidden, extra,
                       res.residual_perm)
        LazyWeights.release_layer(res.layer)  # it is on disk now
        trim_heap()  # hand the freed layer back to the OS: resident memory stays flat from layer to layer
        event(f"layer {res.index}")
        if on_layer_done is not None:
            on_layer_done(res)

    t0 = time.perf_counter()
    residual_perm = None
    if run is None:  # float weights: nothing to calibrate layer by layer
        plan = quantize(fmodel, config, windows, device=device, batch_size=batch_size, offload=offload, seed=seed,
                        progress=progress)
        layer_units = [[tensor_entry(f"{layers_prefix}{i}.{k}", v) for k, v in layer.state_dict().items()]
                       for i, layer in enumerate(adapter.layers(fmodel))]
        layer_infos = [{} for _ in range(n_layers)]
    else:
        saved_perm = run.residual_perm() if run.layers_done else None
        try:
            if run.layers_done < n_layers:
                quantize(fmodel, config, windows, device=device, batch_size=batch_size, offload=offload, seed=seed,
                         progress=progress, on_layer_done=checkpoint, start_layer=run.layers_done,
                         resume_hidden=run.load_hidden() if run.layers_done else None,
                         load_layer=_layer_loader(weights), release_layer=_layer_releaser(weights),
                         residual_perm=saved_perm, **_dynamic_budget_spent(run))
            elif weights is None:  # nothing left to quantize; the model in memory is what the rest is written
                prepare_rotation(fmodel, adapter, config.rotation, config.rotation_seed, None)  # from
                if saved_perm is not None:
                    permute_residual_outside(fmodel, adapter, saved_perm)
        except KeyboardInterrupt as e:
            raise QuantizeInterrupted(str(out), str(partial), run.layers_done, n_layers) from e
        layer_infos = [run.layer_info(i) for i in range(n_layers)]
        plan = Plan(thresholds=config.thresholds, config=config.to_dict())
        for info in layer_infos:
            plan.layers.update(info["entries"])
        layer_units = [file_entries(f) for f in run.layer_files()]
        residual_perm = run.residual_perm()
    t_quant = time.perf_counter() - t0
    event("quantized")

    stored_head = None  # a tied head turned by the rotation: stored as the embedding times one matrix
    if weights is None:  # in memory: the residual stream's tensors there are permuted already
        rest = rest_entries(fmodel, layers_prefix)
        stored_head = stored_head_of(fmodel)
        if stored_head is not None:
            rest = [e for e in rest if e.name != stored_head["head"]]
    else:
        rest = weights.rest_entries()
        if config.rotation != "none" and rotation_problem(fmodel, adapter) is None:  # turned as they are written
            spec = adapter.residual
            if f"{spec.head}.weight" not in {e.name for e in rest}:  # tied in the source files
                stored_head = head_config(spec.head, spec.embeddings)
            rest = rotated_outside_entries(rest, adapter, rotation_for(fmodel, config.rotation, config.rotation_seed),
                                           adapter.norm_weight_offset, tied=stored_head is not None)
            untie_config(fmodel)
        if residual_perm is not None:  # copied from the source files: permuted as they are written
            axes = residual_axes(adapter)
            rest = [permuted_entry(e, axes[e.name], residual_perm) if e.name in axes else e for e in rest]
            if stored_head is not None:  # [hidden, hidden]: both of its axes index the residual stream
                rest = [permuted_entry(permuted_entry(e, 0, residual_perm), 1, residual_perm)
                        if e.name == stored_head["transform"] else e for e in rest]
    store_dtype = unquantized_dtype(float_dtype, keep_dtype)
    quantized = quantized_linears(plan)
    exact = exact_tensor_names(quantized) | ({stored_head["transform"]} if stored_head else set())
    layer_units = [storage_entries(unit, store_dtype, exact) for unit in layer_units]
    rest = storage_entries(rest, store_dtype, exact)
    sizes = stored_sizes((e for unit in [*layer_units, rest] for e in unit), quantized, bpp)
    report: dict[str, Any] = {
        "source_model": src,
        "model_arg": model,
        "output": str(Path(out).resolve()),
        "config": config.to_dict(),
        "calibration": {"source": calib or "bundled C4 sample", "nsamples": nsamples, "seqlen": seqlen,
                        "seed": seed, "text_sha256": settings["calibration_text_sha256"],
                        "windows_sha256": settings["calibration_windows_sha256"]},
        "device": device,
        "counts": dict(plan.counts()),
        "counts_by_projection": {k: dict(v) for k, v in plan.counts_by_projection().items()},
        "versions": versions(),
        "layer_by_layer_loading": weights is not None,
        "resume": {"manifest": run.manifest if run is not None else None, "resumed_at_layer": resumed_at},
        "timings_s": {"load": t_load, "quantize": t_quant,
                      "layers": [info.get("seconds") for info in layer_infos],
                      "layer_phases": _phase_totals(layer_infos)},
    }
    t0 = time.perf_counter()
    try:
        save_streaming(fmodel, plan, out, [*layer_units, rest], tokenizer=tok, report=report, force=force,
                       max_shard_bytes=max_shard_size, stored_head=stored_head)
    except FptqError as e:
        if run is None:
            raise
        raise FptqError(f"{e}; the quantized layers are kept in {partial}: rerun with --resume to write the "
                        "checkpoint without quantizing again") from e
    if run is not None:
        run.remove()
    t_save = time.perf_counter() - t0
    event("saved")
    ckpt = sum(p.stat().st_size for p in Path(out).iterdir() if p.is_file())
    report["timings_s"].update({"save": t_save, "total": time.perf_counter() - t_start})
    report["events"] = events
    mem = process_memory()
    if mem:  # the peak of the whole process, and what it held when the job started (interpreter, libraries)
        report["memory"] = {"rss_at_start_bytes": events[0].get("rss_bytes"), "peak_rss_bytes": mem["peak_rss_bytes"]}
    report["sizes"] = {"float_model_bytes": float_bytes, "checkpoint_bytes": ckpt, **sizes}
    # rewrite the report with the final timings and sizes (files' hashes unchanged)
    rp = Path(out) / "quantize_report.json"
    saved = json.loads(rp.read_text())
    saved.update({k: report[k] for k in ("timings_s", "sizes", "events", "memory") if k in report})
    rp.write_text(json.dumps(saved, indent=2, default=str))
    report["files"] = saved.get("files", {})
    return plan, report


def load_any(spec: str | None, device: str = "cpu", backend: str = "auto"):
    """``(model, tokenizer, kind)`` for a float model spec or an fptq output directory."""
    from transformers import AutoTokenizer

    from .io import PLAN_NAME, load

    if spec is not None and (Path(spec) / PLAN_NAME).is_file():
        model = load(spec, device=device, backend=backend)
        tok = AutoTokenizer.from_pretrained(spec)
        return model, tok, "fptq"
    model, tok, _ = load_float_model(spec)
    return model.to(device), tok, "float"

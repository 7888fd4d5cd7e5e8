"""Resumable quantization runs: the state of an unfinished run, saved after every decoder layer.

``quantize_to_dir`` keeps a hidden sibling of ``OUT``, ``.OUT.partial/``
(it never looks like a checkpoint), holding::

    manifest.json              settings of the run, layers_total, layers_done
    layer-00000.safetensors    decoder layer 0's state after quantization (full tensor names)
    layer-00000.json           its plan entries, sizes and time
    ...
    acts-0000K.safetensors     the activations entering layer K+1 (one tensor per batch)
    residual-order.safetensors the residual stream's order the layers were quantized in (residual_order)

Every file is written under a temporary name and renamed; ``manifest.json``
is written last, so ``layers_done`` always names layers whose files are
complete, whatever moment the run is stopped at.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .errors import FptqError
from .plan import LayerPlan
from .st import read_tensors, tensor_entry, write_safetensors

__all__ = ["PartialRun", "QuantizeInterrupted", "partial_dir", "settings_diff"]

MANIFEST = "manifest.json"
RESIDUAL_ORDER = "residual-order.safetensors"
FORMAT = 1


class QuantizeInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``quantize_to_dir``: the finished layers are kept in ``partial``."""

    def __init__(self, out: str, partial: str, layers_done: int, layers_total: int):
        super().__init__(f"interrupted after {layers_done} of {layers_total} layers")
        self.out, self.partial, self.layers_done, self.layers_total = out, partial, layers_done, layers_total


def partial_dir(out: str | Path) -> Path:
    """Where the unfinished run writing ``out`` keeps its state."""
    out = Path(out).resolve()
    return out.parent / f".{out.name}.partial"


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def settings_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``name (old vs new)`` for every setting that differs."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k} ({a.get(k)!r} vs {b.get(k)!r})" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def _disk_error(e: OSError, where: Path) -> FptqError:
    if e.errno == errno.ENOSPC:
        return FptqError(f"no space left on device while saving progress to {where}; free some space and rerun "
                         "with --resume to continue")
    return FptqError(f"cannot save progress to {where}: {e.strerror or e}")


class PartialRun:
    """The saved state of one unfinished run (see the module docstring)."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest

    # ----------------------------------------------------------- lifecycle
    @classmethod
    def find(cls, path: str | Path) -> "PartialRun | None":
        """The run saved at ``path``, or ``None`` if there is none (or it never saved a manifest)."""
        path = Path(path)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as e:
            raise FptqError(f"the unfinished run in {path} is damaged ({e}); pass --force to start over") from e
        return cls(path, manifest)

    @classmethod
    def create(cls, path: str | Path, settings: dict[str, Any], layers_total: int) -> "PartialRun":
        """A fresh run at ``path`` (anything there is removed)."""
        path = Path(path)
        shutil.rmtree(path, ignore_errors=True)
        try:
            path.mkdir(parents=True)
            run = cls(path, {"format": FORMAT, "settings": settings, "layers_total": layers_total, "layers_done": 0})
            _write_json(path / MANIFEST, run.manifest)
        except OSError as e:
            raise _disk_error(e, path) from e
        return run

    def check(self, settings: dict[str, Any], layers_total: int) -> None:
        """Refuse to continue with settings (or a model) other than the saved ones."""
        if self.manifest.get("format") != FORMAT:
            raise FptqError(f"the unfinished run in {self.path} was saved by another fptq version; pass --force to start over")
        diff = settings_diff(self.manifest.get("settings", {}), settings)
        if self.manifest.get("layers_total") != layers_total:
            diff.append(f"layers_total ({self.manifest.get('layers_total')} vs {layers_total})")
        if diff:
            raise FptqError(
                f"cannot resume the unfinished run in {self.path}: it used other settings or another model: "
                f"{'; '.join(diff)}. Rerun with the same settings, or pass --force to start over"
            )

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    # ---------------------------------------------------------------- state
    @property
    def layers_done(self) -> int:
        return int(self.manifest.get("layers_done", 0))

    def _layer_file(self, i: int) -> Path:
        return self.path / f"layer-{i:05d}.safetensors"

    def _acts_file(self, i: int) -> Path:
        return self.path / f"acts-{i:05d}.safetensors"

    def save_layer(self, index: int, prefix: str, layer: torch.nn.Module, entries: dict[str, LayerPlan],
                   hidden: list[torch.Tensor], extra: dict[str, Any], residual_perm: torch.Tensor | None = None
                   ) -> None:
        """Save decoder layer ``index`` (state, plan entries, ``extra``) and the activations after it; with the
        first layer, the residual stream's order ``residual_perm`` (:meth:`residual_perm`)."""
        if index != self.layers_done:
            raise FptqError(f"internal error: saving layer {index} but {self.layers_done} layers are done")
        try:
            if index == 0 and residual_perm is not None:
                write_safetensors(self.path / RESIDUAL_ORDER, [tensor_entry("residual_perm", residual_perm.cpu())])
            sd = layer.state_dict()
            write_safetensors(self._layer_file(index), [tensor_entry(f"{prefix}{k}", v) for k, v in sd.items()],
                              {"format": "pt", "producer": "fptq"})
            _write_json(self.path / f"layer-{index:05d}.json",
                        {"entries": {k: v.to_dict() for k, v in entries.items()}, **extra})
            write_safetensors(self._acts_file(index), [tensor_entry(f"hidden.{b}", h) for b, h in enumerate(hidden)])
            _write_json(self.path / MANIFEST, {**self.manifest, "layers_done": index + 1})
        except OSError as e:
            raise _disk_error(e, self.path) from e
        self.manifest["layers_done"] = index + 1
        if index > 0:
            self._acts_file(index - 1).unlink(missing_ok=True)

    def load_hidden(self) -> list[torch.Tensor]:
        """The activations entering the first layer not done yet."""
        f = self._acts_file(self.layers_done - 1)
        if not f.is_file():
            raise FptqError(f"the unfinished run in {self.path} lacks {f.name}; pass --force to start over")
        tensors = dict(read_tensors(f))
        return [tensors[f"hidden.{b}"] for b in range(len(tensors))]

    def residual_perm(self) -> torch.Tensor | None:
        """The residual stream's order the saved layers were quantized in; ``None`` when they were not sorted."""
        f = self.path / RESIDUAL_ORDER
        if not f.is_file():
            return None
        return dict(read_tensors(f))["residual_perm"]

    def layer_info(self, i: int) -> dict[str, Any]:
        try:
            d = json.loads((self.path / f"layer-{i:05d}.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise FptqError(f"the unfinished run in {self.path} is damaged (layer {i}: {e}); pass --force to start over") from e
        d["entries"] = {k: LayerPlan.from_dict(v) for k, v in d["entries"].items()}
        return d

    def layer_files(self) -> list[Path]:
        return [self._layer_file(i) for i in range(self.layers_done)]

"""Streaming safetensors reading and writing, one tensor at a time.

``safetensors.torch.save_file`` serialises the whole dict in memory and
``safe_open`` maps whole files; for models larger than memory fptq reads the
tensors of one decoder layer with plain file reads, and writes output files
tensor by tensor (header first, computed from dtypes and shapes). The format
is the standard one (8-byte little-endian header length, JSON header padded
with spaces to a multiple of 8, raw little-endian data), so every safetensors
reader opens the files written here.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from .errors import FptqError

__all__ = ["TensorEntry", "read_header", "read_tensors", "read_chunks", "write_safetensors", "tensor_entry",
           "file_entries", "cast_entry", "permuted_entry", "computed_entry", "dtype_name", "torch_dtype", "WeightIndex", "CHUNK_BYTES"]

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a file being written: its header fields, how to write its bytes and
    (``read``, optional) how to materialise it as a tensor, which :func:`cast_entry` needs."""

    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    nbytes: int
    write: Callable[[BinaryIO], None]
    read: Callable[[], torch.Tensor] | None = None
    # the tensor's values in order as 1-D pieces of at most ``CHUNK_BYTES`` (file-backed entries): lets
    # :func:`cast_entry` convert a tensor larger than memory allows piece by piece
    read_chunks: Callable[[], Iterator[torch.Tensor]] | None = None


CHUNK_BYTES = 1 << 26  # 64 MiB


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def tensor_entry(name: str, t: torch.Tensor) -> TensorEntry:
    """An entry writing the in-memory tensor ``t``."""
    if t.dtype not in _NAMES:
        raise FptqError(f"cannot write {name}: dtype {t.dtype} is not supported by the safetensors writer")
    return TensorEntry(name, _NAMES[t.dtype], tuple(t.shape), t.numel() * t.element_size(),
                       lambda f, t=t: f.write(_tensor_bytes(t)), lambda t=t: t)


def computed_entry(name: str, dtype: str, shape: tuple[int, ...], read: Callable[[], torch.Tensor]) -> TensorEntry:
    """An entry whose tensor (safetensors ``dtype``, ``shape``) ``read`` computes when the file is written."""
    numel = 1
    for d in shape:
        numel *= d
    return TensorEntry(name, dtype, tuple(shape), numel * torch.empty((), dtype=torch_dtype(dtype)).element_size(),
                       lambda f: f.write(_tensor_bytes(read())), read)


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of ``dtype`` (``torch.bfloat16`` -> ``"BF16"``)."""
    if dtype not in _NAMES:
        raise FptqError(f"dtype {dtype} is not supported by the safetensors writer")
    return _NAMES[dtype]


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of the safetensors dtype ``name`` (``"BF16"`` -> ``torch.bfloat16``)."""
    if name not in _DTYPES:
        raise FptqError(f"safetensors dtype {name} is not supported")
    return _DTYPES[name]


def cast_entry(entry: TensorEntry, dtype: torch.dtype) -> TensorEntry:
    """``entry`` written as ``dtype`` (converted when the file is written: nothing is read now)."""
    name = dtype_name(dtype)
    if entry.dtype == name:
        return entry
    if entry.read is None:
        raise FptqError(f"internal error: {entry.name} cannot be converted to {dtype} (its entry has no reader)")
    numel = 1
    for d in entry.shape:
        numel *= d
    src = entry.read

    def read() -> torch.Tensor:
        return src().to(dtype)

    def write(f: BinaryIO) -> None:
        if entry.read_chunks is None:
            f.write(_tensor_bytes(read()))
            return
        for piece in entry.read_chunks():  # never the whole tensor in memory, in either dtype
            f.write(_tensor_bytes(piece.to(dtype)))

    return TensorEntry(entry.name, name, entry.shape, numel * torch.empty((), dtype=dtype).element_size(),
                       write, read)


def permuted_entry(entry: TensorEntry, dim: int, index: torch.Tensor) -> TensorEntry:
    """``entry`` with its tensor's dimension ``dim`` taken in the order ``index`` (``index_select``) when
    the file is written: the whole tensor is read then, one at a time."""
    if entry.read is None:
        raise FptqError(f"internal error: {entry.name} cannot be permuted (its entry has no reader)")
    if not 0 <= dim < len(entry.shape) or entry.shape[dim] != len(index):
        raise FptqError(f"cannot permute dimension {dim} of {entry.name} {list(entry.shape)} by {len(index)} indices")
    src = entry.read

    def read() -> torch.Tensor:
        return src().index_select(dim, index)

    return TensorEntry(entry.name, entry.dtype, entry.shape, entry.nbytes, lambda f: f.write(_tensor_bytes(read())),
                       read)


def read_header(path: str | Path) -> tuple[dict, int]:
    """``(header, data_start)`` of a safetensors file; corrupt or truncated files raise FptqError."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise FptqError(f"{path} is truncated (shorter than a safetensors header); re-download or re-save it")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, _MAX_HEADER):
                raise FptqError(f"{path} is corrupt or truncated (bad safetensors header length); re-download or re-save it")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FptqError(f"{path} is corrupt (unreadable safetensors header); re-download or re-save it") from e
    except OSError as e:
        raise FptqError(f"cannot read {path}: {e.strerror or e}") from e
    if not isinstance(header, dict):
        raise FptqError(f"{path} is corrupt (safetensors header is not a JSON object)")
    data_start = 8 + n
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if data_start + end > size:
        raise FptqError(f"{path} is truncated: it has {size} bytes, its header needs {data_start + end}; "
                        "re-download or re-save it")
    return header, data_start


def read_tensors(path: str | Path, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for ``names`` (default: all) read with plain file reads (no mmap)."""
    header, start = read_header(path)
    keys = [k for k in header if k != "__metadata__"] if names is None else list(names)
    with open(path, "rb") as f:
        for k in keys:
            info = header[k]
            if info["dtype"] not in _DTYPES:
                raise FptqError(f"{path}: tensor {k} has unsupported dtype {info['dtype']}")
            a, b = info["data_offsets"]
            f.seek(start + a)
            buf = bytearray(b - a)
            if f.readinto(buf) != b - a:
                raise FptqError(f"{path} is truncated while reading {k}; re-download or re-save it")
            dtype = _DTYPES[info["dtype"]]
            t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            yield k, t.reshape(info["shape"])


def read_chunks(path: str | Path, name: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[torch.Tensor]:
    """The values of tensor ``name`` of the safetensors file ``path``, in order, as 1-D tensors of at most
    ``chunk_bytes`` each (plain file reads; one piece in memory at a time)."""
    header, start = read_header(path)
    info = header[name]
    if info["dtype"] not in _DTYPES:
        raise FptqError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    dtype = _DTYPES[info["dtype"]]
    size = torch.empty((), dtype=dtype).element_size()
    step = max(size, chunk_bytes - chunk_bytes % size)
    a, b = info["data_offsets"]
    with open(path, "rb") as f:
        f.seek(start + a)
        left = b - a
        while left:
            buf = bytearray(min(left, step))
            if f.readinto(buf) != len(buf):
                raise FptqError(f"{path} is truncated while reading {name}; re-download or re-save it")
            left -= len(buf)
            yield torch.frombuffer(buf, dtype=dtype)


def file_entries(path: str | Path, names: Iterable[str] | None = None) -> list[TensorEntry]:
    """Entries copying tensors (default: all) of an existing file byte for byte (no tensor is materialised)."""
    header, start = read_header(path)
    keys = [k for k in header if k != "__metadata__"] if names is None else list(names)

    def copier(a: int, b: int):
        def write(out: BinaryIO) -> None:
            with open(path, "rb") as f:
                f.seek(start + a)
                left = b - a
                while left:
                    chunk = f.read(min(left, 1 << 24))
                    if not chunk:
                        raise FptqError(f"{path} is truncated")
                    out.write(chunk)
                    left -= len(chunk)
        return write

    def reader(k: str):
        def read() -> torch.Tensor:
            return next(read_tensors(path, [k]))[1]
        return read

    return [TensorEntry(k, header[k]["dtype"], tuple(header[k]["shape"]),
                        header[k]["data_offsets"][1] - header[k]["data_offsets"][0], copier(*header[k]["data_offsets"]),
                        reader(k), lambda k=k: read_chunks(path, k))
            for k in keys]


def write_safetensors(path: str | Path, entries: list[TensorEntry], metadata: dict[str, str] | None = None) -> None:
    """Write ``entries`` in order to ``path`` atomically (a temporary name, then rename)."""
    path = Path(path)
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    off = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [off, off + e.nbytes]}
        off += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for e in entries:
                e.write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class WeightIndex:
    """Where each tensor of a Hugging Face model directory lives (single file or shards + index)."""

    SINGLE = "model.safetensors"
    INDEX = "model.safetensors.index.json"

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.weight_map: dict[str, str] = {}
        idx = self.root / self.INDEX
        if idx.is_file():
            try:
                self.weight_map = dict(json.loads(idx.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise FptqError(f"{idx} is corrupt (no weight_map); re-download the model") from e
            for fname in sorted(set(self.weight_map.values())):
                if not (self.root / fname).is_file():
                    raise FptqError(f"{self.root / fname} is listed in {self.INDEX} but missing; re-download the model")
        elif (self.root / self.SINGLE).is_file():
            header, _ = read_header(self.root / self.SINGLE)
            self.weight_map = {k: self.SINGLE for k in header if k != "__metadata__"}
        self.headers = {f: read_header(self.root / f)[0] for f in sorted(set(self.weight_map.values()))}
        for k, fname in self.weight_map.items():
            if k not in self.headers[fname]:
                raise FptqError(f"{self.root / fname} lacks tensor {k} listed in {self.INDEX}; re-download the model")

    @classmethod
    def available(cls, root: str | Path) -> bool:
        root = Path(root)
        return root.is_dir() and ((root / cls.INDEX).is_file() or (root / cls.SINGLE).is_file())

    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def dtype(self) -> torch.dtype:
        """The floating-point dtype of the stored weights (the first float tensor's)."""
        for fname, header in self.headers.items():
            for k, v in header.items():
                if k != "__metadata__" and v["dtype"] in ("F32", "F16", "BF16"):
                    return _DTYPES[v["dtype"]]
        return torch.float32

    def entries(self, names: Iterable[str]) -> list[TensorEntry]:
        """Entries copying the tensors ``names`` from their files, in the given order."""
        names = list(names)
        by_file: dict[str, list[str]] = {}
        for k in names:
            by_file.setdefault(self.weight_map[k], []).append(k)
        found = {e.name: e for fname, keys in by_file.items() for e in file_entries(self.root / fname, keys)}
        return [found[k] for k in names]

    def nonfinite(self, name: str) -> bool:
        """Whether tensor ``name`` holds a NaN or Inf (read piece by piece: never whole in memory)."""
        for piece in read_chunks(self.root / self.weight_map[name], name, chunk_bytes=1 << 24):
            if piece.is_floating_point() and not bool(torch.isfinite(piece).all()):
                return True
        return False

    def load(self, prefix: str = "", exclude: str | None = None) -> dict[str, torch.Tensor]:
        """Tensors whose name starts with ``prefix`` (and not with ``exclude``), read from their files."""
        by_file: dict[str, list[str]] = {}
        for k, fname in self.weight_map.items():
            if k.startswith(prefix) and not (exclude and k.startswith(exclude)):
                by_file.setdefault(fname, []).append(k)
        out = {}
        for fname, keys in by_file.items():
            out.update(read_tensors(self.root / fname, keys))
        return out

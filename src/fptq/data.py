"""Calibration and evaluation text: reading files and cutting token windows."""
from __future__ import annotations

import gzip
import hashlib
import json
from importlib import resources
from pathlib import Path

import torch

from .errors import FptqError

BUNDLED_CALIBRATION = "c4_calibration_sample.txt.gz"

__all__ = ["read_text", "bundled_calibration_text", "calibration_windows", "text_hash", "SELF_CALIBRATION",
           "ids_to_text"]

# ``--calib self``: calibrate on text the float model generates itself (data-free, see fptq.qat.datagen)
SELF_CALIBRATION = "self"


def bundled_calibration_text() -> str:
    """The C4 sample shipped in the package (see ``fptq/data/README.md`` for its origin and licence)."""
    with resources.files("fptq").joinpath("data", BUNDLED_CALIBRATION).open("rb") as f:
        return gzip.decompress(f.read()).decode("utf-8")


def read_text(path: str | Path | None, field: str = "text", join: str = "\n\n") -> str:
    """Text of a plain-text file, or the ``field`` of every line of a ``.jsonl`` file joined by ``join``.

    ``None`` gives the bundled calibration sample.
    """
    if path is None:
        return bundled_calibration_text()
    p = Path(path)
    if not p.is_file():
        raise FptqError(f"calibration/evaluation file not found: {p}")
    raw = p.read_bytes()
    if not raw.strip():
        raise FptqError(f"{p} is empty: give a text file or a .jsonl file with a {field!r} field")
    if b"\x00" in raw[:4096]:
        raise FptqError(f"{p} looks binary, not text: give a UTF-8 text file or a .jsonl file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FptqError(f"{p} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    if p.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line)[field])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise FptqError(f"{p} line {i + 1}: expected a JSON object with a {field!r} field") from e
        text = join.join(rows)
    return text


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def calibration_windows(tokenizer, text: str, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``[nsamples, seqlen]`` token ids: non-overlapping windows at random positions.

    The text is tokenized once; the token stream is cut into consecutive
    windows starting at a random offset, and ``nsamples`` of them are drawn
    without replacement. Reproducible from ``seed``.
    """
    if nsamples <= 0 or seqlen <= 0:
        raise FptqError(f"--nsamples and --seqlen must be positive (got {nsamples}, {seqlen})")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    total = ids.numel()
    available = total // seqlen
    if available < nsamples:
        raise FptqError(
            f"the calibration text has {total} tokens: enough for {available} windows of {seqlen} tokens, "
            f"not {nsamples}; pass --nsamples {max(available, 1)} or a shorter --seqlen, or a longer --calib file"
            if available > 0
            else f"the calibration text has only {total} tokens, fewer than --seqlen {seqlen}; give a longer --calib file or a smaller --seqlen"
        )
    g = torch.Generator().manual_seed(seed)
    slack = total - available * seqlen
    offset = int(torch.randint(0, slack + 1, (1,), generator=g)) if slack else 0
    chosen = torch.randperm(available, generator=g)[:nsamples].sort().values
    return torch.stack([ids[offset + i * seqlen: offset + (i + 1) * seqlen] for i in chosen.tolist()])


def ids_to_text(tokenizer, ids: torch.Tensor, sep: str = "\n\n") -> str:
    """Generated sequences (``[N, L]`` token ids) as one calibration text: each decoded with its special
    tokens kept, joined with ``sep`` (the separator of the C4 calibration text)."""
    if ids.dim() != 2 or ids.numel() == 0:
        raise FptqError("expected a non-empty [num_sequences, length] tensor of token ids, "
                        f"got shape {tuple(ids.shape)}")
    return sep.join(tokenizer.batch_decode(ids.tolist(), skip_special_tokens=False))

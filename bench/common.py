"""Shared helpers for the benchmark scripts (data paths, the standard windows, results, SQNR)."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FPTQ_DATA", ROOT.parent / "shared" / "data"))
RESULTS = ROOT / "bench" / "results"


def c4_docs(start: int, stop: int, data: Path = DATA) -> list[str]:
    lines = (Path(data) / "text" / "c4_validation_2k.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines[start:stop]]


def calibration_text(data: Path = DATA) -> str:
    """C4 documents 1000-1999 (the calibration split), joined with blank lines."""
    return "\n\n".join(c4_docs(1000, 2000, data))


def wikitext_path() -> Path:
    return DATA / "text" / "wikitext2_test.raw"


def c4_eval_path() -> Path:
    return DATA / "text" / "c4_validation_2k.jsonl"


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``x`` against ``ref`` in dB, in float32."""
    ref, x = ref.float(), x.float()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - x).pow(2).sum().clamp_min(1e-30)))


def write_results(name: str, data: dict, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2))
    (RESULTS / f"{name}.md").write_text(markdown)
    print(f"wrote {RESULTS / name}.json and .md")


def model_arguments(ap, nsamples: int | None = 64, seqlen: int | None = 512) -> None:
    """The options the accuracy scripts share: the model, its weight group size and (unless None) the number
    and length of the calibration windows, with these defaults."""
    ap.add_argument("--model", default=None, help="model directory or .gguf (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--group-size", type=int, default=64)
    if nsamples is not None:
        ap.add_argument("--nsamples", type=int, default=nsamples)
    if seqlen is not None:
        ap.add_argument("--seqlen", type=int, default=seqlen)

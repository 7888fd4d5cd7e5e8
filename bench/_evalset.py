"""One evaluator for the accuracy benchmarks: WikiText-2 and C4 windows, perplexity, and
fidelity (KL divergence, top-1 agreement) against the float model.

The float model's next-token log-probabilities are computed once and kept on disk in
float16 (a numpy memmap, ``[windows, seqlen - 1, vocab]``), so that every quantized
model -- in this process or in llm-compressor's venv (``bench/_llmc_worker.py``) -- is
scored against the same reference without keeping it in memory (Qwen2.5's vocabulary
of 151,936 makes 40 windows of 2048 about 25 GB).

Used by ``bench/peer_llmcompressor.py``, ``bench/_llmc_worker.py`` and
``bench/accuracy_sweep.py``; it imports nothing from llm-compressor or transformers.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from fptq.eval.perplexity import evaluate_perplexity

SETS = ("wikitext2", "c4")


class ReferenceLogprobs:
    """Read-only view of a reference memmap: ``ref[i]`` is window ``i``'s ``[seqlen - 1, vocab]`` float16 tensor."""

    def __init__(self, path: Path, shape: tuple[int, int, int]):
        self.path, self.shape = Path(path), tuple(shape)
        self._mm = np.memmap(self.path, dtype=np.float16, mode="r", shape=self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self._mm[i]))


def windows_meta(windows: dict[str, torch.Tensor]) -> dict:
    return {k: {"shape": list(v.shape), "checksum": int(v.long().sum()) * 31 + int(v[:, :8].long().sum())}
            for k, v in windows.items()}


def build_reference(model, windows: dict[str, torch.Tensor], cache: Path, vocab: int | None = None) -> dict:
    """Evaluate the float ``model`` on ``windows`` (one tensor per set), writing its log-probabilities to
    ``cache/<set>.f16``; reuse them when ``cache/meta.json`` says they are for the same windows.
    Returns ``{"meta": ..., "float": {set: metrics}}``."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    meta_path = cache / "meta.json"
    want = windows_meta(windows)
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old.get("windows") == want and all((cache / f"{s}.f16").exists() for s in windows):
            return old
    out = {"windows": want, "float": {}, "shapes": {}}
    for name, w in windows.items():
        t = time.perf_counter()
        rows: list[torch.Tensor] = []
        mm = None
        for i in range(w.shape[0]):
            keep: list[torch.Tensor] = []
            r = evaluate_perplexity(model, w[i: i + 1], keep_logprobs=keep, progress=False)
            lp = keep[0].numpy()
            if mm is None:
                shape = (w.shape[0], lp.shape[0], lp.shape[1])
                mm = np.memmap(cache / f"{name}.f16", dtype=np.float16, mode="w+", shape=shape)
                out["shapes"][name] = list(shape)
            mm[i] = lp
            rows.append(torch.tensor([r["nll"] * r["tokens"], r["tokens"]]))
        mm.flush()
        del mm
        tot = torch.stack(rows).sum(0)
        nll = float(tot[0] / tot[1])
        out["float"][name] = {"ppl": float(np.exp(nll)), "nll": nll, "tokens": int(tot[1]), "windows": int(w.shape[0]),
                              "kld": 0.0, "top1": 1.0, "eval_s": time.perf_counter() - t}
    meta_path.write_text(json.dumps(out, indent=2))
    return out


def load_reference(cache: Path) -> dict[str, ReferenceLogprobs]:
    meta = json.loads((Path(cache) / "meta.json").read_text())
    return {name: ReferenceLogprobs(Path(cache) / f"{name}.f16", tuple(shape)) for name, shape in meta["shapes"].items()}


def evaluate_all(model, windows: dict[str, torch.Tensor], reference: dict[str, ReferenceLogprobs] | None,
                 desc: str = "") -> dict[str, dict]:
    """``{set: {"ppl", "nll", "tokens", "windows", "kld", "top1", "eval_s"}}`` of ``model``."""
    res = {}
    for name, w in windows.items():
        t = time.perf_counter()
        r = evaluate_perplexity(model, w, reference_logprobs=reference[name] if reference else None,
                                desc=f"{desc} {name}".strip(), progress=False)
        r["eval_s"] = time.perf_counter() - t
        res[name] = r
    return res


def save_windows(path: Path, calib: torch.Tensor, windows: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({"calib": calib.contiguous(), **{f"eval_{k}": v.contiguous() for k, v in windows.items()}}, str(path))


def load_windows(path: Path) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    t = load_file(str(path))
    return t["calib"], {k[5:]: v for k, v in t.items() if k.startswith("eval_")}


def metrics_line(res: dict[str, dict]) -> str:
    return "  ".join(f"{k}: ppl {v['ppl']:.3f}" + (f" kld {v['kld']:.4f} top1 {100 * v['top1']:.2f}%" if "kld" in v else "")
                     for k, v in res.items())

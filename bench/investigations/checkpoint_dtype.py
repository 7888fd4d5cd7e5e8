"""Checkpoint size and perplexity: unquantized tensors in 16 bits (the default) against float32 (``--keep-dtype``).

Runs the README's quickstart quantization twice on the default model (``fptq quantize --nsamples 128 --seqlen 512
--group-size 64``, once with ``--keep-dtype``), then ``fptq eval`` on each checkpoint with the simulated
(``reference``) backend and the default fast backend, on the first ``--windows`` WikiText-2 windows of 2048 tokens.
Writes bench/results/checkpoint_dtype.{json,md}.

    python bench/investigations/checkpoint_dtype.py                  # ~10 minutes on 2 cores; run it alone
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: common.py

from common import machine, wikitext_path, write_results  # noqa: E402

def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def _fptq(*args: str) -> None:
    subprocess.run([sys.executable, "-c", "import sys; from fptq.cli import main; sys.exit(main())", *args], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--windows", type=int, default=10, help="WikiText-2 windows of 2048 tokens")
    ap.add_argument("--work", default=None, help="folder for the two checkpoints (default: a temporary one)")
    args = ap.parse_args()

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        for label, extra in (("16-bit (default)", []), ("float32 (--keep-dtype)", ["--keep-dtype"])):
            out = work / ("ckpt-keep" if extra else "ckpt-16")
            if not (out / "quantize_report.json").is_file():
                _fptq("quantize", "-o", str(out), "--force", "--nsamples", str(args.nsamples), "--seqlen",
                      str(args.seqlen), "--group-size", str(args.group_size), *extra)
            report = json.loads((out / "quantize_report.json").read_text())
            row = {"checkpoint_bytes": _dir_bytes(out), "sizes": report["sizes"], "ppl": {}}
            for backend in ("reference", "auto"):
                js = out / f"eval-{backend}.json"
                _fptq("eval", str(out), "--ppl", f"wikitext2={wikitext_path()}", "--max-windows", str(args.windows),
                      "--backend", backend, "--json", str(js))
                row["ppl"][backend] = json.loads(js.read_text())["ppl"]["wikitext2"]
            rows[label] = row

    base = rows["float32 (--keep-dtype)"]
    fp16_bytes = base["sizes"]["float_model_bytes"] // 2  # the source is float32: its fp16 size is half
    lines = [f"Default model, quickstart settings ({args.nsamples} x {args.seqlen} calibration, group "
             f"{args.group_size}); WikiText-2, first {args.windows} windows of 2048 tokens; 2 threads.", "",
             "| unquantized tensors | checkpoint MB | vs fp16 model | ppl (reference) | ppl (auto backend) | "
             "ppl change vs float32 storage |", "|---|---|---|---|---|---|"]
    for label, r in rows.items():
        change = 100 * (r["ppl"]["reference"] / base["ppl"]["reference"] - 1)
        lines.append(f"| {label} | {r['checkpoint_bytes'] / 1e6:.1f} | {r['checkpoint_bytes'] / fp16_bytes:.3f}x | "
                     f"{r['ppl']['reference']:.3f} | {r['ppl']['auto']:.3f} | {change:+.3f}% |")
    write_results("checkpoint_dtype", {"settings": vars(args), "machine": machine(), "fp16_model_bytes": fp16_bytes,
                                       "rows": rows}, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

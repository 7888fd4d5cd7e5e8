"""The README's comparison table: every method on the default model, with the
issue's settings, through ``fptq compare`` (one evaluator for all rows).

Calibration: 128 windows of 512 tokens from C4 documents 1000-1999 (seed 0),
written to a text file first so that ``fptq compare`` sees only those documents;
group size 64 (576 = 9 x 64); perplexity on the first 40 windows of 2048 tokens
of WikiText-2 and of C4 (documents 0-999); the seven common-sense tasks and
MMLU on seeded random subsets (``--limit`` items per task, ``--mmlu-limit`` per
MMLU subject), with standard errors. Usage::

    python bench/compare_table.py [--device cuda] [--limit 1000] [--mmlu-limit 20] [-o DIR]
    python bench/compare_table.py --model /path/SmolLM2-135M-Instruct.Q4_1.gguf --data-dir /path/data ...

The run is resumable (cells are cached in DIR); when it finishes it copies
``results.{json,md,png}`` to ``bench/results/compare_full/`` (or ``--results``).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from common import DATA, RESULTS, calibration_text, machine

METHODS = "fp,fptq,naive-w4a8,dynamic-w4a8,rtn-w4a16,smoothquant-w8a8,lae-dynamic-w4a8,gptq-w4a16"
TASKS = "wikitext2,c4,piqa,siqa,hellaswag,arc_easy,arc_challenge,boolq,lambada,mmlu"


def finished_cells(out: Path, methods: list[str], tasks: list[str], args) -> dict:
    """The results of an interrupted run: the methods whose every cell is saved (``run_compare`` writes
    ``results.json`` only at the end)."""
    results, done = {}, []
    for m in methods:
        cells = [out / "cells" / m / f"{t}.json" for t in tasks]
        if all(c.is_file() for c in cells):
            results[m] = {t: json.loads(c.read_text())["metrics"] for t, c in zip(tasks, cells)}
            done.append(m)
    settings = {"model": args.model or "default", "calib": "C4 documents 1000-1999", "nsamples": args.nsamples,
                "seqlen": args.seqlen, "group_size": args.group_size, "eval_seqlen": 2048,
                "max_windows": args.max_windows, "limit": args.limit, "mmlu_limit": args.mmlu_limit,
                "backend": "reference", "interrupted": True}
    return {"results": results, "settings": settings, "methods": done, "tasks": tasks, "quantize_s": {}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model path (default: the default model)")
    ap.add_argument("--data-dir", default=str(DATA))
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--tasks", default=TASKS)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--limit", type=int, default=1000, help="items per task (seeded random subset)")
    ap.add_argument("--mmlu-limit", type=int, default=20, help="items per MMLU subject")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("-o", "--out", default="/tmp/fptq-compare-full", help="working directory (cells, checkpoints)")
    ap.add_argument("--results", default=str(RESULTS / "compare_full"))
    args = ap.parse_args(argv)

    from fptq.compare import results_markdown, run_compare

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calib = out / "c4_calibration_docs_1000-1999.txt"
    if not calib.is_file():
        calib.write_text(calibration_text(Path(args.data_dir)), encoding="utf-8")
    t0 = time.perf_counter()
    methods, tasks = args.methods.split(","), args.tasks.split(",")
    try:
        data = run_compare(args.model, methods, tasks, args.data_dir, out,
                           calib=str(calib), nsamples=args.nsamples, seqlen=args.seqlen, group_size=args.group_size,
                           max_windows=args.max_windows, limit=args.limit, mmlu_limit=args.mmlu_limit,
                           batch_size=args.batch_size, device=args.device, progress=sys.stderr.isatty())
    except KeyboardInterrupt:
        data = finished_cells(out, methods, tasks, args)
        (out / "results.png").unlink(missing_ok=True)
        print(f"interrupted: the table holds the {len(data['methods'])} methods whose cells all finished; "
              "rerun the same command to finish the rest", file=sys.stderr)
    data["bench"] = {"wall_s": time.perf_counter() - t0, "machine": machine(), "device": args.device,
                     "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
                     "command": "python bench/compare_table.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    (out / "results.json").write_text(json.dumps(data, indent=2, default=str))
    (out / "results.md").write_text(results_markdown(data))
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    for name in ("results.json", "results.md", "results.png"):
        if (out / name).is_file():
            shutil.copy(out / name, res / name)
    print(results_markdown(data))
    print(f"wrote {res}/results.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

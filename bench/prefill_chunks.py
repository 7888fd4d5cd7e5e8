"""A prompt through fptq's runtime whole and in chunks (``Engine(prefill_chunk=ROWS)``, see
:mod:`fptq.runtime.prefill`): time of ``Engine.forward`` on each prompt shape, the same engine weights, every
chunk size in the same process, interleaved repeats (each repeat runs every chunk size once, in a rotated order;
``native_builds.interleaved_medians``), medians. Checks
first that every chunk size gives the whole prompt's logits (bit for bit with fptq's native attention).

    python bench/prefill_chunks.py --checkpoint OUT [--shapes 1x2048,4x512,16x256] [--chunks 0,512,256]
        [--logits last] [--repeats 7] [--name prefill_chunks_smollm2]

Writes ``bench/results/NAME.{json,md}``. Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import machine, write_results  # noqa: E402
from native_builds import interleaved_medians  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="fptq checkpoint (fptq quantize output)")
    ap.add_argument("--shapes", default="1x2048,4x512,16x256", help="prompts as BATCHxTOKENS, comma-separated")
    ap.add_argument("--chunks", default="0,512,256", help="prefill_chunk values in rows (0: the prompt whole)")
    ap.add_argument("--logits", default="last", choices=["last", "all"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="prefill_chunks")
    a = ap.parse_args(argv)
    from fptq.runtime import Engine, load_for_runtime

    torch.set_num_threads(a.threads)
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes.split(",") if s]
        chunks = [int(c) for c in a.chunks.split(",") if c]
    except ValueError:
        ap.error("--shapes takes BATCHxTOKENS items (e.g. 1x2048,4x512), --chunks whole numbers (e.g. 0,512)")
    if not chunks or any(len(s) != 2 or min(s) < 1 for s in shapes) or min(chunks) < 0:
        ap.error("--shapes takes BATCHxTOKENS items of at least 1x1, --chunks rows >= 0")
    model = load_for_runtime(a.checkpoint)
    engines = {c: Engine(model, prefill_chunk=c) for c in chunks}
    vocab = model.config.vocab_size
    rows = []
    with torch.inference_mode():
        for b, t in shapes:
            ids = torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(t))

            def run(c):
                return engines[c].forward(ids, engines[c].new_cache(b, t), logits=a.logits)

            ref = run(chunks[0])
            same = {c: bool(torch.equal(ref, run(c))) for c in chunks}
            medians = interleaved_medians({c: (lambda c=c: run(c)) for c in chunks}, a.repeats, 1)
            ms = {c: s * 1e3 for c, s in medians.items()}
            rows.append({"batch": b, "tokens": t, "ms": ms, "same_logits_as_first": same})
            print(f"{b}x{t}: " + ", ".join(f"chunk {c}: {ms[c]:.1f} ms" for c in chunks), flush=True)
    label = {c: "whole" if c == 0 else f"{c} rows" for c in chunks}
    md = [f"# A prompt whole and in chunks ({Path(a.checkpoint).name})\n",
          f"{machine()['threads']} threads, {a.repeats} interleaved repeats, medians; `Engine.forward(..., "
          f"logits=\"{a.logits}\")` in ms (ratio: the first column's time over this one's); same: the logits equal "
          f"the first column's bit for bit.\n",
          "| prompt | " + " | ".join(label[c] for c in chunks) + " | same |", "|---|" + "---|" * (len(chunks) + 1)]
    for r in rows:
        base = r["ms"][chunks[0]]
        md.append(f"| {r['batch']} x {r['tokens']} | " + " | ".join(f"{r['ms'][c]:.1f} ({base / r['ms'][c]:.2f}x)"
                                                                   for c in chunks)
                  + f" | {'yes' if all(r['same_logits_as_first'].values()) else 'no'} |")
    command = "python bench/prefill_chunks.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md += ["", f"Command: `{command}`", ""]
    write_results(a.name, {"meta": {"checkpoint": str(a.checkpoint), "repeats": a.repeats, "logits": a.logits,
                                    **machine()}, "rows": rows, "command": command}, "\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

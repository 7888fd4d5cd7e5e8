"""The seed's Table 2 for one model, in one command: W4A8 (fptq) against bf16, W8A8 and W4A16, and llama.cpp on
the same GGUF file.

    python bench/speed_table.py --model default          # SmolLM2-135M-Instruct, group 64
    python bench/speed_table.py --model qwen             # Qwen2.5-Coder-0.5B-Instruct, group 128

Steps (each reuses its output when present, so an interrupted run resumes):

1. quantize the model three times with ``fptq quantize`` (C4 calibration from ../shared/data, 64 x 512
   tokens, seed 0): ``fptq`` (W4A8), ``smoothquant-w8a8`` (W8A8, int8 per-channel weights, dynamic int8
   activations), ``rtn-w4a16`` (W4A16) into ``--work`` (default /tmp/fptq-speed/MODEL);
2. time llama.cpp on the model's GGUF file (``bench/peer_llamacpp.py``; skipped with a note when
   ``--llama-python`` does not exist);
3. ``fptq bench`` with all of them: bench/results/speed_MODEL.{json,md,png}.

Run it alone on the machine: the ratios are only meaningful without other jobs.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

from common import c4_docs  # noqa: E402

MODELS = {"default": {"group": 64}, "qwen": {"group": 128}}
METHODS = {"w4a8": "fptq", "w8a8": "smoothquant-w8a8", "w4a16": "rtn-w4a16"}


def gguf_of(model: str) -> str:
    if model == "default":
        from fptq.models.loading import default_gguf_path

        return str(default_gguf_path())
    tool = HERE.parents[1] / "shared" / "tools" / "get-qwen2.5-coder-0.5b"
    return subprocess.run([str(tool)], check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="default")
    ap.add_argument("--work", default=None, help="folder for the checkpoints (default /tmp/fptq-speed/MODEL)")
    ap.add_argument("--llama-python", default="/work/venvs/llamacpp-noavxvnni/bin/python")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bench-args", default="", help="extra arguments for fptq bench (e.g. '--prefill 512')")
    args = ap.parse_args()
    work = Path(args.work or f"/tmp/fptq-speed/{args.model}")
    work.mkdir(parents=True, exist_ok=True)
    gguf = gguf_of(args.model)
    src = None if args.model == "default" else gguf
    calib = work / "calib_c4.txt"
    if not calib.is_file():
        calib.write_text("\n\n".join(c4_docs(1000, 2000)))
    group = MODELS[args.model]["group"]
    fptq = [sys.executable, "-m", "fptq.cli"]
    ckpt = {}
    for key, method in METHODS.items():
        ckpt[key] = work / key
        if not (ckpt[key] / "fptq_plan.json").is_file():
            gs = ["--group-size", str(group)] if key != "w8a8" else []
            run(fptq + ["quantize"] + ([src] if src else []) + ["-o", str(ckpt[key]), "--method", method,
                        "--calib", str(calib), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                        "--force"] + gs)
    peer = RESULTS / f"speed_{args.model}_llamacpp.json"
    peer_args = []
    if Path(args.llama_python).exists():
        run([sys.executable, str(HERE / "peer_llamacpp.py"), "--gguf", gguf, "--llama-python", args.llama_python,
             "--threads", str(args.threads), "--repeats", str(args.repeats), "-o", str(peer)])
        peer_args = ["--peer", str(peer)]
    else:
        print(f"note: {args.llama_python} not found: no llama.cpp row (build it with "
              "../shared/tools/build-llama-cpp-python)", flush=True)
    run(fptq + ["bench", str(ckpt["w4a8"]), "--w8a8", str(ckpt["w8a8"]), "--w4a16", str(ckpt["w4a16"]),
                "--repeats", str(args.repeats), "--threads", str(args.threads), "-o", str(RESULTS),
                "--name", f"speed_{args.model}"] + peer_args + args.bench_args.split())
    return 0


if __name__ == "__main__":
    sys.exit(main())

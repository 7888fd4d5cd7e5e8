"""Peer benchmark: llama.cpp (llama-cpp-python) on the same GGUF file, same prompts, threads and token counts as
``fptq bench``; writes a JSON that ``fptq bench --peer FILE`` merges into its table.

llama-cpp-python is a bench-only peer, never a dependency of fptq. Build it once in a venv of its own (the
default native build crashes on these machines). ``../shared/tools/build-llama-cpp-python VENV`` names AVX-VNNI
(the VEX encoding of Intel's recent cores), which AMD Zen 4 lacks: there it dies with SIGILL in
``ggml_vec_dot_q4_1_q8_1`` (``{vex} vpdpbusd``). On such a CPU build it with the same flags and
``-DGGML_AVX_VNNI=OFF``::

    python3 -m venv /work/venvs/llamacpp-noavxvnni && /work/venvs/llamacpp-noavxvnni/bin/pip install numpy
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \\
      -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=OFF" \\
      /work/venvs/llamacpp-noavxvnni/bin/pip install --no-cache-dir llama-cpp-python

Then::

    python bench/peer_llamacpp.py --gguf MODEL.gguf --llama-python /work/venvs/llamacpp-noavxvnni/bin/python \\
        -o bench/results/speed_smollm2_llamacpp.json

The prompts are ``fptq.bench.bench_prompts`` (random token ids, seed 0) given to llama.cpp as token ids; its
vocabulary is the model's own, so the ids mean the same tokens. llama-cpp-python's high-level API decodes one
sequence: decode batch 16 and 64 are not measured. The row's model size is the GGUF file's (llama.cpp runs the
file's own quantization, e.g. Q4_1 for SmolLM2; Q5_0/Q4_K/Q6_K/Q8_0 for Qwen2.5-Coder).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fptq.bench import bench_prompts  # noqa: E402


def _vocab(gguf: str) -> int:
    from gguf import GGUFReader

    r = GGUFReader(gguf)
    f = r.fields["tokenizer.ggml.tokens"]
    return len(f.data)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--llama-python", default="/work/venvs/llamacpp-noavxvnni/bin/python",
                    help="python of the venv with llama_cpp (see the module docstring)")
    ap.add_argument("--prefill", default="512,2048")
    ap.add_argument("--decode-steps", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--name", default="llama.cpp (same GGUF)")
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args(argv)
    prefill = [int(x) for x in args.prefill.split(",") if x]
    prompts, dprompts = bench_prompts(_vocab(args.gguf), prefill, [1], args.prompt_len)
    job = {"gguf": str(Path(args.gguf).resolve()), "threads": args.threads, "decode_steps": args.decode_steps,
           "repeats": args.repeats, "prompt_len": args.prompt_len,
           "prefill": {str(n): prompts[n][0].tolist() for n in prefill}, "decode_b1": dprompts[1][0].tolist()}
    worker = Path(__file__).with_name("_llamacpp_worker.py")
    with tempfile.TemporaryDirectory() as d:
        jp, op = Path(d) / "job.json", Path(d) / "out.json"
        jp.write_text(json.dumps(job))
        subprocess.run([args.llama_python, str(worker), str(jp), str(op)], check=True)
        res = json.loads(op.read_text())
    version = subprocess.run([args.llama_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    row = {"tokens_per_s": res["tokens_per_s"], "memory": {"model_bytes": Path(args.gguf).stat().st_size},
           "path": f"llama-cpp-python {version}, {Path(args.gguf).name}, {args.threads} threads"}
    out = {"meta": {"gguf": job["gguf"], "threads": args.threads, "repeats": args.repeats,
                    "decode_steps": args.decode_steps, "prompt_len": args.prompt_len, "llama_cpp_python": version},
           "results": {args.name: row}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

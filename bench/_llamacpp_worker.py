"""Worker of bench/peer_llamacpp.py: runs INSIDE the llama-cpp-python venv (no torch there).

Reads a JSON job (GGUF path, threads, token-id prompts, steps, repeats), times llama.cpp's prefill (the whole
prompt into an empty context, logits of the last position) and greedy decode of one sequence, and writes a
JSON result. Never imports fptq.
"""
import json
import statistics
import sys
import time

import numpy as np
from llama_cpp import Llama


def main(job_path: str, out_path: str) -> None:
    job = json.load(open(job_path))
    threads, steps, repeats = job["threads"], job["decode_steps"], job["repeats"]
    n_ctx = max([int(n) for n in job["prefill"]] + [job["prompt_len"] + steps]) + 8
    llm = Llama(model_path=job["gguf"], n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, n_threads_batch=threads,
                verbose=False, logits_all=False)
    raw = {f"prefill_{n}": [] for n in job["prefill"]}
    if job.get("decode_b1"):
        raw["decode_b1"] = []

    def prefill(tokens):
        llm.reset()
        t = time.perf_counter()
        llm.eval(tokens)
        return time.perf_counter() - t

    def decode(tokens):
        llm.reset()
        llm.eval(tokens)
        t = time.perf_counter()
        for _ in range(steps):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([nxt])
        return time.perf_counter() - t

    prefill(job["prefill"][next(iter(job["prefill"]))][:64])  # warm-up
    for _ in range(repeats):
        for n, toks in job["prefill"].items():
            raw[f"prefill_{n}"].append(int(n) / prefill(toks))
        if job.get("decode_b1"):
            raw["decode_b1"].append(steps / decode(job["decode_b1"]))
    stats = {k: {"min": min(v), "median": statistics.median(v), "max": max(v), "n": len(v)} for k, v in raw.items()}
    json.dump({"tokens_per_s": stats}, open(out_path, "w"), indent=2)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

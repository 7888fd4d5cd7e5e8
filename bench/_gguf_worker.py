"""Worker of bench/gguf_export.py and tests/test_export_gguf.py: runs INSIDE a llama-cpp-python venv (numpy, no
torch, never imports fptq). ``python _gguf_worker.py JOB.json OUT.json``; the job's ``op``:

* ``quantize``: ``llama_model_quantize(input, output, ftype)``, the call ``llama-quantize`` makes (``ftype`` a
  ``LLAMA_FTYPE_MOSTLY_*`` name such as ``Q4_0``, ``Q4_K_M``); writes the tensor types of the result;
* ``logits``: the logits of ``ids`` (one sequence of token ids) under ``gguf``, saved to ``npy``; and the token ids
  llama.cpp's own tokenizer gives ``text`` (when given);
* ``score``: one window of token ids (``window``) under the reference ``ref`` and each of ``models`` (label ->
  GGUF path): per model the sums of the next-token negative log-likelihood, of ``KL(ref || model)`` and of top-1
  agreements with the reference, over the window's ``len(window) - 1`` predicted positions. One model is in
  memory at a time; the reference's log-probabilities are kept for the window.
"""
import ctypes
import gc
import json
import sys

import numpy as np
import llama_cpp
from llama_cpp import Llama

ROWS = 128  # positions per block when comparing distributions (a vocabulary of 150k makes big temporaries)


def _llama(path: str, n_ctx: int, threads: int) -> Llama:
    return Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512), n_threads=threads,
                 n_threads_batch=threads, logits_all=True, verbose=False)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=True)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


def _logprobs(path: str, ids: list[int], threads: int) -> np.ndarray:
    """``[len(ids) - 1, vocab]`` float32 next-token log-probabilities of ``ids`` under ``path``."""
    llm = _llama(path, len(ids), threads)
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids) - 1])
    out = np.empty(logits.shape, dtype=np.float32)
    for a in range(0, logits.shape[0], ROWS):
        out[a: a + ROWS] = _log_softmax(logits[a: a + ROWS])
    del llm, logits
    gc.collect()
    return out


def score(job: dict) -> dict:
    ids, threads = [int(t) for t in job["window"]], job["threads"]
    target = np.asarray(ids[1:])
    ref = _logprobs(job["ref"], ids, threads)
    out = {}
    for label, path in {"__ref__": job["ref"], **job["models"]}.items():
        lp = ref if label == "__ref__" else _logprobs(path, ids, threads)
        nll = -float(lp[np.arange(len(target)), target].astype(np.float64).sum())
        kld, agree = 0.0, 0
        for a in range(0, lp.shape[0], ROWS):
            r, m = ref[a: a + ROWS], lp[a: a + ROWS]
            kld += float((np.exp(r) * (r - m)).astype(np.float64).sum())
            agree += int((r.argmax(-1) == m.argmax(-1)).sum())
        out[label] = {"nll_sum": nll, "kld_sum": kld, "top1_sum": agree, "tokens": int(len(target))}
        if lp is not ref:
            del lp
            gc.collect()
    return out


def quantize(job: dict) -> dict:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{job['ftype']}")
    params.nthread = job.get("threads", 0)
    rc = llama_cpp.llama_model_quantize(job["input"].encode(), job["output"].encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({job['ftype']}) failed with {rc}")
    return {"ftype": job["ftype"], "llama_cpp_python": llama_cpp.__version__}


def logits(job: dict) -> dict:
    ids = [int(t) for t in job["ids"]]
    llm = _llama(job["gguf"], max(len(ids), 8), job.get("threads", 2))
    llm.eval(ids)
    np.save(job["npy"], np.asarray(llm.scores[: len(ids)], dtype=np.float32))
    out = {"llama_cpp_python": llama_cpp.__version__}
    if job.get("text") is not None:
        out["tokens"] = llm.tokenize(job["text"].encode(), add_bos=False, special=False)
    return out


def main(job_path: str, out_path: str) -> None:
    job = json.load(open(job_path))
    result = {"quantize": quantize, "logits": logits, "score": score}[job["op"]](job)
    json.dump(result, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

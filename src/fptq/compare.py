"""``fptq compare``: the paper's comparison table for any model, with one command.

Every (method, task) cell is written to ``RESULTS/cells/<method>/<task>.json``
as soon as it is finished, and quantized checkpoints to
``RESULTS/checkpoints/<method>-<settings hash>``; a rerun with the same
settings reuses both, so an interrupted comparison resumes where it stopped.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from .errors import FptqError

log = logging.getLogger(__name__)

TEXT_TASKS = ("wikitext2", "c4")
MC_TASKS = ("piqa", "siqa", "hellaswag", "arc_easy", "arc_challenge", "boolq", "lambada", "mmlu", "mmlu_5shot")
DEFAULT_METHODS = "fp,rtn-w4a16,gptq-w4a16,smoothquant-w8a8,naive-w4a8,dynamic-w4a8,fptq"
DEFAULT_TASKS = "wikitext2,c4,piqa,siqa,hellaswag,arc_easy,arc_challenge,boolq,lambada,mmlu"

PRECISION = {"fp": "16/16", "rtn-w4a16": "4/16", "gptq-w4a16": "4/16", "smoothquant-w8a8": "8/8",
             "naive-w4a8": "4/8", "dynamic-w4a8": "4/8", "lae-dynamic-w4a8": "4/8", "fptq": "4/8"}


def _atomic_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def _hash(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def text_path(data_dir: Path, task: str) -> Path:
    return data_dir / "text" / ("wikitext2_test.raw" if task == "wikitext2" else "c4_validation_2k.jsonl")


def main_metric(task: str) -> str:
    return "ppl" if task in TEXT_TASKS else "acc"


def run_compare(
    model_spec: str | None,
    methods: list[str],
    tasks: list[str],
    data_dir: str | Path,
    out: str | Path,
    *,
    calib: str | None = None,
    nsamples: int = 128,
    seqlen: int = 512,
    group_size: int = 128,
    eval_seqlen: int = 2048,
    max_windows: int | None = 40,
    limit: int | None = None,
    mmlu_limit: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    device: str = "cpu",
    backend: str = "reference",
    method_overrides: dict[str, dict] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    from . import io as fio
    from .data import calibration_windows, read_text, text_hash
    from .eval.perplexity import evaluate_perplexity, load_eval_text, token_windows
    from .eval.scorer import evaluate_task
    from .methods import METHODS, method_config
    from .models.loading import load_float_model
    from .pipeline import quantize
    from .workflow import versions

    data_dir = Path(data_dir)
    out = Path(out)
    for m in methods:
        if m not in METHODS:
            raise FptqError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    for t in tasks:
        if t not in TEXT_TASKS + MC_TASKS:
            raise FptqError(f"unknown task {t!r}; choose from {', '.join(TEXT_TASKS + MC_TASKS)}")
        if t in TEXT_TASKS and not text_path(data_dir, t).is_file():
            raise FptqError(f"task {t}: {text_path(data_dir, t)} not found; --data-dir must hold text/ and tasks/ "
                            "laid out like the shared data folder")
    out.mkdir(parents=True, exist_ok=True)
    fmodel, tok, src = load_float_model(model_spec)
    fmodel.to(device)
    calib_text = read_text(calib)
    settings = {"model": src, "calib": calib or "bundled", "calib_sha256": text_hash(calib_text),
                "nsamples": nsamples, "seqlen": seqlen, "group_size": group_size, "seed": seed,
                "eval_seqlen": eval_seqlen, "max_windows": max_windows, "limit": limit, "mmlu_limit": mmlu_limit,
                "backend": backend,
                "method_overrides": method_overrides or {}}
    windows = None
    results: dict[str, dict[str, Any]] = {}
    timings: dict[str, float] = {}
    text_windows: dict[str, torch.Tensor] = {}
    ref_logprobs: dict[str, list[torch.Tensor]] = {}  # the float model's log-probs, computed once per text task
    for method in methods:
        overrides = dict((method_overrides or {}).get(method, {}))
        overrides.setdefault("group_size", group_size if method != "smoothquant-w8a8" else None)
        cfg = method_config(method, **overrides)
        key = _hash({**settings, "config": cfg.to_dict()})
        results[method] = {}
        cells_dir = out / "cells" / method
        pending = [t for t in tasks if not _cell_done(cells_dir / f"{t}.json", key)]
        for t in tasks:
            if t not in pending:
                results[method][t] = json.loads((cells_dir / f"{t}.json").read_text())["metrics"]
        if not pending:
            log.info("%s: all cells cached", method)
            continue
        if method == "fp":
            qmodel = fmodel
        else:
            ckpt = out / "checkpoints" / f"{method}-{key}"
            if (ckpt / fio.PLAN_NAME).is_file():
                qmodel = fio.load(ckpt, device=device, backend=backend)
            else:
                if windows is None:
                    windows = calibration_windows(tok, calib_text, nsamples, seqlen, seed)
                qmodel = copy.deepcopy(fmodel)
                t0 = time.perf_counter()
                plan = quantize(qmodel, cfg, windows, device=device, seed=seed, progress=progress)
                timings[method] = time.perf_counter() - t0
                fio.save(qmodel, plan, ckpt, tokenizer=tok, report={"settings": settings, "config": cfg.to_dict(),
                                                                    "quantize_s": timings[method]}, force=True)
                if backend != "reference":
                    from .nn import QuantLinear

                    for mm in qmodel.modules():
                        if isinstance(mm, QuantLinear):
                            mm.set_backend(backend)
        for t in pending:
            t0 = time.perf_counter()
            if t in TEXT_TASKS:
                if t not in text_windows:
                    text_windows[t] = token_windows(tok, load_eval_text(text_path(data_dir, t)), eval_seqlen, max_windows)
                if t not in ref_logprobs and any(m != "fp" for m in methods):
                    keep: list = []
                    rf = evaluate_perplexity(fmodel, text_windows[t], device=device, progress=progress,
                                             desc=f"fp/{t} (reference)", keep_logprobs=keep)
                    ref_logprobs[t] = keep
                else:
                    rf = None
                if method == "fp":
                    r = rf or evaluate_perplexity(fmodel, text_windows[t], device=device, progress=progress, desc=f"fp/{t}")
                else:
                    r = evaluate_perplexity(qmodel, text_windows[t], reference_logprobs=ref_logprobs[t],
                                            device=device, progress=progress, desc=f"{method}/{t}")
                metrics = {"ppl": r["ppl"], "kld": r.get("kld", 0.0), "top1": r.get("top1", 1.0),
                           "windows": r["windows"], "tokens": r["tokens"]}
            else:
                name, shots = ("mmlu", 5) if t == "mmlu_5shot" else (t, 0)
                task_limit = mmlu_limit if (name == "mmlu" and mmlu_limit is not None) else limit
                r = evaluate_task(qmodel, tok, name, data_dir, limit=task_limit, seed=seed, batch_size=batch_size,
                                  num_fewshot=shots, progress=progress)
                metrics = {"acc": r["acc"], "stderr": r.get("acc_stderr", r.get("stderr")), "n": r["n"],
                           "subset": r.get("subset")}
                if "acc_norm" in r:
                    metrics["acc_norm"] = r["acc_norm"]
                    metrics["acc_norm_stderr"] = r.get("acc_norm_stderr")
                if "groups" in r:
                    metrics["groups"] = {g: {"acc": v["acc"], "n": v["n"]} for g, v in r["groups"].items()}
                    metrics["acc_subject_avg"] = r.get("acc_subject_avg")
            metrics["eval_s"] = time.perf_counter() - t0
            results[method][t] = metrics
            _atomic_json(cells_dir / f"{t}.json", {"key": key, "method": method, "task": t, "metrics": metrics})
        if qmodel is not fmodel:
            del qmodel
    data = {"results": results, "settings": settings, "methods": methods, "tasks": tasks,
            "quantize_s": timings, "versions": versions(),
            "conventions": {"wikitext2": "lines joined with blank lines; windows of eval_seqlen",
                            "c4": "first 1000 documents joined with spaces; windows of eval_seqlen",
                            "smoothquant-w8a8": "int8 per-channel weights, dynamic per-token int8 activations",
                            "mmlu": "0-shot, acc = item-weighted mean over subjects (harness convention)",
                            "mmlu_5shot": "5-shot from the dev split"}}
    _atomic_json(out / "results.json", data)
    (out / "results.md").write_text(results_markdown(data))
    results_chart(data, out / "results.png")
    return data


def _cell_done(path: Path, key: str) -> bool:
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("key") == key
    except json.JSONDecodeError:
        return False


def results_markdown(data: dict) -> str:
    tasks, methods, res = data["tasks"], data["methods"], data["results"]
    acc_tasks = [t for t in tasks if t not in TEXT_TASKS]
    head = ["Method", "W/A"] + [f"{t} ppl" for t in tasks if t in TEXT_TASKS] + acc_tasks + (["Avg acc"] if acc_tasks else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        row = [m, PRECISION.get(m, "?")]
        for t in tasks:
            if t in TEXT_TASKS:
                row.append(f"{res[m][t]['ppl']:.2f}")
        accs = []
        for t in acc_tasks:
            c = res[m][t]
            accs.append(c["acc"])
            row.append(f"{100 * c['acc']:.1f} ± {100 * (c.get('stderr') or 0):.1f}")
        if acc_tasks:
            row.append(f"{100 * sum(accs) / len(accs):.1f}")
        lines.append("| " + " | ".join(row) + " |")
    text_tasks = [t for t in tasks if t in TEXT_TASKS]
    if text_tasks:
        lines += ["", "Fidelity to the float model on the same windows (mean KL divergence, top-1 agreement):", "",
                  "| Method | " + " | ".join(f"{t} KLD | {t} top-1" for t in text_tasks) + " |",
                  "|---|" + "---|---|" * len(text_tasks)]
        for m in methods:
            lines.append(f"| {m} | " + " | ".join(
                f"{res[m][t]['kld']:.4f} | {100 * res[m][t]['top1']:.2f}%" for t in text_tasks) + " |")
    s = data["settings"]
    lines += ["", f"Model {s['model']}; calibration {s['nsamples']} x {s['seqlen']} tokens ({s['calib']}), group size "
                  f"{s['group_size']}; perplexity on the first {s['max_windows']} windows of {s['eval_seqlen']} tokens; "
                  f"tasks: {'all items' if not s['limit'] else 'seeded random subsets of ' + str(s['limit']) + ' items'}"
                  f"{'' if not s.get('mmlu_limit') else ', MMLU ' + str(s['mmlu_limit']) + ' items per subject'}; "
                  f"acc ± standard error (%); backend {s['backend']}."]
    return "\n".join(lines) + "\n"


def results_chart(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, res, tasks = data["methods"], data["results"], data["tasks"]
    text_tasks = [t for t in tasks if t in TEXT_TASKS]
    acc_tasks = [t for t in tasks if t not in TEXT_TASKS]
    ncols = (1 if text_tasks else 0) + (1 if acc_tasks else 0)
    if ncols == 0:
        return
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4), dpi=110, squeeze=False)
    ax_i = 0
    width = 0.8 / max(len(methods), 1)
    if text_tasks:
        ax = axes[0][ax_i]
        for i, m in enumerate(methods):
            ax.bar([j + i * width for j in range(len(text_tasks))], [res[m][t]["ppl"] for t in text_tasks], width, label=m)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(text_tasks))], text_tasks)
        ax.set_ylabel("perplexity (lower is better)")
        ax.legend(fontsize=7)
        ax_i += 1
    if acc_tasks:
        ax = axes[0][ax_i]
        avg = [100 * sum(res[m][t]["acc"] for t in acc_tasks) / len(acc_tasks) for m in methods]
        ax.bar(methods, avg, color="tab:blue")
        ax.set_ylabel("average accuracy (%)")
        ax.tick_params(axis="x", rotation=45, labelsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def cmd_compare(args) -> int:
    methods = [m for m in args.methods.split(",") if m]
    tasks = [t for t in args.tasks.split(",") if t]
    data = run_compare(args.model, methods, tasks, args.data_dir, args.out, calib=args.calib, nsamples=args.nsamples,
                       seqlen=args.seqlen, group_size=args.group_size, eval_seqlen=args.eval_seqlen,
                       max_windows=args.max_windows, limit=args.limit, mmlu_limit=args.mmlu_limit, seed=args.seed, batch_size=args.batch_size,
                       device=args.device or "cpu", backend=args.backend)
    print(results_markdown(data))
    print(f"wrote {Path(args.out) / 'results.json'}, results.md and results.png")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("compare", help="quantize with several methods and evaluate them all (the paper's table)")
    c.add_argument("model", nargs="?", default=None, help="model (default: the default model)")
    c.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS})")
    c.add_argument("--tasks", default=DEFAULT_TASKS,
                   help=f"comma-separated from {','.join(TEXT_TASKS + MC_TASKS)} (default {DEFAULT_TASKS})")
    c.add_argument("--data-dir", required=True, help="folder with text/ and tasks/ laid out like the shared data")
    c.add_argument("-o", "--out", required=True, help="results directory (cells and checkpoints are reused on rerun)")
    c.add_argument("--calib", default=None)
    c.add_argument("--nsamples", type=int, default=128)
    c.add_argument("--seqlen", type=int, default=512, help="calibration window length (default 512)")
    c.add_argument("--group-size", type=int, default=128)
    c.add_argument("--eval-seqlen", type=int, default=2048)
    c.add_argument("--max-windows", type=int, default=40)
    c.add_argument("--limit", type=int, default=None, help="seeded random subset of N items per task (MMLU: per subject)")
    c.add_argument("--mmlu-limit", type=int, default=None, help="items per MMLU subject (default: --limit)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--backend", default="reference", help="QuantLinear backend for evaluation (reference = simulated)")
    c.add_argument("--device", default=None)
    c.set_defaults(func=cmd_compare)

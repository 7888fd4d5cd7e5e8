"""Peak memory of ``fptq quantize`` on a model much larger than what it keeps in memory.

Builds a synthetic LLaMA-architecture model with random bf16 weights (default:
hidden 2048, intermediate 5632, 24 layers, 16 heads, vocab 32000, untied
``lm_head`` = 1.36B parameters, 2.7 GB on disk), saved as one safetensors
shard per decoder layer plus one for the rest, with a
``model.safetensors.index.json`` -- written layer by layer, so building it
needs little memory either. The tokenizer is a byte-level BPE with a 300-token
vocabulary trained on a short text (a 32000-token BPE cannot be trained on a
short text); its ids are a subset of the model's 32000, which is all
calibration needs. Then it runs ``fptq quantize`` on it in a subprocess and
reports that process's peak RSS (VmHWM, polled from ``/proc/<pid>/status``,
and ``ru_maxrss`` of the child) against the model's size on disk (target:
below 40%), the time per layer and the total.

Full run (a few GB of disk in --workdir; check that the machine is idle)::

    python bench/memory_large_model.py

Quick check of the script itself::

    python bench/memory_large_model.py --layers 2 --hidden 256 --intermediate 688 --heads 4 --vocab 1000 \\
        --nsamples 4 --seqlen 64 --results /tmp/memres

Results: ``bench/results/memory_large_model.{json,md}`` (or ``--results DIR``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

TEXT = (
    "The quick brown fox jumps over the lazy dog. A language model predicts the next token of a text. "
    "Quantization maps floating point numbers to a few integer levels, and calibration picks the scales. "
    "Weights are stored in four bits and activations in eight bits, so the products run on integer units. "
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no grouped-query attention)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="dtype of the weights on disk (the issue allows fp32 or bf16 shards)")
    p.add_argument("--tied", action="store_true", help="tie lm_head to the embeddings (default: untied)")
    p.add_argument("--shard-size", default="layer",
                   help="how the model's weights are split into files: 'layer' (one file per decoder layer) or a "
                        "size such as 1GB (files filled in order up to that size, as save_pretrained does)")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--low-memory", action="store_true", help="pass --low-memory to fptq quantize")
    p.add_argument("--max-shard-size", default="500MB", help="output shard size passed to fptq quantize")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the quantize process")
    p.add_argument("--workdir", default=None, help="where the model and the output go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the model and the output")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"), help="directory for the results files")
    p.add_argument("--name", default="memory_large_model", help="results file stem (default memory_large_model)")
    p.add_argument("--reuse-model", action="store_true",
                   help="with --workdir: reuse a model already built there (same options) instead of building it")
    return p.parse_args(argv)


def param_count(a) -> int:
    kv = a.kv_heads or a.heads
    head_dim = a.hidden // a.heads
    attn = 2 * a.hidden * a.hidden + 2 * a.hidden * kv * head_dim
    layer = attn + 3 * a.hidden * a.intermediate + 2 * a.hidden
    return a.layers * layer + (1 if a.tied else 2) * a.vocab * a.hidden + a.hidden


def make_tokenizer(dest: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([TEXT * 20], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="</s>").save_pretrained(dest)


def _tensors(a):
    """``(name, tensor)`` of the model in save_pretrained's order, made one at a time."""
    g = torch.Generator().manual_seed(0)
    kv = a.kv_heads or a.heads
    hd = a.hidden // a.heads
    dt = getattr(torch, a.dtype)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(dt)

    yield "model.embed_tokens.weight", rand(a.vocab, a.hidden)
    for i in range(a.layers):
        p = f"model.layers.{i}."
        yield p + "self_attn.q_proj.weight", rand(a.hidden, a.hidden)
        yield p + "self_attn.k_proj.weight", rand(kv * hd, a.hidden)
        yield p + "self_attn.v_proj.weight", rand(kv * hd, a.hidden)
        yield p + "self_attn.o_proj.weight", rand(a.hidden, a.hidden)
        yield p + "mlp.gate_proj.weight", rand(a.intermediate, a.hidden)
        yield p + "mlp.up_proj.weight", rand(a.intermediate, a.hidden)
        yield p + "mlp.down_proj.weight", rand(a.hidden, a.intermediate)
        yield p + "input_layernorm.weight", torch.ones(a.hidden, dtype=dt)
        yield p + "post_attention_layernorm.weight", torch.ones(a.hidden, dtype=dt)
    yield "model.norm.weight", torch.ones(a.hidden, dtype=dt)
    if not a.tied:
        yield "lm_head.weight", rand(a.vocab, a.hidden)


def _shard_key(name: str, shard_size: str):
    """With --shard-size layer: the file a tensor goes to (its decoder layer, or the rest)."""
    parts = name.split(".")
    return int(parts[2]) if parts[1] == "layers" else "rest"


def build_model(a, dest: Path) -> int:
    """Write config, tokenizer and random weights (one shard per layer, or shards of --shard-size bytes);
    return the bytes on disk. At most one shard is in memory at a time."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    dest.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads,
                      num_key_value_heads=a.kv_heads or a.heads, max_position_embeddings=max(2048, a.seqlen),
                      tie_word_embeddings=a.tied, dtype=a.dtype)
    cfg.save_pretrained(dest)
    make_tokenizer(dest)
    limit = None if a.shard_size == "layer" else _parse_size(a.shard_size)
    shards: list[list[str]] = []
    total = 0
    cur: dict[str, torch.Tensor] = {}
    cur_bytes, cur_key = 0, None

    def flush():
        nonlocal cur, cur_bytes
        if cur:
            save_file(cur, str(dest / f"shard-{len(shards):05d}.tmp"), metadata={"format": "pt"})
            shards.append(list(cur))
        cur, cur_bytes = {}, 0

    for name, t in _tensors(a):
        nbytes = t.numel() * t.element_size()
        key = _shard_key(name, a.shard_size) if limit is None else None
        if (limit is None and key != cur_key) or (limit is not None and cur and cur_bytes + nbytes > limit):
            flush()
        cur_key = key
        cur[name] = t
        cur_bytes += nbytes
        total += nbytes
    flush()
    weight_map = {}
    for i, names in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (dest / f"shard-{i:05d}.tmp").rename(dest / final)
        weight_map.update({k: final for k in names})
    (dest / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return sum(f.stat().st_size for f in dest.glob("*.safetensors"))


def _parse_size(s: str) -> int:
    units = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    num = s.rstrip("KMGiBkmgib")
    return int(float(num) * units[s[len(num):].upper()])


def _status_kb(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon and RssFile of ``pid`` in kB (empty once it has exited)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1])
    except OSError:
        return {}
    return out


def run_quantize(a, model: Path, out: Path, calib: Path, log: Path) -> dict:
    cmd = [sys.executable, "-m", "fptq.cli", "quantize", str(model), "-o", str(out), "--calib", str(calib),
           "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--group-size", str(a.group_size),
           "--device", "cpu", "--max-shard-size", a.max_shard_size, "--force"] + (["--low-memory"] if a.low_memory else [])
    env = dict(os.environ)
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    t0 = time.perf_counter()
    samples = []  # (unix time, VmRSS kB, RssAnon kB, RssFile kB)
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
        hwm = 0
        while proc.poll() is None:
            st = _status_kb(proc.pid)
            if st:
                hwm = max(hwm, st.get("VmHWM", 0))
                samples.append((time.time(), st.get("VmRSS", 0), st.get("RssAnon", 0), st.get("RssFile", 0)))
            time.sleep(0.1)
    wall = time.perf_counter() - t0
    maxrss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # kilobytes on Linux
    if proc.returncode != 0:
        sys.exit(f"fptq quantize failed (exit {proc.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return {"command": " ".join(cmd), "wall_s": wall, "peak_rss_bytes": max(hwm, maxrss_kb) * 1024,
            "vmhwm_polled_bytes": hwm * 1024, "ru_maxrss_bytes": maxrss_kb * 1024, "samples": samples}


def phases(samples: list, events: list[dict]) -> list[dict]:
    """Peak sampled RSS (and its anonymous / file-backed parts) in each phase between the run's events:
    ``startup`` (imports, until the quantize job starts), ``load``, ``layer i``, ``assemble`` and ``save``."""
    bounds = [("startup", 0.0)]
    names = {"start": "load", "loaded": "layer 0", "quantized": "save (write checkpoint)"}
    for i, e in enumerate(events):
        if e["event"] in names:
            label = names[e["event"]]
        elif e["event"].startswith("layer "):
            nxt = int(e["event"].split()[1]) + 1
            label = f"layer {nxt}"
        else:
            continue
        bounds.append((label, e["unix_time"]))
    out = []
    for k, (label, t0) in enumerate(bounds):
        t1 = bounds[k + 1][1] if k + 1 < len(bounds) else float("inf")
        sel = [s for s in samples if t0 <= s[0] < t1]
        if sel:
            top = max(sel, key=lambda s: s[1])
            out.append({"phase": label, "seconds": (min(t1, sel[-1][0]) - max(t0, sel[0][0])),
                        "peak_rss_bytes": top[1] * 1024, "anon_bytes": top[2] * 1024, "file_bytes": top[3] * 1024})
    return out


def plot_timeline(samples: list, events: list[dict], disk: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not samples:
        return
    t0 = samples[0][0]
    gib = 1024**2  # kB -> GiB
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot([s[0] - t0 for s in samples], [s[1] / gib for s in samples], label="RSS")
    ax.plot([s[0] - t0 for s in samples], [s[2] / gib for s in samples], label="anonymous", lw=0.8)
    ax.plot([s[0] - t0 for s in samples], [s[3] / gib for s in samples], label="file-backed", lw=0.8)
    for frac in (0.25, 0.40):
        ax.axhline(frac * disk / 1024**3, ls="--", c="grey", lw=0.7)
        ax.text(0, frac * disk / 1024**3, f" {frac:.2f} x model", va="bottom", fontsize=7)
    for e in events:
        if e["event"] in ("loaded", "quantized", "saved"):
            ax.axvline(e["unix_time"] - t0, c="k", lw=0.6)
            ax.text(e["unix_time"] - t0, ax.get_ylim()[1] * 0.95, e["event"], fontsize=7, rotation=90, va="top")
    ax.set_xlabel("seconds")
    ax.set_ylabel("GiB")
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(res: dict, results_dir: Path, name: str) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{name}.json").write_text(json.dumps(res, indent=2))
    gib = 1024**3
    layers = res["timings_s"].get("layers") or []
    peak = res["peak_phase"]
    md = [
        "# fptq quantize: peak memory on a large synthetic LLaMA",
        "",
        f"Model: {res['params'] / 1e9:.2f}B parameters ({res['shape']}), {res.get('dtype', 'bfloat16')}, "
        f"{res['float_disk_bytes'] / gib:.2f} GiB on disk in {res['float_files']} safetensors shards.",
        f"Calibration: {res['nsamples']} x {res['seqlen']} tokens; group size {res['group_size']}; CPU, "
        f"{res['threads'] or 'default'} threads; {res['machine']}; `--low-memory` {'on' if res['low_memory'] else 'off'}.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| peak RSS of the quantize process | {res['peak_rss_bytes'] / gib:.2f} GiB |",
        f"| float model on disk | {res['float_disk_bytes'] / gib:.2f} GiB |",
        f"| peak RSS / size on disk | {res['peak_rss_ratio']:.3f} (target < 0.40: "
        f"{'met' if res['peak_rss_ratio'] < 0.4 else 'NOT met'}; aim < 0.25: "
        f"{'met' if res['peak_rss_ratio'] < 0.25 else 'not met'}) |",
        f"| phase of the peak (sampled every 0.1 s) | {peak['phase']}: {peak['peak_rss_bytes'] / gib:.2f} GiB "
        f"({peak['anon_bytes'] / gib:.2f} anonymous, {peak['file_bytes'] / gib:.2f} file-backed) |",
        f"| checkpoint size | {res['checkpoint_bytes'] / gib:.2f} GiB in {res['checkpoint_files']} weights files |",
        f"| time per layer (mean / max) | {res['layer_s_mean']:.1f} s / {res['layer_s_max']:.1f} s |",
        f"| load / quantize / save | {res['timings_s'].get('load', 0):.1f} s / {res['timings_s'].get('quantize', 0):.1f} s"
        f" / {res['timings_s'].get('save', 0):.1f} s |",
        f"| total (process wall time) | {res['wall_s']:.1f} s |",
        "",
        "Peak RSS by phase (GiB; anonymous + file-backed at the phase's peak sample):",
        "",
        "| phase | seconds | peak RSS | anonymous | file-backed |",
        "|---|---|---|---|---|",
        *[f"| {ph['phase']} | {ph['seconds']:.1f} | {ph['peak_rss_bytes'] / gib:.2f} | {ph['anon_bytes'] / gib:.2f} | "
          f"{ph['file_bytes'] / gib:.2f} |" for ph in res["phases"]],
        "",
        f"Per-layer seconds: {', '.join(f'{t:.1f}' for t in layers)}",
        "",
        f"Command: `{res['command']}`",
        "",
        f"Reproduce: `{res['bench_command']}` (see its docstring). Timeline: `{name}.png`.",
    ]
    (results_dir / f"{name}.md").write_text("\n".join(md) + "\n")


def main(argv=None) -> int:
    a = parse_args(argv)
    load1 = os.getloadavg()[0]
    if load1 > 1.5:
        print(f"warning: load average {load1:.1f}: other work on this machine will slow the run", file=sys.stderr)
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="fptq-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model, out, calib = work / "model", work / "out", work / "calib.txt"
        n = param_count(a)
        if (model / "model.safetensors.index.json").is_file() and a.reuse_model:
            disk = sum(f.stat().st_size for f in model.glob("*.safetensors"))
            print(f"reusing the model in {model} ({disk / 1024**3:.2f} GiB)", flush=True)
        else:
            print(f"building a {n / 1e9:.2f}B-parameter LLaMA in {model} ...", flush=True)
            t0 = time.perf_counter()
            disk = build_model(a, model)
            print(f"  {disk / 1024**3:.2f} GiB in {time.perf_counter() - t0:.0f} s", flush=True)
        calib.write_text(TEXT * max(50, a.nsamples * a.seqlen // 40))
        print("quantizing in a subprocess ...", flush=True)
        run = run_quantize(a, model, out, calib, work / "quantize.log")
        rep = json.loads((out / "quantize_report.json").read_text())
        layers = [t for t in rep["timings_s"].get("layers", []) if t is not None]
        ckpt_files = [f for f in rep["files"] if f.endswith(".safetensors")]
        samples = run.pop("samples")
        by_phase = phases(samples, rep.get("events", []))
        res = {
            "params": n, "dtype": a.dtype, "shape": f"hidden {a.hidden}, intermediate {a.intermediate}, {a.layers} layers, "
                                  f"{a.heads} heads ({a.kv_heads or a.heads} kv), vocab {a.vocab}, "
                                  f"{'tied' if a.tied else 'untied'} lm_head",
            "float_disk_bytes": disk, "float_files": len(list(model.glob("*.safetensors"))),
            "nsamples": a.nsamples, "seqlen": a.seqlen, "group_size": a.group_size, "threads": a.threads,
            "low_memory": a.low_memory, **run, "peak_rss_ratio": run["peak_rss_bytes"] / disk,
            "phases": by_phase, "peak_phase": max(by_phase, key=lambda ph: ph["peak_rss_bytes"]),
            "timings_s": rep["timings_s"], "events": rep.get("events", []),
            "layer_s_mean": sum(layers) / max(len(layers), 1),
            "layer_s_max": max(layers, default=0.0), "checkpoint_bytes": rep["sizes"]["checkpoint_bytes"],
            "checkpoint_files": len(ckpt_files), "layer_by_layer_loading": rep.get("layer_by_layer_loading"),
            "load_average_at_start": load1, "versions": rep["versions"],
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "bench_command": "python bench/memory_large_model.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "rss_timeline_kb": [[round(s[0] - samples[0][0], 2), s[1], s[2], s[3]] for s in samples[::5]],
        }
        write_results(res, Path(a.results), a.name)
        plot_timeline(samples, rep.get("events", []), disk, Path(a.results) / f"{a.name}.png")
        print((Path(a.results) / f"{a.name}.md").read_text())
    finally:
        if not a.keep and not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--low-memory", action="store_true", help="pass --low-memory to fptq quantize")
    p.add_argument("--max-shard-size", default="500MB", help="output shard size passed to fptq quantize")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the quantize process")
    p.add_argument("--workdir", default=None, help="where the model and the output go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the model and the output")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"), help="directory for the results files")
    return p.parse_args(argv)


def param_count(a) -> int:
    kv = a.kv_heads or a.heads
    head_dim = a.hidden // a.heads
    attn = 2 * a.hidden * a.hidden + 2 * a.hidden * kv * head_dim
    layer = attn + 3 * a.hidden * a.intermediate + 2 * a.hidden
    return a.layers * layer + 2 * a.vocab * a.hidden + a.hidden


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


def build_model(a, dest: Path) -> int:
    """Write config, tokenizer and random weights (one shard per layer); return the bytes on disk."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    dest.mkdir(parents=True, exist_ok=True)
    kv = a.kv_heads or a.heads
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=kv,
                      max_position_embeddings=max(2048, a.seqlen), tie_word_embeddings=False, dtype=a.dtype)
    cfg.save_pretrained(dest)
    make_tokenizer(dest)
    g = torch.Generator().manual_seed(0)
    hd = a.hidden // a.heads

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(getattr(torch, a.dtype))

    n = a.layers + 1
    weight_map = {}
    total = 0
    for i in range(a.layers):
        p = f"model.layers.{i}."
        sd = {
            p + "self_attn.q_proj.weight": rand(a.hidden, a.hidden),
            p + "self_attn.k_proj.weight": rand(kv * hd, a.hidden),
            p + "self_attn.v_proj.weight": rand(kv * hd, a.hidden),
            p + "self_attn.o_proj.weight": rand(a.hidden, a.hidden),
            p + "mlp.gate_proj.weight": rand(a.intermediate, a.hidden),
            p + "mlp.up_proj.weight": rand(a.intermediate, a.hidden),
            p + "mlp.down_proj.weight": rand(a.hidden, a.intermediate),
            p + "input_layernorm.weight": torch.ones(a.hidden, dtype=getattr(torch, a.dtype)),
            p + "post_attention_layernorm.weight": torch.ones(a.hidden, dtype=getattr(torch, a.dtype)),
        }
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(sd, str(dest / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in sd})
        total += sum(t.numel() * t.element_size() for t in sd.values())
        del sd
    sd = {"model.embed_tokens.weight": rand(a.vocab, a.hidden), "lm_head.weight": rand(a.vocab, a.hidden),
          "model.norm.weight": torch.ones(a.hidden, dtype=getattr(torch, a.dtype))}
    name = f"model-{n:05d}-of-{n:05d}.safetensors"
    save_file(sd, str(dest / name), metadata={"format": "pt"})
    weight_map.update({k: name for k in sd})
    total += sum(t.numel() * t.element_size() for t in sd.values())
    (dest / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return sum(f.stat().st_size for f in dest.glob("*.safetensors"))


def _vmhwm_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def run_quantize(a, model: Path, out: Path, calib: Path, log: Path) -> dict:
    cmd = [sys.executable, "-m", "fptq.cli", "quantize", str(model), "-o", str(out), "--calib", str(calib),
           "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--group-size", str(a.group_size),
           "--device", "cpu", "--max-shard-size", a.max_shard_size, "--force"] + (["--low-memory"] if a.low_memory else [])
    env = dict(os.environ)
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    t0 = time.perf_counter()
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
        hwm = 0
        while proc.poll() is None:
            hwm = max(hwm, _vmhwm_kb(proc.pid) or 0)
            time.sleep(0.2)
    wall = time.perf_counter() - t0
    maxrss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # kilobytes on Linux
    if proc.returncode != 0:
        sys.exit(f"fptq quantize failed (exit {proc.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return {"command": " ".join(cmd), "wall_s": wall, "peak_rss_bytes": max(hwm, maxrss_kb) * 1024,
            "vmhwm_polled_bytes": hwm * 1024, "ru_maxrss_bytes": maxrss_kb * 1024}


def write_results(res: dict, results_dir: Path) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "memory_large_model.json").write_text(json.dumps(res, indent=2))
    gib = 1024**3
    layers = res["timings_s"].get("layers") or []
    md = [
        "# fptq quantize: peak memory on a large synthetic LLaMA",
        "",
        f"Model: {res['params'] / 1e9:.2f}B parameters ({res['shape']}), {res.get('dtype', 'bfloat16')}, "
        f"{res['float_disk_bytes'] / gib:.2f} GiB on disk in {res['float_files']} safetensors shards.",
        f"Calibration: {res['nsamples']} x {res['seqlen']} tokens; group size {res['group_size']}; CPU, "
        f"{res['threads'] or 'default'} threads; {res['machine']}.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| peak RSS of the quantize process | {res['peak_rss_bytes'] / gib:.2f} GiB |",
        f"| float model on disk | {res['float_disk_bytes'] / gib:.2f} GiB |",
        f"| peak RSS / size on disk | {100 * res['peak_rss_ratio']:.1f}% (target < 40%: "
        f"{'met' if res['peak_rss_ratio'] < 0.4 else 'NOT met'}) |",
        f"| checkpoint size | {res['checkpoint_bytes'] / gib:.2f} GiB in {res['checkpoint_files']} weights files |",
        f"| time per layer (mean / max) | {res['layer_s_mean']:.1f} s / {res['layer_s_max']:.1f} s |",
        f"| load / quantize / save | {res['timings_s'].get('load', 0):.1f} s / {res['timings_s'].get('quantize', 0):.1f} s"
        f" / {res['timings_s'].get('save', 0):.1f} s |",
        f"| total (process wall time) | {res['wall_s']:.1f} s |",
        "",
        f"Per-layer seconds: {', '.join(f'{t:.1f}' for t in layers)}",
        "",
        f"Command: `{res['command']}`",
        "",
        "Reproduce: `python bench/memory_large_model.py` (see its docstring).",
    ]
    (results_dir / "memory_large_model.md").write_text("\n".join(md) + "\n")


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
        res = {
            "params": n, "dtype": a.dtype, "shape": f"hidden {a.hidden}, intermediate {a.intermediate}, {a.layers} layers, "
                                  f"{a.heads} heads ({a.kv_heads or a.heads} kv), vocab {a.vocab}",
            "float_disk_bytes": disk, "float_files": len(list(model.glob("*.safetensors"))),
            "nsamples": a.nsamples, "seqlen": a.seqlen, "group_size": a.group_size, "threads": a.threads,
            **run, "peak_rss_ratio": run["peak_rss_bytes"] / disk,
            "timings_s": rep["timings_s"], "layer_s_mean": sum(layers) / max(len(layers), 1),
            "layer_s_max": max(layers, default=0.0), "checkpoint_bytes": rep["sizes"]["checkpoint_bytes"],
            "checkpoint_files": len(ckpt_files), "layer_by_layer_loading": rep.get("layer_by_layer_loading"),
            "load_average_at_start": load1, "versions": rep["versions"],
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        }
        write_results(res, Path(a.results))
        print((Path(a.results) / "memory_large_model.md").read_text())
    finally:
        if not a.keep and not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

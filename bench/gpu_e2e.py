"""One prepared GPU run (issue 28): a LLaMA-2-7B-shaped float16 model quantized on CUDA, its speed table from
``fptq bench --device cuda``, and the GPU tests, in one command that fits a short GPU slot.

Steps, each writing its results as soon as it ends (so a run cut short still leaves what it measured):

1. ``model``: a random LLaMA (default: hidden 4096, intermediate 11008, 32 heads, 8 layers, vocab 32000, the
   shapes of LLaMA-2-7B) with outlier channels planted in the norms so that every FPTQ strategy occurs, saved
   as float16 safetensors (one file per layer);
2. ``quantize``: ``fptq quantize --device cuda`` with the default method (W4A8) and, for the table's other
   rows, ``smoothquant-w8a8`` and ``rtn-w4a16``; wall time, time per layer and the strategy counts (the
   float16 failure of issue 28 shows here);
3. ``bench``: ``fptq bench --device cuda`` (fp16 transformers, W4A8, W8A8, W4A16; prefill and decode);
4. ``tests``: ``pytest -m gpu`` and the Triton kernel tests on CUDA;
4b. ``compile``: the W4A8 checkpoint through ``fptq.load`` (static cache, CUDA graphs) with and without
   ``compile=True`` (torch.compile of the decode step): decode tokens/s at batch 1 and 16, and the first
   step's time (capture, compilation);
5. ``target``: issue 28's quantize target, one such layer (a model of its own) at 128 x 2048 calibration
   tokens with the default method, if the budget leaves a minute for it.

Results: ``OUT/gpu_e2e.json`` and ``.md`` (default ``bench/results/gpu``); the logs of each step beside them.
On the CPU the whole chain runs on a tiny model (``--tiny``), which is how this script is tested::

    python bench/gpu_e2e.py --out $OUT                 # on the GPU machine, < 6 minutes
    python bench/gpu_e2e.py --tiny --device cpu --out /tmp/e2e
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("The quick brown fox jumps over the lazy dog. A language model predicts the next token of a text. "
        "Quantization maps floating point numbers to a few integer levels, and calibration picks the scales. ")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu"))
    p.add_argument("--work", default=None, help="where the model and checkpoints go (default: OUT/work)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a tiny model (hidden 256, 2 layers): tests the chain")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--budget-s", type=float, default=330, help="skip the steps that would start after this")
    p.add_argument("--compile-probe", default=None, metavar="CKPT",
                   help="(the compile step, run in a process of its own) time fptq.load(CKPT) with and without compile")
    p.add_argument("--skip", default="", help="comma-separated steps to skip (model, quantize, bench, tests, compile, target)")
    return p.parse_args(argv)


def shape(a) -> dict:
    if a.tiny:
        return dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=4,
                    num_hidden_layers=2, vocab_size=1000)
    return dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                num_hidden_layers=a.layers, vocab_size=32000)


def build_model(a, dest: Path) -> dict:
    """Random float16 weights (drawn on the device, one layer at a time) with planted outlier channels: input
    norms x 8 on three channels (their q/k/v inputs in the LAE band), post-attention norms x 40 on two (gate/up
    dynamic)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from fptq.models.loading import load_tokenizer  # noqa: F401  (fptq importable before the long steps)

    s = shape(a)
    dest.mkdir(parents=True, exist_ok=True)
    LlamaConfig(**s, max_position_embeddings=4096, tie_word_embeddings=False, dtype="float16").save_pretrained(dest)
    _tokenizer(dest, s["vocab_size"])
    dev = a.device if a.device.startswith("cuda") and torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    h, i, kv = s["hidden_size"], s["intermediate_size"], s["num_key_value_heads"] * s["hidden_size"] // s["num_attention_heads"]

    def rand(*sh):
        return (torch.randn(*sh, generator=g, device=dev) * 0.02).half().cpu()

    weight_map = {}
    for li in range(s["num_hidden_layers"]):
        p = f"model.layers.{li}."
        ln1 = torch.ones(h, dtype=torch.float16)
        ln1[:3] = 8
        ln2 = torch.ones(h, dtype=torch.float16)
        ln2[5:7] = 40
        sd = {p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
              p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
              p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
              p + "mlp.down_proj.weight": rand(h, i), p + "input_layernorm.weight": ln1,
              p + "post_attention_layernorm.weight": ln2}
        save_file(sd, str(dest / f"layer{li}.safetensors"), metadata={"format": "pt"})
        weight_map.update({k: f"layer{li}.safetensors" for k in sd})
    rest = {"model.embed_tokens.weight": rand(s["vocab_size"], h), "lm_head.weight": rand(s["vocab_size"], h),
            "model.norm.weight": torch.ones(h, dtype=torch.float16)}
    save_file(rest, str(dest / "rest.safetensors"), metadata={"format": "pt"})
    weight_map.update({k: "rest.safetensors" for k in rest})
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return {**s, "bytes": sum(f.stat().st_size for f in dest.glob("*.safetensors"))}


def _tokenizer(dest: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([TEXT * 20], trainers.BpeTrainer(vocab_size=min(300, vocab), show_progress=False,
                                                           special_tokens=["<unk>", "<s>", "</s>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="</s>").save_pretrained(dest)


def run(cmd: list[str], log: Path, timeout: float) -> dict:
    t = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        with open(log, "w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=max(timeout, 1), env=env).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    return {"command": " ".join(cmd), "rc": rc, "seconds": time.perf_counter() - t,
            "log_tail": log.read_text(errors="replace")[-1500:]}


def kernels_per_step(r, prompt) -> float | None:
    """GPU kernels per decode step of runner ``r`` (CUDA kernel events of torch.profiler, graph replays included:
    9 steps minus 1, over 8); None without CUDA."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    def count(steps: int) -> int:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            r.decode(prompt, steps)
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)

    return (count(9) - count(1)) / 8


def compile_probe(a) -> int:
    """Decode through fptq.load(CKPT) on the device, uncompiled (the fused step) and compiled: tokens/s per batch,
    the first step's seconds (static cache set-up, graph capture, compilation) and the GPU kernels per step,
    written to OUT/compile_probe.json."""
    import fptq
    from fptq.runtime.timing import HFRunner

    rows = {}
    steps, prompt_len = (4, 8) if a.tiny else (32, 16)
    for label, comp in (("fptq.load", False), ("fptq.load, compile=True", True)):
        model = fptq.load(a.compile_probe, device=a.device, compile=comp)
        r, row = HFRunner(model), {}
        for b in (1, 16):
            prompt = torch.randint(0, model.config.vocab_size, (b, prompt_len), generator=torch.Generator().manual_seed(b))
            t = time.perf_counter()
            r.decode(prompt, 1)  # the first steps of this batch size: set-up, capture, compilation
            row[f"first_decode_b{b}_s"] = time.perf_counter() - t
            secs = sorted(r.decode(prompt, steps) for _ in range(3))
            row[f"decode_b{b}_tokens_per_s"] = b * steps / secs[1]
            try:
                row[f"kernels_per_step_b{b}"] = kernels_per_step(r, prompt)
            except Exception as e:  # noqa: BLE001 -- a profiler that cannot count here does not stop the probe
                row[f"kernels_per_step_b{b}"] = f"{e!r}"[:300]
        dec = model.model
        row["path"] = {"graph": getattr(dec, "uses_graph", None), "graph_reason": getattr(dec, "graph_reason", None),
                       "step_path": getattr(dec, "step_path", None),
                       "compile_reason": getattr(dec, "compile_reason", None)}
        rows[label] = row
        (Path(a.out) / "compile_probe.json").write_text(json.dumps(rows, indent=2, default=str))
        del model, r
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(json.dumps(rows, indent=2, default=str))
    return 0


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.compile_probe:
        return compile_probe(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work) if a.work else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    left = lambda: a.budget_s - (time.perf_counter() - t0)  # noqa: E731
    skip = set(filter(None, a.skip.split(",")))
    res: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                 "torch": torch.__version__, "args": vars(a), "steps": {}}

    def save():
        (out / "gpu_e2e.json").write_text(json.dumps(res, indent=2, default=str))
        (out / "gpu_e2e.md").write_text(markdown(res))

    model = work / "model"
    if "model" not in skip:
        t = time.perf_counter()
        res["steps"]["model"] = {**build_model(a, model), "seconds": time.perf_counter() - t}
        save()
    calib = work / "calib.txt"
    calib.write_text(TEXT * 400)
    py = sys.executable
    ckpts = {"fptq": work / "w4a8", "smoothquant-w8a8": work / "w8a8", "rtn-w4a16": work / "w4a16"}
    if "quantize" not in skip:
        res["steps"]["quantize"] = {}
        for method, ck in ckpts.items():
            if left() < 30:
                break
            gs = [] if method == "smoothquant-w8a8" else ["--group-size", "128"]
            r = run([py, "-m", "fptq.cli", "quantize", str(model), "-o", str(ck), "--method", method, "--calib",
                     str(calib), "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--device", a.device,
                     "--force", *gs], out / f"quantize_{method}.log", left())
            rep = ck / "quantize_report.json"
            if rep.is_file():
                q = json.loads(rep.read_text())
                r.update(counts=q.get("counts"), timings_s=q.get("timings_s"), memory=q.get("memory"))
            res["steps"]["quantize"][method] = r
            save()
    if "bench" not in skip and (ckpts["fptq"] / "fptq_plan.json").is_file() and left() > 30:
        extra = [f for flag, m in (("--w8a8", "smoothquant-w8a8"), ("--w4a16", "rtn-w4a16"))
                 if (ckpts[m] / "fptq_plan.json").is_file() for f in (flag, str(ckpts[m]))]
        tasks = (["--prefill", "64", "--decode-batch", "1,4", "--decode-steps", "8", "--prompt-len", "16"] if a.tiny
                 else ["--prefill", "512,2048", "--decode-batch", "1,16,64", "--decode-steps", "32"])
        r = run([py, "-m", "fptq.cli", "bench", str(ckpts["fptq"]), *extra, "--float-model", str(model),
                 "--device", a.device, "--repeats", "2", *tasks, "-o", str(out), "--name", "gpu_e2e_speed"],
                out / "bench.log", left())
        speed = out / "gpu_e2e_speed.json"
        if speed.is_file():
            r["table"] = json.loads(speed.read_text())["results"]
        res["steps"]["bench"] = r
        save()
    if "tests" not in skip and left() > 20:
        tests = ["-m", "gpu"] if torch.cuda.is_available() else ["tests/kernels/test_triton_kernels.py"]
        res["steps"]["tests"] = run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *tests],
                                    out / "pytest_gpu_e2e.log", left())
        save()
    if "compile" not in skip and (ckpts["fptq"] / "fptq_plan.json").is_file() and left() > 60:
        r = run([py, str(Path(__file__).resolve()), "--compile-probe", str(ckpts["fptq"]), "--out", str(out),
                 "--device", a.device, *(["--tiny"] if a.tiny else [])], out / "compile_probe.log", left())
        probe = out / "compile_probe.json"
        if probe.is_file():
            r["rows"] = json.loads(probe.read_text())
        res["steps"]["compile"] = r
        save()
    if "target" not in skip and left() > 60:  # issue 28's quantize target: one layer at 128 x 2048 tokens
        one, ck = work / "model_1layer", work / "w4a8_1layer"
        t = time.perf_counter()
        built = build_model(argparse.Namespace(**{**vars(a), "layers": 1}), one)
        ns, sl = (8, 256) if a.tiny else (128, 2048)
        long_calib = work / "calib_long.txt"
        long_calib.write_text(TEXT * (400 if a.tiny else 8000))
        r = run([py, "-m", "fptq.cli", "quantize", str(one), "-o", str(ck), "--calib", str(long_calib), "--nsamples",
                 str(ns), "--seqlen", str(sl), "--group-size", "128", "--device", a.device, "--force"],
                out / "quantize_target.log", left())
        rep = ck / "quantize_report.json"
        if rep.is_file():
            q = json.loads(rep.read_text())
            r.update(counts=q.get("counts"), timings_s=q.get("timings_s"), memory=q.get("memory"))
        res["steps"]["target"] = {**r, "nsamples": ns, "seqlen": sl, "build_s": time.perf_counter() - t - r["seconds"],
                                  "model_bytes": built["bytes"]}
        save()
    res["seconds"] = time.perf_counter() - t0
    save()
    print(markdown(res))
    return 0


def markdown(res: dict) -> str:
    st = res["steps"]
    md = [f"# GPU end to end ({res['device']}, torch {res['torch']})", ""]
    if "model" in st:
        m = st["model"]
        md.append(f"Model: hidden {m['hidden_size']}, intermediate {m['intermediate_size']}, {m['num_hidden_layers']} "
                  f"layers, vocab {m['vocab_size']}, float16, {m['bytes'] / 2**30:.2f} GiB ({m['seconds']:.0f} s to build).")
    for method, r in st.get("quantize", {}).items():
        layers = [x for x in (r.get("timings_s") or {}).get("layers", []) if x is not None]
        per = f"{sum(layers) / len(layers):.1f} s/layer" if layers else "no layer finished"
        md.append(f"- quantize `{method}`: rc {r['rc']}, {r['seconds']:.0f} s, {per}, counts {r.get('counts')}")
    if "bench" in st:
        md.append(f"- bench: rc {st['bench']['rc']}, {st['bench']['seconds']:.0f} s (table: gpu_e2e_speed.md)")
    if "target" in st:
        r = st["target"]
        layers = [x for x in (r.get("timings_s") or {}).get("layers", []) if x is not None]
        md.append(f"- quantize one layer at {r['nsamples']} x {r['seqlen']} tokens (issue 28's target: <= 8 s on an "
                  f"H200): rc {r['rc']}, {r['seconds']:.0f} s, layer {layers[0] if layers else float('nan'):.1f} s, "
                  "phases " + ", ".join(f"{k} {v:.1f} s" for k, v in
                                        ((r.get('timings_s') or {}).get('layer_phases') or {}).items()))
    if "compile" in st:
        c = st["compile"]
        md.append(f"- compile probe: rc {c['rc']}, {c['seconds']:.0f} s")
        for label, row in (c.get("rows") or {}).items():
            md.append(f"  - {label}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items() if isinstance(v, float))
                      + f"; {row.get('path')}")
    if "tests" in st:
        md.append(f"- tests: rc {st['tests']['rc']}, {st['tests']['seconds']:.0f} s: "
                  f"{st['tests']['log_tail'].strip().splitlines()[-1] if st['tests']['log_tail'].strip() else ''}")
    if "seconds" in res:
        md.append(f"\nTotal {res['seconds']:.0f} s.")
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    sys.exit(main())

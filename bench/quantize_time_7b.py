"""Time to quantize LLaMA-2-7B-shaped decoder layers, per phase, for two or more fptq source trees in one run.

Builds the model of ``bench/gpu_e2e.py`` (hidden 4096, intermediate 11008, 32 heads, vocab 32000, float16 --
what LLaMA-2 ships -- with outlier channels planted so that every strategy occurs; ``--layers`` decoder layers),
then runs ``fptq quantize`` on it (default method, group 128) once per tree and repeat, interleaved, each in its
own process, and reads each run's report: the quantize time, the per-layer phase times (load + rotation,
statistics pass, weights: strategies, folds, GPTQ; propagation) and the time outside the layers (the embedding's
rotation, the float pass of the residual order, the head).

    python bench/quantize_time_7b.py --trees base=/path/to/old/src,new=src --name quantize_time_7b_cpu

``--trees``: ``label=path`` pairs, each a ``src`` folder put first on ``PYTHONPATH`` (a worktree of another
commit gives the baseline); ``--device cuda`` times the GPU; ``--tiny --results /tmp/x`` tests the script. Results: ``bench/results/NAME.{json,md}`` (ratios
against the first tree). Run alone on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trees", default=f"this={ROOT / 'src'}", help="label=src_path pairs, comma-separated")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--method", default="fptq")
    p.add_argument("--workdir", default=None, help="where the model goes (default: a temporary folder)")
    p.add_argument("--tiny", action="store_true", help="a tiny model (hidden 256): tests this script")
    p.add_argument("--name", default="quantize_time_7b")
    p.add_argument("--results", default=str(HERE / "results"))
    return p.parse_args(argv)


def build(a, dest: Path) -> dict:
    sys.path.insert(0, str(HERE))
    import gpu_e2e  # the same model as the prepared GPU run

    spec = argparse.Namespace(tiny=a.tiny, layers=a.layers, device=a.device)
    info = gpu_e2e.build_model(spec, dest)
    return {**info, "calibration_text": gpu_e2e.TEXT}


def quantize_once(src: str, model: Path, calib: Path, out: Path, a) -> dict:
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "fptq.cli", "quantize", str(model), "-o", str(out), "--method", a.method,
           "--calib", str(calib), "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--group-size", "128",
           "--device", a.device, "--force"]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        return {"rc": r.returncode, "wall_s": wall, "stderr": r.stderr[-2000:]}
    rep = json.loads((out / "quantize_report.json").read_text())
    t_s = rep["timings_s"]
    phases = t_s.get("layer_phases", {})
    return {"rc": 0, "wall_s": wall, "quantize_s": t_s["quantize"], "save_s": t_s.get("save"),
            "layer_phases_s": phases, "outside_layers_s": t_s["quantize"] - sum(phases.values()),
            "counts": rep.get("counts"), "peak_rss_bytes": rep.get("memory", {}).get("peak_rss_bytes")}


def main(argv=None) -> int:
    a = parse_args(argv)
    trees = dict(pair.split("=", 1) for pair in a.trees.split(","))
    work = Path(a.workdir or tempfile.mkdtemp(prefix="fptq-q7b-"))
    model = work / "model"
    res: dict = {"args": vars(a), "runs": []}
    res["model"] = build(a, model)
    calib = work / "calib.txt"
    calib.write_text(res["model"].pop("calibration_text") * 400)
    out_json = Path(a.results) / f"{a.name}.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    for rep in range(a.repeats):
        for label, src in trees.items():
            r = quantize_once(str(Path(src).resolve()), model, calib, work / f"q_{label}", a)
            res["runs"].append({"tree": label, "repeat": rep, **r})
            print(json.dumps(res["runs"][-1]), flush=True)
            out_json.write_text(json.dumps(res, indent=1))
    res["summary"] = summarize(res["runs"], list(trees))
    out_json.write_text(json.dumps(res, indent=1))
    out_json.with_suffix(".md").write_text(markdown(res, a))
    print(markdown(res, a))
    return 0


def summarize(runs: list[dict], labels: list[str]) -> dict:
    out = {}
    for label in labels:
        ok = [r for r in runs if r["tree"] == label and r["rc"] == 0]
        if not ok:
            continue
        best = min(ok, key=lambda r: r["quantize_s"])
        out[label] = {"quantize_s": best["quantize_s"], "layer_phases_s": best["layer_phases_s"],
                      "outside_layers_s": best["outside_layers_s"], "save_s": best["save_s"],
                      "peak_rss_bytes": best["peak_rss_bytes"], "counts": best["counts"]}
    if labels and labels[0] in out:
        base = out[labels[0]]["quantize_s"]
        for label in out:
            out[label]["x_faster_than_" + labels[0]] = base / out[label]["quantize_s"]
    return out


def markdown(res: dict, a) -> str:
    m = res["model"]
    lines = [f"# Quantizing LLaMA-2-7B-shaped layers ({a.device})", "",
             f"hidden {m['hidden_size']}, intermediate {m['intermediate_size']}, {m['num_hidden_layers']} decoder "
             f"layer(s), vocab {m['vocab_size']}, float16; `fptq quantize --method {a.method}`, {a.nsamples} x "
             f"{a.seqlen} calibration tokens, group 128; best of {a.repeats} interleaved run(s) per tree.", "",
             "| tree | quantize s | per layer: load + rotation | statistics | weights | propagate | outside the "
             "layers | save s | peak RSS GB | speed-up |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, s in res.get("summary", {}).items():
        p = s["layer_phases_s"]
        n = m["num_hidden_layers"]
        speed = next((v for k, v in s.items() if k.startswith("x_faster")), None)
        lines.append(f"| {label} | {s['quantize_s']:.1f} | {p.get('load', 0) / n:.1f} | {p.get('statistics', 0) / n:.1f} | "
                     f"{p.get('weights', 0) / n:.1f} | {p.get('propagate', 0) / n:.1f} | {s['outside_layers_s']:.1f} | "
                     f"{s['save_s']:.1f} | {(s['peak_rss_bytes'] or 0) / 1e9:.2f} | "
                     f"{'' if speed is None else f'{speed:.2f}x'} |")
    failed = [r for r in res["runs"] if r["rc"] != 0]
    if failed:
        lines += ["", "Failed runs:"] + [f"- {r['tree']} (repeat {r['repeat']}): rc {r['rc']}" for r in failed]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

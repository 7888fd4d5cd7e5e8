"""Human-readable summaries and the plan chart."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from .plan import Plan

STRATEGY_ORDER = ("static_tensor", "lae_static_tensor", "dynamic_token", "float")
STRATEGY_LABEL = {
    "static_tensor": "static",
    "lae_static_tensor": "LAE+static",
    "dynamic_token": "dynamic",
    "float": "float",
}


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def _part_dtypes(sizes: dict[str, Any], kind: str, prefix: str = "") -> str:
    """``prefix`` + the dtypes a kind of stored tensor takes (see :func:`fptq.workflow.stored_sizes`),
    e.g. ``bfloat16``; empty when the checkpoint has none of that kind."""
    dtypes = sizes.get("stored", {}).get(kind, {}).get("dtypes", {})
    if not dtypes:
        return ""
    return prefix + " in " * bool(prefix) + " + ".join(sorted(dtypes, key=lambda d: -dtypes[d]))


def strategy_table(plan: Plan) -> str:
    """Counts per projection type and strategy, as an aligned text table."""
    by_proj = plan.counts_by_projection()
    cols = [s for s in STRATEGY_ORDER if any(c.get(s) for c in by_proj.values())]
    header = ["projection"] + [STRATEGY_LABEL[c] for c in cols] + ["total"]
    rows = []
    for proj, c in by_proj.items():
        rows.append([proj] + [str(c.get(s, 0)) for s in cols] + [str(sum(c.values()))])
    tot = plan.counts()
    rows.append(["all"] + [str(tot.get(s, 0)) for s in cols] + [str(sum(tot.values()))])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def quantize_summary(plan: Plan, report: dict[str, Any]) -> str:
    cfg = plan.config
    sizes = report.get("sizes", {})
    t = report.get("timings_s", {})
    lines = [
        f"fptq {cfg.get('method')}: W{cfg.get('wbits')}A{cfg.get('abits')}, group {cfg.get('group_size')}, "
        f"thresholds {tuple(plan.thresholds)}",
        f"model      {report.get('source_model')}",
        f"calibration {report.get('calibration', {}).get('nsamples')} x {report.get('calibration', {}).get('seqlen')} tokens "
        f"from {report.get('calibration', {}).get('source')}"
        + (" (not used: weight-only round-to-nearest is data-free)" if _data_free(plan) else ""),
        "",
        strategy_table(plan),
        *_budget_line(plan),
        "",
        f"time       quantize {t.get('quantize', 0):.1f} s (load {t.get('load', 0):.1f} s, save {t.get('save', 0):.1f} s, "
        f"total {t.get('total', 0):.1f} s)",
    ]
    if t.get("layer_phases"):
        lines.append("           layers: " + ", ".join(f"{k} {v:.1f} s" for k, v in t["layer_phases"].items()))
    mem = report.get("memory") or {}
    if mem.get("peak_rss_bytes"):
        peak, fb = mem["peak_rss_bytes"], sizes.get("float_model_bytes")
        # the ratio says something once the model outweighs the interpreter and its libraries
        ratio = fb and fb > (mem.get("rss_at_start_bytes") or 0)
        lines.append(f"memory     peak {_fmt_bytes(peak)} resident"
                     + (f" ({peak / fb:.2f}x the float model's {_fmt_bytes(fb)})" if ratio else ""))
    if sizes:
        lines.append(
            f"size       {_fmt_bytes(sizes['float_model_bytes'])} float -> {_fmt_bytes(sizes['checkpoint_bytes'])} checkpoint; "
            f"quantized Linears {_fmt_bytes(sizes['float_linear_bytes'])} -> {_fmt_bytes(sizes['quantized_linear_bytes'])} "
            f"({sizes['bits_per_weight']:.3f} bits/weight incl. scales{_part_dtypes(sizes, 'biases', ' and biases')})"
        )
        if sizes.get("stored", {}).get("unquantized"):
            lines.append(f"           unquantized tensors (embeddings, lm_head, norms): {_fmt_bytes(sizes['other_bytes'])} in "
                         f"{_part_dtypes(sizes, 'unquantized')}")
    if report.get("output"):
        lines.append(f"checkpoint {report['output']}")
    return "\n".join(lines)


def _budget_line(plan: Plan) -> list[str]:
    """How the dynamic budget (``dynamic_share``) was spent, when the plan had one."""
    share = plan.config.get("dynamic_share") or 0
    if not share or not plan.layers:
        return []
    n = len(plan.layers)
    dyn = sum(lp.strategy == "dynamic_token" for lp in plan.layers.values())
    chosen = sum(lp.chosen_dynamic for lp in plan.layers.values())
    return [f"dynamic    {dyn} of {n} Linears ({100 * dyn / n:.1f}%, budget {100 * share:g}%): {dyn - chosen} by the "
            f"thresholds, {chosen} by calibration error"]


def _data_free(plan: Plan) -> bool:
    """No layer measured its input: the data-free path (fptq.pipeline.quantize_layer_weights) ran."""
    return bool(plan.layers) and all(math.isnan(lp.act_absmax) and lp.weight_method == "rtn" for lp in plan.layers.values())


def plan_rows(plan: Plan) -> list[list[str]]:
    rows = []
    for name, lp in plan.layers.items():
        rows.append([
            name, STRATEGY_LABEL.get(lp.strategy, lp.strategy), "-" if math.isnan(lp.act_absmax) else f"{lp.act_absmax:.2f}",
            "" if lp.act_scale is None else f"{lp.act_scale:.4g}",
            "" if lp.equalization_max_scale is None else f"{lp.equalization_max_scale:.2f}",
            "" if lp.equalization_power is None else f"{lp.equalization_power:g}",
            "sorted" if lp.channels_reordered else "",
            lp.weight_method, "" if lp.weight_error is None else f"{lp.weight_error:.4f}",
        ])
    return rows


def plan_table(plan: Plan) -> str:
    header = ["layer", "strategy", "max|x|", "act_scale", "max eq s", "eq power", "channels", "weights", "w rel err"]
    rows = plan_rows(plan)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(x.ljust(w) for x, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def plan_chart(plan: Plan, path: str | Path) -> Path:
    """PNG: max|x| of every quantized Linear's input (log scale), by strategy, thresholds drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(plan.layers)
    projs = sorted({n.rsplit(".", 1)[-1] for n in names}, key=lambda p: names.index(next(n for n in names if n.endswith(p))))
    markers = dict(zip(projs, "osD^v<>ph*x+"))
    colors = {"static_tensor": "tab:green", "lae_static_tensor": "tab:orange", "dynamic_token": "tab:red", "float": "tab:gray"}
    fig, ax = plt.subplots(figsize=(11, 4.5), dpi=110)
    seen = set()
    for n, lp in plan.layers.items():
        parts = n.split(".")
        idx = next((int(p) for p in parts if p.isdigit()), 0)
        proj = parts[-1]
        label = None
        key = (proj, lp.strategy)
        if key not in seen:
            seen.add(key)
            label = f"{proj} ({STRATEGY_LABEL.get(lp.strategy, lp.strategy)})"
        ax.scatter(idx + 0.08 * projs.index(proj), max(lp.act_absmax, 1e-3), c=colors.get(lp.strategy, "k"),
                   marker=markers.get(proj, "o"), s=28, label=label, alpha=0.85)
    t0, t1 = plan.thresholds
    ax.axhline(t0, ls="--", c="tab:orange", lw=1)
    ax.axhline(t1, ls="--", c="tab:red", lw=1)
    ax.text(0, t0 * 1.08, f"t0 = {t0:g}", color="tab:orange", fontsize=8)
    ax.text(0, t1 * 1.08, f"t1 = {t1:g}", color="tab:red", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("max |x| of the Linear's input (calibration)")
    c = Counter(lp.strategy for lp in plan.layers.values())
    ax.set_title("FPTQ plan: " + ", ".join(f"{STRATEGY_LABEL.get(k, k)} {v}" for k, v in c.items()))
    ax.legend(fontsize=7, ncol=4, loc="upper left", bbox_to_anchor=(0, -0.15))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path

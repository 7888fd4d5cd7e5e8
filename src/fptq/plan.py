"""The per-layer plan: what the method decided for every quantized Linear.

Written as ``fptq_plan.json``::

    {"version": 1, "thresholds": [15.0, 150.0], "config": {...},
     "layers": {"model.layers.0.self_attn.q_proj": {"strategy": "static_tensor",
                "act_absmax": 3.2, "act_scale": 0.021, ...}, ...}}
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import QuantConfig, Strategy

PLAN_VERSION = 1

__all__ = ["LayerPlan", "Plan", "choose_strategy", "PLAN_VERSION"]


def choose_strategy(act_absmax: float, thresholds: tuple[float, float]) -> Strategy:
    """FPTQ's rule: ``v < t0`` static; ``t0 <= v < t1`` LAE + static; else dynamic."""
    t0, t1 = thresholds
    if act_absmax < t0:
        return Strategy.STATIC
    if act_absmax < t1:
        return Strategy.LAE_STATIC
    return Strategy.DYNAMIC


@dataclass
class LayerPlan:
    strategy: str
    act_absmax: float
    in_features: int = 0
    out_features: int = 0
    wbits: int = 4
    abits: int = 8
    group_size: int = 128
    act_scale: float | None = None  # static per-tensor scale (clip / qmax)
    act_absmax_equalized: float | None = None  # max|x/s| after equalization
    equalization: str = "none"  # lae | smoothquant | none
    equalization_folded_into: str | None = None
    equalization_note: str | None = None  # why a wanted scale was not applied
    equalization_max_scale: float | None = None
    # the power beta of the equalization scales (s**beta) chosen by the search (QuantConfig.equalization_powers);
    # None: not searched (beta = 1 where equalized). 0 leaves the input as it was
    equalization_power: float | None = None
    # the Linear's input channels were permuted, with its producer's output rows (QuantConfig.channel_order)
    channels_reordered: bool = False
    observer: str | None = None
    weight_method: str = "rtn"  # rtn | gptq | gptq-fallback-rtn | float
    weight_error: float | None = None  # relative Frobenius error of the quantized weight
    # where config.dynamic_share weighed the group (its static Linears): the group's quantized output errors on
    # the calibration sample with a static per-tensor and a dynamic per-token input scale (fptq.dynamic_budget)
    static_error: float | None = None
    dynamic_error: float | None = None

    @property
    def chosen_dynamic(self) -> bool:
        """Dynamic because the budget of ``dynamic_share`` chose it (not the thresholds)."""
        return self.strategy == "dynamic_token" and self.static_error is not None

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if v is not None}
        if math.isnan(self.act_absmax):  # not measured (data-free or float layers): JSON null, not NaN
            d["act_absmax"] = None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerPlan":
        d = dict(d)
        if d.get("act_absmax", 0.0) is None:
            d["act_absmax"] = float("nan")
        return cls(**d)


@dataclass
class Plan:
    thresholds: tuple[float, float]
    config: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    version: int = PLAN_VERSION

    # --------------------------------------------------------------- summary
    def counts(self) -> Counter:
        return Counter(lp.strategy for lp in self.layers.values())

    def counts_by_projection(self) -> dict[str, Counter]:
        out: dict[str, Counter] = {}
        for name, lp in self.layers.items():
            proj = name.rsplit(".", 1)[-1]
            out.setdefault(proj, Counter())[lp.strategy] += 1
        return out

    # -------------------------------------------------------------------- io
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "thresholds": list(self.thresholds),
            "config": self.config,
            "counts": dict(self.counts()),
            "layers": {k: v.to_dict() for k, v in self.layers.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        if d.get("version", 1) > PLAN_VERSION:
            raise ValueError(f"plan version {d.get('version')} is newer than this fptq supports ({PLAN_VERSION})")
        layers = {k: LayerPlan.from_dict(v) for k, v in d.get("layers", {}).items()}
        return cls(thresholds=tuple(d["thresholds"]), config=d.get("config", {}), layers=layers,
                   version=d.get("version", 1))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def quant_config(self) -> QuantConfig:
        return QuantConfig.from_dict(self.config)

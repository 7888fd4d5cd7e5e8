"""Quantization settings: frozen, versioned, round-trippable to JSON."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

from .quant.static_scale import OBSERVERS
from .quant.weights import WEIGHT_SCALE_SIGNS

CONFIG_VERSION = 1
SCALE_ROUNDINGS = ("auto", "down", "nearest")


class Strategy(str, Enum):
    """Activation strategy of one Linear (the names are part of the plan format)."""

    STATIC = "static_tensor"
    LAE_STATIC = "lae_static_tensor"
    DYNAMIC = "dynamic_token"
    FLOAT = "float"  # activations left in floating point (W4A16, fp)


class Equalization(str, Enum):
    LAE = "lae"
    SMOOTHQUANT = "smoothquant"
    NONE = "none"


class ActPolicy(str, Enum):
    """How strategies are assigned to Linears."""

    THRESHOLDS = "thresholds"  # FPTQ: by max|x| against (t0, t1)
    STATIC = "static"  # every layer static per-tensor
    DYNAMIC = "dynamic"  # every layer dynamic per-token
    FLOAT = "float"  # no activation quantization


@dataclass(frozen=True)
class QuantConfig:
    """Everything that decides what a quantization run does.

    ``method`` is informative (the preset it came from); the other fields are
    what the pipeline reads.
    """

    method: str = "fptq"
    wbits: int = 4
    abits: int = 8
    group_size: int = 128
    thresholds: tuple[float, float] = (15.0, 150.0)
    act_policy: ActPolicy = ActPolicy.THRESHOLDS
    equalization: Equalization = Equalization.LAE
    # equalize which layers: with THRESHOLDS only the middle band; with the
    # other policies every layer whose input it can fold into
    smoothquant_alpha: float = 0.5
    # which producers take equalization scales: "all" (norms and Linears: v_proj -> o_proj, up_proj -> down_proj)
    # or "norms" (llm-compressor's default mappings); a group left out gets no equalization, and a Linear of it
    # in FPTQ's LAE band runs dynamic per-token instead
    equalize_into: str = "all"
    # which layers FPTQ equalizes: "all" (default: every static layer too, and dynamic layers fed by a norm;
    # WikiText-2 29.73 vs 31.79 on SmolLM2-135M, bench/results/lae_scope.md) or "band" (the paper: only
    # 15 <= max|x| < 150). Configurations saved before this field existed ran "band".
    lae_scope: str = "all"
    # per-channel statistic the equalization scales are computed from: "absmax" (max|x|, the FPTQ and
    # SmoothQuant papers) or "range" (max(x) - min(x), what llm-compressor's smoothing modifiers use)
    equalization_stat: str = "absmax"
    # equalization strength chosen per group: the power beta of the scales (s**beta) among these that gives
    # the smallest error of the group's quantized outputs on calibration inputs (quant/search.py);
    # empty: beta = 1, the formula as published
    equalization_powers: tuple[float, ...] = ()
    static_observer: str = "mse"
    # order of the channels between a Linear and the Linears it feeds element by element (up/gate -> down):
    # "none", or "weight": sorted by the size of the consumers' (equalized) weight columns, so that each
    # weight group holds channels of like size (quant/reorder.py); exact, and free at run time
    channel_order: str = "none"
    # order of the residual stream's channels: "none", or "max": sorted by their largest |x| at the norms'
    # outputs on a float pass over a few calibration windows, so that LAE's outlier columns share few weight
    # groups (residual.py); exact, and free at run time
    residual_order: str = "none"
    # orthogonal rotations folded into the weights before anything else (rotation.py; QuaRot / SpinQuant's
    # offline R1 and R2): "none", "residual" (the residual stream, by a randomized Hadamard matrix: the norms
    # fold into their readers and lm_head is untied) or "residual+heads" (also every head's values); exact in
    # float, free at run time, the architecture unchanged. ``rotation_seed`` draws the matrices' signs
    rotation: str = "none"
    rotation_seed: int = 0
    weight_clip_search: bool = False
    # what the clip search minimises: "weight" (the squared error of the weights) or "output" (the squared
    # error each group adds to the Linear's output on the calibration inputs: activation-aware clipping)
    weight_clip_objective: str = "weight"
    # which rows of a GPTQ Linear take the searched clip: "all", or "best": each output row is quantized with
    # the clip and without, and keeps the one with the smaller error on the calibration outputs (quant/gptq.py;
    # twice GPTQ's column loop). Round-to-nearest weights take the clip on every row either way
    weight_clip_rows: str = "all"
    # how each float16 weight scale is rounded from absmax / 7.5: "down" (never above it, so a group's
    # negative extreme keeps code -8), "nearest", or "auto": down for round-to-nearest weights (KLD -3%,
    # bench/results/rtn_rounding_spread.md), nearest for GPTQ weights (KLD -10 to -20% on SmolLM2-135M over
    # three calibration seeds, bench/results/smol_scale_rounding*.md, smol_gptq_scale_rounding.md)
    scale_rounding: str = "auto"
    # the sign of the weight scales: "positive" (absmax / 7.5) or "signed" (llama.cpp's Q4_0 rule: the group's
    # signed extreme / -8, so the extreme is code -8 exactly and the step is absmax / 8; quant/weights.py)
    weight_scale_sign: str = "positive"
    # the 4-bit group scales: "float" (any float16 value per group) or "integer": per output channel a base
    # scale times an integer -15 .. -1 or 1 .. 16 per group, each group's integer the one of least squared
    # weight error (it replaces the clip search and the sign rule; with GPTQ the scales come from the weights
    # before it, as static groups). The checkpoint format is the same; on AMX CPUs the runtime then sums a
    # Linear's int8 products over the whole input dimension at once (fptq.quant.intscales)
    group_scales: str = "float"
    gptq: bool = False
    gptq_damp: float = 0.01
    gptq_block_size: int = 128
    gptq_act_order: bool = False
    gptq_static_groups: bool = False
    gptq_token_cap: float = 0.0
    gptq_first_token_weight: float = 1.0
    # rows of calibration inputs the GPTQ Hessians are accumulated from, drawn evenly from every batch;
    # 0: every token. The Hessian of a wide input (down_proj) costs tokens x K^2: on Qwen2.5-0.5B with
    # every token it is most of GPTQ's time
    gptq_hessian_rows: int = 0
    # how the Hessian is accumulated: "float32" running average (the GPTQ reference code), or "float64":
    # per-batch float32 products summed in float64, divided at the end (bench/results/qwen_gptq_hessian_dtype.md)
    gptq_hessian_dtype: str = "float32"
    # execution choices that change numerics slightly (recorded for reproducibility):
    # dtype of the statistics pass ("float32" or "bfloat16": autocast, faster on CPUs with AMX/AVX512-BF16)
    calib_dtype: str = "float32"
    # backend that runs the quantized layer to produce the next layer's inputs
    # ("reference" = simulated quantization, "auto" = the integer kernels)
    propagate_backend: str = "reference"
    # what each layer is calibrated on: "quantized" (the outputs of the already quantized layers before it, as
    # GPTQ's reference code and fptq by default) or "float" (the float model's outputs: what llm-compressor's
    # round-to-nearest recipes see, since its sequential pipeline runs with fake quantization switched off and
    # only GPTQ writes quantized weights back)
    calib_inputs: str = "quantized"
    # the largest share of the quantized Linears that may run dynamic per-token activations: the thresholds
    # decide first, then the static groups whose calibration output error drops most when quantized per token
    # go dynamic, the budget spread evenly over the layers (fptq.dynamic_budget); 0: the thresholds alone
    dynamic_share: float = 0.0
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "act_policy", ActPolicy(self.act_policy))
        object.__setattr__(self, "equalization", Equalization(self.equalization))
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        object.__setattr__(self, "equalization_powers", tuple(float(p) for p in self.equalization_powers))
        self.validate()

    def validate(self) -> None:
        if self.wbits not in (2, 3, 4, 8, 16):
            raise ValueError(f"--wbits must be one of 2, 3, 4, 8 or 16 (16 = float weights), got {self.wbits}")
        if self.abits not in (4, 8, 16):
            raise ValueError(f"--abits must be 4, 8 or 16 (16 = float activations), got {self.abits}")
        if self.group_size != -1 and self.group_size < 8:
            raise ValueError(
                f"--group-size must be at least 8 (or -1 for one scale per output channel), got {self.group_size}"
            )
        if len(self.thresholds) != 2 or not (0 < self.thresholds[0] <= self.thresholds[1]):
            raise ValueError(
                f"--thresholds must be two positive numbers t0<=t1, e.g. 15,150; got {self.thresholds}"
            )
        if self.static_observer not in OBSERVERS:
            raise ValueError(f"static observer must be one of {OBSERVERS}, got {self.static_observer!r}")
        if not 0 < self.smoothquant_alpha < 1:
            raise ValueError(f"smoothquant alpha must be in (0, 1), got {self.smoothquant_alpha}")
        if self.lae_scope not in ("band", "all"):
            raise ValueError(f"lae_scope must be 'band' or 'all', not {self.lae_scope!r}")
        if self.equalize_into not in ("all", "norms"):
            raise ValueError(f"equalize_into must be 'all' or 'norms', not {self.equalize_into!r}")
        if self.calib_inputs not in ("quantized", "float"):
            raise ValueError(f"calib_inputs must be 'quantized' or 'float', not {self.calib_inputs!r}")
        if self.residual_order not in ("none", "max"):
            raise ValueError(f"residual_order must be 'none' or 'max', not {self.residual_order!r}")
        if self.rotation not in ("none", "residual", "residual+heads"):
            raise ValueError(f"rotation must be 'none', 'residual' or 'residual+heads', not {self.rotation!r}")
        if self.channel_order not in ("none", "weight"):
            raise ValueError(f"channel_order must be 'none' or 'weight', not {self.channel_order!r}")
        if self.weight_clip_objective not in ("weight", "output"):
            raise ValueError(f"weight_clip_objective must be 'weight' or 'output', not {self.weight_clip_objective!r}")
        if self.weight_clip_rows not in ("all", "best"):
            raise ValueError(f"weight_clip_rows must be 'all' or 'best', not {self.weight_clip_rows!r}")
        if any(p < 0 for p in self.equalization_powers):
            raise ValueError(f"equalization powers must be >= 0, got {self.equalization_powers}")
        if self.equalization_stat not in ("absmax", "range"):
            raise ValueError(f"equalization_stat must be 'absmax' or 'range', not {self.equalization_stat!r}")
        if self.weight_scale_sign not in WEIGHT_SCALE_SIGNS:
            raise ValueError(f"weight_scale_sign must be one of {WEIGHT_SCALE_SIGNS}, not {self.weight_scale_sign!r}")
        if self.group_scales not in ("float", "integer"):
            raise ValueError(f"group_scales must be 'float' or 'integer', not {self.group_scales!r}")
        if self.group_scales == "integer":
            if self.wbits != 4 or self.group_size <= 0:
                raise ValueError("integer group scales are for 4-bit weights in groups (--wbits 4, --group-size > 0), "
                                 f"not --wbits {self.wbits} --group-size {self.group_size}")
        if self.scale_rounding not in SCALE_ROUNDINGS:
            raise ValueError(f"scale_rounding must be one of {SCALE_ROUNDINGS}, not {self.scale_rounding!r}")
        if self.calib_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"calib_dtype must be float32 or bfloat16, got {self.calib_dtype!r}")
        if self.gptq_hessian_dtype not in ("float32", "float64"):
            raise ValueError(f"gptq_hessian_dtype must be float32 or float64, not {self.gptq_hessian_dtype!r}")
        if self.gptq_hessian_rows < 0:
            raise ValueError(f"gptq_hessian_rows must be >= 0 (0 = every token), got {self.gptq_hessian_rows}")
        if not 0 <= self.dynamic_share < 1:
            raise ValueError(f"dynamic_share must be in [0, 1) (0.1: at most 10% of the Linears dynamic), "
                             f"got {self.dynamic_share}")
        if not 0 <= self.gptq_damp < 1:
            raise ValueError(f"gptq damp must be in [0, 1), got {self.gptq_damp}")

    @property
    def quantize_weights(self) -> bool:
        return self.wbits < 16

    @property
    def quantize_acts(self) -> bool:
        return self.abits < 16 and self.act_policy != ActPolicy.FLOAT

    @property
    def needs_calibration(self) -> bool:
        """Whether any decision reads calibration activations. Round-to-nearest weights with float
        activations and no equalization are data-free: each weight is quantized on its own."""
        return (self.quantize_acts or self.gptq or self.equalization != Equalization.NONE
                or (self.weight_clip_search and self.weight_clip_objective == "output"))

    def rounding_for(self, gptq: bool) -> str:
        """The float16 rounding of the weight scales ("down" or "nearest") for weights quantized with GPTQ
        (``gptq``) or round-to-nearest."""
        if self.scale_rounding != "auto":
            return self.scale_rounding
        return "nearest" if gptq else "down"

    def replace(self, **changes: Any) -> "QuantConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = {}
        for f in fields(self):
            v = getattr(self, f.name)
            d[f.name] = v.value if isinstance(v, Enum) else list(v) if isinstance(v, tuple) else v
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        version = d.get("version", CONFIG_VERSION)
        if version > CONFIG_VERSION:
            raise ValueError(
                f"this configuration has version {version}, newer than this fptq understands "
                f"({CONFIG_VERSION}); upgrade fptq"
            )
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs.setdefault("lae_scope", "band")  # what every run before the field existed did
        kwargs.setdefault("scale_rounding", "nearest")  # likewise
        if "thresholds" in kwargs:
            kwargs["thresholds"] = tuple(kwargs["thresholds"])
        return cls(**kwargs)

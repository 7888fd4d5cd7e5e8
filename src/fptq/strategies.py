"""How each group of a decoder layer's Linears (those sharing one input) chooses its activation strategy and
equalization power, scored on the calibration sample the statistics pass drew: FPTQ's thresholds
(:func:`strategy_for`), the LAE power search (:func:`search_power`) and the budget of dynamic Linears
(:func:`budget_candidate`, :func:`spend_dynamic_budget`; the maths in :mod:`fptq.dynamic_budget`); the two
searches share one :func:`scoring_inputs` per group."""
from __future__ import annotations

import logging

import torch
from torch import nn

from .calibrate import InputStats
from .config import ActPolicy, Equalization, QuantConfig, Strategy
from .dynamic_budget import DynamicCandidate, choose_dynamic
from .folding import wants_reorder
from .models.adapters import FoldGroup
from .plan import choose_strategy
from .quant.search import best_equalization_power, quantized_output_error

log = logging.getLogger(__name__)

__all__ = ["ACT_MODE", "SEARCH_ROWS", "budget_candidate", "scoring_inputs", "search_power", "search_rows",
           "spend_dynamic_budget", "strategy_for"]


def strategy_for(config: QuantConfig, v: float) -> Strategy:
    """The activation strategy of a group of Linears whose input reaches ``v = max|x|``: the config's policy,
    FPTQ's thresholds by default."""
    if not config.quantize_acts:
        return Strategy.FLOAT
    if config.act_policy == ActPolicy.STATIC:
        return Strategy.STATIC
    if config.act_policy == ActPolicy.DYNAMIC:
        return Strategy.DYNAMIC
    s = choose_strategy(v, config.thresholds)
    if s == Strategy.LAE_STATIC and config.equalization == Equalization.NONE:
        return Strategy.STATIC  # ablation: FPTQ without LAE
    return s


SEARCH_ROWS = 2048


def search_rows(sample: torch.Tensor | None) -> torch.Tensor | None:
    """At most ``SEARCH_ROWS`` rows of ``sample``, evenly strided (every calibration batch contributes)."""
    if sample is None or len(sample) <= SEARCH_ROWS:
        return sample
    return sample[:: -(-len(sample) // SEARCH_ROWS)]


# the QuantLinear activation mode each strategy runs with
ACT_MODE = {Strategy.STATIC: "static_tensor", Strategy.LAE_STATIC: "static_tensor",
            Strategy.DYNAMIC: "dynamic_token", Strategy.FLOAT: "none"}


def _search_kwargs(config: QuantConfig, group: FoldGroup) -> dict:
    """How :mod:`fptq.quant.search` quantizes a group's weights and input, as the pipeline will."""
    return dict(wbits=config.wbits, group_size=config.group_size if config.group_size > 0 else -1,
                abits=config.abits, observer=config.static_observer, reorder=wants_reorder(config, group),
                weight_sign=config.weight_scale_sign)


def scoring_inputs(group: FoldGroup, layer: nn.Module,
                   st: InputStats) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]] | None:
    """What a group is scored on, built once for :func:`search_power` and :func:`budget_candidate`: its first
    ``SEARCH_ROWS`` sampled calibration inputs (float32), its Linears' weights as they are now (before the
    group's fold) and their float outputs; ``None`` without a sample. On the weights' device (the GPU with
    ``--device cuda``: the searches quantize the group's weights once per candidate, work for the GPU, not
    for the host's cores; the samples are kept on the CPU)."""
    x = st.sample(SEARCH_ROWS)
    if x.numel() == 0:
        return None
    lins = [layer.get_submodule(c) for c in group.consumers]
    x = x.to(lins[0].weight.device).float()
    weights = [lin.weight.detach().float() for lin in lins]
    return x, weights, [x @ w.t() for w in weights]


def search_power(config: QuantConfig, group: FoldGroup, scored: tuple | None, s_in: torch.Tensor,
                 strategy: Strategy) -> tuple[float, float | None]:
    """The equalization power of ``config.equalization_powers`` that leaves the smallest error in the
    group's quantized outputs on ``scored`` (:func:`scoring_inputs`: the first ``SEARCH_ROWS`` sampled
    calibration inputs; rows strided over every batch instead measured no better:
    bench/results/qwen_plan_levers.md, smol_signed.md), and that error (``None`` without a sample)."""
    if scored is None:
        return 1.0, None
    x, weights, refs = scored
    power, errs = best_equalization_power(x, weights, s_in.to(x.device), config.equalization_powers, refs=refs,
                                          act_mode=ACT_MODE[strategy], **_search_kwargs(config, group))
    return power, min(errs)


def budget_candidate(config: QuantConfig, group: FoldGroup, scored: tuple | None, s: torch.Tensor | None,
                     key: int, static_error: float | None) -> DynamicCandidate | None:
    """The group's quantized output errors on ``scored`` (:func:`scoring_inputs`) with a static and with a
    dynamic input scale, ``s`` the equalization scales it will get (``static_error``: already measured by the
    power search), for :func:`~fptq.dynamic_budget.choose_dynamic`; ``None`` without a sample."""
    if scored is None:
        return None
    x, weights, refs = scored
    s = torch.ones(x.shape[1], device=x.device) if s is None else s.float().to(x.device)
    kw = _search_kwargs(config, group)
    if static_error is None:
        static_error = quantized_output_error(x, weights, refs, s, act_mode="static_tensor", **kw)
    dynamic_error = quantized_output_error(x, weights, refs, s, act_mode="dynamic_token", **kw)
    return DynamicCandidate(key, len(group.consumers), static_error, dynamic_error)


def spend_dynamic_budget(decisions: list[tuple], candidates: list[DynamicCandidate], allowance: int,
                         layer_prefix: str) -> None:
    """Turn the static groups :func:`~fptq.dynamic_budget.choose_dynamic` picks dynamic, in ``decisions``
    (tuples of :func:`quantize_layer`: group, strategy, ..., note at index 10), within ``allowance`` Linears
    less those the thresholds already made dynamic."""
    forced = sum(len(d[0].consumers) for d in decisions if d[1] == Strategy.DYNAMIC)
    chosen = set(choose_dynamic(candidates, allowance - forced))
    for c in candidates:
        log.debug("%s.%s: static error %.4g, dynamic %.4g, gain per Linear %.4g%s", layer_prefix,
                  decisions[c.key][0].consumers[0], c.static_error, c.dynamic_error, c.gain,
                  " -> dynamic" if c.key in chosen else "")
        if c.key in chosen:
            d = list(decisions[c.key])
            why = (f"dynamic per-token activations (dynamic_share): the calibration output error drops from "
                   f"{c.static_error:.3g} to {c.dynamic_error:.3g}")
            d[1], d[10] = Strategy.DYNAMIC, f"{d[10]}; {why}" if d[10] else why
            decisions[c.key] = tuple(d)

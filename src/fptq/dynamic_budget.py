"""A budget of dynamic Linears spent where the calibration error drops most (``QuantConfig.dynamic_share``).

FPTQ's thresholds fix each Linear's activation strategy from ``max|x|`` alone. With a share ``f`` the plan
may run up to ``floor(f * total)`` of the model's quantized Linears on dynamic per-token activations (so at
least ``1 - f`` of them stay static): the thresholds decide first, and the Linears they send to dynamic
count against the budget; what is left goes to the static groups of Linears (those sharing one input:
q/k/v, gate/up, o, down) whose quantized output error on the calibration sample drops most when their
input is quantized per token instead of per tensor.

Calibration runs one decoder layer at a time, so a layer decides before the later ones are seen. A float
pass before calibration predicts the Linears the thresholds will make dynamic in every layer (its inputs'
``max|x|``); they are reserved, the rest of the budget is spread evenly over the layers (what earlier
layers left unspent carries forward), and inside a layer the groups with the largest drop per Linear come
first. The thresholds' choices are never undone: when the calibrated ``max|x|`` crosses a threshold the float
pass did not, the later layers' extra Linears shrink to make room, as far as they can.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["DynamicCandidate", "dynamic_allowance", "choose_dynamic", "dynamic_budget"]


@dataclass(frozen=True)
class DynamicCandidate:
    """A static group of Linears that could run dynamic instead: ``key`` names it for the caller,
    ``linears`` is what it costs, ``static_error`` and ``dynamic_error`` its quantized output errors
    (summed over its Linears) with a per-tensor and a per-token activation scale."""

    key: int
    linears: int
    static_error: float
    dynamic_error: float

    @property
    def gain(self) -> float:
        """Error removed per Linear of the budget."""
        return (self.static_error - self.dynamic_error) / max(self.linears, 1)


def dynamic_budget(share: float, total_linears: int) -> int:
    """Most Linears of the model that may run dynamic: ``floor(share * total_linears)``."""
    if not 0 <= share < 1:
        raise ValueError(f"dynamic share must be in [0, 1), got {share}")
    return math.floor(share * total_linears + 1e-9)


def dynamic_allowance(budget: int, layer_index: int, predicted: list[int], used: int, extras: int) -> int:
    """Dynamic Linears decoder layer ``layer_index`` may hold, those the thresholds choose included.

    ``predicted``: per layer, the Linears the thresholds are expected to make dynamic (from a float pass, before
    any layer is quantized); ``used``: the dynamic Linears of the layers before this one, ``extras`` of them
    chosen by error. What the thresholds leave of the budget is spread evenly over the layers (the unspent part
    of earlier layers carried forward), and never so far that the predicted Linears of this and the later layers
    would not fit."""
    n = len(predicted)
    if not 0 <= layer_index < n:
        raise ValueError(f"layer index {layer_index} is not in a model of {n} layers")
    spare = max(0, budget - sum(predicted))
    through = math.floor(spare * (layer_index + 1) / n + 1e-9)
    room = budget - used - sum(predicted[layer_index:])
    return predicted[layer_index] + max(0, min(through - extras, room))


def choose_dynamic(candidates: list[DynamicCandidate], allowance: int) -> list[int]:
    """Keys of the candidates to run dynamic with at most ``allowance`` Linears: largest gain per Linear
    first, a group that does not fit in what is left skipped for smaller ones; never one whose error would
    not drop."""
    chosen, left = [], allowance
    for c in sorted(candidates, key=lambda c: (-c.gain, c.key)):
        if c.gain <= 0:
            break
        if c.linears <= left:
            chosen.append(c.key)
            left -= c.linears
    return chosen

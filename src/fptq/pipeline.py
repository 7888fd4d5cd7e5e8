"""``fptq.quantize``: the layer-by-layer pipeline shared by every method.

For each decoder layer: collect input statistics of its Linears (float layer,
inputs = quantized outputs of the previous layer, or with ``calib_inputs="float"``
the float model's), decide each Linear's
activation strategy, fold equalization scales, quantize the weights (RTN or
GPTQ), pick static activation scales, replace the Linears with
:class:`~fptq.nn.QuantLinear`, and run the quantized layer to produce the
next layer's inputs (or, for float inputs, keep the float layer's outputs).
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .calibrate import (
    InputStats,
    LayerInputs,
    capture_layer0_inputs,
    collect_input_stats,
    execution_choices,
    float_pass_dtype,
    rows_per_batch,
    run_layer,
)
from .config import ActPolicy, QuantConfig, Strategy
from .dynamic_budget import DynamicCandidate, dynamic_allowance, dynamic_budget
from .errors import FptqError
from .folding import equalization_scales, fold_group, reorder_group, wants_equalization, wants_reorder
from .memory import trim_heap
from .models.adapters import Adapter, attention_heads, get_adapter
from .nn import QuantLinear
from .plan import LayerPlan, Plan
from .quant import (
    SAMPLED_OBSERVERS,
    choose_static_scale,
    gptq_quantize,
    quantize_weight,
    weight_scales,
)
from .quant.intscales import integer_group_scales
from .quant.reorder import permute_square
from .quant.weights import dequantize_weight, group_gram
from .residual import (
    float_pass_maxima,
    permute_residual_layer,
    permute_residual_outside,
    residual_channel_maxima,
    residual_inputs,
    residual_order,
    residual_problem,
)
from .rotation import prepare_rotation
from .strategies import (
    ACT_MODE,
    budget_candidate,
    scoring_inputs,
    search_power,
    search_rows,
    spend_dynamic_budget,
    strategy_for,
)

log = logging.getLogger(__name__)

__all__ = ["quantize", "quantize_layer", "LayerResult", "layer_generator"]

MAX_SAMPLE_ROWS = 8192


@dataclass
class LayerResult:
    """What ``on_layer_done`` receives after decoder layer ``index`` is quantized:
    the layer itself (its Linears are QuantLinears now) and the cached
    activations that feed the next layer."""

    index: int
    seconds: float
    entries: dict[str, LayerPlan]
    layer: nn.Module | None = None
    inputs: LayerInputs | None = None
    phases: dict[str, float] | None = None  # seconds: load, statistics, weights, propagate
    residual_perm: torch.Tensor | None = None  # the residual stream's order (config.residual_order), or None
    # per layer, the Linears the thresholds were predicted to make dynamic (config.dynamic_share), or None
    dynamic_prediction: list[int] | None = None


def layer_generator(seed: int, index: int) -> torch.Generator:
    """The random generator of decoder layer ``index``: a function of ``(seed, index)``
    only, so that a resumed run draws the same samples as an uninterrupted one."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63 - 1))


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _sort_residual(model: nn.Module, adapter: Adapter, inputs: LayerInputs, device: torch.device,
                   perm: torch.Tensor | None, load_layer, release_layer, start_layer: int,
                   maxima: torch.Tensor | None = None, pass_dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """``config.residual_order``: the order of the residual stream's channels (``perm``, that of a run being
    resumed, or measured on a float pass over a few of the captured ``inputs``: :mod:`fptq.residual`; its
    ``maxima`` when that pass already ran),
    applied to the tensors outside the decoder layers and to the captured layer-0 ``inputs``; each decoder
    layer is permuted when it is processed. ``None`` (the model left as it is, with a warning) when the
    architecture has no residual table."""
    problem = residual_problem(model, adapter)
    if problem:
        log.warning("residual stream left in its order: %s", problem)
        return None
    if perm is None:
        if start_layer:
            raise FptqError("resuming a run with residual_order needs the order it measured (residual_perm): the "
                            "first layers were quantized in it")
        if maxima is None:
            maxima = residual_channel_maxima(model, adapter, residual_inputs(inputs), device,
                                             load_layer=load_layer, release_layer=release_layer,
                                             compute_dtype=pass_dtype)
        perm = residual_order(maxima)
    perm = perm.cpu()
    permute_residual_outside(model, adapter, perm)
    for b, h in enumerate(inputs.hidden):  # one batch at a time: never two copies of the whole cache
        inputs.hidden[b] = h.index_select(-1, perm.to(h.device))
    return perm


def quantize_layer(
    layer: nn.Module,
    layer_prefix: str,
    adapter: Adapter,
    config: QuantConfig,
    inputs: LayerInputs,
    device: torch.device,
    heads: tuple[int, int],
    generator: torch.Generator,
    phases: dict[str, float] | None = None,
    dynamic_allowance: int | None = None,
) -> dict[str, LayerPlan]:
    """Quantize one decoder layer in place (its Linears become QuantLinears)
    and advance ``inputs`` to the next layer's inputs. Returns plan entries; ``phases`` (optional) receives
    the seconds of the statistics pass, of the weights (strategies, folds, GPTQ or round-to-nearest) and of the
    propagation pass. ``dynamic_allowance``: how many of the layer's Linears may run dynamic activations
    (``config.dynamic_share``, :mod:`fptq.dynamic_budget`); ``None``: the thresholds alone decide."""
    phases = {} if phases is None else phases
    t = time.perf_counter()
    linears = adapter.quantizable_linears(layer)
    reps = {g.consumers[0]: layer.get_submodule(g.consumers[0]) for g in adapter.groups}
    nb = len(inputs.hidden)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if config.calib_dtype == "bfloat16"
                else contextlib.nullcontext())
    seq_len = inputs.hidden[0].shape[1] if inputs.hidden and inputs.hidden[0].dim() == 3 else None
    with collect_input_stats(reps, rows_per_batch(MAX_SAMPLE_ROWS, nb), generator, hessian=config.gptq,
                             seq_len=seq_len, hessian_token_cap=config.gptq_token_cap,
                             hessian_first_token_weight=config.gptq_first_token_weight,
                             hessian_rows_per_batch=rows_per_batch(config.gptq_hessian_rows, nb)
                             if config.gptq_hessian_rows else 0,
                             hessian_dtype=config.gptq_hessian_dtype) as stats:
        with autocast:  # calibrated on float inputs: the float layer's outputs feed the next layer
            run_layer(layer, inputs, device, name=layer_prefix, replace=config.calib_inputs == "float", keep=False)
    del reps  # each float Linear is freed once its QuantLinear replaces it (below)
    phases["statistics"] = time.perf_counter() - t
    t = time.perf_counter()
    # activation-aware weight clipping scores the clip on sampled calibration inputs
    output_clip = config.weight_clip_search and config.weight_clip_objective == "output"
    for name, st in stats.items():
        if st.nonfinite:
            raise FptqError(f"non-finite values (NaN or Inf) in the input of {layer_prefix}.{name}")

    entries: dict[str, LayerPlan] = {}
    decisions = []
    candidates: list[DynamicCandidate] = []  # static groups that could spend the dynamic budget
    for group in adapter.groups:
        st: InputStats = stats[group.consumers[0]]
        wcm = st.channel_max_matrix()
        absmax = wcm.amax(dim=0)
        v = float(absmax.max())
        strategy = strategy_for(config, v)
        sample = st.sample() if config.static_observer in SAMPLED_OBSERVERS or output_clip else None
        hess = st.hessian.h if st.hessian is not None else None
        first_max = st.first_token_absmax  # the attention sink's inputs, per channel
        eq_name, folded_into, max_scale, note, power, reordered = "none", None, None, None, None, False
        static_error, candidate = None, None
        budgeted = dynamic_allowance is not None and strategy in (Strategy.STATIC, Strategy.LAE_STATIC)
        wants = wants_equalization(config, strategy, group)
        if wants and not group.foldable:
            note = f"not equalized: {group.note}"
            if strategy == Strategy.LAE_STATIC:
                strategy = Strategy.DYNAMIC
                note += "; dynamic per-token activations instead of LAE + static"
        elif wants:
            stat = absmax if config.equalization_stat == "absmax" else st.channel_range().to(absmax.device)
            s_in, s_out = equalization_scales(config, group, layer, stat, heads)
            s_in = s_in.to(absmax.device)
            # both searches score the weights before the fold, on one sample and its float outputs
            scored = scoring_inputs(group, layer, st) if config.equalization_powers or budgeted else None
            if config.equalization_powers:
                power, static_error = search_power(config, group, scored, s_in, strategy)
                s_in, s_out = s_in.pow(power), s_out.pow(power)
            if budgeted:
                candidate = budget_candidate(config, group, scored, s_in, len(decisions), static_error)
            del scored
            fold_group(adapter, group, layer, layer_prefix, s_in, s_out, heads)
            wcm = wcm / s_in
            absmax = wcm.amax(dim=0)
            if sample is not None and sample.numel():
                sample = sample / s_in
            if first_max is not None:
                first_max = first_max.to(s_in.device) / s_in
            if hess is not None:  # in place: the accumulator's copy is not needed any more (one K x K less)
                inv = (1.0 / s_in).to(hess.device)
                with torch.inference_mode(hess.is_inference()):  # accumulated under inference mode
                    hess = hess.mul_(inv.view(-1, 1)).mul_(inv.view(1, -1))
            eq_name = config.equalization.value
            folded_into = f"{layer_prefix}.{group.producer}"
            max_scale = float(s_in.max())
        if budgeted and eq_name == "none":
            candidate = budget_candidate(config, group, scoring_inputs(group, layer, st), None, len(decisions), None)
        if candidate is not None:
            candidates.append(candidate)
        if wants_reorder(config, group):
            perm = reorder_group(group, layer)
            wcm, absmax = wcm[:, perm.to(wcm.device)], absmax[perm.to(absmax.device)]
            if sample is not None and sample.numel():
                sample = sample[:, perm.to(sample.device)]
            if first_max is not None:
                first_max = first_max[perm.to(first_max.device)]
            if hess is not None:
                with torch.inference_mode(hess.is_inference()):
                    hess = permute_square(hess, perm)
            reordered = True

        decisions.append((group, strategy, v, wcm, absmax, sample, hess, eq_name, folded_into, max_scale, note,
                          first_max, power, reordered, candidate))

    for st in stats.values():  # the decisions hold the Hessians they need; each is freed after its group
        st.hessian = None
    if dynamic_allowance is not None:
        spend_dynamic_budget(decisions, candidates, dynamic_allowance, layer_prefix)
    # quantize only after every fold of the layer is done (folds change producers' weights)
    decisions.reverse()
    while decisions:
        (group, strategy, v, wcm, absmax, sample, hess, eq_name, folded_into, max_scale, note,
         first_max, power, reordered, candidate) = decisions.pop()
        gs = config.group_size if config.group_size > 0 else -1
        gram = None
        quantized = {}
        ws = {c: linears[c].weight.detach().float() for c in group.consumers}
        gptq_out = {}
        if config.gptq and hess is not None:
            # GPTQ treats every output row on its own given the input's Hessian: the group's consumers
            # (q/k/v, gate/up) run as one stacked matrix, one factorisation and one column loop for all. It runs
            # where the layer's weights are (the GPU with --device cuda: its K x K factorisations and the
            # error feed-forward's products: 34 s of a 7B-shaped layer's 78 s of weight time on 2 CPU cores)
            hess = hess.to(next(iter(ws.values())).device)
            codes, scales, ok = gptq_quantize(
                list(ws.values()), hess, config.wbits, gs, block_size=config.gptq_block_size,
                damp=config.gptq_damp, act_order=config.gptq_act_order,
                static_groups=config.gptq_static_groups, clip_search=config.weight_clip_search,
                scale_rounding=config.rounding_for(gptq=True), clip_objective=config.weight_clip_objective,
                scale_sign=config.weight_scale_sign, clip_rows=config.weight_clip_rows,
                group_scales=config.group_scales,
            )
            if not ok:
                log.warning("GPTQ fell back to round-to-nearest for %s.{%s}", layer_prefix, ",".join(ws))
            rows = [w.shape[0] for w in ws.values()]
            for cname, c, sc in zip(ws, codes.split(rows), scales.split(rows)):
                gptq_out[cname] = (c, sc, "gptq" if ok else "gptq-fallback-rtn")
        for cname, w in ws.items():
            if cname in gptq_out:
                codes, scales, weight_method = gptq_out[cname]
                codes, scales = codes.to(w.device), scales.to(w.device)
            else:
                weight_method = "rtn"
                if gram is None and output_clip and sample is not None and sample.numel():
                    gram = group_gram(sample.to(w.device), gs)  # once per group: its consumers share the input
                codes, scales = rtn_weight_codes(w, config, gs, gram)
            deq = dequantize_weight(codes, scales, gs)
            rel_err = relative_weight_error(w, deq)
            # the dequantized weights are kept only for the observer that scores through them
            quantized[cname] = (codes, scales, deq if config.static_observer == "output" else None, weight_method,
                                rel_err)
            del deq
        act_scale = None
        if strategy in (Strategy.STATIC, Strategy.LAE_STATIC):
            weight = None
            if config.static_observer == "output":  # scored through the weights as they will run
                weight = torch.cat([q[2] for q in quantized.values()])
                sample = search_rows(sample)
            act_scale = choose_static_scale(
                config.static_observer, float(absmax.max()), sample=sample,
                window_maxes=wcm.amax(dim=1), bits=config.abits, weight=weight,
                floor=float(first_max.max()) if first_max is not None else 0.0,
            )
        act_mode = ACT_MODE[strategy]
        for cname in group.consumers:
            lin = linears[cname]
            codes, scales, _, weight_method, rel_err = quantized[cname]
            q = QuantLinear.from_codes(
                codes, scales, wbits=config.wbits, group_size=gs, abits=config.abits, act_mode=act_mode,
                act_scale=act_scale, bias=lin.bias, dtype=lin.weight.dtype,
            )
            _set_submodule(layer, cname, q)
            del linears[cname]  # nothing refers to the float Linear now: its weights are freed
            entries[f"{layer_prefix}.{cname}"] = LayerPlan(
                strategy=strategy.value, act_absmax=v, in_features=lin.in_features,
                out_features=lin.out_features, wbits=config.wbits,
                abits=config.abits if strategy != Strategy.FLOAT else 16, group_size=gs,
                act_scale=act_scale, act_absmax_equalized=float(absmax.max()) if eq_name != "none" else None,
                equalization=eq_name, equalization_folded_into=folded_into, equalization_note=note,
                equalization_max_scale=max_scale, equalization_power=power, channels_reordered=reordered,
                observer=config.static_observer if act_scale is not None else None,
                weight_method=weight_method, weight_error=rel_err,
                static_error=candidate.static_error if candidate is not None else None,
                dynamic_error=candidate.dynamic_error if candidate is not None else None,
            )
        # nothing of this group's float weights, codes or Hessian outlives it (the next group's GPTQ needs the room),
        # and the C heap hands back what they took (it would keep the freed pages resident)
        del ws, w, lin, q, quantized, gptq_out, codes, scales, hess, sample, gram
        trim_heap()
    phases["weights"] = time.perf_counter() - t
    t = time.perf_counter()
    if config.calib_inputs == "float":
        return entries  # the statistics pass already wrote the float layer's outputs into ``inputs``
    qlinears = [m for m in layer.modules() if isinstance(m, QuantLinear)]
    if config.propagate_backend != "reference":
        for m in qlinears:
            m.set_backend(config.propagate_backend)
    try:
        run_layer(layer, inputs, device, name=layer_prefix, replace=True)
    finally:
        for m in qlinears:  # back to the simulated path and the checkpoint's layout; caches rebuilt on demand
            m.set_backend("reference")
            m.use_rowpair_layout()
            m.clear_cache()
        phases["propagate"] = time.perf_counter() - t
    return entries


def rtn_weight_codes(w: torch.Tensor, config: QuantConfig, gs: int,
                     gram: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest codes and float16 scales of ``w`` as ``config`` asks (clip search, scale rounding,
    integer group scales)."""
    if config.group_scales == "integer":
        scales = integer_group_scales(w, gs, config.wbits).to(w.device)
    else:
        scales = weight_scales(w, config.wbits, gs, clip_search=config.weight_clip_search, gram=gram,
                               rounding=config.rounding_for(gptq=False), sign=config.weight_scale_sign)
    return quantize_weight(w, scales, config.wbits, gs), scales


def relative_weight_error(w: torch.Tensor, deq: torch.Tensor) -> float:
    """Relative Frobenius error of the quantized weight (the plan's ``weight_error``)."""
    return float((deq - w).norm() / w.norm().clamp_min(1e-12))


def quantize_layer_weights(layer: nn.Module, layer_prefix: str, adapter: Adapter,
                           config: QuantConfig) -> dict[str, LayerPlan]:
    """Data-free path (``not config.needs_calibration``): every Linear of the layer gets round-to-nearest
    weights and float activations, exactly as :func:`quantize_layer` gives them, without running the layer."""
    gs = config.group_size if config.group_size > 0 else -1
    entries: dict[str, LayerPlan] = {}
    for cname, lin in adapter.quantizable_linears(layer).items():
        w = lin.weight.detach().float()
        codes, scales = rtn_weight_codes(w, config, gs)
        rel_err = relative_weight_error(w, dequantize_weight(codes, scales, gs))
        _set_submodule(layer, cname, QuantLinear.from_codes(
            codes, scales, wbits=config.wbits, group_size=gs, abits=config.abits, act_mode="none",
            bias=lin.bias, dtype=lin.weight.dtype))
        entries[f"{layer_prefix}.{cname}"] = LayerPlan(
            strategy=Strategy.FLOAT.value, act_absmax=float("nan"), in_features=lin.in_features,
            out_features=lin.out_features, wbits=config.wbits, abits=16, group_size=gs, weight_method="rtn",
            weight_error=rel_err)
    return entries


def _replace_hidden(inputs: LayerInputs, hidden: list[torch.Tensor]) -> None:
    """Swap in cached activations (a resumed run), checking they fit the calibration batches."""
    if len(hidden) != len(inputs.hidden) or any(
        h.shape != c.shape or h.dtype != c.dtype for h, c in zip(hidden, inputs.hidden)
    ):
        raise FptqError("the cached activations of the unfinished run do not match the calibration batches; "
                        "pass --force to start over")
    inputs.hidden = [h.to(c.device) for h, c in zip(hidden, inputs.hidden)]


def offload_device(offload: bool | str | None, device: torch.device) -> torch.device:
    """Where the cached calibration activations live: ``device`` (no offload), the CPU (``True``), or the named device."""
    if offload is None or offload is False:
        return device
    if offload is True:
        return torch.device("cpu")
    try:
        store = torch.device(offload)
    except (RuntimeError, TypeError) as e:
        raise FptqError(f"--offload {offload!r} is not a device; use cpu, cuda or cuda:N") from e
    if store.type == "cuda":
        if not torch.cuda.is_available():
            raise FptqError(f"--offload {offload} asks for a CUDA device but none is available; use --offload cpu")
        if store.index is not None and store.index >= torch.cuda.device_count():
            raise FptqError(f"--offload {offload}: there are only {torch.cuda.device_count()} CUDA devices")
    return store


def quantize(
    model: nn.Module,
    config: QuantConfig,
    calibration: torch.Tensor,
    *,
    device: str | torch.device | None = None,
    batch_size: int = 8,
    offload: bool | str = False,
    seed: int = 0,
    progress: bool = True,
    on_layer_done: Callable[[LayerResult], None] | None = None,
    start_layer: int = 0,
    resume_hidden: list[torch.Tensor] | None = None,
    load_layer: Callable[[int, nn.Module], None] | None = None,
    release_layer: Callable[[int, nn.Module], None] | None = None,
    residual_perm: torch.Tensor | None = None,
    dynamic_prediction: list[int] | None = None,
    dynamic_spent: tuple[int, int] = (0, 0),
) -> Plan:
    """Quantize ``model`` in place with ``config``; return the :class:`Plan`.

    ``calibration`` is a ``[n, seqlen]`` tensor of token ids (see
    :func:`fptq.data.calibration_windows`). Decoder layers are moved to
    ``device`` one at a time; the cached activations live on ``device`` too,
    or elsewhere with ``offload``: ``True`` (the CPU) or a device name (e.g.
    ``"cuda:1"``: the layer runs on ``device``, its cached inputs and outputs
    stay on that other device). Each layer draws its random samples from
    :func:`layer_generator` ``(seed, index)``.

    Resuming: ``start_layer`` skips the layers before it (the returned plan
    holds only the layers processed here) and ``resume_hidden`` are the
    cached inputs of layer ``start_layer``, one tensor per batch.
    ``load_layer(i, layer)`` is called right before layer ``i`` is processed
    (to load its weights from disk); ``on_layer_done`` right after.

    ``config.residual_order`` measures the order on a float pass over the
    layers first (loading each with ``load_layer`` and dropping it with
    ``release_layer(i, layer)`` when given); a resumed run passes the order
    it was quantized in as ``residual_perm`` (every :class:`LayerResult`
    carries it). Layers before ``start_layer`` are not touched.

    ``config.rotation`` turns the model by orthogonal matrices folded into its
    weights before anything else (:mod:`fptq.rotation`): all of it now when it
    is in memory, each layer right after ``load_layer`` otherwise (the writer
    then turns the final norm and ``lm_head``: :func:`fptq.rotation.rotated_outside_entries`).

    ``config.dynamic_share`` spreads a budget of dynamic Linears over the layers
    (:mod:`fptq.dynamic_budget`), with the thresholds' choices predicted on a
    float pass; a resumed run passes that prediction (every :class:`LayerResult`
    carries it) as ``dynamic_prediction``, and as ``dynamic_spent`` the dynamic
    Linears of the layers before ``start_layer`` and how many of them were chosen
    by error.
    """
    adapter = get_adapter(model)
    if adapter.generic:
        log.warning("model type %r is not in fptq's architecture table; its decoder layers are shaped like LLaMA's, "
                    "so it is quantized with the LLaMA table (check the result)", adapter.model_types[0])
    if config.equalize_into == "norms":
        adapter = adapter.with_unfoldable({g.producer for g in adapter.groups if g.kind not in ("norm", "none")},
                                          "equalize_into='norms' leaves out Linear producers")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FptqError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2:
        raise FptqError("calibration must be a [num_windows, seqlen] tensor of token ids")
    config = execution_choices(config, device)
    plan = Plan(thresholds=config.thresholds, config=config.to_dict())
    layers = adapter.layers(model)
    heads = attention_heads(model)

    if not config.quantize_weights:
        if config.quantize_acts:
            raise FptqError("activation-only quantization (--wbits 16 with --abits 8) is not supported")
        for i, layer in enumerate(layers):
            for cname, lin in adapter.quantizable_linears(layer).items():
                plan.layers[f"{adapter.layers_path}.{i}.{cname}"] = LayerPlan(
                    strategy=Strategy.FLOAT.value, act_absmax=float("nan"), in_features=lin.in_features,
                    out_features=lin.out_features, wbits=16, abits=16, weight_method="float",
                )
        return plan

    was_training = model.training
    model.eval()
    # config.rotation first: everything after it (the float pass, the order, calibration) sees the rotated model
    _, load_layer = prepare_rotation(model, adapter, config.rotation, config.rotation_seed, load_layer)
    store = offload_device(offload, device)
    data_free = not config.needs_calibration
    # data-free (weight-only round-to-nearest): no activations are captured or propagated
    inputs = (LayerInputs(hidden=[], kwargs=[]) if data_free
              else capture_layer0_inputs(model, adapter, calibration, batch_size, device, store))
    budget = None
    if config.dynamic_share > 0 and config.quantize_acts and config.act_policy == ActPolicy.THRESHOLDS:
        budget = dynamic_budget(config.dynamic_share,
                                sum(len(adapter.quantizable_linears(layer)) for layer in layers))
    maxima = None  # one float pass serves the residual order and the budget's prediction
    pass_dtype = float_pass_dtype(config, next(iter(model.parameters())).dtype)
    if budget is not None and dynamic_prediction is None:
        if start_layer:
            raise FptqError("resuming a run with dynamic_share needs the prediction it made (dynamic_prediction)")
        maxima = float_pass_maxima(model, adapter, residual_inputs(inputs), device, load_layer=load_layer,
                                   release_layer=release_layer, compute_dtype=pass_dtype)
        dynamic_prediction = [sum(len(g.consumers) for g, v in zip(adapter.groups, row)
                                  if strategy_for(config, v) == Strategy.DYNAMIC) for row in maxima[1]]
        log.info("dynamic budget: %d Linears; the thresholds predicted to take %d", budget, sum(dynamic_prediction))
    perm = None
    if config.residual_order != "none" and not data_free:
        perm = _sort_residual(model, adapter, inputs, device, residual_perm, load_layer, release_layer, start_layer,
                              maxima[0] if maxima is not None else None, pass_dtype)
    if resume_hidden is not None:
        _replace_hidden(inputs, resume_hidden)
    dynamic_used, dynamic_extras = dynamic_spent
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(layers), initial=start_layer, desc=f"fptq {config.method}", unit="layer")
    try:
        for i, layer in enumerate(layers):
            if i < start_layer:
                continue
            t0 = time.perf_counter()
            if load_layer is not None:
                load_layer(i, layer)
            if perm is not None:
                permute_residual_layer(layer, adapter, perm)
            layer_device = next(layer.parameters()).device
            layer.to(device)
            phases = {"load": time.perf_counter() - t0}
            inputs.layer_index = i
            prefix = f"{adapter.layers_path}.{i}"
            allowance = (dynamic_allowance(budget, i, dynamic_prediction, dynamic_used, dynamic_extras)
                         if budget is not None else None)
            entries = (quantize_layer_weights(layer, prefix, adapter, config) if data_free else
                       quantize_layer(layer, prefix, adapter, config, inputs, device, heads, layer_generator(seed, i),
                                      phases, allowance))
            dynamic_used += sum(e.strategy == Strategy.DYNAMIC.value for e in entries.values())
            dynamic_extras += sum(e.chosen_dynamic for e in entries.values())
            layer.to(layer_device)
            plan.layers.update(entries)
            res = LayerResult(i, time.perf_counter() - t0, entries, layer, inputs, phases, perm,
                              dynamic_prediction if budget is not None else None)
            if on_layer_done is not None:
                on_layer_done(res)
            if bar is not None:
                c = plan.counts()
                bar.set_postfix({k.split("_")[0] if k != "lae_static_tensor" else "lae": n for k, n in c.items()})
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    model.train(was_training)
    return plan

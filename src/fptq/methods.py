"""Named methods: presets of :class:`QuantConfig` sharing one pipeline (what each sets and when to use it: the
table in docs/methods.md)."""
from __future__ import annotations

from typing import Any

from .config import ActPolicy, Equalization, QuantConfig

_PRESETS: dict[str, dict[str, Any]] = {
    # (every preset in one table: docs/methods.md)
    # FPTQ as fptq runs it by default (docs/results/defaults.md): the paper's layer-wise
    # static / LAE + static / dynamic structure; LAE on every static layer too; static scales from the
    # calibration max, which never clips the attention sink (the MSE clip did: 52.60 vs 46.25 WikiText-2 ppl
    # on Qwen2.5-Coder-0.5B); GPTQ weights on the equalized layer from Hessians of 8192 sampled rows, columns
    # in act-order (KL divergence 0.27 vs 0.34 on SmolLM2-135M, bench/results/smol_fast_levers.md); the
    # statistics pass in bfloat16 and the next layer's inputs from the integer kernels, as the model will run
    # (1.8x faster at the same accuracy, bench/results/smol_speed_levers.md); each weight group's scale from a
    # clip search on its squared error before GPTQ (KL divergence -10% to -12% on SmolLM2-135M in two
    # calibration draws; at best neutral on Qwen2.5-Coder-0.5B, whose WikiText-2 perplexity rose 4.4% / 4.9%;
    # bench/results/peer_full_*.md, {smol,qwen}_fptq_clip{,_seed1}.md)
    # Since 2026-12-05: the LAE power of each group of Linears searched among 0, 0.5, 1 on its quantized
    # output error, and the channels between up/gate_proj and down_proj sorted by down_proj's weight columns
    # (KL divergence -25% / -30% on Qwen2.5-Coder-0.5B, -13% / -10% on SmolLM2-135M, every measure lower on
    # both; bench/results/fptq_default_{smol,qwen}_20.md, {qwen,smol}_reorder.md, docs/results/defaults.md)
    # Since 2026-12-05 (third session): the residual stream's channels sorted by their largest |x| at the
    # norms' outputs, and each weight group's scale its signed extreme / -8 (llama.cpp's Q4_0 rule) (every
    # measure lower on both models, KL divergence -21% / -27% on Qwen2.5-Coder-0.5B, -9% / -14% on SmolLM2-135M, 20 + 20 windows;
    # bench/results/fptq_residual_signed_{qwen,smol}_20.md, docs/results/defaults.md); and the GPTQ Hessians
    # from every calibration token instead of 8192 sampled rows (KL divergence -12% / -12% on Qwen2.5 at 1.4x
    # the quantize time, -2% / -0% on SmolLM2 at 1.14x; bench/results/{qwen,smol}_default3_levers.md)
    # Since 2026-12-05 (fifth session): up to 10% of the Linears dynamic, those whose calibration output error
    # drops most (fptq.dynamic_budget; KL divergence -4.9% / -2.9% on Qwen2.5-Coder-0.5B, -3.8% / -6.9% on
    # SmolLM2-135M, 20 + 20 windows, every SmolLM2 measure lower, Qwen2.5's C4 perplexity +0.2%;
    # bench/results/fptq_default4_{qwen,smol}_20.md, {qwen,smol}_dynamic_share.md; docs/results/defaults.md)
    # Since 2026-12-06: the residual stream turned by a randomized Hadamard matrix folded into the weights
    # (fptq.rotation); KL divergence -40% / -25% on Qwen2.5-Coder-0.5B, -20% / -15% on SmolLM2-135M (8 + 8
    # windows; bench/results/rotation_{qwen,smollm2}.md; docs/results/defaults.md)
    # Since 2026-12-06 (twelfth session): every attention head's values turned as well ("residual+heads"):
    # Qwen2.5-Coder-0.5B below llm-compressor's GPTQ W4A16 on all four measures (WikiText-2 ppl -1.2%, KL
    # divergence -5% / -2% against "residual"), SmolLM2-135M level over three rotation seeds (mean WikiText-2
    # ppl +0.1%, C4 -0.3%, KL divergence +0.4% / -2.0%); 20 + 20 windows, bench/results/fptq_levers11_*_20.md,
    # fptq_seeds12_smol_20.md, docs/results/defaults.md
    "fptq": dict(act_policy=ActPolicy.THRESHOLDS, equalization=Equalization.LAE, static_observer="max",
                 gptq=True, gptq_hessian_rows=0, gptq_act_order=True, weight_clip_search=True,
                 equalization_powers=(0.0, 0.5, 1.0), channel_order="weight", residual_order="max",
                 weight_scale_sign="signed", calib_dtype="bfloat16", propagate_backend="auto", dynamic_share=0.1,
                 rotation="residual+heads"),
    # the paper's recipe as published: LAE only in the band 15 <= max|x| < 150, static scales from the
    # calibration max, round-to-nearest weights
    "fptq-paper": dict(act_policy=ActPolicy.THRESHOLDS, equalization=Equalization.LAE, lae_scope="band",
                       static_observer="max"),
    "fp": dict(wbits=16, abits=16, act_policy=ActPolicy.FLOAT, equalization=Equalization.NONE),
    "rtn-w4a16": dict(abits=16, act_policy=ActPolicy.FLOAT, equalization=Equalization.NONE),
    # GPTQ in act-order, as llm-compressor's GPTQModifier by default ("static": group scales from the weights
    # before GPTQ): KLD 0.23 vs 0.38 in column order on SmolLM2-135M (bench/results/smol_gptq_scale_rounding.md)
    "gptq-w4a16": dict(abits=16, act_policy=ActPolicy.FLOAT, equalization=Equalization.NONE, gptq=True,
                       gptq_act_order=True),
    "smoothquant-w8a8": dict(
        wbits=8, group_size=-1, act_policy=ActPolicy.DYNAMIC, equalization=Equalization.SMOOTHQUANT
    ),
    # every input static per tensor, scales from the mean of the calibration windows' maxima: it keeps the
    # attention sink (present in every window) and clips rare outliers. The `mse` clip was 42.20 vs 37.16
    # WikiText-2 ppl on Qwen2.5-Coder-0.5B, `max` 47.38 (bench/results/qwen_naive_observer*.md); on SmolLM2 mse
    # is better (44.36 vs 53.86, bench/results/smol_naive_observer.md) but mean_max still ahead of llm-compressor
    "naive-w4a8": dict(act_policy=ActPolicy.STATIC, equalization=Equalization.NONE, static_observer="mean_max"),
    "dynamic-w4a8": dict(act_policy=ActPolicy.DYNAMIC, equalization=Equalization.NONE),
    # llm-compressor's log-equalization recipe: LAE folded into the norms only, as its mappings do (folding it
    # into up_proj -> down_proj too, where max|x| reaches thousands, costs 7% perplexity on SmolLM2-135M,
    # bench/results/lae_producers.md), with scales from max(x) - min(x) per channel, the statistic of its
    # smoothing modifiers (26.25 vs 26.90 from max|x| on SmolLM2-135M, bench/results/exp_gptq_sink.md)
    # Each layer is calibrated on the float model's activations, as llm-compressor's sequential pipeline does
    # for round-to-nearest recipes (it runs with fake quantization off): that difference, not the scale
    # rounding, was the KL-divergence gap on Qwen2.5-Coder-0.5B (bench/results/qwen_logeq_floatin_seed*.md)
    "lae-dynamic-w4a8": dict(act_policy=ActPolicy.DYNAMIC, equalization=Equalization.LAE, equalize_into="norms",
                             equalization_stat="range", calib_inputs="float"),
    # quantization-aware training (fptq.qat): the plan of the base method in QAT_BASE, then knowledge distillation
    # from the float model on data the model generates itself. LLM-QAT (arXiv 2305.17888): per-channel int4
    # weights, dynamic per-token int8 activations
    "llm-qat-w4a8": dict(act_policy=ActPolicy.DYNAMIC, equalization=Equalization.NONE, group_size=-1),
    # fptq-qat starts from FPTQ's plan with round-to-nearest weights (training replaces them) and the MSE
    # observer it was measured with (bench/results/qat.md)
    "fptq-qat": dict(act_policy=ActPolicy.THRESHOLDS, equalization=Equalization.LAE),
}

METHODS = tuple(_PRESETS)
# QAT method -> the PTQ method whose plan it starts from
QAT_BASE = {"llm-qat-w4a8": "dynamic-w4a8", "fptq-qat": "fptq"}


def method_config(name: str, **overrides: Any) -> QuantConfig:
    """The :class:`QuantConfig` of method ``name`` with ``overrides`` applied."""
    if name not in _PRESETS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    kwargs = dict(_PRESETS[name])
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    if name in QAT_BASE and kwargs.get("group_scales", "float") != "float":
        raise ValueError(f"--group-scales integer is for post-training quantization; {name} trains its own "
                         "float16 scales")
    return QuantConfig(method=name, **kwargs)

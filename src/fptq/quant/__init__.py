"""Pure tensor maths: quantizers, packing, equalization scales, GPTQ."""
from .activations import (
    act_qmax,
    fake_quantize_per_token,
    fake_quantize_static,
    quantize_per_token,
    quantize_static,
)
from .equalize import (
    expand_kv_scales,
    fold_into_fused_qkv_v,
    fold_into_linear_outputs,
    fold_into_norm,
    lae_scales,
    norm_fold_is_exact,
    reduce_to_kv_channels,
    scale_linear_inputs,
    smoothquant_scales,
)
from .gptq import HessianAccumulator, gptq_quantize
from .pack import pack_int4, pack_int4_vnni, unpack_int4, unpack_int4_vnni, vnni_padded_shape
from .static_scale import OBSERVERS, SAMPLED_OBSERVERS, choose_static_scale
from .weights import (
    dequantize_weight,
    expand_group_scales,
    fake_quantize_weight,
    num_groups,
    qrange,
    quantize_weight,
    weight_scales,
)

__all__ = [name for name in dir() if not name.startswith("_")]

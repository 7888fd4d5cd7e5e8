import math

import torch

from fptq.quant import (
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


def test_lae_formula():
    m = torch.tensor([0.0, 1.0, 14.0, 100.0])
    s = lae_scales(m)
    assert s[0] == 1.0  # dead channel untouched
    for i in (1, 2, 3):
        assert math.isclose(float(s[i]), float(m[i]) / math.log2(2 + float(m[i])), rel_tol=1e-6)
    # after equalization a channel's max is log2(2 + m): compressed, order preserved
    eq = m[1:] / s[1:]
    torch.testing.assert_close(eq, torch.log2(2 + m[1:]))


def test_smoothquant_formula():
    a, w = torch.tensor([4.0, 9.0]), torch.tensor([1.0, 4.0])
    torch.testing.assert_close(smoothquant_scales(a, w, 0.5), torch.tensor([2.0, 1.5]))


def test_fold_into_rmsnorm_and_linear_keeps_outputs():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
    lin = torch.nn.Linear(16, 8)
    x = torch.randn(3, 16)
    ref = lin(norm(x))
    s = torch.rand(16) * 10 + 0.1
    fold_into_norm(norm, s)
    scale_linear_inputs(lin, s)
    torch.testing.assert_close(lin(norm(x)), ref, rtol=1e-5, atol=1e-5)


def test_fold_into_producing_linear_keeps_outputs():
    torch.manual_seed(0)
    up, down = torch.nn.Linear(8, 12), torch.nn.Linear(12, 4)
    x = torch.randn(5, 8)
    ref = down(up(x) * 0.5)
    s = torch.rand(12) * 5 + 0.2
    fold_into_linear_outputs(up, s)
    scale_linear_inputs(down, s)
    torch.testing.assert_close(down(up(x) * 0.5), ref, rtol=1e-5, atol=1e-5)


def test_kv_channel_reduce_expand():
    h, kv, d = 6, 2, 3
    absmax = torch.arange(h * d, dtype=torch.float32)
    r = reduce_to_kv_channels(absmax, h, kv)
    assert r.shape == (kv * d,)
    # heads 0-2 share kv head 0: max over them is head 2's channel values
    assert r[:d].tolist() == absmax[2 * d: 3 * d].tolist()
    e = expand_kv_scales(r, h, kv)
    assert e.shape == (h * d,) and e[:d].tolist() == e[2 * d: 3 * d].tolist()


def test_fused_qkv_v_fold_divides_only_the_value_rows():
    """BLOOM's rows are [head, (q, k, v), head_dim]: attention output channel h * d + j is value row j of head h."""
    heads, d, k = 3, 4, 8
    lin = torch.nn.Linear(k, 3 * heads * d)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    s = torch.rand(heads * d) * 10 + 0.5
    fold_into_fused_qkv_v(lin, s, heads)
    w, b = lin.weight.view(heads, 3, d, k), lin.bias.view(heads, 3, d)
    assert torch.equal(w[:, :2], w0.view(heads, 3, d, k)[:, :2]) and torch.equal(b[:, :2], b0.view(heads, 3, d)[:, :2])
    torch.testing.assert_close(w[:, 2], w0.view(heads, 3, d, k)[:, 2] / s.view(heads, d, 1))
    torch.testing.assert_close(b[:, 2], b0.view(heads, 3, d)[:, 2] / s.view(heads, d))


def test_norm_fold_check_catches_a_wrong_weight_offset():
    class OnePlusWeightNorm(torch.nn.Module):  # Gemma's RMSNorm: scales by 1 + weight
        def __init__(self, n):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.rand(n) - 0.5)

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)

    s = torch.rand(16) * 10 + 0.5
    gemma_like, layer_norm = OnePlusWeightNorm(16), torch.nn.LayerNorm(16)
    assert norm_fold_is_exact(gemma_like, s, 1.0) and not norm_fold_is_exact(gemma_like, s, 0.0)
    assert norm_fold_is_exact(layer_norm, s, 0.0) and not norm_fold_is_exact(layer_norm, s, 1.0)
    w = gemma_like.weight.detach().clone()
    norm_fold_is_exact(gemma_like, s, 1.0)
    assert torch.equal(gemma_like.weight, w)  # the check works on a copy

"""Reordering the channels between Linears (quant/reorder.py) and its use in the pipeline."""
import copy

import pytest
import torch

import fptq
from fptq.folding import reorder_group
from fptq.models import get_adapter
from fptq.quant.reorder import channel_order, permute_square
from fptq.quant.weights import dequantize_weight, quantize_weight, weight_scales

from ..conftest import sqnr_db, tiny_llama


def test_channel_order_sorts_columns_by_their_size_over_every_matrix():
    a = torch.tensor([[1.0, 0.0, 3.0, 0.5]])
    b = torch.tensor([[0.0, 2.0, 0.0, 0.5], [0.0, 2.0, 0.0, 0.0]])
    # column energies: 1, 8, 9, 0.5
    assert channel_order([a, b]).tolist() == [2, 1, 0, 3]
    assert channel_order([torch.ones(2, 5)]).tolist() == [0, 1, 2, 3, 4]  # ties keep their order
    with pytest.raises(ValueError, match="same number of columns"):
        channel_order([a, torch.ones(1, 3)])
    g = torch.Generator().manual_seed(0)
    ws, sc = [torch.randn(6, 40, generator=g), torch.randn(3, 40, generator=g)], torch.rand(40, generator=g) * 9
    assert torch.equal(channel_order(ws, sc), channel_order([w * sc for w in ws]))  # scaled one at a time


@pytest.mark.parametrize("k", [1, 7, 1500])
def test_permute_square_is_the_permuted_matrix_in_place(k):
    g = torch.Generator().manual_seed(k)
    h = torch.randn(k, k, generator=g)
    perm = torch.randperm(k, generator=g)
    want = h[perm][:, perm].clone()
    out = permute_square(h, perm, chunk=64)
    assert out.data_ptr() == h.data_ptr()
    assert torch.equal(out, want)


def test_reordering_an_mlp_keeps_the_layer_function():
    model = tiny_llama()
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits
    adapter = get_adapter(model)
    group = next(g for g in adapter.groups if g.reorderable)
    assert group.consumers == ("mlp.down_proj",) and group.partners == ("mlp.gate_proj",)
    for layer in adapter.layers(model):
        before = layer.mlp.down_proj.weight.detach().clone()
        perm = reorder_group(group, layer)
        assert sorted(perm.tolist()) == list(range(before.shape[1])) and perm.tolist() != sorted(perm.tolist())
        torch.testing.assert_close(layer.mlp.down_proj.weight, before[:, perm])
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_sorted_channels_lower_the_group_quantization_error_of_equalized_weights():
    """A few large columns (as LAE's scales make them) spread over every group cost each group its levels;
    sorted together they cost one group."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=g)
    w[:, torch.randperm(256, generator=g)[:8]] *= 12

    def err(m):
        s = weight_scales(m, 4, 32)
        return float((dequantize_weight(quantize_weight(m, s, 4, 32), s, 32) - m).pow(2).sum())

    assert err(w[:, channel_order([w])]) < 0.6 * err(w)


def test_pipeline_reorders_the_mlp_channels_and_stays_accurate():
    model = tiny_llama(hidden_size=64, intermediate_size=256)
    ids = torch.randint(0, 300, (16, 32), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits
    out, plans = {}, {}
    for order in ("none", "weight"):
        m = copy.deepcopy(model)
        cfg = fptq.method_config("fptq", group_size=32, thresholds=(2.0, 20.0), channel_order=order)
        plans[order] = fptq.quantize(m, cfg, ids, device="cpu", progress=False)
        out[order] = sqnr_db(ref, m(ids).logits)
    assert all(lp.channels_reordered == k.endswith("down_proj") for k, lp in plans["weight"].layers.items())
    assert not any(lp.channels_reordered for lp in plans["none"].layers.values())
    # the plan says so after a round trip through JSON
    again = fptq.Plan.from_dict(plans["weight"].to_dict())
    assert again.layers["model.layers.0.mlp.down_proj"].channels_reordered
    assert out["weight"] > 8 and out["weight"] > out["none"] - 1.0


def test_channel_order_is_validated():
    with pytest.raises(ValueError, match="channel_order"):
        fptq.QuantConfig(channel_order="random")


def test_power_search_scores_the_reordered_weights_when_asked():
    from fptq.quant.search import quantized_output_error

    g = torch.Generator().manual_seed(2)
    x = torch.randn(256, 128, generator=g)
    x[:, [3, 40, 77, 110]] *= 40  # outlier channels in four groups: LAE scales make their weight columns large
    w = torch.randn(32, 128, generator=g)
    s = x.abs().amax(dim=0) / torch.log2(2 + x.abs().amax(dim=0))
    refs = [x @ w.t()]
    kw = dict(wbits=4, group_size=32, act_mode="dynamic_token")
    plain = quantized_output_error(x, [w], refs, s, **kw)
    assert plain == quantized_output_error(x, [w], refs, s, reorder=False, **kw)
    # the output does not depend on the channel order; only the weight groups do
    assert quantized_output_error(x, [w], refs, s, reorder=True, **kw) < plain

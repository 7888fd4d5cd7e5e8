"""Property: for random small LLaMA shapes, quantize -> save -> load reproduces the in-memory logits exactly."""
import tempfile

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fptq

from .conftest import as_stored, tiny_llama


@st.composite
def llama_shapes(draw):
    heads = draw(st.sampled_from([1, 3, 5]))
    kv = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]))  # grouped-query attention
    hidden = heads * draw(st.sampled_from([3, 5, 7]))  # odd, divisible by the head count
    return dict(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=draw(st.sampled_from([4, 6])),  # RoPE needs an even head dimension
        intermediate_size=draw(st.integers(17, 45)),
        num_hidden_layers=draw(st.integers(1, 2)),
        tie_word_embeddings=draw(st.booleans()),
    ), draw(st.sampled_from([8, 12, 24])), draw(st.integers(0, 2**16))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(llama_shapes())
def test_quantize_save_load_is_exact(case):
    shape, group_size, seed = case
    model = tiny_llama(seed=seed, **shape)
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(seed))
    config = fptq.method_config("fptq", group_size=group_size, thresholds=(1.0, 5.0))
    plan = fptq.quantize(model, config, ids, device="cpu", progress=False, seed=seed)
    ref = model(ids).logits
    with tempfile.TemporaryDirectory() as d:
        loaded = fptq.load(fptq.save(model, plan, f"{d}/out", keep_dtype=True), backend="reference")
        assert torch.equal(loaded(ids).logits, ref)
        loaded = fptq.load(fptq.save(model, plan, f"{d}/out16"), backend="reference")
        assert torch.equal(loaded(ids).logits, as_stored(model)(ids).logits)
        assert loaded.fptq_plan.to_dict() == plan.to_dict()

"""transformers.AutoModelForCausalLM.from_pretrained on an fptq checkpoint (quantizer registered by `import fptq`)."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import fptq
from fptq.hf import FptqConfig, FptqHfQuantizer, register
from fptq.io import WEIGHTS_NAME
from fptq.nn import QuantLinear
from fptq.runtime.hf_fast import uses_runtime

from .conftest import make_tokenizer, tiny_llama


def _checkpoint(tmp_path, method="fptq", dtype=torch.float32, rotation=None, **kw):
    model = tiny_llama(**kw).to(dtype)
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    extra = {} if rotation is None else {"rotation": rotation}
    plan = fptq.quantize(model, fptq.method_config(method, group_size=32, thresholds=(2.0, 20.0), **extra), ids,
                         device="cpu", progress=False)
    return fptq.save(model, plan, tmp_path / "out", tokenizer=make_tokenizer()), ids


@pytest.mark.parametrize("method,dtype,kw", [
    ("fptq", torch.float32, {}),
    ("fptq", torch.bfloat16, {"tie_word_embeddings": True}),
    ("fptq", torch.bfloat16, {"tie_word_embeddings": True, "rotation": "none"}),
    ("rtn-w4a16", torch.float32, {}),
])
def test_from_pretrained_equals_fptq_load(tmp_path, method, dtype, kw):
    out, ids = _checkpoint(tmp_path, method, dtype, **kw)
    ref = fptq.load(out)
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert uses_runtime(ref) and uses_runtime(hf)  # both run on fptq's runtime, the 16-bit tensors as stored
    assert hf.dtype == ref.dtype == (torch.bfloat16 if dtype == torch.float32 else dtype)
    assert fptq.load(out, runtime="off").dtype == dtype  # transformers' modules: the source model's dtype
    assert sum(isinstance(m, QuantLinear) for m in hf.modules()) == 14
    sd_ref, sd_hf = ref.state_dict(), hf.state_dict()
    assert sd_ref.keys() == sd_hf.keys()
    for k in sd_ref:  # same tensors, same dtypes (fp16 scales stay fp16, uint8 codes stay uint8)
        assert sd_hf[k].dtype == sd_ref[k].dtype and torch.equal(sd_hf[k], sd_ref[k]), k
    assert torch.equal(hf(ids).logits, ref(ids).logits)
    assert hf.fptq_plan.to_dict() == ref.fptq_plan.to_dict()
    if kw.get("tie_word_embeddings"):  # kept tied, unless the rotation (the default's) untied it
        tied = kw.get("rotation") == "none"
        assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tied
        assert hf.config.tie_word_embeddings == tied


def test_generate_on_from_pretrained_model(tmp_path):
    out, ids = _checkpoint(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(out)
    prompt = ids[:1, :6]
    got = hf.generate(prompt, max_new_tokens=6, do_sample=False)
    want = fptq.load(out).generate(prompt, max_new_tokens=6, do_sample=False)
    assert got.shape == (1, 12) and torch.equal(got, want)


def test_tampered_checkpoint_is_refused_by_from_pretrained(tmp_path):
    out, _ = _checkpoint(tmp_path)
    data = bytearray((out / WEIGHTS_NAME).read_bytes())
    data[-5] ^= 0xFF
    (out / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(fptq.FptqError, match="sha256"):
        AutoModelForCausalLM.from_pretrained(out)


def test_registration_is_idempotent():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert register() and register()
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["fptq"] is FptqConfig
    assert AUTO_QUANTIZER_MAPPING["fptq"] is FptqHfQuantizer
    cfg = FptqConfig.from_dict({"quant_method": "fptq", "plan_file": "fptq_plan.json", "wbits": 4, "future_key": 1})
    assert cfg.to_dict()["future_key"] == 1 and cfg.quant_method == "fptq"

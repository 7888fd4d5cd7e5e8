"""Running checkpoints: integer backends through fptq.load, generation, fptq bench."""
import json

import pytest
import torch

import fptq
from fptq.cli import main

from .conftest import make_tokenizer, sqnr_db, tiny_llama


@pytest.fixture
def checkpoint(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(0))
    plan = fptq.quantize(model, fptq.method_config("fptq", group_size=32, thresholds=(2.0, 20.0)), ids,
                         device="cpu", progress=False)
    tok = make_tokenizer()
    out = fptq.save(model, plan, tmp_path / "ckpt", tokenizer=tok,
                    report={"source_model": None})
    return out, ids


@pytest.mark.parametrize("backend,min_db", [("int8_grouped", 60), ("int8_perchannel", 25), ("native", 25), ("auto", 25)])
def test_integer_backends_track_the_simulated_model(checkpoint, backend, min_db):
    out, ids = checkpoint
    ref = fptq.load(out, backend="reference")(ids).logits
    fast = fptq.load(out, backend=backend)(ids).logits
    assert sqnr_db(ref, fast) > min_db


def test_generate_with_hf_generate(checkpoint):
    from fptq.generate import generate_text

    out, _ = checkpoint
    model = fptq.load(out, backend="auto")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    text = generate_text(model, tok, "The quick brown", max_new_tokens=5, chat=False, stream=False)
    assert isinstance(text, str)
    text2 = generate_text(model, tok, "The quick brown", max_new_tokens=5, chat=False, stream=False)
    assert text == text2  # greedy is deterministic


def test_bench_command_writes_json_and_markdown(checkpoint, tiny_model_dir, tmp_path, capsys):
    out, _ = checkpoint
    rc = main(["bench", str(out), "--float-model", str(tiny_model_dir), "--prefill", "16", "--decode-batch", "1",
               "--decode-steps", "2", "--repeats", "1", "--no-bf16", "--device", "cpu", "-o", str(tmp_path / "b")])
    assert rc == 0
    data = json.loads((tmp_path / "b" / "e2e_bench.json").read_text())
    assert set(data["results"]) == {"fp32", "w4a8 (auto)"}
    r = data["results"]["w4a8 (auto)"]
    assert r["tokens_per_s"]["prefill_16"]["median"] > 0 and "decode_1" in r["tokens_per_s"]
    assert "Speed-up" in (tmp_path / "b" / "e2e_bench.md").read_text()

"""Running checkpoints: integer backends through fptq.load, generation, fptq bench."""
import json

import pytest
import torch

import fptq
from fptq.cli import main
from fptq.kernels import fast_bfloat16, native

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


# exact group-wise kernels (int8_grouped, native) differ from the simulated model only by float summation order,
# which flips a few activation codes at rounding ties layer after layer: ~50 dB on this tiny model
@pytest.mark.parametrize("backend,min_db", [("int8_grouped", 45), ("int8_perchannel", 25), ("native", 45), ("auto", 45)])
def test_integer_backends_track_the_simulated_model(checkpoint, backend, min_db):
    if backend == "native" and not native.available():
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    out, ids = checkpoint
    ref = fptq.load(out, backend="reference")(ids).logits
    fast = fptq.load(out, backend=backend, runtime="off")(ids).logits  # the kernels Linear by Linear
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


def test_generate_command_streams_on_the_runtime_with_either_head(checkpoint, capsys):
    """``fptq generate``: greedy text from the runtime, the same first tokens with the int8 and the stored head
    on this tiny model; an unknown head is refused by the parser."""
    out, _ = checkpoint
    texts = []
    for head in ("auto", "stored"):
        assert main(["generate", str(out), "--prompt", "the quick", "--no-chat", "--max-new-tokens", "3",
                     "--head", head]) == 0
        printed = capsys.readouterr().out
        assert "fptq runtime]" in printed and "3 tokens in" in printed
        texts.append(printed.split("\n[3 tokens")[0])
    assert texts[0] == texts[1]
    with pytest.raises(SystemExit) as e:
        main(["generate", str(out), "--prompt", "x", "--head", "int4"])
    assert e.value.code == 2


def test_bench_command_writes_the_speed_table(checkpoint, tiny_model_dir, tmp_path, capsys):
    out, _ = checkpoint
    rc = main(["bench", str(out), "--float-model", str(tiny_model_dir), "--prefill", "16", "--decode-batch", "1,2",
               "--decode-steps", "2", "--prompt-len", "8", "--repeats", "1", "--device", "cpu", "-o", str(tmp_path / "b"),
               "--name", "t", "--stored-head-row"])
    assert rc == 0
    data = json.loads((tmp_path / "b" / "t.json").read_text())
    # the baseline is the float format a user runs on this CPU: bf16 where it is fast, else fp32 (AVX2)
    base = "bf16" if fast_bfloat16("cpu") else "fp32"
    assert data["meta"]["baseline"] == base and data["meta"]["cpu_kernels"].startswith(native.isa() or "none")
    assert list(data["results"]) == [f"{base} (transformers)", f"{base} (fptq runtime)", "W4A8 (fptq)",
                                     "W4A8 (fptq, stored head)", "W4A8 (fptq.load, transformers API)"]
    # the runtime's head: int8 for the quantized checkpoint (native kernels), the float model's own on its row
    paths = {k: v["path"] for k, v in data["results"].items()}
    assert paths["W4A8 (fptq)"].endswith("; int8 head)") == native.available()
    assert "int8 head" not in paths[f"{base} (fptq runtime)"]
    assert "int8 head" not in paths["W4A8 (fptq, stored head)"]
    api = data["results"]["W4A8 (fptq.load, transformers API)"]
    assert api["path"] == ("transformers forward on fptq's runtime" if native.available()
                           else "transformers forward + fptq kernels")
    assert all(s["median"] > 0 for s in api["tokens_per_s"].values())
    w = data["results"]["W4A8 (fptq)"]
    assert set(w["tokens_per_s"]) == {"prefill_16", "decode_b1", "decode_b2"}
    assert all(s["median"] > 0 for s in w["tokens_per_s"].values())
    assert data["results"][f"{base} (transformers)"]["ratio_vs_baseline"]["decode_b1"] == 1.0
    # with the native kernels the quantized Linears take a fraction of the 16-bit ones (packed 4-bit codes, 16-bit
    # scales); the int8 fallback (no native kernels) also caches int8 copies of the codes
    ratio = 0.5 if native.available() else 1.5
    assert w["memory"]["linear_weight_bytes"] < ratio * data["results"][f"{base} (transformers)"]["memory"]["linear_weight_bytes"]
    md = (tmp_path / "b" / "t.md").read_text()
    assert "W4A8 (fptq): speed-up over each row" in md and (tmp_path / "b" / "t.png").stat().st_size > 0


def test_bench_refuses_a_non_checkpoint(tmp_path, capsys):
    assert main(["bench", str(tmp_path)]) == 2
    assert "not an fptq checkpoint" in capsys.readouterr().err

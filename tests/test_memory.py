import sys

import pytest

from fptq.memory import return_freed_memory_to_os


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_mmap_threshold_is_applied_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert return_freed_memory_to_os() is True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_trim_heap_runs_on_glibc():
    import platform

    from fptq.memory import trim_heap

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert trim_heap() is True


def test_low_memory_flag_is_in_quantize_help():
    from fptq.cli import build_parser

    args = build_parser().parse_args(["quantize", "-o", "x", "--low-memory"])
    assert args.low_memory is True
    assert build_parser().parse_args(["quantize", "-o", "x"]).low_memory is False


def _write_llama(dest, hidden: int, intermediate: int, layers: int, vocab: int) -> dict:
    """A random LLaMA in float32 safetensors (one file per decoder layer, one for the rest) with a tokenizer,
    written a tensor group at a time; returns the sizes the memory bound is made of."""
    import json

    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from .conftest import make_tokenizer

    dest.mkdir()
    LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False,
                dtype="float32").save_pretrained(dest)
    make_tokenizer().save_pretrained(dest)
    g = torch.Generator().manual_seed(0)
    files: dict[str, dict] = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
                  "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
                  "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
                  "mlp.down_proj": (hidden, intermediate)}
        sd = {p + k + ".weight": torch.randn(*s, generator=g) * 0.02 for k, s in shapes.items()}
        sd.update({p + n: torch.ones(hidden) for n in ("input_layernorm.weight", "post_attention_layernorm.weight")})
        files[f"layer{i}.safetensors"] = sd
    files["rest.safetensors"] = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g) * 0.02,
                                 "lm_head.weight": torch.randn(vocab, hidden, generator=g) * 0.02,
                                 "model.norm.weight": torch.ones(hidden)}
    weight_map = {}
    for name, sd in files.items():
        save_file(sd, str(dest / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in sd})
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    layer = sum(t.numel() for t in files["layer0.safetensors"].values()) * 4
    return {"layer": layer, "embedding": vocab * hidden * 4, "hessian_max": intermediate**2 * 4,
            "group_max": 2 * intermediate * hidden * 4,
            "disk": sum(f.stat().st_size for f in dest.glob("*.safetensors"))}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resident memory is read from /proc/self/status")
def test_quantize_peak_memory_stays_within_one_layers_working_set(tmp_path, calib_file):
    """`fptq quantize` (default method: GPTQ on every Linear, weight clip search) of a ~300 MB float32 model in a
    subprocess: its peak resident memory (the report's, from the OS) over what the process held when the job
    started (interpreter and libraries) stays within one decoder layer's working set: the layer, GPTQ's
    largest Hessian and its working copy, the largest group of weights three times over (the float weights,
    GPTQ's transposed copy, its products), the embeddings, and 256 MB for what loads after the start
    (transformers' model code, the native kernels) and the allocator's slack. Measured on the machine of
    docs/results/memory: 433 MB used against a bound of 560 MB; before the memory fixes of issue 31 the same run
    used 820 MB (extra K x K copies of the Hessian in GPTQ and in the LAE fold, the float weights and a stacked
    copy kept through the layer, isfinite's temporaries)."""
    import json
    import subprocess

    sizes = _write_llama(tmp_path / "m", hidden=1024, intermediate=4096, layers=1, vocab=4096)
    out = tmp_path / "q"
    r = subprocess.run([sys.executable, "-m", "fptq.cli", "quantize", str(tmp_path / "m"), "-o", str(out),
                        "--calib", str(calib_file), "--nsamples", "2", "--seqlen", "64", "--group-size", "128",
                        "--device", "cpu"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    mem = json.loads((out / "quantize_report.json").read_text())["memory"]
    used = mem["peak_rss_bytes"] - mem["rss_at_start_bytes"]
    bound = (sizes["layer"] + 2 * sizes["hessian_max"] + 3 * sizes["group_max"] + sizes["embedding"]
             + 256 * 2**20)
    assert used < bound, f"peak {used / 2**20:.0f} MB over the start, bound {bound / 2**20:.0f} MB ({sizes})"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resident memory is read from /proc/self/status")
def test_calibration_tokens_cost_about_one_copy_of_the_hidden_states(tmp_path):
    """`fptq quantize` of the same small model on 16 and on 64 windows of 512 tokens: the extra tokens may raise
    the peak resident memory by about one float32 copy of their hidden states, at most three (the layer's cached
    inputs; the Hessians do not grow with the tokens, nor the sampled rows past 16 x 512 = MAX_SAMPLE_ROWS). The statistics pass used to keep
    every batch's outputs, and the C heap every batch's temporaries, until the layer's end: the README
    quickstart's peak rose by 0.8 GB over its 128 x 512 tokens (the trace in docs/results/memory.md)."""
    import json
    import subprocess

    from .conftest import _TEXT

    _write_llama(tmp_path / "m", hidden=512, intermediate=1408, layers=2, vocab=512)
    calib = tmp_path / "calib.txt"
    calib.write_text(_TEXT * 40)
    peaks = {}
    for n in (16, 64):
        out = tmp_path / f"q{n}"
        r = subprocess.run([sys.executable, "-m", "fptq.cli", "quantize", str(tmp_path / "m"), "-o", str(out),
                            "--calib", str(calib), "--nsamples", str(n), "--seqlen", "512", "--group-size", "128",
                            "--device", "cpu"], capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-2000:]
        mem = json.loads((out / "quantize_report.json").read_text())["memory"]
        peaks[n] = mem["peak_rss_bytes"] - mem["rss_at_start_bytes"]
    hidden_copy = (64 - 16) * 512 * 512 * 4  # float32 hidden states of the extra tokens: 48 MiB
    grew = peaks[64] - peaks[16]
    # measured 1.0-2.1 copies with the fix (the allocator's slack varies between machines), 5.7 before it
    assert grew < 3 * hidden_copy, f"+{grew / 2**20:.0f} MB for {hidden_copy / 2**20:.0f} MB of hidden states ({peaks})"

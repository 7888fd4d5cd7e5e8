"""The command line end to end on a tiny random LLaMA saved in the test."""
import json
import subprocess
import sys

import pytest
import torch

from fptq.cli import main


def run(*args):
    return main([str(a) for a in args])


def test_quantize_eval_inspect_end_to_end(tiny_model_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "q"
    rc = run("quantize", tiny_model_dir, "-o", out, "--calib", calib_file, "--nsamples", 4, "--seqlen", 32,
             "--group-size", 32, "--thresholds", "2,20", "--device", "cpu")
    assert rc == 0
    text = capsys.readouterr().out
    assert "q_proj" in text and "down_proj" in text and "bits/weight" in text and str(out) in text
    plan = json.loads((out / "fptq_plan.json").read_text())
    assert plan["thresholds"] == [2.0, 20.0]
    assert {v["strategy"] for v in plan["layers"].values()} == {"static_tensor", "lae_static_tensor", "dynamic_token"}
    rep = json.loads((out / "quantize_report.json").read_text())
    assert rep["source_model"] == str(tiny_model_dir)
    assert rep["calibration"]["nsamples"] == 4 and rep["versions"]["torch"] == torch.__version__
    assert rep["sizes"]["bits_per_weight"] < 4.6

    res = tmp_path / "ppl.json"
    assert run("eval", out, "--ppl", f"calib={calib_file}", "--seqlen", 32, "--max-windows", 3, "--json", res) == 0
    ppl_q = json.loads(res.read_text())["ppl"]["calib"]
    assert run("eval", tiny_model_dir, "--ppl", f"calib={calib_file}", "--seqlen", 32, "--max-windows", 3,
               "--json", res) == 0
    ppl_f = json.loads(res.read_text())["ppl"]["calib"]
    assert 0 < ppl_q < 2 * ppl_f and ppl_f > 1

    assert run("inspect", out) == 0
    assert (out / "fptq_plan.png").stat().st_size > 1000
    assert "lae_static_tensor" not in capsys.readouterr().out.split("\n")[0]


def test_quantize_is_deterministic(tiny_model_dir, calib_file, tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"q{i}"
        assert run("quantize", tiny_model_dir, "-o", out, "--calib", calib_file, "--nsamples", 2, "--seqlen", 32,
                   "--group-size", 32, "--device", "cpu") == 0
        outs.append((out / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]


@pytest.mark.parametrize("args,message", [
    (["--wbits", "5"], "--wbits must be one of"),
    (["--group-size", "3"], "--group-size must be at least 8"),
    (["--nsamples", "1000"], "enough for"),
])
def test_bad_settings_exit_2_with_a_clear_message(tiny_model_dir, calib_file, tmp_path, capsys, args, message):
    out = tmp_path / "q"
    rc = run("quantize", tiny_model_dir, "-o", out, "--calib", calib_file, "--seqlen", 32, "--device", "cpu", *args)
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_bad_inputs(tmp_path, capsys, tiny_model_dir, calib_file):
    assert run("quantize", tmp_path / "nope", "-o", tmp_path / "o") == 2
    assert "model path not found" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("")
    assert run("quantize", tiny_model_dir, "-o", tmp_path / "o", "--calib", tmp_path / "empty.txt") == 2
    assert "is empty" in capsys.readouterr().err
    assert run("quantize", tiny_model_dir, "-o", tmp_path / "o", "--calib", tmp_path / "missing.txt") == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "notmodel").mkdir()
    assert run("quantize", tmp_path / "notmodel", "-o", tmp_path / "o") == 2
    assert "no config.json" in capsys.readouterr().err
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "x").write_text("1")
    assert run("quantize", tiny_model_dir, "-o", existing, "--calib", calib_file, "--seqlen", 32) == 2
    assert "--force" in capsys.readouterr().err
    assert (existing / "x").read_text() == "1"
    assert run("inspect", tmp_path) == 2
    assert "not an fptq checkpoint" in capsys.readouterr().err


def test_thresholds_parse_error():
    with pytest.raises(SystemExit) as e:
        main(["quantize", "-o", "x", "--thresholds", "150,15"])
    assert e.value.code == 2


def test_help_lists_commands():
    r = subprocess.run([sys.executable, "-m", "fptq.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for cmd in ("quantize", "eval", "inspect"):
        assert cmd in r.stdout


def test_gptq_flags_and_method_defaults():
    """``fptq`` runs GPTQ in act-order with sampled Hessians and clip-searched group scales, max static
    scales, bfloat16 statistics and
    integer-kernel propagation by default; ``--no-gptq`` gives
    round-to-nearest; ``fptq-paper`` is the paper's recipe; other methods keep round-to-nearest."""
    from fptq.cli import build_parser, config_from_args

    def cfg(*argv):
        return config_from_args(build_parser().parse_args(["quantize", "-o", "x", *argv]))

    d = cfg()
    assert d.gptq and d.gptq_hessian_rows == 0 and d.static_observer == "max"
    assert d.weight_clip_search and d.weight_clip_objective == "weight" and not cfg("--no-weight-clip").weight_clip_search
    assert not cfg("--no-gptq").gptq
    assert d.gptq_act_order and not cfg("--no-gptq-act-order").gptq_act_order
    assert d.calib_dtype == "bfloat16" and cfg("--calib-dtype", "float32").calib_dtype == "float32"
    assert d.propagate_backend == "auto" and cfg("--propagate-backend", "reference").propagate_backend == "reference"
    assert d.calib_inputs == "quantized" and cfg("--calib-inputs", "float").calib_inputs == "float"
    rtn = cfg("--method", "rtn-w4a16")
    assert (rtn.calib_dtype, rtn.propagate_backend, rtn.gptq_act_order) == ("float32", "reference", False)
    assert cfg("--gptq-hessian-rows", "0").gptq_hessian_rows == 0
    assert d.gptq_hessian_dtype == "float32" and cfg("--gptq-hessian-dtype", "float64").gptq_hessian_dtype == "float64"
    assert cfg("--observer", "mse").static_observer == "mse"
    clip = cfg("--method", "rtn-w4a16", "--weight-clip", "--weight-clip-objective", "output")
    assert clip.weight_clip_search and clip.weight_clip_objective == "output"
    assert not cfg("--weight-clip", "--no-weight-clip").weight_clip_search
    assert d.weight_clip_rows == "all" and cfg("--weight-clip-rows", "best").weight_clip_rows == "best"
    paper = cfg("--method", "fptq-paper")
    assert not paper.gptq and paper.lae_scope == "band" and paper.static_observer == "max"
    assert not cfg("--method", "naive-w4a8").gptq and cfg("--method", "naive-w4a8").static_observer == "mean_max"
    assert cfg("--method", "rtn-w4a16", "--gptq").gptq
    assert d.equalization_powers == (0.0, 0.5, 1.0) and d.channel_order == "weight"
    assert cfg("--equalization-powers", "1").equalization_powers == (1.0,)
    assert cfg("--channel-order", "none").channel_order == "none"
    assert paper.equalization_powers == () and paper.channel_order == "none"
    assert d.weight_scale_sign == "signed" and cfg("--weight-scale-sign", "positive").weight_scale_sign == "positive"
    assert d.residual_order == "max" and cfg("--residual-order", "none").residual_order == "none"
    assert paper.residual_order == "none" and paper.weight_scale_sign == "positive"
    for bad in ("0,x", "-1"):
        with pytest.raises(SystemExit) as e:
            cfg("--equalization-powers", bad)
        assert e.value.code == 2


def test_eval_activations_override(tmp_path, calib_file, capsys):
    """``fptq eval --activations dynamic|float`` runs every quantized layer with dynamic per-token inputs or float
    inputs: the same perplexity as the model with that mode set in Python."""
    import fptq
    from fptq.eval.perplexity import evaluate_perplexity, load_eval_text, token_windows
    from fptq.nn import set_act_mode

    from .conftest import make_tokenizer, tiny_llama

    model, tok = tiny_llama(), make_tokenizer()
    calib = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    plan = fptq.quantize(model, fptq.method_config("fptq", group_size=32, thresholds=(2.0, 20.0)), calib,
                         device="cpu", progress=False)
    out = fptq.save(model, plan, tmp_path / "q", tokenizer=tok)
    windows = token_windows(tok, load_eval_text(calib_file), 32, 3)
    res = tmp_path / "ppl.json"
    got = {}
    for mode, act in (("plan", None), ("dynamic", "dynamic_token"), ("float", "none")):
        assert run("eval", out, "--ppl", f"calib={calib_file}", "--seqlen", 32, "--max-windows", 3,
                   "--activations", mode, "--backend", "reference", "--json", res) == 0
        got[mode] = json.loads(res.read_text())["ppl"]["calib"]
        ref = fptq.load(out, backend="reference")
        if act:
            assert set_act_mode(ref, act) == 14
        assert got[mode] == pytest.approx(evaluate_perplexity(ref, windows, progress=False)["ppl"], rel=1e-6)
    assert len(set(got.values())) == 3
    assert run("eval", "--activations", "dynamic", "--ppl", f"calib={calib_file}") == 2
    assert "applies to an fptq checkpoint" in capsys.readouterr().err

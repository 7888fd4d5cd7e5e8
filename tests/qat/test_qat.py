"""Distillation, the QAT methods end to end, the checkpoint they write, and their command line."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import fptq
from fptq.cli import main
from fptq.errors import FptqError
from fptq.nn import QuantLinear
from fptq.qat import (
    GenerationRecipe,
    QATConfig,
    QATLinear,
    build_student,
    distill,
    generate_data,
    kd_loss,
    qat_quantize,
    quantize_keeping_latents,
    to_quant_linears,
)

from ..conftest import tiny_llama


def _sharp_model(seed: int = 0):
    """A tiny LLaMA whose output head is scaled up: peaked next-token distributions, so that quantization
    error shows in the KL divergence."""
    m = tiny_llama(seed=seed)
    with torch.no_grad():
        m.lm_head.weight.mul_(12)
    return m


@pytest.fixture(scope="module")
def data():
    return generate_data(_sharp_model(), 24, GenerationRecipe(length=32, seed=0), batch_size=12, progress=False)


def _kl(student, teacher, ids):
    with torch.no_grad():
        return float(kd_loss(student(ids).logits, teacher(ids).logits))


def test_kd_loss_is_the_kl_divergence():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    ref = F.kl_div(F.log_softmax(s, -1).reshape(10, 11), F.log_softmax(t, -1).reshape(10, 11), log_target=True,
                   reduction="batchmean")
    assert torch.allclose(kd_loss(s, t), ref, rtol=1e-5)
    assert float(kd_loss(t, t)) == pytest.approx(0.0, abs=1e-6)


def test_distillation_lowers_the_kl_to_the_teacher(data):
    teacher = _sharp_model()
    student = copy.deepcopy(teacher)
    cfg = fptq.method_config("llm-qat-w4a8", wbits=3)
    plan, latents = quantize_keeping_latents(student, cfg, data[:4], progress=False)
    build_student(student, plan, latents)
    train = data[:16]
    before = _kl(student, teacher, train)
    assert before > 0.01  # quantization visibly hurts the sharp model
    qat = QATConfig(steps=40, batch_size=4, lr=3e-4, num_sequences=16, dtype="float32")
    res = distill(student, teacher, train, qat, progress=False)
    after = _kl(student, teacher, train)
    assert res.steps == 40 and res.tokens == 40 * 4 * 32 and len(res.losses) == 40
    assert after < 0.8 * before, (before, after)
    assert not any(p.requires_grad for p in student.parameters())  # training mode is left


@pytest.mark.parametrize("method", ["llm-qat-w4a8", "fptq-qat"])
def test_checkpoint_loads_and_matches_the_trained_model(method, data, tmp_path):
    model = _sharp_model()
    overrides = {"group_size": 32, "thresholds": (0.5, 3.0)} if method == "fptq-qat" else {}
    cfg = fptq.method_config(method, **overrides)
    qat = QATConfig(steps=6, batch_size=4, lr=1e-3, num_sequences=24, dtype="float32")
    # the trained student just before conversion, to check the conversion changes nothing
    plan, cost = qat_quantize(model, cfg, qat, data[:8], data, progress=False)
    assert cost["steps"] == 6 and cost["tokens"] == 6 * 4 * 32 and cost["train_s"] > 0
    assert plan.config["qat"]["steps"] == 6 and plan.config["method"] == method
    qls = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(qls) == len(plan.layers) == 14
    assert all(lp.weight_method == "rtn-qat" for lp in plan.layers.values())
    if method == "fptq-qat":
        assert {lp.strategy for lp in plan.layers.values()} >= {"lae_static_tensor", "dynamic_token"}
    else:
        assert {lp.strategy for lp in plan.layers.values()} == {"dynamic_token"}
        assert all(q.group_size == -1 for q in qls.values())  # per-channel, as the paper

    fptq.save(model, plan, tmp_path / "ckpt")
    loaded = fptq.load(tmp_path / "ckpt")
    for n, q in qls.items():  # the quantized tensors are stored exactly
        lq = loaded.get_submodule(n)
        assert torch.equal(lq.qweight, q.qweight) and torch.equal(lq.w_scales, q.w_scales)
        assert lq.act_mode == q.act_mode and torch.equal(lq.act_scale, q.act_scale)
    with torch.no_grad():
        ref = model(data[:2]).logits
        out = loaded(data[:2]).logits
    # unquantized tensors (norms, embeddings) may be stored in 16 bits: agreement within that rounding
    assert float(kd_loss(out, ref)) < 1e-3
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_student_forward_equals_the_converted_quantlinears(data):
    model = _sharp_model()
    cfg = fptq.method_config("fptq-qat", group_size=32, thresholds=(0.5, 3.0))
    plan, latents = quantize_keeping_latents(model, cfg, data[:8], progress=False)
    with torch.no_grad():
        ptq_logits = model(data[:2]).logits
    student = build_student(model, plan, latents, learn_act_scales=True)
    assert all(isinstance(m, QATLinear) for m in student.values())
    with torch.no_grad():
        for m in student.values():  # move the weights and the static scales as training would
            m.weight.add_(torch.randn_like(m.weight) * 0.01)
            if m.act_scale is not None:
                m.act_scale.mul_(1.1)
        qat_logits = model(data[:2]).logits
    to_quant_linears(model, plan)
    with torch.no_grad():
        converted = model(data[:2]).logits
    assert torch.allclose(converted, qat_logits, rtol=0, atol=1e-4)
    assert not torch.allclose(converted, ptq_logits, atol=1e-3)
    static = [n for n, lp in plan.layers.items() if lp.act_scale is not None]
    assert static and all(model.get_submodule(n).act_scale == plan.layers[n].act_scale for n in static)


def test_student_starts_at_the_ptq_result(data):
    model = _sharp_model()
    cfg = fptq.method_config("fptq-qat", group_size=32, thresholds=(0.5, 3.0))
    plan, latents = quantize_keeping_latents(model, cfg, data[:8], progress=False)
    with torch.no_grad():
        ptq = model(data[:2]).logits
    build_student(model, plan, latents)
    with torch.no_grad():
        assert torch.allclose(model(data[:2]).logits, ptq, rtol=0, atol=1e-4)


def test_learned_versus_kept_activation_scales(data):
    cfg = fptq.method_config("fptq-qat", group_size=32, thresholds=(0.5, 3.0))
    scales = {}
    for learn in (False, True):
        model = _sharp_model()
        qat = QATConfig(steps=4, batch_size=4, lr=1e-3, act_scale_lr=1e-2, num_sequences=24, dtype="float32",
                        learn_act_scales=learn)
        ptq_plan, latents = quantize_keeping_latents(copy.deepcopy(model), cfg, data[:8], progress=False)
        plan, _ = qat_quantize(model, cfg, qat, data[:8], data, progress=False)
        scales[learn] = {n: (ptq_plan.layers[n].act_scale, lp.act_scale) for n, lp in plan.layers.items()
                         if lp.act_scale is not None}
    assert scales[False] and all(a == b for a, b in scales[False].values())
    assert any(abs(a - b) > 1e-6 * a for a, b in scales[True].values())


def test_qat_refuses_gptq_and_non_qat_methods(data):
    with pytest.raises(FptqError, match="drop --gptq"):
        quantize_keeping_latents(_sharp_model(), fptq.method_config("fptq-qat", gptq=True), data[:4], progress=False)
    with pytest.raises(FptqError, match="not a QAT method"):
        qat_quantize(_sharp_model(), fptq.method_config("fptq"), QATConfig(num_sequences=4, batch_size=2), data[:4],
                     data, progress=False)
    with pytest.raises(FptqError, match="batch size"):
        QATConfig(batch_size=8, num_sequences=4)


def test_cli_generate_data_and_quantize_llm_qat(tiny_model_dir, calib_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FPTQ_CACHE", str(tmp_path / "cache"))
    gen = tmp_path / "gen.safetensors"
    args = ["generate-data", str(tiny_model_dir), "-o", str(gen), "--num", "6", "--length", "16", "--batch-size", "3"]
    assert main(args) == 0
    assert "6 sequences x 16 tokens" in capsys.readouterr().out
    mtime = gen.stat().st_mtime_ns
    assert main(args) == 0 and gen.stat().st_mtime_ns == mtime  # reused
    assert json.loads((tmp_path / "gen.json").read_text())["recipe"]["length"] == 16

    out = tmp_path / "q"
    rc = main(["quantize", str(tiny_model_dir), "-o", str(out), "--method", "llm-qat-w4a8", "--nsamples", "4",
               "--seqlen", "16", "--qat-steps", "3", "--qat-batch-size", "2", "--qat-num", "6", "--qat-length", "16",
               "--qat-dtype", "float32", "--qat-data", str(gen)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "training   3 steps, 96 tokens" in text
    report = json.loads((out / "quantize_report.json").read_text())
    assert report["training"]["steps"] == 3 and report["calibration"]["source"] == "generated training data"
    assert report["qat"]["base_method"] == "dynamic-w4a8"
    model = fptq.load(out)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14

    # --calib self for a PTQ method: generated text, cached in $FPTQ_CACHE
    rc = main(["quantize", str(tiny_model_dir), "-o", str(tmp_path / "p"), "--method", "fptq", "--calib", "self",
               "--nsamples", "4", "--seqlen", "16", "--group-size", "32"])
    assert rc == 0
    report = json.loads((tmp_path / "p" / "quantize_report.json").read_text())
    assert report["calibration"]["source"].endswith(".txt") and "generated" in report["calibration"]["source"]


def test_compare_adds_the_qat_rows_with_their_training_cost(tiny_model_dir, calib_file, tmp_path, monkeypatch):
    from fptq.compare import run_compare

    from ..conftest import _TEXT

    monkeypatch.setenv("FPTQ_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "data"
    (d / "text").mkdir(parents=True)
    (d / "text" / "wikitext2_test.raw").write_text("\n".join([_TEXT[:400]] * 6))
    qat = QATConfig(steps=2, batch_size=2, num_sequences=4, dtype="float32", recipe=GenerationRecipe(length=16))
    kw = dict(calib=str(calib_file), nsamples=4, seqlen=16, group_size=32, eval_seqlen=32, max_windows=2,
              progress=False, qat=qat)
    methods = ["fp", "dynamic-w4a8", "llm-qat-w4a8", "fptq-qat"]
    data = run_compare(str(tiny_model_dir), methods, ["wikitext2"], d, tmp_path / "res", **kw)
    assert data["costs"]["llm-qat-w4a8"]["steps"] == 2 and data["costs"]["fptq-qat"]["tokens"] == 2 * 2 * 16
    assert "train_s" not in data["costs"]["dynamic-w4a8"] and data["costs"]["dynamic-w4a8"]["quantize_s"] > 0
    assert data["results"]["llm-qat-w4a8"]["wikitext2"]["kld"] > 0
    md = (tmp_path / "res" / "results.md").read_text()
    assert "| llm-qat-w4a8 | 4/8 |" in md and "| fptq-qat | 4/8 |" in md
    assert "| QAT steps | QAT tokens |" in md and "| 2 | 64 |" in md
    # a rerun reuses the checkpoints and reads their cost back
    again = run_compare(str(tiny_model_dir), methods, ["wikitext2"], d, tmp_path / "res", **kw)
    assert again["quantize_s"] == {} and again["costs"]["fptq-qat"]["steps"] == 2

import logging

import pytest
import torch

from fptq.quant import HessianAccumulator, dequantize_weight, fake_quantize_weight, gptq_quantize
from fptq.quant.gptq import token_cap_weights
from fptq.quant.weights import group_gram, hessian_group_blocks, weight_scales


def _correlated_inputs(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(k // 4, k, generator=g)
    return torch.randn(n, k // 4, generator=g) @ basis + 0.1 * torch.randn(n, k, generator=g)


def test_hessian_accumulator_matches_direct_formula():
    x = torch.randn(50, 8)
    acc = HessianAccumulator(8)
    acc.add(x[:20])
    acc.add(x[20:])
    torch.testing.assert_close(acc.h, 2 / 50 * x.t() @ x, rtol=1e-5, atol=1e-5)


def test_hessian_float64_sum_matches_the_running_average():
    """The float64 sum, divided at the end, is the same Hessian as the float32 running average, closer to
    the exact float64 one, and with row weights it counts a row of weight w as w rows."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 16, generator=g) * torch.logspace(-2, 2, 16)
    w = torch.rand(300, generator=g)
    exact = 2 / 300 * (x.double() * w.double()[:, None]).t() @ x.double()
    run, s64 = HessianAccumulator(16), HessianAccumulator(16, dtype="float64")
    for lo in range(0, 300, 7):
        run.add(x[lo:lo + 7], w[lo:lo + 7])
        s64.add(x[lo:lo + 7], w[lo:lo + 7])
    assert s64.h.dtype == torch.float32 and s64.n == run.n == 300
    torch.testing.assert_close(s64.h, run.h, rtol=1e-5, atol=1e-4)
    err64, err32 = (s64.h.double() - exact).abs().max(), (run.h.double() - exact).abs().max()
    assert err64 <= err32


def test_hessian_dtype_is_checked():
    from fptq.config import QuantConfig
    with pytest.raises(ValueError, match="float32 or float64"):
        HessianAccumulator(4, dtype="float16")
    with pytest.raises(ValueError, match="gptq_hessian_dtype"):
        QuantConfig(gptq_hessian_dtype="bfloat16")


def test_gptq_beats_rtn_on_correlated_inputs():
    torch.manual_seed(0)
    k, n = 128, 64
    x = _correlated_inputs(2048, k)
    w = torch.randn(n, k)
    acc = HessianAccumulator(k)
    acc.add(x)
    q, s, ok = gptq_quantize(w, acc.h, bits=4, group_size=32)
    assert ok
    err_gptq = (x @ (dequantize_weight(q, s, 32) - w).t()).pow(2).mean()
    err_rtn = (x @ (fake_quantize_weight(w, 4, 32) - w).t()).pow(2).mean()
    assert err_gptq < 0.8 * err_rtn


def test_gptq_act_order_and_ragged_groups():
    torch.manual_seed(1)
    k = 100  # groups of 32: last one ragged
    x = _correlated_inputs(1024, k)
    w = torch.randn(16, k)
    acc = HessianAccumulator(k)
    acc.add(x)
    q, s, ok = gptq_quantize(w, acc.h, bits=4, group_size=32, act_order=True)
    assert ok and q.shape == (16, k) and s.shape == (16, 4)
    err = (x @ (dequantize_weight(q, s, 32) - w).t()).pow(2).mean()
    err_rtn = (x @ (fake_quantize_weight(w, 4, 32) - w).t()).pow(2).mean()
    assert err < err_rtn


def test_hessian_group_blocks_are_the_group_grams():
    """The Hessian's diagonal blocks are the Gram matrices of the input groups (up to 2x), ragged last
    group zero-padded, so the clip search can score on the Linear's output from the Hessian alone."""
    x = _correlated_inputs(300, 100, seed=4)
    acc = HessianAccumulator(100)
    acc.add(x)
    blocks = hessian_group_blocks(acc.h, 32)
    assert blocks.shape == (4, 32, 32)
    torch.testing.assert_close(blocks, 2 * group_gram(x, 32), rtol=1e-4, atol=1e-4)
    assert blocks[3, 4:].abs().max() == 0 and blocks[3, :, 4:].abs().max() == 0


@pytest.mark.parametrize("objective", ["weight", "output"])
def test_gptq_clip_search_scales_and_output_error(objective):
    """With act-order (static groups), GPTQ's clip search picks exactly the scales weight_scales picks for
    the same objective (the output one from the Hessian's blocks), and the result still beats RTN."""
    torch.manual_seed(5)
    k = 96
    x = _correlated_inputs(1024, k, seed=5) * torch.linspace(0.2, 3.0, k)
    w = torch.randn(24, k)
    w[:, ::7] *= 4  # a few large weights: clipping matters
    acc = HessianAccumulator(k)
    acc.add(x)
    q, s, ok = gptq_quantize(w, acc.h, bits=4, group_size=32, act_order=True, clip_search=True,
                             clip_objective=objective)
    gram = hessian_group_blocks(acc.h, 32) if objective == "output" else None
    expected = weight_scales(w, 4, 32, clip_search=True, gram=gram, rounding="nearest")
    assert ok and torch.equal(s, expected)
    assert not torch.equal(s, weight_scales(w, 4, 32, rounding="nearest"))  # the search did shrink some
    err = (x @ (dequantize_weight(q, s, 32) - w).t()).pow(2).mean()
    err_rtn = (x @ (fake_quantize_weight(w, 4, 32) - w).t()).pow(2).mean()
    assert err < 0.8 * err_rtn


def test_gptq_output_clip_in_column_order_scores_each_group_on_its_block():
    """Without static groups each group's scale comes from the updated weights; the output objective then
    differs from the weight one (the blocks weigh the columns by their input energy); a ragged last group
    is scored on its zero-padded block."""
    torch.manual_seed(6)
    k = 80
    x = _correlated_inputs(512, k, seed=6) * torch.linspace(0.1, 5.0, k)
    w = torch.randn(16, k)
    acc = HessianAccumulator(k)
    acc.add(x)
    _, s_w, ok_w = gptq_quantize(w, acc.h, group_size=32, clip_search=True, clip_objective="weight")
    _, s_o, ok_o = gptq_quantize(w, acc.h, group_size=32, clip_search=True, clip_objective="output")
    assert ok_w and ok_o and s_o.shape == (16, 3) and not torch.equal(s_w, s_o)
    with pytest.raises(ValueError, match="clip_objective"):
        gptq_quantize(w, acc.h, group_size=32, clip_search=True, clip_objective="outputs")


def test_gptq_falls_back_to_rtn_with_a_warning(caplog):
    w = torch.randn(4, 8)
    h = -torch.eye(8)  # not positive definite: Cholesky fails
    with caplog.at_level(logging.WARNING):
        q, s, ok = gptq_quantize(w, h, bits=4, group_size=8)
    assert not ok
    assert "falling back to round-to-nearest" in caplog.text
    torch.testing.assert_close(dequantize_weight(q, s, 8), fake_quantize_weight(w, 4, 8))


def test_hessian_row_weights_count_a_row_as_that_many_rows():
    """A row of weight w contributes w * x x^T (normalised by the number of rows added)."""
    x = torch.randn(30, 8)
    w = torch.rand(30)
    acc = HessianAccumulator(8)
    acc.add(x[:10], w[:10])
    acc.add(x[10:], w[10:])
    torch.testing.assert_close(acc.h, 2 / 30 * (x * w[:, None]).t() @ x, rtol=1e-5, atol=1e-5)
    # weight 1 everywhere is the unweighted Hessian
    plain, ones = HessianAccumulator(8), HessianAccumulator(8)
    plain.add(x)
    ones.add(x, torch.ones(30))
    torch.testing.assert_close(plain.h, ones.h)


def test_token_cap_weights_cap_outlier_rows_only():
    x = torch.randn(100, 16)
    x[0] *= 300  # an attention-sink-like row
    w = token_cap_weights(x, cap=10.0)
    assert w.shape == (100,) and torch.all((w > 0) & (w <= 1))
    norms = x.norm(dim=1)
    assert w[0] < 1 and abs(float(w[0].sqrt() * norms[0]) - 10 * float(norms.median())) < 1e-3
    assert torch.all(w[1:] == 1)  # ordinary rows keep full weight


def test_stacked_rows_give_the_same_result_as_one_matrix_at_a_time():
    """GPTQ's updates act on each output row alone given the Hessian, so the pipeline runs the Linears
    that share an input (q/k/v, gate/up) as one stacked matrix: same codes and scales as one by one."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    h = 2 / 512 * x.t() @ x
    ws = [torch.randn(n, 64, generator=g) for n in (48, 16, 16)]
    codes, scales, ok = gptq_quantize(torch.cat(ws), h, 4, 32)
    assert ok
    one = [gptq_quantize(w, h, 4, 32) for w in ws]
    same = (codes == torch.cat([c for c, _, _ in one])).float().mean()
    assert same > 0.999  # identical up to the summation order of the block updates
    torch.testing.assert_close(scales.float(), torch.cat([s for _, s, _ in one]).float(), rtol=2e-3, atol=1e-6)


def _textbook_gptq(w, h, group_size, damp=0.01):
    """GPTQ one column at a time, without blocks or lazy updates (the algorithm as written in the paper):
    the reference the blocked loop must reproduce."""
    w = w.double().clone()
    k = w.shape[1]
    h = h.double() + damp * torch.diagonal(h).mean() * torch.eye(k, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    q = torch.zeros(w.shape, dtype=torch.int8)
    scales = []
    for j in range(k):
        if j % group_size == 0:
            s = (w[:, j:j + group_size].abs().amax(dim=1) / 7.5).to(torch.float16)
            scales.append(s)
            s = s.double()
        qj = torch.clamp(torch.round(w[:, j] / s), -8, 7)
        q[:, j] = qj.to(torch.int8)
        e = (w[:, j] - qj * s) / u[j, j]
        w[:, j:] -= e[:, None] * u[j, j:][None, :]
    return q, torch.stack(scales, dim=1)


def test_blocked_gptq_reproduces_the_textbook_column_loop():
    torch.manual_seed(3)
    k, n = 200, 48  # blocks of 64 and groups of 32 that do not line up with the blocks' ends
    x = _correlated_inputs(1024, k)
    w = torch.randn(n, k)
    acc = HessianAccumulator(k)
    acc.add(x)
    q, s, ok = gptq_quantize(w, acc.h, bits=4, group_size=32, block_size=64)
    q_ref, s_ref = _textbook_gptq(w, acc.h, 32)
    assert ok
    # float32 vs float64 rounding may flip a code sitting on a rounding tie, nothing more
    assert (q != q_ref).float().mean() < 2e-3
    assert ((s.float() - s_ref.float()).abs() <= 1e-3 * s_ref.float()).float().mean() > 0.99


def test_a_list_of_matrices_is_quantized_as_their_stack_bit_for_bit():
    """The pipeline hands GPTQ the Linears that share an input as a list (no stacked copy in memory): the same
    codes and scales, bit for bit, as the stacked matrix; the caller's weights and Hessian are not written."""
    g = torch.Generator().manual_seed(0)
    x = _correlated_inputs(512, 96)
    x[:, 7] = 0  # a dead input channel: GPTQ zeroes its weights on a copy
    h = HessianAccumulator(96)
    h.add(x)
    ws = [torch.randn(n, 96, generator=g) for n in (40, 24)]
    before = [w.clone() for w in ws], h.h.clone()
    for kw in ({}, {"act_order": True, "clip_search": True}, {"clip_search": True, "clip_objective": "output"}):
        whole = gptq_quantize(torch.cat(ws), h.h, 4, 32, **kw)
        parts = gptq_quantize(ws, h.h, 4, 32, **kw)
        assert torch.equal(whole[0], parts[0]) and torch.equal(whole[1], parts[1]) and whole[2] and parts[2]
    assert all(torch.equal(a, b) for a, b in zip(ws, before[0])) and torch.equal(h.h, before[1])


def test_inverse_factor_is_computed_in_one_column_major_buffer_with_the_reference_bits():
    """GPTQ's Hessian inverse factor: the dampened (permuted) Hessian, its Cholesky factor, the inverse and the
    inverse's factor all in one column-major buffer (LAPACK's layout, so no call copies the matrix), with the
    same bits as the out-of-place chain on ``h[perm][:, perm]``."""
    from fptq.quant.gptq import _inverse_factor, _working_hessian

    x = _correlated_inputs(400, 72)
    acc = HessianAccumulator(72)
    acc.add(x)
    h = acc.h
    perm = torch.argsort(torch.diag(h), descending=True)
    w = _working_hessian(h, perm)
    assert w.stride() == (1, 72) and torch.equal(w, h[perm][:, perm])
    for p in (None, perm):
        hp = h.clone() if p is None else h[p][:, p]
        hp.diagonal().add_(0.01 * torch.mean(torch.diag(hp)))
        want = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hp)), upper=True)
        got = _inverse_factor(h, p, 0.01)
        assert got.stride() == (1, 72) and torch.equal(got, want)
    assert _inverse_factor(-torch.eye(8), None, 0.01) is None  # not positive definite even dampened


def test_clip_search_in_blocks_of_rows_equals_the_whole_matrix(monkeypatch):
    """The weight clip search runs a block of rows at a time (bounded temporaries): rows are independent, so
    the scales are the same bits as one pass over the whole matrix."""
    import fptq.quant.weights as W

    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 200, generator=g)
    gram = group_gram(torch.randn(64, 200, generator=g), 64)
    whole = [W.weight_scales(w, 4, 64, clip_search=True), W.weight_scales(w, 4, 64, clip_search=True, gram=gram)]
    monkeypatch.setattr(W, "CLIP_SEARCH_ELEMENTS", 3 * 200)  # blocks of 3 rows
    blocked = [W.weight_scales(w, 4, 64, clip_search=True), W.weight_scales(w, 4, 64, clip_search=True, gram=gram)]
    assert all(torch.equal(a, b) for a, b in zip(whole, blocked))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_signed_scales(act_order):
    """GPTQ on the signed-extreme grid: scales of both signs, the static-group scales exactly those of
    weight_scales, and a lower output error than round-to-nearest on the same grid and than GPTQ with
    positive scales."""
    torch.manual_seed(8)
    k = 128
    x = _correlated_inputs(2048, k, seed=8)
    w = torch.randn(48, k)
    acc = HessianAccumulator(k)
    acc.add(x)
    q, s, ok = gptq_quantize(w, acc.h, bits=4, group_size=32, act_order=act_order, scale_sign="signed")
    assert ok and bool((s < 0).any()) and bool((s > 0).any())
    if act_order:
        assert torch.equal(s, weight_scales(w, 4, 32, rounding="nearest", sign="signed"))
    err = (x @ (dequantize_weight(q, s, 32) - w).t()).pow(2).mean()
    err_rtn = (x @ (fake_quantize_weight(w, 4, 32, sign="signed") - w).t()).pow(2).mean()
    assert err < 0.8 * err_rtn
    qp, sp, _ = gptq_quantize(w, acc.h, bits=4, group_size=32, act_order=act_order)
    assert err < (x @ (dequantize_weight(qp, sp, 32) - w).t()).pow(2).mean()


def _row_output_error(x, w, q, s, gs):
    d = dequantize_weight(q, s, gs) - w
    return (x @ d.t()).pow(2).sum(0)  # [rows]: each row's squared output error on the inputs


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_clip_rows_best_keeps_per_row_the_result_with_the_smaller_output_error(act_order):
    """``clip_rows="best"``: every row is the clipped or the unclipped GPTQ result (the same row as that run
    gives on its own, up to the summation order of the block updates), the one whose error on the
    calibration outputs is smaller; both kinds of rows occur here, so the whole Linear's error is below
    either run's."""
    torch.manual_seed(7)
    k, n, gs = 128, 64, 32
    x = _correlated_inputs(2048, k, seed=7) * torch.linspace(0.2, 3.0, k)
    w = torch.randn(n, k)
    w[: n // 2, ::9] *= 6  # rows with a few large weights, where clipping them may cost more than it saves
    acc = HessianAccumulator(k)
    acc.add(x)
    kw = dict(bits=4, group_size=gs, act_order=act_order, clip_search=True)
    q_c, s_c, _ = gptq_quantize(w, acc.h, **kw)
    q_n, s_n, _ = gptq_quantize(w, acc.h, **{**kw, "clip_search": False})
    q_b, s_b, ok = gptq_quantize(w, acc.h, **kw, clip_rows="best")
    assert ok and q_b.shape == (n, k) and s_b.shape == (n, k // gs)
    e_c, e_n, e_b = (_row_output_error(x, w, q, s, gs) for q, s in ((q_c, s_c), (q_n, s_n), (q_b, s_b)))
    from_clip = (s_b == s_c).all(1) & ((q_b == q_c).float().mean(1) > 0.99)
    from_plain = (s_b == s_n).all(1) & ((q_b == q_n).float().mean(1) > 0.99)
    assert bool((from_clip | from_plain).all())
    assert 0 < int(from_clip.sum()) < n and not torch.equal(s_c, s_n)  # both choices made
    torch.testing.assert_close(e_b, torch.minimum(e_c, e_n), rtol=1e-3, atol=0)
    assert e_b.sum() < 0.999 * min(e_c.sum(), e_n.sum())


def test_gptq_clip_rows_without_the_clip_search_changes_nothing_and_is_checked():
    torch.manual_seed(8)
    x = _correlated_inputs(256, 64, seed=8)
    w = torch.randn(8, 64)
    h = 2 / 256 * x.t() @ x
    q, s, _ = gptq_quantize(w, h, 4, 32, act_order=True)
    q2, s2, _ = gptq_quantize(w, h, 4, 32, act_order=True, clip_rows="best")
    assert torch.equal(q, q2) and torch.equal(s, s2)
    with pytest.raises(ValueError, match="clip_rows"):
        gptq_quantize(w, h, 4, 32, clip_search=True, clip_rows="some")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("clip_rows", ["all", "best"])
def test_gptq_on_cuda_gives_the_cpu_codes(clip_rows):
    """The pipeline runs GPTQ where the layer's weights are (the GPU with --device cuda): every buffer, the
    factorisations and the column loop on that device, with the CPU's codes up to float summation order."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4096, 256, generator=g)
    x[:, ::17] *= 10
    h = 2 * x.t() @ x / x.shape[0]
    w = [torch.randn(96, 256, generator=g), torch.randn(32, 256, generator=g)]
    kw = dict(bits=4, group_size=64, act_order=True, clip_search=True, clip_objective="output", clip_rows=clip_rows)
    q_cpu, s_cpu, ok_cpu = gptq_quantize(w, h, **kw)
    q_gpu, s_gpu, ok_gpu = gptq_quantize([p.cuda() for p in w], h.cuda(), **kw)
    assert ok_cpu and ok_gpu
    assert q_gpu.device.type == "cuda" and s_gpu.device.type == "cuda"
    assert float((q_gpu.cpu() == q_cpu).float().mean()) > 0.99
    assert float((s_gpu.cpu() == s_cpu).float().mean()) > 0.95

import pytest
import torch

from fptq.quant.weights import fp16_floor, group_gram
from fptq.quant import (
    dequantize_weight,
    expand_group_scales,
    fake_quantize_weight,
    num_groups,
    pack_int4,
    quantize_weight,
    unpack_int4,
    weight_scales,
)


@pytest.mark.parametrize("k,gs", [(128, 32), (200, 64), (576, 128), (7, 4), (64, -1)])
def test_roundtrip_error_is_within_half_a_step(k, gs):
    torch.manual_seed(0)
    w = torch.randn(16, k)
    s = weight_scales(w, 4, gs)
    g = num_groups(k, gs)
    assert s.shape == (16, g) and s.dtype == torch.float16
    q = quantize_weight(w, s, 4, gs)
    assert int(q.min()) >= -8 and int(q.max()) <= 7
    deq = dequantize_weight(q, s, gs)
    step = expand_group_scales(s.float(), k, gs)
    # absmax/7.5 scales: the max rounds to 8 and clamps to 7, so the error is still <= half a step
    # (plus the float16 rounding of the scale, downwards: at most 7.5 * 2**-10 of a step)
    assert bool(((deq - w).abs() <= step * (0.5 + 7.5 * 2**-10) + 1e-6).all())


def test_fp16_floor_is_the_largest_float16_not_above():
    x = torch.cat([torch.rand(10000) * 10, torch.tensor([0.0, 1.0, 0.5, 65504.0, 1e6, 1e-9])])
    h = fp16_floor(x)
    assert h.dtype == torch.float16 and bool((h.float() <= x).all())
    up = (h.view(torch.int16) + 1).view(torch.float16).float()  # the next float16 above
    assert bool((up > x).all())
    assert h[-5] == 1.0 and h[-4] == 0.5 and h[-3] == 65504 and h[-2] == 65504  # exact values kept; overflow capped


def test_group_extremes_use_the_full_code_range():
    """A group's largest-magnitude weight gets code -8 when negative and 7 when positive: the float16
    scale never rounds up, which would send -7.5 s to -7 and shrink both extremes of the group
    (rounding to nearest did that to about half the groups)."""
    torch.manual_seed(3)
    w = torch.randn(64, 512) * torch.rand(64, 1) * 0.05
    s = weight_scales(w, 4, 64)
    q = quantize_weight(w, s, 4, 64).view(64, 8, 64)
    wg = w.view(64, 8, 64)
    idx = wg.abs().argmax(-1, keepdim=True)
    ext_code, ext_w = q.gather(-1, idx).squeeze(-1), wg.gather(-1, idx).squeeze(-1)
    assert bool((ext_code[ext_w < 0] == -8).all()) and bool((ext_code[ext_w > 0] == 7).all())
    # to nearest, the scale rounds up for some groups and their negative extreme lands on -7
    s_near = (w.view(64, 8, 64).abs().amax(-1) / 7.5).half()
    q_near = quantize_weight(w, s_near, 4, 64).view(64, 8, 64).gather(-1, idx).squeeze(-1)
    assert bool((q_near[ext_w < 0] == -7).any())


def test_nearest_rounding_is_the_plain_float16_cast():
    torch.manual_seed(4)
    w = torch.randn(8, 128)
    near = weight_scales(w, 4, 32, rounding="nearest")
    assert torch.equal(near, (w.view(8, 4, 32).abs().amax(-1) / 7.5).half())
    down = weight_scales(w, 4, 32)
    assert bool((down <= near).all()) and bool((down < near).any())
    with pytest.raises(ValueError, match="rounding"):
        weight_scales(w, 4, 32, rounding="up")


def test_ragged_last_group_uses_its_own_scale():
    w = torch.ones(2, 200)
    w[:, 128:] = 100.0  # the ragged tail (groups of 64: 0-63, 64-127, 128-191, 192-199)
    w[:, 192:] = 0.01
    s = weight_scales(w, 4, 64).float()
    assert s.shape == (2, 4)
    torch.testing.assert_close(s[:, 3], torch.full((2,), 0.01 / 7.5), rtol=1e-3, atol=0)
    deq = fake_quantize_weight(w, 4, 64)
    torch.testing.assert_close(deq[:, 192:], w[:, 192:], rtol=0.1, atol=0)


def test_scales_are_exact_fp16_so_the_checkpoint_reproduces_codes():
    torch.manual_seed(1)
    w = torch.randn(8, 96)
    s = weight_scales(w, 4, 32)
    q1 = quantize_weight(w, s, 4, 32)
    q2 = quantize_weight(w, s.float().half(), 4, 32)
    assert torch.equal(q1, q2)


def test_clip_search_never_increases_error():
    torch.manual_seed(2)
    w = torch.randn(32, 256) * torch.rand(32, 256).pow(4) * 3
    e_plain = (fake_quantize_weight(w, 4, 64) - w).pow(2).sum()
    e_clip = (fake_quantize_weight(w, 4, 64, clip_search=True) - w).pow(2).sum()
    assert e_clip <= e_plain * (1 + 1e-6)


@pytest.mark.parametrize("k", [1, 2, 7, 64, 577])
def test_pack_unpack_bit_exact(k):
    g = torch.Generator().manual_seed(k)
    q = torch.randint(-8, 8, (5, k), generator=g, dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (k + 1) // 2)
    assert torch.equal(unpack_int4(packed, k), q)


def test_pack_layout_low_nibble_first():
    q = torch.tensor([[1, -1, -8, 7]], dtype=torch.int8)
    assert pack_int4(q).tolist() == [[0xF1, 0x78]]


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match="-8..7"):
        pack_int4(torch.tensor([[8]], dtype=torch.int8))


def test_group_gram_is_the_diagonal_blocks_of_xtx():
    torch.manual_seed(3)
    x = torch.randn(40, 100)  # groups of 32: the last one ragged (4 columns)
    g = group_gram(x, 32)
    assert g.shape == (4, 32, 32)
    full = x.t() @ x / 40
    torch.testing.assert_close(g[1], full[32:64, 32:64])
    torch.testing.assert_close(g[3, :4, :4], full[96:, 96:])
    assert bool((g[3, 4:, :] == 0).all())


def test_output_objective_clip_search_lowers_the_output_error():
    # channels of very different magnitude: the weight error of the columns that meet large inputs matters most
    torch.manual_seed(4)
    x = torch.randn(2048, 128) * torch.linspace(0.05, 4, 128)[torch.randperm(128)]
    w = torch.randn(32, 128) * torch.rand(32, 128).pow(3) * 2

    def out_err(s):
        return float((x @ (dequantize_weight(quantize_weight(w, s, 4, 32), s, 32) - w).t()).pow(2).mean())

    plain = out_err(weight_scales(w, 4, 32))
    by_weight = out_err(weight_scales(w, 4, 32, clip_search=True))
    by_output = out_err(weight_scales(w, 4, 32, clip_search=True, gram=group_gram(x, 32)))
    assert by_output < plain
    assert by_output < by_weight


def test_output_objective_rejects_a_gram_of_other_groups():
    with pytest.raises(ValueError, match="gram must be"):
        weight_scales(torch.randn(4, 64), 4, 32, clip_search=True, gram=torch.zeros(3, 32, 32))


@pytest.mark.parametrize("rounding", ["down", "nearest"])
def test_signed_scales_put_each_group_extreme_on_code_minus_8(rounding):
    """llama.cpp's Q4_0 rule: the scale is the group's signed extreme over -8, so the extreme is code -8
    (whatever its sign) and comes back within the float16 rounding of its scale; the scale's sign is the
    opposite of the extreme's."""
    torch.manual_seed(6)
    w = torch.randn(32, 320) * torch.rand(32, 1)
    w[0, :64] = 0.0  # an all-zero group: a tiny positive scale, codes 0
    s = weight_scales(w, 4, 64, sign="signed", rounding=rounding)
    assert s.dtype == torch.float16 and s.shape == (32, 5)
    wg = w.view(32, 5, 64)
    ext = wg.gather(-1, wg.abs().argmax(-1, keepdim=True)).squeeze(-1)
    nz = ext != 0
    assert bool((torch.sign(s.float())[nz] == -torch.sign(ext)[nz]).all())
    assert s[0, 0] > 0 and torch.equal(quantize_weight(w, s, 4, 64)[0, :64], torch.zeros(64, dtype=torch.int8))
    q = quantize_weight(w, s, 4, 64).view(32, 5, 64)
    assert bool((q.gather(-1, wg.abs().argmax(-1, keepdim=True)).squeeze(-1)[nz] == -8).all())
    if rounding == "down":  # toward zero: |s| never above |extreme| / 8
        assert bool(((s.float().abs() <= ext.abs() / 8) | ~nz).all())
    else:
        assert torch.equal(s[nz], (ext / -8).half()[nz])
    # the step is |extreme| / 8 instead of / 7.5: every weight the grid spans within half a step; on the
    # extreme's other side the grid stops at 7 steps, and a weight beyond (up to 8) is within one step
    deq = dequantize_weight(q.view(32, 320), s, 64)
    step = expand_group_scales(s.float().abs(), 320, 64)
    err, inside = (deq - w).abs(), (w / expand_group_scales(s.float(), 320, 64)) <= 7.5
    assert bool((err[inside] <= step[inside] * (0.5 + 8 * 2**-10) + 1e-6).all())
    assert bool((err <= step * (1 + 8 * 2**-10) + 1e-6).all()) and bool((~inside).any())


def test_signed_scales_lower_the_weight_error_with_and_without_clip_search():
    torch.manual_seed(7)
    w = torch.randn(128, 512)
    err = {(sign, clip): (fake_quantize_weight(w, 4, 64, clip_search=clip, sign=sign) - w).pow(2).sum()
           for sign in ("positive", "signed") for clip in (False, True)}
    assert err["signed", False] < 0.9 * err["positive", False]
    assert err["signed", True] < 0.95 * err["positive", True]
    assert err["signed", True] <= err["signed", False] * (1 + 1e-6)
    # the clip search keeps each group's sign
    s_clip, s_plain = weight_scales(w, 4, 64, clip_search=True, sign="signed"), weight_scales(w, 4, 64, sign="signed")
    assert torch.equal(torch.sign(s_clip), torch.sign(s_plain))
    assert bool((s_clip.float().abs() <= s_plain.float().abs()).all())
    with pytest.raises(ValueError, match="sign"):
        weight_scales(w, 4, 64, sign="negative")

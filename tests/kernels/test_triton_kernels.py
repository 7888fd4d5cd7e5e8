"""Triton W4A8 kernels against ``QuantLinear.reference_forward``.

* On a CUDA machine with triton: the real kernels (``test_gpu_*``).
* Without CUDA but with triton installed (CI: ``pip install -e '.[test]'`` installs it):
  the same checks under Triton's interpreter on CPU tensors with small shapes
  (``test_interpreter_*``, ~15 s). ``tests/conftest.py`` sets ``TRITON_INTERPRET=1``
  when there is no CUDA device, before anything imports triton: the interpreter is
  chosen when the kernels are defined, at import.
* Without triton: everything here but the import checks is skipped; the module
  itself must still import (``test_module_imports_without_triton_or_cuda``).

Every case runs every path / kernel variant (``VARIANTS``): the ``triton``
(auto), ``triton_grouped`` and ``triton_perchannel`` forwards, and the GEMV,
swapped-operand and plain tensor-core grouped kernels with explicit split-K, and
the ``torch._int_mm`` per-channel variant.

Bounds: activation codes and per-token scales bit-identical to
``quantize_input`` (also in the reciprocal mode torch uses on CUDA); float32
outputs within ``1e-5 * (|x_deq| @ |W_deq|^T)`` of the reference (exact
group-wise maths, only the summation order differs); fp16/bf16 outputs within
one rounding of the output dtype of the float32 reference (``2 * eps(dtype) *
|ref| + 1e-5 * bound``).  The per-channel paths are held to the same bounds
against the per-channel reference (``x_deq @ (W8 * s_c)^T``), and their int8
weights must equal the CPU ``int8_perchannel`` backend's.  No variant may
have fallen back to the baseline kernel.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
#: set by tests/conftest.py when there is no CUDA device
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# (leading dims, K, N, group_size, act_mode, bias, dtype)
CASES = [
    ((1,), 200, 7, 64, "static_tensor", True, "float32"),  # M = 1, ragged group, odd N
    ((2, 3), 200, 33, 64, "dynamic_token", False, "float32"),  # batch dims
    ((17,), 256, 65, 128, "dynamic_token", True, "float16"),
    ((3,), 201, 9, -1, "dynamic_token", True, "float32"),  # per-channel, odd K
    ((20,), 256, 40, 32, "static_tensor", False, "bfloat16"),
    ((40,), 320, 130, 64, "dynamic_token", True, "float32"),  # several M and N tiles
    ((1, 5), 384, 24, 128, "static_tensor", True, "float16"),
]
GPU_CASES = CASES + [
    ((300,), 4096, 1000, 128, "dynamic_token", True, "float16"),
    ((1,), 11008, 4096, 128, "static_tensor", False, "float16"),
    ((129,), 1000, 257, 64, "dynamic_token", True, "bfloat16"),
]


def _dtype(name):
    return getattr(torch, name)


#: what each variant runs; "perchannel"-type variants are checked against the per-channel
#: reference (the int8 weights times their per-channel scales), the others against
#: ``reference_forward`` (exact group-wise maths)
VARIANTS = ("auto", "grouped", "perchannel", "gemv_split3", "gemm_swap_split2", "gemm_split2", "int_mm",
            "gemv_quant", "gemv_quant_split3", "gemv_dp4a", "gemv_dp4a_split3", "gemv_dp4a_1l")


def _tol_ratio(y, ref, qf, w_deq, bias, dtype) -> float:
    bound = (qf.abs() @ w_deq.abs().t()).reshape(ref.shape)
    if bias is not None:
        bound = bound + bias.float().abs()
    eps = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps
    tol = 2 * eps * ref.abs() + 1e-5 * bound + 1e-6
    return float(((y.float() - ref).abs() / tol).max()) if ref.numel() else 0.0


def run_case(case, device, variants=VARIANTS, group_scales: str = "float") -> dict:
    """Run one case with every variant; return a dict of measured errors and booleans. ``group_scales="integer"``:
    the weights get integer group scales (:mod:`fptq.quant.intscales`), which the packed kernels sum in one int32
    accumulator and the per-channel paths convert without a rounding."""
    import warnings

    from fptq.kernels import cpu as kcpu
    from fptq.kernels import triton_w4a8 as tw
    from fptq.nn import QuantLinear
    from fptq.quant import quantize_weight, weight_scales

    lead, k, n, gs, mode, bias, dtname = case
    dtype = _dtype(dtname)
    g = torch.Generator().manual_seed(k * 31 + n)
    w = torch.randn(n, k, generator=g)
    if group_scales == "integer":
        from fptq.quant.intscales import integer_group_scales

        s = integer_group_scales(w, gs)  # multipliers -15 .. 16: either sign
    else:
        s = weight_scales(w, 4, gs, sign="signed")  # scales of either sign: the kernels multiply, whatever the sign
    q = quantize_weight(w, s, 4, gs)
    b = torch.randn(n, generator=g) if bias else None
    layer = QuantLinear.from_codes(q, s, wbits=4, group_size=gs, abits=8, act_mode=mode, act_scale=0.05, bias=b)
    w8_cpu, sc_cpu = kcpu.perchannel_weight(layer)  # the CPU backend's conversion, on a CPU copy
    layer = layer.to(device)
    x = torch.randn(*lead, k, generator=g)
    x[..., :: max(1, k // 7)] *= 8
    x = x.to(dtype).to(device)
    x2 = x.reshape(-1, k)
    out = {"case": repr(case)}
    # activation quantization
    qx, sx = tw.quantize_activations(x2, layer.act_scale if mode == "static_tensor" else None)
    qr, sr = layer.quantize_input(x2)
    out["codes_equal"] = bool(torch.equal(qx, qr))
    out["scales_equal"] = bool(torch.equal(sx.reshape(-1), sr.reshape(-1).to(sx.device)))
    qf = qr.float() * sr
    ref = layer.reference_forward(x.float())  # float32 reference on the same codes
    w8, sc = tw.perchannel_weight_device(layer)
    out["w8_matches_cpu"] = bool(torch.equal(w8.cpu(), w8_cpu) and torch.equal(sc.cpu(), sc_cpu.float()))
    w_pc = w8.float() * sc[:, None]
    if group_scales == "integer":  # found again at first use; the per-channel weights are the group-wise ones
        out["int_scales_found"] = tw.integer_scales_device(layer) is not None
        out["w8_exact"] = bool(torch.equal(w_pc.cpu(), layer.dequantized_weight().float().cpu()))
    ref_pc = qf @ w_pc.t()
    if layer.bias is not None:
        ref_pc = ref_pc + layer.bias.float()
    ref_pc = ref_pc.reshape(ref.shape)
    args = (qr, sr.reshape(-1) if mode == "dynamic_token" else sr, layer.qweight, layer.w_scales, k, gs)
    runs = {
        "auto": lambda: tw.triton_forward(layer, x),
        "grouped": lambda: tw.triton_forward(layer, x, path="grouped"),
        "perchannel": lambda: tw.triton_forward(layer, x, path="perchannel"),
        "gemv_split3": lambda: tw.w4a8_gemv(*args, bias=layer.bias, out_dtype=dtype, config={"SPLIT_K": 3}),
        "gemm_swap_split2": lambda: tw.w4a8_matmul(
            *args, bias=layer.bias, out_dtype=dtype, config={"SWAP_AB": True, "SPLIT_K": 2}),
        "gemm_split2": lambda: tw.w4a8_matmul(
            *args, bias=layer.bias, out_dtype=dtype, config={"SWAP_AB": False, "SPLIT_K": 2}),
        "int_mm": lambda: tw.int8_perchannel_matmul(
            qr, args[1], w8, sc, bias=layer.bias, out_dtype=dtype, impl="int_mm"),
        "gemv_quant": lambda: fused(None),
        "gemv_quant_split3": lambda: fused({"SPLIT_K": 3}),
        "gemv_dp4a": lambda: dp4a(None),
        "gemv_dp4a_split3": lambda: dp4a({"SPLIT_K": 3}),
        "gemv_dp4a_1l": lambda: dp4a_one_launch(),
    }
    fused_scales = {}
    dp4a_why = tw.dp4a_problem(layer.qweight, k, gs)

    def dp4a(config):
        # the dp4a GEMV (PTX on CUDA): its default configuration against the reference; tiled by whole groups as
        # the byte-wise GEMV (its BLOCK_K) with the same split-K, that GEMV's bits
        static = layer.act_scale if mode == "static_tensor" else None
        if config is None:
            return tw.w4a8_gemv_dp4a(x2, static, layer.qweight, layer.w_scales, k, gs, qmax=layer.act_qmax(),
                                     bias=layer.bias, out_dtype=dtype)[0]
        config = dict(config, BLOCK_K=tw.pick_gemv_config(x2.shape[0], n, k, gs)["BLOCK_K"])
        y = tw.w4a8_gemv_dp4a(x2, static, layer.qweight, layer.w_scales, k, gs, qmax=layer.act_qmax(),
                              bias=layer.bias, out_dtype=dtype, config=config)[0]
        fused_scales["dp4a bits"] = bool(torch.equal(y, tw.w4a8_gemv_quant(
            x2, static, layer.qweight, layer.w_scales, k, gs, qmax=layer.act_qmax(), bias=layer.bias,
            out_dtype=dtype, config=config)[0]))
        return y

    def dp4a_one_launch():
        # split-K reduced in the same launch (counters): the two-launch reduction's bits, the counters back at zero
        static = layer.act_scale if mode == "static_tensor" else None
        cfg = {"SPLIT_K": 3}
        cnt = torch.zeros(tw.counters_needed(x2.shape[0], n, k, gs, cfg), dtype=torch.int32, device=x2.device)
        kw = dict(qmax=layer.act_qmax(), bias=layer.bias, out_dtype=dtype, config=cfg)
        y = tw.w4a8_gemv_dp4a(x2, static, layer.qweight, layer.w_scales, k, gs, counters=cnt, **kw)[0]
        two = tw.w4a8_gemv_dp4a(x2, static, layer.qweight, layer.w_scales, k, gs, **kw)[0]
        fused_scales["dp4a one-launch bits"] = bool(torch.equal(y, two)) and not bool(cnt.any())
        return y

    def fused(config):
        # the activations quantized inside the GEMV: the same scales as quantize_input and, for the same launch
        # configuration, the same bits as quantize_activations followed by the GEMV
        y, s_f = tw.w4a8_gemv_quant(x2, layer.act_scale if mode == "static_tensor" else None, layer.qweight,
                                    layer.w_scales, k, gs, qmax=layer.act_qmax(), bias=layer.bias, out_dtype=dtype,
                                    config=config)
        fused_scales[repr(config)] = bool(torch.equal(s_f.reshape(-1), sr.reshape(-1).to(s_f.device)))
        unfused = tw.w4a8_gemv(*args, bias=layer.bias, out_dtype=dtype, config=config)
        fused_scales[repr(config) + " bits"] = bool(torch.equal(y, unfused))
        return y
    m = x2.shape[0]
    for v in variants:
        if v.startswith("gemv_dp4a") and (dp4a_why or m > tw.GEMV_MAX_M):
            out[v] = {"skipped": dp4a_why or f"M={m}: the dispatch runs the dp4a GEMV for M <= {tw.GEMV_MAX_M}"}
            continue
        try:
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                y = runs[v]()
        except Exception as e:  # one broken variant must not hide the others
            out[v] = {"error": f"{e!r}"[:2000]}
            continue
        pc = v in ("perchannel", "int_mm") or (v == "auto" and tw.select_path(m) == "perchannel")
        r_ref, w_ref = (ref_pc, w_pc) if pc else (ref, layer.dequantized_weight())
        y = y.reshape(ref.shape)
        out[v] = {
            "shape_ok": tuple(y.shape) == tuple(ref.shape),
            "dtype_ok": y.dtype == dtype,
            "max_err_over_tol": _tol_ratio(y, r_ref, qf, w_ref, layer.bias, dtype),
            "max_rel_err": float((y.float() - r_ref).abs().max() / r_ref.abs().max().clamp_min(1e-12)),
            "fallback_warnings": [str(w_.message) for w_ in rec if "falling back" in str(w_.message)],
        }
        if v.startswith("gemv_quant"):  # scales equal to quantize_input's, output bits equal to the unfused pair's
            out[v]["same_as_unfused"] = all(fused_scales.values()) and len(fused_scales) == 2
            fused_scales.clear()
        if v == "gemv_dp4a_split3":  # the byte-wise GEMV's bits for the same tiling and split-K
            out[v]["same_as_unfused"] = fused_scales.pop("dp4a bits", False)
        if v == "gemv_dp4a_1l":  # the two-launch split-K's bits
            out[v]["same_as_unfused"] = fused_scales.pop("dp4a one-launch bits", False)
    return out


def _assert_ok(r: dict, variant: str = "auto") -> None:
    assert r["codes_equal"] and r["scales_equal"], r
    assert r["w8_matches_cpu"], r
    v = r[variant]
    if "skipped" in v:  # a kernel that does not cover this layer (the dispatch does not use it there)
        return
    assert "error" not in v, (variant, v["error"])
    assert v["shape_ok"] and v["dtype_ok"], (variant, r)
    assert v["max_err_over_tol"] <= 1.0, (variant, r)
    assert not v["fallback_warnings"], (variant, r)
    assert v.get("same_as_unfused", True), (variant, r)
    assert r.get("int_scales_found", True) and r.get("w8_exact", True), r


def quant_recip_check() -> dict:
    """The per-token scale in the reciprocal mode (what torch does on CUDA) against an
    emulation of ``amax * fp32(1/127)`` on CPU, and the codes from that scale."""
    import numpy as np

    from fptq.kernels import triton_w4a8 as tw

    g = torch.Generator().manual_seed(7)
    x = torch.randn(33, 300, generator=g) * torch.rand(33, 1, generator=g) * 10
    q, s = tw.quantize_activations(x, None, recip=True)
    s_ref = (x.abs().amax(dim=-1, keepdim=True) * torch.tensor(np.float32(1.0 / 127))).clamp_min(1e-8)
    q_ref = torch.clamp(torch.round(x / s_ref), -127, 127).to(torch.int8)
    return {"scales_equal": bool(torch.equal(s, s_ref.reshape(-1))), "codes_equal": bool(torch.equal(q, q_ref)),
            "differs_from_division": int((s != (x.abs().amax(dim=-1) / 127)).sum())}


def test_module_imports_without_triton_or_cuda():
    from fptq.kernels import triton_w4a8 as tw

    assert tw.HAS_TRITON == HAS_TRITON
    assert tw.is_available() == (HAS_TRITON and HAS_CUDA)
    cfg = tw.pick_config(1, 4096, 4096, 128)
    assert cfg["BLOCK_M"] >= 16 and 128 % cfg["BLOCK_K"] == 0
    assert tw.pick_config(2048, 4096, 4096, 64)["BLOCK_K"] == 64
    assert tw.pick_gemv_config(1, 4096, 4096, 32)["BLOCK_K"] == 32
    assert tw.select_path(1) == "gemv" and tw.select_path(4096) == "perchannel"
    assert tw.select_path(tw.GROUPED_MAX_M) == "grouped"


def test_split_plan():
    from fptq.kernels import triton_common as tw

    # decode, K=11008 N=4096: 64 tiles of 64 channels -> split K over the 86 groups
    s, chunk = tw._split_plan(64, 1, 11008, 86, 128, "cpu")
    assert s > 1 and (s - 1) * chunk < 86 <= s * chunk
    assert tw._split_plan(10_000, 1, 4096, 32, 128, "cpu") == (1, 32)  # enough tiles already
    assert tw._split_plan(4, 1, 256, 4, 64, "cpu") == (1, 4)  # K too short to split
    assert tw._split_plan(4, 1, 256, 4, 64, "cpu", split_k=3) == (2, 2)  # explicit, rounded to full chunks


# ------------------------------------------------------------- interpreter
interpreter = pytest.mark.skipif(
    not (HAS_TRITON and INTERPRET),
    reason="triton is not installed" if not HAS_TRITON else
    "CUDA is present: test_gpu_* runs the same cases on the GPU (TRITON_INTERPRET is left unset)",
)


@pytest.fixture(scope="module")
def interp_case():
    """``run_case`` on CPU tensors under the interpreter, every variant at once, once per case and kind of group
    scales."""
    done: dict = {}

    def get(idx: int, group_scales: str = "float") -> dict:
        if (idx, group_scales) not in done:
            done[idx, group_scales] = run_case(CASES[idx], "cpu", group_scales=group_scales)
        return done[idx, group_scales]

    return get


@interpreter
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("idx", range(len(CASES)))
def test_interpreter_kernels_match_reference(interp_case, idx, variant):
    """The Triton kernels under TRITON_INTERPRET=1 on CPU tensors."""
    _assert_ok(interp_case(idx), variant)


#: the cases also run with integer group scales (several groups per row: the integer path needs more than one)
INT_CASE_INDICES = (0, 1, 2, 6)


@interpreter
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("idx", INT_CASE_INDICES)
def test_interpreter_kernels_match_reference_with_integer_group_scales(interp_case, idx, variant):
    """Integer group scales: the packed kernels' single-accumulator path and the per-channel paths (exact here)
    against the group-wise reference, every variant."""
    _assert_ok(interp_case(idx, "integer"), variant)


@interpreter
def test_interpreter_quant_reciprocal_mode():
    r = quant_recip_check()
    assert r["scales_equal"] and r["codes_equal"], r
    assert r["differs_from_division"] > 0, r  # the probe case really exercises the difference


@interpreter
def test_interpreter_kernels_are_interpreted():
    """The kernels were defined in interpreter mode (TRITON_INTERPRET was set before the import)."""
    from fptq.kernels import triton_grouped, triton_perchannel, triton_quant

    for fn in (triton_grouped._w4a8_gemm_kernel, triton_grouped._w4a8_gemv_kernel,
               triton_perchannel._int8_gemm_kernel, triton_quant._quant_act_kernel):
        assert type(fn).__name__ == "InterpretedFunction", type(fn)


# --------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON) or INTERPRET,
                         reason="needs a CUDA device and triton (the CPU runs the interpreter tests instead)")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[repr(c) for c in GPU_CASES])
def test_gpu_kernels_match_reference(case):
    r = run_case(case, "cuda")
    for v in VARIANTS:
        _assert_ok(r, v)
    if case[3] > 0 and -(-case[1] // case[3]) > 1:
        r = run_case(case, "cuda", group_scales="integer")
        for v in VARIANTS:
            _assert_ok(r, v)


@gpu
@pytest.mark.gpu
def test_gpu_backend_dispatch():
    from fptq.kernels import available_backends, default_backend, run_backend

    for name in ("triton", "triton_grouped", "triton_perchannel"):
        assert name in available_backends("cuda")
    assert default_backend("cuda") == "triton"
    from fptq.nn import QuantLinear

    layer = QuantLinear(256, 64, group_size=128, act_mode="dynamic_token", device="cuda").set_backend("auto")
    x = torch.randn(3, 256, device="cuda", dtype=torch.float16)
    assert layer(x).shape == (3, 64)
    for name in ("triton", "triton_grouped", "triton_perchannel"):
        assert run_backend(name, layer, x).dtype == torch.float16


@interpreter
@pytest.mark.parametrize("mode", ["dynamic_token", "static_tensor"])
def test_interpreter_quant_in_blocks_matches_quantize_input(mode):
    """Rows longer than one block (K > 16384 by default) are read a block at a time, for the per-token absmax (the
    helper the self-quantizing GEMV shares) and for the codes: the same codes and scales as ``quantize_input``."""
    from fptq.kernels import triton_w4a8 as tw
    from fptq.nn import QuantLinear
    from fptq.quant import quantize_weight, weight_scales

    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 1000, generator=g) * 4
    w = torch.randn(8, 1000, generator=g)
    sw = weight_scales(w, 4, -1)
    layer = QuantLinear.from_codes(quantize_weight(w, sw, 4, -1), sw, wbits=4, group_size=-1, abits=8, act_mode=mode,
                                   act_scale=0.05)
    q, s = tw.quantize_activations(x, layer.act_scale if mode == "static_tensor" else None, block=128)
    q_ref, s_ref = layer.quantize_input(x)
    assert torch.equal(q, q_ref) and torch.equal(s.reshape(-1), s_ref.reshape(-1))

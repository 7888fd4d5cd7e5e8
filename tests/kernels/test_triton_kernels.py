"""Triton W4A8 kernels against ``QuantLinear.reference_forward``.

* On a CUDA machine with triton: the real kernels (``test_gpu_*``).
* Without CUDA but with triton installed: the same checks under Triton's
  interpreter (``TRITON_INTERPRET=1``) on CPU tensors with small shapes, run in
  a subprocess (the interpreter is chosen when the kernels are defined, at
  import), ~10-20 s.
* Without triton: everything here is skipped; the module itself must still
  import (checked by ``test_module_imports_without_triton_or_cuda``).

Bounds: activation codes and per-token scales bit-identical to
``quantize_input``; float32 outputs within ``1e-5 * (|x_deq| @ |W_deq|^T)``
of the reference (exact group-wise maths, only the summation order differs);
fp16/bf16 outputs within one rounding of the output dtype of the float32
reference (``2 * eps(dtype) * |ref| + 1e-5 * bound``).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()

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


def patch_interpreter_for_numpy2() -> None:
    """Triton 3.6's interpreter does ``int(ndarray_of_shape_(1,))`` for loop bounds, which
    numpy >= 2.4 rejects; make ``__index__`` take the single element instead."""
    import numpy as np
    from triton.runtime import interpreter as it

    if getattr(it, "_fptq_patched", False) or not hasattr(it, "_patch_lang_tensor"):
        return
    orig = it._patch_lang_tensor

    def wrapped(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    it._patch_lang_tensor = wrapped
    it._fptq_patched = True


def _dtype(name):
    return getattr(torch, name)


def run_case(case, device) -> dict:
    """Run one case; return a dict of measured errors and booleans."""
    from fptq.kernels import triton_w4a8 as tw
    from fptq.nn import QuantLinear
    from fptq.quant import quantize_weight, weight_scales

    lead, k, n, gs, mode, bias, dtname = case
    dtype = _dtype(dtname)
    g = torch.Generator().manual_seed(k * 31 + n)
    w = torch.randn(n, k, generator=g)
    s = weight_scales(w, 4, gs)
    q = quantize_weight(w, s, 4, gs)
    b = torch.randn(n, generator=g) if bias else None
    layer = QuantLinear.from_codes(q, s, wbits=4, group_size=gs, abits=8, act_mode=mode, act_scale=0.05, bias=b)
    layer = layer.to(device)
    x = torch.randn(*lead, k, generator=g)
    x[..., :: max(1, k // 7)] *= 8
    x = x.to(dtype).to(device)
    x2 = x.reshape(-1, k)
    # activation quantization
    qx, sx = tw.quantize_activations(x2, layer.act_scale if mode == "static_tensor" else None)
    qr, sr = layer.quantize_input(x2)
    codes_equal = bool(torch.equal(qx, qr))
    scales_equal = bool(torch.equal(sx.reshape(-1), sr.reshape(-1).to(sx.device)))
    # full forward
    y = tw.triton_forward(layer, x)
    ref = layer.reference_forward(x.float())  # float32 reference on the same codes
    qf = qr.float() * sr
    bound = (qf.abs() @ layer.dequantized_weight().abs().t()).reshape(ref.shape)
    if layer.bias is not None:
        bound = bound + layer.bias.float().abs()
    eps = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps
    tol = 2 * eps * ref.abs() + 1e-5 * bound + 1e-6
    ratio = float(((y.float() - ref).abs() / tol).max()) if ref.numel() else 0.0
    return {
        "case": repr(case),
        "shape_ok": tuple(y.shape) == tuple(ref.shape),
        "dtype_ok": y.dtype == dtype,
        "codes_equal": codes_equal,
        "scales_equal": scales_equal,
        "max_err_over_tol": ratio,
        "max_rel_err": float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)),
    }


def _assert_ok(r: dict) -> None:
    assert r["shape_ok"] and r["dtype_ok"], r
    assert r["codes_equal"] and r["scales_equal"], r
    assert r["max_err_over_tol"] <= 1.0, r


def test_module_imports_without_triton_or_cuda():
    from fptq.kernels import triton_w4a8 as tw

    assert tw.HAS_TRITON == HAS_TRITON
    assert tw.is_available() == (HAS_TRITON and HAS_CUDA)
    cfg = tw.pick_config(1, 4096, 4096, 128)
    assert cfg["BLOCK_M"] >= 16 and 128 % cfg["BLOCK_K"] == 0
    assert tw.pick_config(2048, 4096, 4096, 64)["BLOCK_K"] == 64


# ------------------------------------------------------------- interpreter
_INTERP_RESULTS: list | None = None


def _interp_results() -> list:
    global _INTERP_RESULTS
    if _INTERP_RESULTS is None:
        env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
        src = os.path.join(os.path.dirname(__file__), "..", "..", "src")
        env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(src), env.get("PYTHONPATH", "")])
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--interpret"],
            env=env, capture_output=True, text=True, timeout=600,
        )
        if proc.returncode != 0:
            pytest.fail(f"interpreter run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")][-1]
        _INTERP_RESULTS = json.loads(line[len("RESULTS "):])
    return _INTERP_RESULTS


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("idx", range(len(CASES)))
def test_interpreter_kernels_match_reference(idx):
    """The Triton kernels under TRITON_INTERPRET=1 on CPU tensors."""
    r = _interp_results()[idx]
    assert "error" not in r, r.get("error")
    _assert_ok(r)


# --------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[repr(c) for c in GPU_CASES])
def test_gpu_kernels_match_reference(case):
    _assert_ok(run_case(case, "cuda"))


@gpu
@pytest.mark.gpu
def test_gpu_backend_dispatch():
    from fptq.kernels import available_backends, default_backend, run_backend

    assert "triton" in available_backends("cuda")
    assert default_backend("cuda") == "triton"
    r = run_case(((4,), 256, 64, 128, "dynamic_token", True, "float16"), "cuda")
    _assert_ok(r)
    from fptq.nn import QuantLinear

    layer = QuantLinear(256, 64, group_size=128, act_mode="dynamic_token", device="cuda").set_backend("auto")
    x = torch.randn(3, 256, device="cuda", dtype=torch.float16)
    assert layer(x).shape == (3, 64)
    assert run_backend("triton", layer, x).dtype == torch.float16


if __name__ == "__main__" and "--interpret" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"
    patch_interpreter_for_numpy2()
    out = []
    for c in CASES:
        try:
            out.append(run_case(c, "cpu"))
        except Exception as e:  # report, don't hide
            import traceback

            out.append({"case": repr(c), "error": traceback.format_exc()})
    print("RESULTS " + json.dumps(out))

"""One-shot GPU check + benchmark of the Triton W4A8 kernels (fptq backend ``triton``).

    PYTHONUNBUFFERED=1 PYTHONPATH=src python bench/gpu_kernels.py [--out bench/results] [--budget-s 200]

1. Correctness: the Triton kernels against ``QuantLinear.reference_forward``
   (float32, TF32 off) on small/odd shapes (M=1, ragged groups, odd N/K, batch
   dims, static & dynamic activations, bias, fp16/bf16/fp32) and two large
   ones; activation codes and per-token scales must be bit-identical.
2. Timing (``triton.testing.do_bench``, median ms): at M in (1, 16, 256, 2048)
   and (K, N) in (4096, 11008), (5120, 13824), (8192, 28672), (11008, 4096):
   fp16 ``F.linear`` (cuBLAS) vs W4A8 GEMM alone (static / per-token scales)
   vs end-to-end W4A8 (activation quantization + GEMM), plus activation
   quantization alone; a small launch-config sweep at (4096, 11008).

Everything is wrapped per shape: a failure is recorded and the run goes on.
Results are rewritten after every step to ``<out>/gpu_kernels.json`` and
``.md``; a global time budget (default 200 s) skips what is left, and a
watchdog (budget + 60 s) dumps tracebacks and exits rather than hang.
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--budget-s", type=float, default=200.0, help="stop starting new work after this many seconds")
    ap.add_argument("--dry-run", action="store_true",
                    help="exercise this script on CPU under TRITON_INTERPRET=1 with tiny shapes (no GPU needed)")
    args = ap.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        _patch_interpreter_for_numpy2()
    os.makedirs(args.out, exist_ok=True)
    faulthandler.dump_traceback_later(args.budget_s + 60, exit=True)

    import torch

    results: dict = {"env": {}, "correctness": [], "timing": [], "act_quant": [], "config_sweep": [], "errors": []}
    json_path = os.path.join(args.out, "gpu_kernels.json")
    md_path = os.path.join(args.out, "gpu_kernels.md")

    def save() -> None:
        results["elapsed_s"] = time.time() - T0
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
        write_md(results, md_path)

    def over_budget() -> bool:
        return time.time() - T0 > args.budget_s

    env = results["env"]
    env["python"] = sys.version.split()[0]
    env["torch"] = torch.__version__
    env["cuda_available"] = torch.cuda.is_available()
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        env["triton"] = f"unavailable: {e!r}"
    if not torch.cuda.is_available() and not args.dry_run:
        log("no CUDA device: nothing to do")
        results["errors"].append("no CUDA device")
        save()
        return 1
    env["device"] = "cpu (dry run, triton interpreter)" if args.dry_run else torch.cuda.get_device_name(0)
    env["capability"] = None if args.dry_run else list(torch.cuda.get_device_capability(0))
    log(f"env: {env}")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    from triton.testing import do_bench

    from fptq.kernels import triton_w4a8 as tw
    from fptq.nn import QuantLinear
    from fptq.quant import quantize_weight, weight_scales

    dev = "cpu" if args.dry_run else "cuda"

    # ----------------------------------------------------------- correctness
    cases = [
        # (leading dims, K, N, group_size, act_mode, bias, dtype)
        ((1,), 200, 7, 64, "static_tensor", True, torch.float32),
        ((2, 3), 200, 33, 64, "dynamic_token", False, torch.float32),
        ((17,), 256, 65, 128, "dynamic_token", True, torch.float16),
        ((3,), 201, 9, -1, "dynamic_token", True, torch.float32),
        ((20,), 256, 40, 32, "static_tensor", False, torch.bfloat16),
        ((40,), 320, 130, 64, "dynamic_token", True, torch.float32),
        ((1, 5), 384, 24, 128, "static_tensor", True, torch.float16),
        ((129,), 1000, 257, 64, "dynamic_token", True, torch.bfloat16),
        ((1,), 4096, 11008, 128, "static_tensor", False, torch.float16),
        ((300,), 4096, 1000, 128, "dynamic_token", True, torch.float16),
        ((2048,), 1024, 512, 128, "dynamic_token", True, torch.float16),
        ((16,), 11008, 4096, 128, "static_tensor", True, torch.float32),
    ]
    if args.dry_run:
        cases = cases[:3]
    for case in cases:
        lead, k, n, gs, mode, bias, dtype = case
        rec = {"case": f"lead={lead} K={k} N={n} gs={gs} {mode} bias={bias} {str(dtype).replace('torch.', '')}"}
        try:
            g = torch.Generator().manual_seed(k * 31 + n)
            w = torch.randn(n, k, generator=g)
            s = weight_scales(w, 4, gs)
            q = quantize_weight(w, s, 4, gs)
            b = torch.randn(n, generator=g) if bias else None
            layer = QuantLinear.from_codes(
                q, s, wbits=4, group_size=gs, abits=8, act_mode=mode, act_scale=0.05, bias=b
            ).to(dev)
            x = torch.randn(*lead, k, generator=g)
            x[..., :: max(1, k // 7)] *= 8
            x = x.to(dtype).to(dev)
            x2 = x.reshape(-1, k)
            qx, sx = tw.quantize_activations(x2, layer.act_scale if mode == "static_tensor" else None)
            qr, sr = layer.quantize_input(x2)
            rec["codes_equal"] = bool(torch.equal(qx, qr))
            rec["codes_mismatches"] = int((qx != qr).sum())
            rec["scales_equal"] = bool(torch.equal(sx.reshape(-1), sr.reshape(-1)))
            y = tw.triton_forward(layer, x)
            if dev == "cuda":
                torch.cuda.synchronize()
            ref = layer.reference_forward(x.float())
            qf = qr.float() * sr
            bound = (qf.abs() @ layer.dequantized_weight().abs().t()).reshape(ref.shape)
            if layer.bias is not None:
                bound = bound + layer.bias.float().abs()
            eps = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps
            tol = 2 * eps * ref.abs() + 1e-5 * bound + 1e-6
            rec["shape_ok"] = tuple(y.shape) == tuple(ref.shape) and y.dtype == dtype
            rec["max_err_over_tol"] = float(((y.float() - ref).abs() / tol).max())
            rec["max_rel_err"] = float((y.float() - ref).abs().max() / ref.abs().max())
            rec["ok"] = bool(rec["shape_ok"] and rec["codes_equal"] and rec["scales_equal"] and rec["max_err_over_tol"] <= 1)
        except Exception as e:  # noqa: BLE001
            rec["ok"] = False
            rec["error"] = f"{e!r}"
            rec["traceback"] = traceback.format_exc()[-3000:]
        results["correctness"].append(rec)
        log(f"check {rec['case']}: {'OK' if rec['ok'] else 'FAIL'} "
            f"{ {k_: v for k_, v in rec.items() if k_ not in ('case', 'traceback')} }")
        save()
    n_ok = sum(r["ok"] for r in results["correctness"])
    log(f"correctness: {n_ok}/{len(results['correctness'])} ok")

    # ---------------------------------------------------------------- timing
    def bench(fn) -> float:
        if args.dry_run:
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))

    shapes = [(4096, 11008), (5120, 13824), (8192, 28672), (11008, 4096)]
    ms_list = (1, 16, 256, 2048)
    if args.dry_run:
        shapes, ms_list = [(256, 96), (384, 64)], (1, 20)
    gs = 128
    for k, n in shapes:
        if over_budget():
            results["errors"].append(f"time budget reached before K={k} N={n}")
            log("time budget reached; skipping the remaining shapes")
            break
        try:
            qweight = torch.randint(0, 256, (n, (k + 1) // 2), dtype=torch.uint8, device=dev)
            w_scales = (torch.rand(n, -(-k // gs), device=dev) * 0.01 + 0.001).to(torch.float16)
            w16 = torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02
        except Exception as e:  # noqa: BLE001
            results["errors"].append(f"K={k} N={n} setup: {e!r}")
            log(f"setup failed K={k} N={n}: {e!r}")
            continue
        for m in ms_list:
            if over_budget():
                results["errors"].append(f"time budget reached at K={k} N={n} M={m}")
                break
            rec = {"M": m, "K": k, "N": n, "group_size": gs, "config": tw.pick_config(m, n, k, gs)}
            try:
                x = torch.randn(m, k, device=dev, dtype=torch.float16)
                static = torch.tensor(0.05, device=dev)
                xq, sxd = tw.quantize_activations(x)
                rec["fp16_cublas_ms"] = bench(lambda: torch.nn.functional.linear(x, w16))
                rec["w4a8_gemm_static_ms"] = bench(
                    lambda: tw.w4a8_matmul(xq, static, qweight, w_scales, k, gs, out_dtype=torch.float16))
                rec["w4a8_gemm_dynamic_ms"] = bench(
                    lambda: tw.w4a8_matmul(xq, sxd, qweight, w_scales, k, gs, out_dtype=torch.float16))

                def e2e():
                    q_, s_ = tw.quantize_activations(x)
                    return tw.w4a8_matmul(q_, s_, qweight, w_scales, k, gs, out_dtype=torch.float16)

                rec["w4a8_e2e_dynamic_ms"] = bench(e2e)
                rec["act_quant_dynamic_ms"] = bench(lambda: tw.quantize_activations(x))
                rec["act_quant_static_ms"] = bench(lambda: tw.quantize_activations(x, static))
                base = rec["fp16_cublas_ms"]
                rec["speedup_gemm_dynamic"] = base / rec["w4a8_gemm_dynamic_ms"]
                rec["speedup_e2e_dynamic"] = base / rec["w4a8_e2e_dynamic_ms"]
                ops = 2 * m * k * n
                rec["w4a8_gemm_tops"] = ops / rec["w4a8_gemm_dynamic_ms"] / 1e9
                rec["fp16_tflops"] = ops / base / 1e9
                rec["w4a8_weight_GBps"] = (n * ((k + 1) // 2)) / rec["w4a8_gemm_dynamic_ms"] / 1e6
            except Exception as e:  # noqa: BLE001
                rec["error"] = f"{e!r}"
                rec["traceback"] = traceback.format_exc()[-3000:]
            results["timing"].append(rec)
            if "error" in rec:
                log(f"time M={m} K={k} N={n}: ERROR {rec['error']}")
            else:
                log(f"time M={m:5d} K={k:5d} N={n:5d}: cuBLAS fp16 {rec['fp16_cublas_ms']:.4f} ms | "
                    f"w4a8 gemm static {rec['w4a8_gemm_static_ms']:.4f} dyn {rec['w4a8_gemm_dynamic_ms']:.4f} | "
                    f"e2e {rec['w4a8_e2e_dynamic_ms']:.4f} | quant {rec['act_quant_dynamic_ms']:.4f} | "
                    f"x{rec['speedup_gemm_dynamic']:.2f} (gemm) x{rec['speedup_e2e_dynamic']:.2f} (e2e)")
            save()
        del qweight, w_scales, w16
        torch.cuda.empty_cache()

    # ------------------------------------------------------- config sweep
    sweep = {
        1: [dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4),
            dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3)],
        16: [dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4)],
        256: [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3),
              dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=128, num_warps=8, num_stages=3)],
        2048: [dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, num_warps=8, num_stages=3),
               dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)],
    }
    k, n = (256, 64) if args.dry_run else (4096, 11008)
    if args.dry_run:
        sweep = {1: sweep[1][:1], 256: sweep[256][1:]}
    try:
        qweight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev)
        w_scales = (torch.rand(n, k // gs, device=dev) * 0.01 + 0.001).to(torch.float16)
        for m, cfgs in sweep.items():
            if args.dry_run:
                m = 20
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            xq, sxd = tw.quantize_activations(x)
            ref = tw.w4a8_matmul(xq, sxd, qweight, w_scales, k, gs, out_dtype=torch.float32)
            for cfg in cfgs:
                if over_budget():
                    results["errors"].append("time budget reached in the config sweep")
                    break
                rec = {"M": m, "K": k, "N": n, "config": cfg}
                try:
                    y = tw.w4a8_matmul(xq, sxd, qweight, w_scales, k, gs, out_dtype=torch.float32, config=cfg)
                    rec["matches_default_config"] = bool(torch.allclose(y, ref, rtol=1e-5, atol=1e-5))
                    rec["ms"] = bench(lambda: tw.w4a8_matmul(
                        xq, sxd, qweight, w_scales, k, gs, out_dtype=torch.float16, config=cfg))
                except Exception as e:  # noqa: BLE001
                    rec["error"] = f"{e!r}"
                results["config_sweep"].append(rec)
                log(f"sweep M={m} {cfg}: {rec.get('ms', rec.get('error'))} match={rec.get('matches_default_config')}")
                save()
    except Exception as e:  # noqa: BLE001
        results["errors"].append(f"config sweep: {e!r}")
    save()
    faulthandler.cancel_dump_traceback_later()
    log(f"done; wrote {json_path} and {md_path}")
    return 0 if n_ok == len(results["correctness"]) else 2


def _patch_interpreter_for_numpy2() -> None:
    """(dry run only) triton 3.6's interpreter does int(ndarray of shape (1,)), which numpy >= 2.4 rejects."""
    try:
        import numpy as np
        from triton.runtime import interpreter as it
    except Exception:  # noqa: BLE001
        return
    if getattr(it, "_fptq_patched", False) or not hasattr(it, "_patch_lang_tensor"):
        return
    orig = it._patch_lang_tensor

    def wrapped(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    it._patch_lang_tensor = wrapped
    it._fptq_patched = True


def write_md(results: dict, path: str) -> None:
    env = results.get("env", {})
    lines = [
        "# Triton W4A8 kernels on GPU",
        "",
        f"- device: {env.get('device')} (sm {env.get('capability')}), torch {env.get('torch')}, "
        f"triton {env.get('triton')}, python {env.get('python')}",
        f"- elapsed: {results.get('elapsed_s', 0):.0f} s",
        "",
        "## Correctness vs QuantLinear.reference_forward",
        "",
        "| case | ok | codes equal | max err / tol | max rel err | error |",
        "|---|---|---|---|---|---|",
    ]
    for r in results.get("correctness", []):
        lines.append(
            f"| {r['case']} | {r.get('ok')} | {r.get('codes_equal')} | {r.get('max_err_over_tol', float('nan')):.3g} | "
            f"{r.get('max_rel_err', float('nan')):.3g} | {r.get('error', '')} |"
        )
    lines += [
        "",
        "## Timing (median ms, triton.testing.do_bench), group size 128",
        "",
        "| M | K | N | cuBLAS fp16 | W4A8 GEMM static | W4A8 GEMM per-token | W4A8 e2e (quant+GEMM) | act quant dyn | "
        "act quant static | speed-up GEMM | speed-up e2e | W4A8 TOPS | error |",
        "|" + "---|" * 13,
    ]
    for r in results.get("timing", []):
        if "error" in r:
            lines.append(f"| {r['M']} | {r['K']} | {r['N']} |" + " |" * 10 + f" {r['error']} |")
            continue
        lines.append(
            f"| {r['M']} | {r['K']} | {r['N']} | {r['fp16_cublas_ms']:.4f} | {r['w4a8_gemm_static_ms']:.4f} | "
            f"{r['w4a8_gemm_dynamic_ms']:.4f} | {r['w4a8_e2e_dynamic_ms']:.4f} | {r['act_quant_dynamic_ms']:.4f} | "
            f"{r['act_quant_static_ms']:.4f} | {r['speedup_gemm_dynamic']:.2f}x | {r['speedup_e2e_dynamic']:.2f}x | "
            f"{r['w4a8_gemm_tops']:.1f} | |"
        )
    if results.get("config_sweep"):
        lines += ["", "## Config sweep (K=4096, N=11008, per-token GEMM)", "", "| M | config | ms | matches | error |",
                  "|---|---|---|---|---|"]
        for r in results["config_sweep"]:
            ms = r.get("ms")
            lines.append(f"| {r['M']} | {r['config']} | {'' if ms is None else f'{ms:.4f}'} | "
                         f"{r.get('matches_default_config', '')} | {r.get('error', '')} |")
    if results.get("errors"):
        lines += ["", "## Errors / skipped", ""] + [f"- {e}" for e in results["errors"]]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())

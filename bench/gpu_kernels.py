"""One-shot GPU check + benchmark of the Triton W4A8 kernels (fptq backends ``triton``,
``triton_grouped``, ``triton_perchannel``).

    PYTHONUNBUFFERED=1 PYTHONPATH=src python bench/gpu_kernels.py --out bench/results/gpu [--budget-s 200]
    PYTHONPATH=src python bench/gpu_kernels.py --dry-run --out /tmp/x   # CPU, triton interpreter, tiny shapes

1. Correctness (phase deadline 30% of the budget): every kernel variant of
   ``tests/kernels/test_triton_kernels.py`` (auto / grouped / perchannel forwards,
   GEMV and tensor-core grouped kernels with explicit split-K, ``torch._int_mm``
   per-channel) against ``QuantLinear.reference_forward`` (exact paths) or the
   per-channel reference (int8 paths) on small/odd shapes and a few large ones;
   activation codes and per-token scales must be bit-identical to torch's.
2. Timing (``triton.testing.do_bench``, median ms, L2 flushed; until 75% of the budget):
   M in (1, 16, 256, 2048) x (K, N) in (4096, 11008), (5120, 13824), (8192, 28672),
   (11008, 4096), group size 128, dynamic per-token activations, fp16: cuBLAS fp16
   ``F.linear`` vs the dispatched ``triton`` forward end to end (activation quant +
   GEMM) and each kernel alone (GEMV, tensor-core grouped, int8 per-channel Triton,
   ``torch._int_mm`` + epilogue) plus the activation quantization alone.
3. Config sweep (rest of the budget): the small-M kernels (GEMV / swapped tensor-core,
   split-K on/off) at M = 1, 16 and the int8 GEMM at M = 256, 2048; then the integer-group-scale
   kernels (tensor-core at M = 16, 256; the self-quantizing GEMV at M = 1); then the dp4a GEMV
   (``fptq.kernels.triton_dp4a``, what the dispatch runs at M <= 2) at M = 1.

Everything is wrapped per item: a failure is recorded and the run goes on.  Results are
rewritten after every step to ``<out>/gpu_kernels.json`` and ``.md``; a global time
budget (default 200 s) skips what is left, and a watchdog (budget + 60 s) dumps
tracebacks and exits rather than hang.
"""
from __future__ import annotations

import argparse
import faulthandler
import importlib.util
import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def _load_test_module():
    path = os.path.join(HERE, "..", "tests", "kernels", "test_triton_kernels.py")
    spec = importlib.util.spec_from_file_location("fptq_test_triton_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
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

    results: dict = {"env": {}, "correctness": [], "timing": [], "config_sweep": [], "errors": []}
    json_path = os.path.join(args.out, "gpu_kernels.json")
    md_path = os.path.join(args.out, "gpu_kernels.md")

    def save() -> None:
        results["elapsed_s"] = time.time() - T0
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1, default=str)
        write_md(results, md_path)

    def past(frac: float) -> bool:
        return time.time() - T0 > args.budget_s * frac

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
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    from triton.testing import do_bench

    from fptq.kernels import triton_w4a8 as tw
    from fptq.kernels.triton_w4a16 import w4a16_matmul
    from fptq.nn import QuantLinear

    dev = "cpu" if args.dry_run else "cuda"
    env["dispatch"] = {"GEMV_MAX_M": tw.GEMV_MAX_M, "GROUPED_MAX_M": tw.GROUPED_MAX_M,
                       "PERCHANNEL_IMPL": tw.PERCHANNEL_IMPL}
    if not args.dry_run:
        try:
            env["scalar_div_reciprocal"] = tw._scalar_div_mode(dev, 127)
        except Exception as e:  # noqa: BLE001
            env["scalar_div_reciprocal"] = f"error: {e!r}"
    try:  # the inline PTX (dp4a, the byte split) against the plain forms on this device (used only if equal)
        env["ptx_verified"] = tw.ptx_verified(dev)
    except Exception as e:  # noqa: BLE001
        env["ptx_verified"] = f"error: {e!r}"
    log(f"env: {env}")
    save()

    # ----------------------------------------------------------- correctness
    n_bad = 0
    try:
        T = _load_test_module()
        cases = [
            # (leading dims, K, N, group_size, act_mode, bias, dtype)
            ((1,), 200, 7, 64, "static_tensor", True, "float32"),
            ((2, 3), 200, 33, 64, "dynamic_token", False, "float32"),
            ((1,), 4096, 11008, 128, "static_tensor", False, "float16"),
            ((17,), 256, 65, 128, "dynamic_token", True, "float16"),
            ((300,), 4096, 1000, 128, "dynamic_token", True, "float16"),
            ((3,), 201, 9, -1, "dynamic_token", True, "float32"),
            ((2,), 11008, 4096, 128, "dynamic_token", True, "float16"),
            ((20,), 256, 40, 32, "static_tensor", False, "bfloat16"),
            ((129,), 1000, 257, 64, "dynamic_token", True, "bfloat16"),
            ((16,), 11008, 4096, 128, "static_tensor", True, "float32"),
            ((40,), 320, 130, 64, "dynamic_token", True, "float32"),
        ]
        if args.dry_run:  # small shapes only: the interpreter is slow
            cases = [c for c in cases if c[1] * c[2] <= 20_000][:3]
        # integer group scales (--group-scales integer): the packed kernels' single-accumulator path
        runs = [(c, "float") for c in cases] + [(c, "integer") for c in cases
                                                if c[3] > 0 and -(-c[1] // c[3]) > 1][:4]
        for case, group_scales in runs:
            if past(0.3):
                results["errors"].append(f"correctness phase deadline reached before {case} ({group_scales})")
                break
            try:
                r = T.run_case(case, dev, group_scales=group_scales)
                r["case"] += "" if group_scales == "float" else " integer scales"
                for v in T.VARIANTS:
                    rec = {"case": r["case"], "variant": v, **{k_: r.get(k_) for k_ in
                           ("codes_equal", "scales_equal", "w8_matches_cpu")}, **r[v]}
                    try:
                        T._assert_ok(r, v)
                        rec["ok"] = True
                    except AssertionError:
                        rec["ok"] = False
                        n_bad += 1
                    results["correctness"].append(rec)
                bad = [x["variant"] for x in results["correctness"][-len(T.VARIANTS):] if not x["ok"]]
                log(f"check {r['case']}: codes_equal={r['codes_equal']} scales_equal={r['scales_equal']} "
                    f"w8_matches_cpu={r['w8_matches_cpu']} "
                    + ("all variants OK" if not bad else f"FAILED variants {bad}")
                    + " | err/tol " + " ".join(f"{v}={r[v].get('max_err_over_tol', r[v].get('error'))}" for v in T.VARIANTS))
            except Exception as e:  # noqa: BLE001
                n_bad += 1
                results["correctness"].append({"case": repr(case), "variant": "*", "ok": False, "error": f"{e!r}",
                                               "traceback": traceback.format_exc()[-3000:]})
                log(f"check {case}: ERROR {e!r}")
            save()
        try:
            rr = T.quant_recip_check()
            ok = rr["scales_equal"] and rr["codes_equal"]
            n_bad += not ok
            results["correctness"].append({"case": "reciprocal-mode act quant (cpu emulation)", "variant": "quant",
                                           "ok": ok, **rr})
        except Exception as e:  # noqa: BLE001
            results["errors"].append(f"quant_recip_check: {e!r}")
    except Exception as e:  # noqa: BLE001
        n_bad += 1
        results["errors"].append(f"correctness phase: {e!r}")
        results["correctness_traceback"] = traceback.format_exc()[-3000:]
        log(f"correctness phase ERROR {e!r}")
    n_ok = sum(bool(r.get("ok")) for r in results["correctness"])
    log(f"correctness: {n_ok}/{len(results['correctness'])} ok")
    save()

    # ---------------------------------------------------------------- timing
    def bench(fn) -> float:
        if args.dry_run:
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))

    def bench_graph(fn) -> float:
        # the same call replayed from a CUDA graph: no Python or launch overhead, as in fptq's graph-captured decode
        # steps (do_bench above also counts the host's launch time, which at decode sizes can exceed the kernel's)
        if args.dry_run:
            return bench(fn)
        from triton.testing import do_bench_cudagraph

        return float(do_bench_cudagraph(fn, rep=40, return_mode="median"))

    def make_layer(k: int, n: int, gs: int, integer: bool = False):
        layer = QuantLinear(k, n, group_size=gs, act_mode="dynamic_token", dtype=torch.float16, device=dev)
        layer.qweight = torch.randint(0, 256, (n, (k + 1) // 2), dtype=torch.uint8, device=dev)
        if integer:  # integer group scales: a 6-bit channel base times -15 .. 16 (exact in float16)
            base = torch.randint(32, 64, (n, 1), device=dev).float() * 2.0 ** -14
            mult = torch.randint(1, 17, (n, -(-k // gs)), device=dev).float()
            mult[mult == 16] = -3
            layer.w_scales = (base * mult).to(torch.float16)
        else:
            layer.w_scales = (torch.rand(n, -(-k // gs), device=dev) * 0.01 + 0.001).to(torch.float16)
        return layer.set_backend("triton")

    shapes = [(4096, 11008), (5120, 13824), (8192, 28672), (11008, 4096)]
    ms_list = (1, 16, 256, 2048)
    if args.dry_run:
        shapes, ms_list = [(256, 96), (384, 64)], (1, 20, 70)
    gs = 128
    for k, n in shapes:
        if past(0.75):
            results["errors"].append(f"timing phase deadline reached before K={k} N={n}")
            log("timing phase deadline reached; skipping the remaining shapes")
            break
        try:
            layer = make_layer(k, n, gs)
            layer_i = make_layer(k, n, gs, integer=True)
            ints = tw.integer_scales_device(layer_i)
            if ints is None:
                raise RuntimeError("the integer-scale layer has no integer structure")
            w16 = torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02
            w8, sc = tw.perchannel_weight_device(layer)
        except Exception as e:  # noqa: BLE001
            results["errors"].append(f"K={k} N={n} setup: {e!r}")
            log(f"setup failed K={k} N={n}: {e!r}")
            continue
        qw, ws = layer.qweight, layer.w_scales
        for m in ms_list:
            if past(0.75):
                results["errors"].append(f"timing phase deadline reached at K={k} N={n} M={m}")
                break
            rec = {"M": m, "K": k, "N": n, "group_size": gs, "dispatched_path": tw.select_path(m)}
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            xq, sxd = tw.quantize_activations(x)
            items = {
                "fp16_cublas_ms": lambda: torch.nn.functional.linear(x, w16),
                "triton_e2e_ms": lambda: tw.triton_forward(layer, x),
                "act_quant_ms": lambda: tw.quantize_activations(x),
                "grouped_tc_ms": lambda: tw.w4a8_matmul(xq, sxd, qw, ws, k, gs, out_dtype=torch.float16),
                "perchannel_triton_ms": lambda: tw.int8_perchannel_matmul(
                    xq, sxd, w8, sc, out_dtype=torch.float16, impl="triton"),
                # integer group scales: one int32 accumulator over K (layer_i: the same codes, such scales)
                "triton_e2e_int_ms": lambda: tw.triton_forward(layer_i, x),
                "grouped_tc_int_ms": lambda: tw.w4a8_matmul(xq, sxd, layer_i.qweight, layer_i.w_scales, k, gs,
                                                            out_dtype=torch.float16, int_scales=ints),
                # W4A16 on the same packed codes (Table 2's W4A16 row): fp16 activations on tensor cores
                "w4a16_ms": lambda: w4a16_matmul(x, qw, ws, k, gs),
            }
            if m <= 2:  # the dp4a GEMV on packed words (the dispatch's choice at decode), quantizing in the kernel
                items["gemv_dp4a_ms"] = lambda: tw.w4a8_gemv_dp4a(x, None, qw, ws, k, gs, out_dtype=torch.float16)
                # ... with its split-K reduced in the same launch (the dispatch's default: SERIAL_SPLIT_K)
                cnt = torch.zeros(tw.counters_needed(2, n, k, gs), dtype=torch.int32, device=dev)
                items["gemv_dp4a_1l_ms"] = lambda: tw.w4a8_gemv_dp4a(x, None, qw, ws, k, gs, out_dtype=torch.float16,
                                                                     counters=cnt)
                items["gemv_dp4a_int_ms"] = lambda: tw.w4a8_gemv_dp4a(
                    x, None, layer_i.qweight, layer_i.w_scales, k, gs, out_dtype=torch.float16, int_scales=ints)
            if m <= 16:
                items["gemv_ms"] = lambda: tw.w4a8_gemv(xq, sxd, qw, ws, k, gs, out_dtype=torch.float16)
                items["gemv_quant_ms"] = lambda: tw.w4a8_gemv_quant(x, None, qw, ws, k, gs, out_dtype=torch.float16)
                items["gemv_quant_int_ms"] = lambda: tw.w4a8_gemv_quant(
                    x, None, layer_i.qweight, layer_i.w_scales, k, gs, out_dtype=torch.float16, int_scales=ints)
            if m > 16:
                items["perchannel_int_mm_ms"] = lambda: tw.int8_perchannel_matmul(
                    xq, sxd, w8, sc, out_dtype=torch.float16, impl="int_mm")
            if m <= 16:  # decode sizes: also timed from a CUDA graph (what a graph-captured decode step pays)
                items["fp16_cublas_graph_ms"] = items["fp16_cublas_ms"]
                items["w4a16_graph_ms"] = items["w4a16_ms"]
                items["unfused_graph_ms"] = lambda: tw.w4a8_gemv(*tw.quantize_activations(x), qw, ws, k, gs,
                                                                 out_dtype=torch.float16)
                items["gemv_quant_graph_ms"] = items["gemv_quant_ms"]
                items["gemv_quant_int_graph_ms"] = items["gemv_quant_int_ms"]
                if "gemv_dp4a_ms" in items:
                    items["gemv_dp4a_graph_ms"] = items["gemv_dp4a_ms"]
                    items["gemv_dp4a_1l_graph_ms"] = items["gemv_dp4a_1l_ms"]
            for name, fn in items.items():
                try:
                    rec[name] = (bench_graph if name.endswith("_graph_ms") else bench)(fn)
                except Exception as e:  # noqa: BLE001
                    rec.setdefault("errors", {})[name] = f"{e!r}"[:500]
            base = rec.get("fp16_cublas_ms")
            if base:
                for name in list(items):
                    if name.endswith("_graph_ms"):
                        continue
                    if name != "fp16_cublas_ms" and name in rec:
                        rec["x_" + name[:-3]] = base / rec[name]
                # (float-scale kernels: what a default checkpoint runs)
                gemms = {nm: rec[nm] for nm in ("grouped_tc_ms", "gemv_ms", "gemv_dp4a_ms", "perchannel_triton_ms",
                                                "perchannel_int_mm_ms") if nm in rec}
                if gemms:
                    best = min(gemms, key=gemms.get)
                    rec["best_gemm"] = best[:-3]
                    rec["x_best_gemm"] = base / gemms[best]
                if "triton_e2e_ms" in rec:
                    rec["e2e_int8_TOPS"] = 2 * m * k * n / rec["triton_e2e_ms"] / 1e9
            gbase = rec.get("fp16_cublas_graph_ms")
            if gbase:
                for name in ("unfused_graph_ms", "gemv_quant_graph_ms", "gemv_quant_int_graph_ms", "gemv_dp4a_graph_ms",
                             "gemv_dp4a_1l_graph_ms", "w4a16_graph_ms"):
                    if name in rec:
                        rec["x_" + name[:-3]] = gbase / rec[name]
            results["timing"].append(rec)
            log(f"time M={m:5d} K={k:5d} N={n:5d} [{rec['dispatched_path']}]: "
                + " ".join(f"{nm[:-3]}={rec[nm]:.4f}" for nm in items if nm in rec)
                + (f" | e2e x{rec['x_triton_e2e']:.2f}" if "x_triton_e2e" in rec else "")
                + (f" | best {rec.get('best_gemm')} x{rec['x_best_gemm']:.2f}" if "x_best_gemm" in rec else "")
                + (f" | errors {rec['errors']}" if "errors" in rec else ""))
            save()
        del layer, layer_i, ints, w16, w8, sc, qw, ws
        if dev == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------- Linears on one input: one launch against one each
    from _gpu_shared_input import time_shared_input

    results["shared_input"] = time_shared_input(make_layer, bench_graph, dev, args.dry_run, past)
    for r in results["shared_input"]:
        log(f"shared input {r}")
    save()

    # ------------------------------------------------------- config sweep
    sweep_shapes = [(4096, 11008), (11008, 4096)]
    if args.dry_run:
        sweep_shapes = [(256, 64)]
    gemv_cfgs = [dict(BLOCK_N=32, SPLIT_K=None), dict(BLOCK_N=64, SPLIT_K=1), dict(BLOCK_N=64, SPLIT_K=None),
                 dict(BLOCK_N=128, SPLIT_K=None), dict(BLOCK_N=128, SPLIT_K=None, num_warps=8),
                 dict(BLOCK_N=64, SPLIT_K=16)]
    tc_cfgs = [dict(SWAP_AB=True, BLOCK_M=16, BLOCK_N=64, SPLIT_K=1),
               dict(SWAP_AB=True, BLOCK_M=16, BLOCK_N=128, SPLIT_K=None),
               dict(SWAP_AB=True, BLOCK_M=16, BLOCK_N=64, SPLIT_K=None, num_stages=4),
               dict(SWAP_AB=False, BLOCK_M=16, BLOCK_N=64, SPLIT_K=None),
               dict(SWAP_AB=False, BLOCK_M=16, BLOCK_N=32, SPLIT_K=1, num_stages=4)]
    i8_cfgs = [dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, num_warps=8, num_stages=3),
               dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=4),
               dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
               dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4)]
    # the dp4a GEMV: tile shape, split-K, pipelining (picked from compiled-code counts, never timed before)
    # (SPLIT_K=1 with narrow tiles: one launch, no split-K reduction, each program quantizing all of K)
    dp4a_cfgs = [dict(BLOCK_N=128, BLOCK_K=128, SPLIT_K=None), dict(BLOCK_N=32, BLOCK_K=128, SPLIT_K=1),
                 dict(BLOCK_N=64, BLOCK_K=128, SPLIT_K=1), dict(BLOCK_N=64, BLOCK_K=128, SPLIT_K=None),
                 dict(BLOCK_N=256, BLOCK_K=128, SPLIT_K=None), dict(BLOCK_N=128, BLOCK_K=128, SPLIT_K=None, num_stages=3),
                 dict(BLOCK_N=128, BLOCK_K=128, SPLIT_K=None, num_warps=8)]
    # the integer-scale tensor-core kernel at sizes where it may replace the int8 per-channel cache
    int_cfgs = [dict(SWAP_AB=False, BLOCK_M=64, BLOCK_N=128, SPLIT_K=1),
                dict(SWAP_AB=False, BLOCK_M=128, BLOCK_N=128, SPLIT_K=1, num_warps=8),
                dict(SWAP_AB=False, BLOCK_M=64, BLOCK_N=64, SPLIT_K=None)]
    plan = [(1, "gemv", gemv_cfgs), (1, "gemv_quant", gemv_cfgs), (1, "grouped_tc", tc_cfgs[:2] + tc_cfgs[3:4]),
            (16, "grouped_tc", tc_cfgs), (16, "gemv", gemv_cfgs[2:4]), (256, "perchannel_triton", i8_cfgs), (2048, "perchannel_triton", i8_cfgs),
            (16, "grouped_tc_int", tc_cfgs[:3]), (256, "grouped_tc_int", int_cfgs), (1, "gemv_quant_int", gemv_cfgs[:3]),
            (1, "gemv_dp4a", dp4a_cfgs)]
    if args.dry_run:
        plan = [(1, "gemv", gemv_cfgs[:2]), (1, "gemv_quant", gemv_cfgs[:2]), (20, "grouped_tc", tc_cfgs[1:2] + tc_cfgs[3:4]),
                (70, "perchannel_triton", i8_cfgs[3:]), (20, "grouped_tc_int", tc_cfgs[1:2]),
                (1, "gemv_quant_int", gemv_cfgs[:1]), (1, "gemv_dp4a", dp4a_cfgs[:2])]
    for k, n in sweep_shapes:
        if past(1.0):
            results["errors"].append("time budget reached in the config sweep")
            break
        try:
            layer = make_layer(k, n, gs)
            qw, ws = layer.qweight, layer.w_scales
            w8, sc = tw.perchannel_weight_device(layer)
            layer_i = make_layer(k, n, gs, integer=True)
            ints = tw.integer_scales_device(layer_i)
        except Exception as e:  # noqa: BLE001
            results["errors"].append(f"sweep K={k} N={n} setup: {e!r}")
            continue
        for m, kernel, cfgs in plan:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            xq, sxd = tw.quantize_activations(x)
            if kernel == "perchannel_triton":
                def run(cfg, dt=torch.float16):
                    return tw.int8_perchannel_matmul(xq, sxd, w8, sc, out_dtype=dt, config=cfg, impl="triton")
            elif kernel == "gemv":
                def run(cfg, dt=torch.float16):
                    return tw.w4a8_gemv(xq, sxd, qw, ws, k, gs, out_dtype=dt, config=cfg)
            elif kernel == "gemv_quant":
                def run(cfg, dt=torch.float16):
                    return tw.w4a8_gemv_quant(x, None, qw, ws, k, gs, out_dtype=dt, config=cfg)[0]
            elif kernel == "gemv_quant_int":
                def run(cfg, dt=torch.float16):
                    return tw.w4a8_gemv_quant(x, None, layer_i.qweight, layer_i.w_scales, k, gs, out_dtype=dt,
                                              config=cfg, int_scales=ints)[0]
            elif kernel == "gemv_dp4a":
                def run(cfg, dt=torch.float16):
                    return tw.w4a8_gemv_dp4a(x, None, qw, ws, k, gs, out_dtype=dt, config=cfg)[0]
            elif kernel == "grouped_tc_int":
                def run(cfg, dt=torch.float16):
                    return tw.w4a8_matmul(xq, sxd, layer_i.qweight, layer_i.w_scales, k, gs, out_dtype=dt,
                                          config=cfg, int_scales=ints)
            else:
                def run(cfg, dt=torch.float16):
                    return tw.w4a8_matmul(xq, sxd, qw, ws, k, gs, out_dtype=dt, config=cfg)
            try:
                ref = run(None, torch.float32)
            except Exception as e:  # noqa: BLE001
                results["errors"].append(f"sweep {kernel} M={m} K={k} N={n} default: {e!r}")
                continue
            for cfg in cfgs:
                if past(1.0):
                    results["errors"].append("time budget reached in the config sweep")
                    break
                rec = {"M": m, "K": k, "N": n, "kernel": kernel, "config": cfg}
                try:
                    y = run(cfg, torch.float32)
                    rec["matches_default_config"] = bool(torch.allclose(y, ref, rtol=1e-4, atol=1e-4))
                    rec["ms"] = bench(lambda: run(cfg))
                except Exception as e:  # noqa: BLE001
                    rec["error"] = f"{e!r}"[:500]
                results["config_sweep"].append(rec)
                log(f"sweep {kernel} M={m} K={k} N={n} {cfg}: {rec.get('ms', rec.get('error'))} "
                    f"match={rec.get('matches_default_config')}")
                save()
        del layer, layer_i
    save()
    faulthandler.cancel_dump_traceback_later()
    log(f"done; wrote {json_path} and {md_path}")
    return 0 if n_bad == 0 else 2


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

    def f(v, spec=".4f"):
        return "" if v is None else (format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool)
                                     else str(v))

    lines = [
        "# Triton W4A8 kernels on GPU",
        "",
        f"- device: {env.get('device')} (sm {env.get('capability')}), torch {env.get('torch')}, "
        f"triton {env.get('triton')}, python {env.get('python')}",
        f"- dispatch: {env.get('dispatch')}; torch divides by a scalar via its reciprocal: "
        f"{env.get('scalar_div_reciprocal')}",
        f"- elapsed: {results.get('elapsed_s', 0):.0f} s",
        "",
        "## Correctness (exact paths vs QuantLinear.reference_forward, per-channel paths vs the "
        "per-channel reference)",
        "",
        "| case | variant | ok | codes equal | scales equal | w8 = cpu | max err / tol | max rel err | "
        "fallback / error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results.get("correctness", []):
        lines.append(
            f"| {r['case']} | {r.get('variant')} | {r.get('ok')} | {r.get('codes_equal')} | {r.get('scales_equal')} | "
            f"{r.get('w8_matches_cpu', '')} | {f(r.get('max_err_over_tol'), '.3g')} | "
            f"{f(r.get('max_rel_err'), '.3g')} | {r.get('error', '')}{'; '.join(r.get('fallback_warnings') or [])}{'skipped: ' + r['skipped'] if r.get('skipped') else ''} |"
        )
    cols = ["fp16_cublas_ms", "triton_e2e_ms", "x_triton_e2e", "act_quant_ms", "gemv_ms", "gemv_quant_ms",
            "x_gemv_quant", "gemv_dp4a_ms", "x_gemv_dp4a", "gemv_dp4a_1l_ms", "x_gemv_dp4a_1l", "grouped_tc_ms", "perchannel_triton_ms", "perchannel_int_mm_ms", "best_gemm",
            "x_best_gemm", "e2e_int8_TOPS", "w4a16_ms", "x_w4a16"]
    icols = ["fp16_cublas_ms", "triton_e2e_int_ms", "x_triton_e2e_int", "gemv_quant_int_ms", "x_gemv_quant_int",
             "gemv_dp4a_int_ms", "x_gemv_dp4a_int", "grouped_tc_int_ms", "x_grouped_tc_int", "grouped_tc_ms", "x_grouped_tc"]
    gcols = ["fp16_cublas_graph_ms", "unfused_graph_ms", "x_unfused_graph", "gemv_quant_graph_ms",
             "x_gemv_quant_graph", "gemv_quant_int_graph_ms", "x_gemv_quant_int_graph", "gemv_dp4a_graph_ms",
             "x_gemv_dp4a_graph", "gemv_dp4a_1l_graph_ms", "x_gemv_dp4a_1l_graph", "w4a16_graph_ms", "x_w4a16_graph"]
    def table(title: str, note: str, lead: list[str], value_cols: list[str], rows: list[dict], tail: bool) -> None:
        lines.extend(["", title, "", note, "",
                      "| " + " | ".join(lead + [c.replace("_ms", "") for c in value_cols]) + (" | errors |" if tail else " |"),
                      "|" + "---|" * (len(lead) + len(value_cols) + tail)])
        for r in rows:
            vals = [str(r.get(k) if k != "path" else r.get("dispatched_path")) for k in lead]
            vals += [f(r.get(c), ".2f" if c.startswith(("x_", "e2e")) else ".4f") for c in value_cols]
            lines.append("| " + " | ".join(vals) + (f" | {r.get('errors', '')} |" if tail else " |"))

    table("## Timing (median ms, do_bench, L2 flushed), group size 128, per-token activations, fp16",
          "`triton_e2e` = dispatched backend `triton` (activation quant + GEMM; the dp4a GEMV at M <= 2 when "
          "`ptx_verified`); `x_*` = speed-up over cuBLAS fp16; `gemv` / `grouped_tc` / `perchannel_*` exclude the "
          "activation quantization, `gemv_quant` (byte-wise) and `gemv_dp4a` (packed words, dp4a) include it; "
          "`gemv_dp4a_1l`: its split-K reduced in the same launch (the dispatch's default); `w4a16` = the W4A16 kernel "
          "(fp16 activations, the same packed codes: Table 2's W4A16 row).",
          ["M", "K", "N", "path"], cols, results.get("timing", []), True)
    table("## Integer group scales (`--group-scales integer`): median ms, same shapes",
          "`triton_e2e_int` = the dispatched backend on a layer with integer group scales (above GROUPED_MAX_M the int8 "
          "per-channel cache, exact for such scales); `gemv_quant_int` / `grouped_tc_int` = the packed kernels "
          "with one int32 accumulator over K; `grouped_tc` = the float-scale kernel, for comparison.",
          ["M", "K", "N", "path"], icols, results.get("timing", []), False)
    graph_rows = [r for r in results.get("timing", []) if "fp16_cublas_graph_ms" in r]
    if graph_rows:
        table("## Decode sizes replayed from a CUDA graph (median ms, do_bench_cudagraph: no launch overhead)",
              "`unfused` = activation quantization launch + GEMV; `gemv_quant` = the GEMV quantizing the activations "
              "itself (one launch); `x_*` = speed-up over cuBLAS fp16 in a graph.",
              ["M", "K", "N"], gcols, graph_rows, False)
    if results.get("shared_input"):
        from _gpu_shared_input import COLUMNS

        table("## Decode Linears that read one input (M = 1 and 16, group 128, from a CUDA graph)",
              "`separate` = one launch per layer as the dispatch runs it (M = 1: dp4a GEMV, split-K reduced in the "
              "launch; M = 16: tensor-core kernel), for gate/up then SiLU x up (at M = 16 writing a static-scale "
              "reader's codes); `shared` = the fused decode step's one launch (`w4a8_gemv_dp4a_layers` / "
              "`w4a8_gemv_dp4a_glu`, `w4a8_matmul_layers` / `w4a8_matmul_glu`); `fp16_cublas` = one cuBLAS call per "
              "layer (and `silu(g) * u`); `same_bits`: the one launch gave the separate launches' bits (at M = 1 it "
              "may split K otherwise: then `max_abs_diff` is float32 rounding of the partial sums).",
              ["set", "M"], COLUMNS, results["shared_input"], True)
    if results.get("config_sweep"):
        lines += ["", "## Config sweep (per-token, fp16 out)", "", "| kernel | M | K | N | config | ms | matches | error |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in results["config_sweep"]:
            lines.append(f"| {r['kernel']} | {r['M']} | {r['K']} | {r['N']} | {r['config']} | {f(r.get('ms'))} | "
                         f"{r.get('matches_default_config', '')} | {r.get('error', '')} |")
    if results.get("errors"):
        lines += ["", "## Errors / skipped", ""] + [f"- {e}" for e in results["errors"]]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())

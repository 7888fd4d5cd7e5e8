"""``bench/gpu_kernels.py``'s table of decode Linears that read one input: q/k/v and gate/up of LLaMA shapes at
M = 1 and M = 16, each replayed from a CUDA graph. ``separate``: one launch per layer, what the dispatch runs per
layer (M = 1: the dp4a GEMV with its split-K reduced in the launch; M = 16: the tensor-core kernel), for gate/up
followed by SiLU x up's launch (``silu_mul_triton``; at M = 16 writing down_proj's codes under a static scale).
``shared``: the fused decode step's one launch (``w4a8_gemv_dp4a_layers`` / ``w4a8_gemv_dp4a_glu`` at M = 1,
``w4a8_matmul_layers`` / ``w4a8_matmul_glu`` at M = 16). Baseline: cuBLAS fp16, one call per layer (and
``silu(g) * u``). Each row also says whether the one launch gave the separate launches' bits."""
from __future__ import annotations

import torch

#: (name, [(K, N) per layer]), group size 128
SETS = [("LLaMA-2-7B q/k/v", [(4096, 4096)] * 3),
        ("LLaMA-3-8B q/k/v", [(4096, 4096), (4096, 1024), (4096, 1024)]),
        ("LLaMA-2-7B gate/up", [(4096, 11008)] * 2),
        ("LLaMA-2-70B gate/up", [(8192, 28672)] * 2)]
DRY_SETS = [("tiny q/k/v", [(256, 64), (256, 32), (256, 32)]), ("tiny gate/up", [(256, 96)] * 2)]
COLUMNS = ["one_launch", "fp16_cublas_graph_ms", "separate_graph_ms", "shared_graph_ms",
           "x_shared_over_separate", "x_shared_over_fp16", "same_bits", "max_abs_diff"]


def _forms(m: int, glu: bool, x, layers, w16, k: int, gs: int, dev: str) -> tuple:
    """(separate, shared, fp16) callables for one set at ``m`` rows."""
    from fptq.kernels import triton_w4a8 as tw
    from fptq.kernels.triton_decode import silu_mul_triton
    from fptq.kernels.triton_dp4a_layers import w4a8_gemv_dp4a_glu, w4a8_gemv_dp4a_layers
    from fptq.kernels.triton_grouped_layers import w4a8_matmul_glu, w4a8_matmul_layers

    xq, sx = tw.quantize_activations(x)
    spec = [(l.qweight, l.w_scales, None, None) for l in layers]
    down = (torch.tensor(0.02, device=dev), 8)  # the static quantizer of the Linear reading SiLU x up (M = 16)
    f16 = torch.float16
    if m <= 2:
        cnt = [torch.zeros(tw.counters_needed(2, l.out_features, k, gs), dtype=torch.int32, device=dev)
               for l in layers]
        cnt_all = torch.zeros(sum(c.numel() for c in cnt), dtype=torch.int32, device=dev)

        def each():
            return [tw.w4a8_gemv_dp4a(xq, sx, l.qweight, l.w_scales, k, gs, out_dtype=f16, counters=c)[0]
                    for l, c in zip(layers, cnt)]

        def shared():
            if glu:
                return [w4a8_gemv_dp4a_glu(xq, sx, *spec, k, gs, cnt[0], out_dtype=f16)]
            return w4a8_gemv_dp4a_layers(xq, sx, spec, k, gs, out_dtype=f16, counters=cnt_all)[0]
    else:
        def each():
            return [tw.w4a8_matmul(xq, sx, l.qweight, l.w_scales, k, gs, out_dtype=f16) for l in layers]

        def shared():
            if glu:
                return list(w4a8_matmul_glu(xq, sx, *spec, k, gs, out_dtype=f16, quant=down)[:2])
            return w4a8_matmul_layers(xq, sx, spec, k, gs, out_dtype=f16)

    def separate():
        ys = each()
        if not glu:
            return ys
        return [silu_mul_triton(*ys)] if m <= 2 else list(silu_mul_triton(*ys, down)[:2])

    def fp16():
        ys = [torch.nn.functional.linear(x, w) for w in w16]
        return [torch.nn.functional.silu(ys[0]) * ys[1]] if glu else ys

    return separate, shared, fp16


def time_shared_input(make_layer, bench_graph, dev: str, dry_run: bool, past) -> list[dict]:
    gs, rows = 128 if not dry_run else 64, []
    for name, shapes in (DRY_SETS if dry_run else SETS):
        k, glu = shapes[0][0], "gate/up" in name
        try:
            layers = [make_layer(k, n, gs) for _, n in shapes]
            w16 = [torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02 for _, n in shapes]
        except Exception as e:  # noqa: BLE001
            rows.append({"set": name, "errors": f"setup: {e!r}"[:500]})
            continue
        for m in (1, 16):
            if past(0.95):  # (after the main timing table, which stops at 0.75 of the budget)
                rows.append({"set": name, "M": m, "errors": "time budget reached"})
                return rows
            rec: dict = {"set": name, "M": m, "shapes": shapes,
                         "one_launch": "gate/up + SiLU x up" if glu else "q/k/v"}
            try:
                separate, shared, fp16 = _forms(m, glu, torch.randn(m, k, device=dev, dtype=torch.float16), layers,
                                                w16, k, gs, dev)
                a, b = separate(), shared()
                rec["same_bits"] = all(bool(torch.equal(p, q)) for p, q in zip(a, b))
                rec["max_abs_diff"] = max(float((p.float() - q.float()).abs().max()) for p, q in zip(a, b))
                rec["fp16_cublas_graph_ms"] = bench_graph(fp16)
                rec["separate_graph_ms"] = bench_graph(separate)
                rec["shared_graph_ms"] = bench_graph(shared)
                rec["x_shared_over_separate"] = rec["separate_graph_ms"] / rec["shared_graph_ms"]
                rec["x_shared_over_fp16"] = rec["fp16_cublas_graph_ms"] / rec["shared_graph_ms"]
            except Exception as e:  # noqa: BLE001
                rec["errors"] = f"{e!r}"[:500]
            rows.append(rec)
        del layers, w16
        if dev == "cuda":
            torch.cuda.empty_cache()
    return rows

"""``bench/gpu_kernels.py``'s table of decode Linears that read one input: q/k/v and gate/up of LLaMA shapes at
M = 1, each replayed from a CUDA graph, as one dp4a launch each (``w4a8_gemv_dp4a`` with its split-K reduced in the
launch, what the dispatch runs per layer) against one launch for all (``w4a8_gemv_dp4a_layers``, what the fused
decode step runs for q/k/v), with cuBLAS fp16 (one call per layer) as the baseline; for gate/up each side also
applies SiLU x up (``silu_mul_triton`` after the GEMVs; ``F.silu(g) * u`` after cuBLAS) against gate/up and SiLU x up
in one launch (``w4a8_gemv_dp4a_glu``, what the fused decode step runs for the MLP). Each row also says whether the
one-launch forms gave the bits of the launches they replace."""
from __future__ import annotations

import torch

#: (name, [(K, N) per layer]), group size 128
SETS = [("LLaMA-2-7B q/k/v", [(4096, 4096)] * 3),
        ("LLaMA-3-8B q/k/v", [(4096, 4096), (4096, 1024), (4096, 1024)]),
        ("LLaMA-2-7B gate/up", [(4096, 11008)] * 2),
        ("LLaMA-2-70B gate/up", [(8192, 28672)] * 2)]
DRY_SETS = [("tiny q/k/v", [(256, 64), (256, 32), (256, 32)]), ("tiny gate/up", [(256, 96)] * 2)]
COLUMNS = ["one_launch", "fp16_cublas_graph_ms", "separate_graph_ms", "shared_graph_ms", "x_shared_over_separate",
           "x_shared_over_fp16", "same_bits", "max_abs_diff"]


def time_shared_input(make_layer, bench_graph, dev: str, dry_run: bool, past) -> list[dict]:
    from fptq.kernels import triton_w4a8 as tw
    from fptq.kernels.triton_decode import silu_mul_triton
    from fptq.kernels.triton_shared_input import w4a8_gemv_dp4a_glu, w4a8_gemv_dp4a_layers

    gs, rows = 128 if not dry_run else 64, []
    for name, shapes in (DRY_SETS if dry_run else SETS):
        if past(0.9):  # (after the main timing table, which stops at 0.75 of the budget)
            rows.append({"set": name, "errors": "time budget reached"})
            break
        rec: dict = {"set": name, "M": 1, "shapes": shapes}
        try:
            k = shapes[0][0]
            layers = [make_layer(k, n, gs) for _, n in shapes]
            w16 = [torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02 for _, n in shapes]
            x = torch.randn(1, k, device=dev, dtype=torch.float16)
            xq, sx = tw.quantize_activations(x)
            cnt = [torch.zeros(tw.counters_needed(2, n, k, gs), dtype=torch.int32, device=dev) for _, n in shapes]
            cnt_all = torch.zeros(sum(c.numel() for c in cnt), dtype=torch.int32, device=dev)
            spec = [(l.qweight, l.w_scales, None, None) for l in layers]

            glu = "gate/up" in name

            def then_silu(ys):  # gate/up: SiLU x up after the GEMVs, as the step without the one-launch form
                return [silu_mul_triton(*ys)] if glu else ys

            def separate():
                return then_silu([tw.w4a8_gemv_dp4a(xq, sx, l.qweight, l.w_scales, k, gs, out_dtype=torch.float16,
                                                    counters=c)[0] for l, c in zip(layers, cnt)])

            def shared():
                if glu:
                    return [w4a8_gemv_dp4a_glu(xq, sx, *spec, k, gs, cnt[0], out_dtype=torch.float16)]
                return w4a8_gemv_dp4a_layers(xq, sx, spec, k, gs, out_dtype=torch.float16, counters=cnt_all)[0]

            def fp16():
                ys = [torch.nn.functional.linear(x, w) for w in w16]
                return [torch.nn.functional.silu(ys[0]) * ys[1]] if glu else ys

            a, b = separate(), shared()
            rec["one_launch"] = "gate/up + SiLU x up" if glu else "q/k/v"
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
        if dev == "cuda":
            torch.cuda.empty_cache()
    return rows

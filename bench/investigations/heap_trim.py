"""Investigation (thirteenth session, 2026-12-06): what the per-batch heap trim of ``calibrate.run_layer``
costs. Quantize time and peak RSS of the ``fptq`` default on SmolLM2 (64 x 512, group 64), one process per run:
``trim`` as main does (malloc_trim after every batch of 8 windows), ``notrim`` (no per-batch trim), ``everyK``
(every K-th batch). Run interleaved, alone on the machine, from the repository root:

    for v in trim notrim trim notrim every8 every8; do python bench/investigations/heap_trim.py $v | tail -1; done

Replacing ``fptq.calibrate.trim_heap`` here is an investigation device, not a way to configure fptq.
Answer in docs/results/memory.md; results in bench/results/heap_trim_smollm2.json."""
import sys, time, json, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import fptq
from common import calibration_text
variant = sys.argv[1]
torch.set_num_threads(2)
if variant == "notrim":
    import fptq.calibrate as c
    c.trim_heap = lambda: True   # per-batch trim off (investigation only)
if variant.startswith("every"):
    import fptq.calibrate as c, fptq.memory as m
    k = int(variant[5:]); n = [0]
    def every():
        n[0] += 1
        return m.trim_heap() if n[0] % k == 0 else False
    c.trim_heap = every
model, tok, src = fptq.load_float_model(None)
calib = fptq.calibration_windows(tok, calibration_text(), 64, 512, seed=0)
cfg = fptq.method_config("fptq", group_size=64)
t = time.perf_counter()
fptq.quantize(model, cfg, calib, device="cpu", progress=False)
qs = time.perf_counter() - t
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"variant": variant, "quantize_s": round(qs, 1), "peak_rss_mb": int(hwm) // 1024}), flush=True)

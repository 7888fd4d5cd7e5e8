"""Investigation (fourteenth session, 2026-12-06): mend the cost of ``calibrate.run_layer``'s per-batch heap trim
(+14% quantize time for -12% peak on SmolLM2, thirteenth session, docs/results/memory.md). Quantize time and peak
RSS of the ``fptq`` default on SmolLM2 (64 x 512, group 64), one process per run:

* ``main``: fptq as it is (malloc_trim after every batch);
* ``trim``: the same, through this script's replacement (for the traces);
* ``notrim``: no per-batch trim;
* ``trace-trim`` / ``trace-notrim``: as ``trim`` / ``notrim``, printing the resident set after every batch (and
  after each trim), to see how much a batch leaves in the heap.

Run interleaved, alone on the machine, from the repository root:

    for v in main trim notrim main trim notrim; do python bench/investigations/heap_trim.py $v | tail -1; done

Replacing ``fptq.calibrate``'s trim here is an investigation device, not a way to configure fptq."""
import json
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import fptq  # noqa: E402
import fptq.calibrate as c  # noqa: E402
import fptq.memory as m  # noqa: E402
from common import calibration_text  # noqa: E402

variant = sys.argv[1]
torch.set_num_threads(2)
trace = []


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 // 2**20


if variant in ("trim", "trace-trim"):
    def always():
        before = rss()
        m.trim_heap()
        if variant.startswith("trace"):
            trace.append((before, rss()))
        return True
    c.trim_heap = always
elif variant in ("notrim", "trace-notrim"):
    def never():
        if variant.startswith("trace"):
            trace.append((rss(), None))
        return False
    c.trim_heap = never
model, tok, src = fptq.load_float_model(None)
calib = fptq.calibration_windows(tok, calibration_text(), 64, 512, seed=0)
cfg = fptq.method_config("fptq", group_size=64)
t = time.perf_counter()
fptq.quantize(model, cfg, calib, device="cpu", progress=False)
qs = time.perf_counter() - t
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1]
if trace:
    print(json.dumps({"variant": variant, "rss_mb_after_each_batch": trace[:200]}))
print(json.dumps({"variant": variant, "quantize_s": round(qs, 1), "peak_rss_mb": int(hwm) // 1024}), flush=True)

"""fptq compare on a tiny model and a tiny data folder: table, resume, reuse."""
import json

import pytest

from fptq.compare import run_compare

from .conftest import _TEXT


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    (d / "text").mkdir(parents=True)
    (d / "text" / "wikitext2_test.raw").write_text("\n".join([_TEXT[:400]] * 6))
    (d / "text" / "c4_validation_2k.jsonl").write_text("\n".join(json.dumps({"text": _TEXT[:300]}) for _ in range(6)))
    (d / "tasks" / "piqa").mkdir(parents=True)
    rows = [{"goal": "To quantize a model", "sol1": "pick scales", "sol2": "delete it"},
            {"goal": "To run fast", "sol1": "use integers", "sol2": "use floats"}] * 3
    (d / "tasks" / "piqa" / "valid.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (d / "tasks" / "piqa" / "valid-labels.lst").write_text("\n".join(["0", "0"] * 3))
    return d


def test_compare_table_and_resume(tiny_model_dir, calib_file, data_dir, tmp_path):
    out = tmp_path / "res"
    kw = dict(calib=str(calib_file), nsamples=4, seqlen=32, group_size=32, eval_seqlen=32, max_windows=2,
              batch_size=4, progress=False)
    data = run_compare(str(tiny_model_dir), ["fp", "rtn-w4a16", "fptq"], ["wikitext2", "c4", "piqa"], data_dir, out, **kw)
    res = data["results"]
    assert set(res) == {"fp", "rtn-w4a16", "fptq"}
    assert res["fp"]["wikitext2"]["kld"] == 0.0 and res["fp"]["wikitext2"]["top1"] == 1.0
    assert res["fptq"]["wikitext2"]["kld"] > 0 and 0 < res["fptq"]["c4"]["top1"] <= 1
    assert res["fptq"]["piqa"]["n"] == 6 and 0 <= res["fptq"]["piqa"]["acc"] <= 1
    md = (out / "results.md").read_text()
    assert "| fptq | 4/8 |" in md and "Avg acc" in md
    assert (out / "results.png").stat().st_size > 1000
    saved = json.loads((out / "results.json").read_text())
    assert saved["results"]["fptq"]["piqa"]["acc"] == res["fptq"]["piqa"]["acc"]

    # resume: delete one cell; the rerun recomputes only that one and reuses the checkpoint
    (out / "cells" / "fptq" / "piqa.json").unlink()
    before = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*.json")}
    data2 = run_compare(str(tiny_model_dir), ["fp", "rtn-w4a16", "fptq"], ["wikitext2", "c4", "piqa"], data_dir, out, **kw)
    after = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*.json")}
    assert before == {p: after[p] for p in before}
    assert (out / "cells" / "fptq" / "piqa.json").is_file()
    assert data2["quantize_s"] == {}  # nothing re-quantized
    assert data2["results"]["fptq"]["piqa"]["acc"] == res["fptq"]["piqa"]["acc"]

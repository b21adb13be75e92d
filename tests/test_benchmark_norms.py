"""tools/benchmark_norms.py: the report's structure and its paired ratios (not the timings).

The smoke run uses the tiny Mask R-CNN at 128 px; it checks that every child process (interleaved
training, memory, interleaved inference) runs and that the table reaches its section of the
output file without touching the rest. Speed itself is never asserted.
"""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from helpers import REPO

TOOL = os.path.join(REPO, "tools", "benchmark_norms.py")
TINY = os.path.join(REPO, "configs", "test", "tiny-mask_rcnn.yaml")


def _tool():
    sys.path.insert(0, os.path.dirname(TOOL))
    try:
        spec = importlib.util.spec_from_file_location("benchmark_norms", TOOL)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(os.path.dirname(TOOL))
    return module


def test_paired_ratios_are_per_step_not_ratios_of_medians():
    tool = _tool()
    # BN slows down in the second half; the norm is always 10% slower than BN on the same step
    bn = [[1.0, 1.0, 2.0, 2.0, 2.0]]
    norm = [[1.1, 1.1, 2.2, 2.2, 2.2]]
    assert tool._paired_ratio(norm, bn) == pytest.approx(1.1)
    assert tool._paired_ratio(norm, []) is None
    times = {"BN|eval": [1.0, 3.0, 3.0], "CBN|eval": [1.0, 3.03, 3.03], "CBN|converted": [0.99, 3.0, 2.97]}
    summary = tool._inference_summary(times, "CBN")
    assert summary["eval"] == pytest.approx(3.03) and summary["eval_ratio"] == pytest.approx(1.01)
    assert summary["conv_ratio"] == pytest.approx(0.99)
    assert tool._inference_summary(times, "GN") == {"eval": None, "conv": None, "eval_ratio": None, "conv_ratio": None}


def test_smoke_run_writes_only_its_section(tmp_path):
    out = tmp_path / "BENCH.md"
    out.write_text("# keep me\n\n<!-- BEGIN benchmark_norms_1x -->\nold\n<!-- END benchmark_norms_1x -->\n<!-- BEGIN benchmark_norms_scratch_3x -->\nother\n<!-- END benchmark_norms_scratch_3x -->\n\ntail\n")
    cmd = [sys.executable, TOOL, "--config-file", TINY, "--norms", "BN", "CBN", "GN", "floor", "--settings", "1x",
           "--warmup", "3", "--iters", "1", "--infer-images", "1", "--infer-repeats", "1",
           "--min-size", "96", "--max-size", "128", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# keep me\n") and text.endswith("\ntail\n") and "\nold\n" not in text
    assert "\nother\n" in text  # the setting that did not run keeps its table
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| (BN|CBN|GN|floor) +\|.*$", text, re.M)}
    assert set(rows) == {"BN", "CBN", "GN", "floor"}
    cells = [c.strip() for c in rows["BN"].strip("|").split("|")]
    assert cells[2] == "1.00x" and cells[4] == "1.00x" and cells[6] == "1.000x"  # BN against itself
    assert "n/a (GN has no FrozenBN form)" in rows["GN"]
    assert "(= BN)" in rows["floor"]  # the floor row's inference is BN's by construction
    assert re.search(r"- 1x CBN: training [0-9.]+x BN \(target <= 1\.20x: (met|NOT met)\)", text)
    assert "WARNING" not in text  # finite losses in every model, the same number of detections
    assert re.search(r"Every model returned \d+ detections", text)

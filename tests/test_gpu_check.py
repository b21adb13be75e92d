"""tools/gpu_check.py and tools/prepare_gpu_wheels.py without a GPU.

What can be checked on a CPU machine: the refusal (no CUDA: exit status 2, a message about CUDA,
no traceback, torch not even imported when no driver is present); the output folder rules; the
stage runner (time limit with the whole process group killed, failures recorded, the next stage
still runs, the budget); the JUnit counts; the report built from synthetic results; the detector
rows' paired ratios; the wheel plan, the offline closure check and the install commands; the
venv that sees its creator's torch; and the block-level child on the CPU.
"""
import os
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch

from helpers import REPO

sys.path.insert(0, REPO)  # benchmarks/ is not installed (setup.py ships smallbn_d2 only)
from benchmarks import gpu_check, gpu_report, gpu_setup

TOOL = os.path.join(REPO, "tools", "gpu_check.py")


# ------------------------------------------------------------------------------------ refusal
@pytest.mark.slow
def test_refuses_without_a_driver_before_importing_torch(tmp_path):
    if gpu_check._driver_present():
        pytest.skip("an NVIDIA driver is present here: the no-driver refusal cannot be observed")
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-X", "importtime", TOOL, "--output-dir", str(out)], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert any("CUDA is needed" in line and "no NVIDIA driver" in line for line in errors), proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert imported and not [m for m in imported if m.split(".")[0] in ("torch", "detectron2", "numpy")]
    assert not out.exists()


@pytest.mark.slow
def test_refuses_when_torch_sees_no_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\nexit 9\n")
    (fake / "nvidia-smi").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run([sys.executable, TOOL, "--output-dir", str(tmp_path / "report")], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env=env)
    assert proc.returncode == 2
    assert "CUDA is needed" in proc.stderr and "torch.cuda.is_available() is False" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "report").exists()


@pytest.mark.slow
def test_stdlib_modules_import_nothing_heavy():
    """What tools/gpu_check.py imports before the install must not need torch, Detectron2 or smallbn_d2."""
    code = textwrap.dedent(f"""
        import runpy, sys
        runpy.run_path({TOOL!r})  # not as __main__: imports only
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "detectron2", "numpy", "smallbn_d2",
                                                                   "benchmarks")))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         cwd=REPO).stdout
    assert eval(out) == ["benchmarks", "benchmarks.gpu_check", "benchmarks.gpu_report", "benchmarks.gpu_setup"]


def test_output_dir_rules(tmp_path):
    assert gpu_check.check_output_dir(tmp_path / "new", overwrite=False) == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    gpu_check.check_output_dir(tmp_path / "empty", overwrite=False)
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("keep")
    with pytest.raises(gpu_check.OutputDirError, match=r"not empty.*mine\.txt.*--overwrite"):
        gpu_check.check_output_dir(full, overwrite=False)
    gpu_check.check_output_dir(full, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(gpu_check.OutputDirError, match="is a file"):
        gpu_check.check_output_dir(tmp_path / "file", overwrite=True)


# ------------------------------------------------------------------------------------ stage runner
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_stage_runner_limits_kills_the_group_records_failures_and_goes_on(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    hang = [sys.executable, "-c", "import subprocess, sys, time; p = subprocess.Popen(['sleep', '60']); "
            f"open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(60)"]
    fail = [sys.executable, "-c", "import sys; print('boom' + '-marker'); sys.exit(3)"]
    result = tmp_path / "ok.json"
    ok = [sys.executable, "-c", f"import json; json.dump({{'value': 7}}, open({str(result)!r}, 'w'))"]
    stages = [gpu_check.Stage("hang", "hangs", 2, [hang], min_s=1),
              gpu_check.Stage("fail", "fails", 30, [fail, ok], min_s=1),
              gpu_check.Stage("ok", "works", 30, [ok], min_s=1, result_file=str(result)),
              gpu_check.Stage("told", "skipped", 30, [ok], skip="needs >= 2 GPUs"),
              gpu_check.Stage("late", "too late", 30, [ok], min_s=1000)]
    deadline = time.monotonic() + 300
    with open(tmp_path / "log", "wb") as log:
        recs = [gpu_check.run_stage(s, log, deadline) for s in stages]
    hang_rec, fail_rec, ok_rec, told, late = recs
    # "timeout" only when killed at the limit (the step sleeps 60 s): no wall-clock assertion
    assert hang_rec["status"] == "timeout" and "limit of 2 s" in hang_rec["message"]
    grandchild = int(pidfile.read_text())
    for _ in range(50):
        if not _alive(grandchild):
            break
        time.sleep(0.1)
    assert not _alive(grandchild), "the stage's grandchild survived its time limit"
    assert fail_rec["status"] == "failed" and fail_rec["message"] == "exit status 3: boom-marker"
    assert not result.exists() or ok_rec["status"] == "passed"  # the failing stage stopped at its first step
    assert ok_rec["status"] == "passed" and ok_rec["data"] == {"value": 7}
    assert told["status"] == "skipped" and told["message"] == "needs >= 2 GPUs"
    assert late["status"] == "skipped" and "budget left" in late["message"]
    log_text = (tmp_path / "log").read_text()
    assert "===== stage fail: failed" in log_text and "boom-marker" in log_text


def test_stage_limit_is_capped_by_the_budget(tmp_path):
    stage = gpu_check.Stage("hang", "hangs", 600, [[sys.executable, "-c", "import time; time.sleep(60)"]], min_s=1)
    with open(tmp_path / "log", "wb") as log:
        rec = gpu_check.run_stage(stage, log, deadline=time.monotonic() + 1.5)
    assert rec["status"] == "timeout" and rec["limit_s"] <= 1.5


def test_pytest_summary_needs_a_passed_test(tmp_path):
    """pytest's own summary line is the cuda_tests result; a run where every CUDA test skipped
    (pytest does not see the GPU) exits 0 but fails the stage."""
    log = tmp_path / "log"
    log.write_text("earlier stage: 3 passed in 1.0s\n")
    offset = log.stat().st_size
    with open(log, "a") as f:
        f.write("..s.F\nFAILED tests/test_cbn.py::test_b[cuda-float16]\n"
                "==== 1 failed, 3 passed, 1 skipped, 600 deselected in 9.10s ====\n")
    data, message, ok = gpu_check.pytest_summary(log, offset)
    assert ok and message == data["summary"] == "1 failed, 3 passed, 1 skipped, 600 deselected in 9.10s"
    with open(log, "a") as f:
        offset = f.tell()
        f.write("sss\n3 skipped, 600 deselected in 2.00s\n")
    data, message, ok = gpu_check.pytest_summary(log, offset)
    assert not ok and message.startswith("no CUDA test passed (3 skipped, 600 deselected in 2.00s)")
    assert not gpu_check.pytest_summary(log, log.stat().st_size)[2]  # nothing printed: no summary


def test_failure_message_is_the_error_line(tmp_path):
    log_path = tmp_path / "log"
    log_path.write_text("noise\nTraceback (most recent call last):\n  File \"x\", line 1\n"
                        "FloatingPointError: Loss became infinite or NaN at iteration=3!\nmore noise\n")
    assert gpu_check._tail(str(log_path), 0) == "FloatingPointError: Loss became infinite or NaN at iteration=3!"
    log_path.write_text("a\nb\nc\nd\n")
    assert gpu_check._tail(str(log_path), 2) == "b / c / d"


def test_build_stages(tmp_path):
    py = "/venv/bin/python"
    stages = gpu_check.build_stages(py, tmp_path, gpu_count=1, wheels=tmp_path / "gpu_wheels")
    assert [s.name for s in stages] == list(gpu_check.STAGE_NAMES)
    install = stages[0]
    assert callable(install.steps[0]) and install.steps[1][:3] == [py, "-m", "pip"]
    tests = stages[1].steps[0]
    assert tests[:4] == [py, "-m", "pytest", "tests"] and tests[tests.index("-k") + 1] == "cuda"
    ddp = next(s for s in stages if s.name == "ddp")
    assert ddp.skip and "needs >= 2 GPUs" in ddp.skip and "has 1" in ddp.skip
    assert not next(s for s in gpu_check.build_stages(py, tmp_path, 2) if s.name == "ddp").skip
    train = next(s for s in stages if s.name == "train_mabn_amp").steps[0]
    assert train[:3] == [py, "-m", "benchmarks.gpu"] and "--amp" in train and "MABN" in train
    only = gpu_check.build_stages(py, tmp_path, 1, wheels=tmp_path, only=["block"])
    assert [s.name for s in only] == ["install", "block"]
    assert [s.name for s in gpu_check.build_stages(py, tmp_path, 1)][0] == "cuda_tests"  # no wheels, no install
    # the whole budget is the sum of what the stages may take at most, capped by the deadline
    assert gpu_check.DEFAULT_BUDGET_S <= 480


# ------------------------------------------------------------------------------------ report
def _synthetic_results():
    bn_t = [0.10, 0.12, 0.30]
    detector_rows = {
        "BN": {"train": 0.12, "train_ratio": 1.0, "mem": 4000 * 2**20, "mem_ratio": 1.0, "nonfinite": 0, "eval": 0.05,
               "conv": 0.05, "eval_ratio": 1.0, "conv_ratio": 1.0, "inference_of": None, "no_frozen_form": False},
        "GN": {"train": 0.13, "train_ratio": 1.10, "mem": 4100 * 2**20, "mem_ratio": 1.025, "nonfinite": 0,
               "eval": 0.08, "conv": None, "eval_ratio": 1.6, "conv_ratio": None, "inference_of": None,
               "no_frozen_form": True},
        "CBN": {"train": 0.16, "train_ratio": 1.25, "mem": 4300 * 2**20, "mem_ratio": 1.06, "nonfinite": 2,
                "eval": 0.05, "conv": 0.05, "eval_ratio": 1.01, "conv_ratio": 0.99, "inference_of": None,
                "no_frozen_form": False},
    }
    return {
        "command": "python3 tools/gpu_check.py --wheels gpu_wheels --output-dir gpu_report",
        "machine": {"gpus": ["NVIDIA H200"], "gpu_count": 1, "gpu_memory": "143771 MiB", "driver": "580.1",
                    "torch": "2.11.0+cu130", "cuda": "13.0", "cudnn": 91002, "python": "3.12.3", "cpu_count": 16},
        "started": 1000.0, "finished": 1300.0, "budget_s": 480,
        "stages": [
            {"name": "install", "title": "install from gpu_wheels/ into a venv", "status": "passed", "seconds": 20.0,
             "limit_s": 90, "message": "",
             "data": {"torch": "2.11.0+cu130", "torch_path": "/opt/torch/site-packages/torch/__init__.py",
                      "cuda_available": True, "compiled_ops": False,
                      "versions": {"pb1-detectron2": "0.6", "fvcore": "0.1.5.post20221221", "pycocotools": "2.0.11"}}},
            {"name": "cuda_tests", "title": "CUDA tests (pytest tests -k cuda)", "status": "failed", "seconds": 30.0,
             "limit_s": 90, "message": "1 failed, 10 passed, 600 deselected in 20.00s",
             "data": {"summary": "1 failed, 10 passed, 600 deselected in 20.00s"}},
            {"name": "train_cbn_amp", "title": "training, CBN, AMP fp16, 60 iterations", "status": "passed",
             "seconds": 40.0, "limit_s": 75, "message": "",
             "data": {"norm": "CBN", "amp": True, "iterations": 60, "max_iter": 60, "images_per_iter": 2,
                      "losses": [[19, 3.5], [39, 2.9], [59, 2.5]], "all_finite": True, "s_per_iter": 0.061,
                      "peak_memory_mb": 1234.0, "results": {"bbox": {"AP": 0.12}, "segm": {"AP": 0.05}},
                      "test_set": "coco_2017_sample_val"}},
            {"name": "train_mabn_amp", "title": "training, MABN, AMP fp16, 60 iterations", "status": "failed",
             "seconds": 12.0, "limit_s": 75, "message": "exit status 1: FloatingPointError: Loss became infinite",
             "data": {"norm": "MABN", "amp": True, "returncode": 1, "max_iter": 60, "images_per_iter": 2}},
            {"name": "block", "title": "block level benchmark", "status": "passed", "seconds": 9.0, "limit_s": 45,
             "message": "", "data": {"shape": [64, 256, 14, 14], "depth": 4, "window": 4, "rounds": 5, "iters": 10,
                                     "warmup": 3, "times": {"BN": [0.002, 0.002, 0.003], "CBN": [0.0026, 0.0026, 0.004]},
                                     "peak_bytes": {"BN": 100 * 2**20, "CBN": 150 * 2**20},
                                     "state_bytes": {"BN": 9 * 2**20, "CBN": 36 * 2**20},
                                     "descriptions": {"BN": "torch.nn.BatchNorm2d", "CBN": "CBN k=4"}}},
            {"name": "detector_1x", "title": "detector level benchmark, 1x", "status": "passed", "seconds": 100.0,
             "limit_s": 150, "message": "",
             "data": {"setting": "1x", "images": 4, "min_size": 800, "max_size": 1333, "warmup": 3, "memory_iters": 2,
                      "iters": 3, "start_iter": 20000, "train_times": {"BN": bn_t}, "rows": detector_rows,
                      "detections": {"BN|eval": 100, "CBN|eval": 100}, "infer_images": 4, "infer_repeats": 3}},
            {"name": "ddp", "title": "two processes (DDP, NCCL), CBN, 10 iterations", "status": "skipped",
             "seconds": 0.0, "limit_s": None, "message": "needs >= 2 GPUs; this machine has 1", "data": {}},
            {"name": "detector_scratch_3x", "title": "detector level benchmark, scratch_3x", "status": "timeout",
             "seconds": 80.0, "limit_s": 80, "message": "killed at the stage's limit of 80 s", "data": {}},
        ],
    }


def _table_after(report: str, heading: str):
    """The rows (lists of cells) of the first Markdown table after ``heading``."""
    lines = report[report.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    assert all(len(r) == len(rows[0]) for r in rows), rows
    assert set(rows[1]) == {"---"}
    return rows[0], {r[0]: r for r in rows[2:]}


def test_report_from_synthetic_results():
    report = gpu_report.build_report(_synthetic_results())
    assert report.startswith("### GPU check: NVIDIA H200\n")
    assert "Command: `python3 tools/gpu_check.py --wheels gpu_wheels --output-dir gpu_report`" in report
    assert "1 x NVIDIA H200 (143771 MiB, driver 580.1), torch 2.11.0+cu130, CUDA 13.0" in report
    assert "Run took 300 s of a 480 s budget" in report
    assert ("Installed from the wheel folder: Detectron2 0.6 (pb1-detectron2, without its compiled ops), fvcore "
            "0.1.5.post20221221, pycocotools 2.0.11; torch 2.11.0+cu130 from /opt/torch/site-packages/torch/__init__.py "
            "(CUDA available: True).") in report

    _, stages = _table_after(report, "#### Stages")
    assert stages["training, MABN, AMP fp16, 60 iterations"][1].startswith("**FAILED**: exit status 1: FloatingPoint")
    assert stages["two processes (DDP, NCCL), CBN, 10 iterations"][1:] == [
        "skipped: needs >= 2 GPUs; this machine has 1", "-", "-"]
    assert stages["detector level benchmark, scratch_3x"][1].startswith("**TIMED OUT**")

    assert ("`pytest tests -k cuda`: 1 failed, 10 passed, 600 deselected in 20.00s; **FAILED**: 1 failed, 10 passed"
            in report)

    header, train = _table_after(report, "#### Training")
    assert train["CBN"][header.index("last total_loss")] == "2.500"
    assert train["CBN"][header.index("box AP")] == "0.12" and train["CBN"][header.index("precision")].startswith("fp16")
    assert train["MABN"][header.index("losses finite")] == "**NO**"
    assert train["MABN"][header.index("iterations")] == "0 / 60" and "- MABN: **FAILED**: exit status 1" in report

    header, block = _table_after(report, "#### Block level on CUDA")
    # medians: BN 2.0 ms, CBN 2.6 ms -> 1.30x; memory 150 / 100 MiB -> 1.50x
    assert block["CBN"][header.index("fwd+bwd ms/step")] == "2.60"
    assert block["CBN"][header.index("time vs BN")] == "1.30x"
    assert block["CBN"][header.index("memory vs BN")] == "1.50x"
    assert block["CBN"][header.index("parameters + buffers MiB")] == "36.0"

    header, det = _table_after(report, "#### Detector level on CUDA, `1x`")
    assert det["CBN"][header.index("vs BN")] == "1.25x" and det["CBN"][header.index("iter/s")] == "6.25"
    assert det["GN"][header.index("converted s/img")] == "n/a (no FrozenBN form)"
    assert det["CBN"][header.index("peak memory MiB")] == "4300"
    assert "WARNING: CBN: 2 step(s) with a non-finite loss" in report
    assert "#### Detector level on CUDA, `scratch_3x`" in report and "No result: **TIMED OUT**" in report

    _, paper = _table_after(report, "#### Against the CBN paper")
    assert paper["training time CBN / BN"][1:] == ["1.30", "1.25"]
    assert paper["training time GN / BN"][1:] == ["1.08", "1.10"]
    assert paper["inference time GN / BN"][1:] == ["1.68", "1.60"]
    assert paper["inference img/s, BN (eval mode)"][1:] == ["6.2", "20.0"]
    assert paper["memory CBN / BN"][1:] == ["1.07", "1.06"]
    assert "needs >= 2 GPUs; this machine has 1" in report.split("#### Two processes")[1]
    failures = report.split("#### Failures")[1]
    assert "training, MABN" in failures and "detector level benchmark, scratch_3x: **TIMED OUT**" in failures
    assert "CUDA tests" in failures


def test_report_of_an_empty_run_does_not_raise():
    report = gpu_report.build_report({"stages": []})
    assert "`pytest tests -k cuda`: no pytest summary; not run." in report and "| training iter/s, CBN | 1.0 | n/a |" in report


def test_detector_rows_are_paired_per_step():
    from benchmarks.gpu import detector_rows

    # BN slows down over the steps; CBN is 25% slower than BN on every step, GN has no FrozenBN form
    result = {"norms": ["BN", "CBN", "GN", "floor"],
              "train_times": {"BN": [1.0, 2.0, 4.0], "CBN": [1.25, 2.5, 5.0], "GN": [1.1, 2.4, 4.4],
                              "floor": [1.1, 2.2, 4.4]},
              "peak_bytes": {"BN": 100, "CBN": 107},
              "infer_times": {"BN|eval": [1.0, 2.0], "BN|converted": [1.0, 2.0], "CBN|eval": [1.0, 2.02],
                              "CBN|converted": [0.99, 1.98], "GN|eval": [1.6, 3.4]}}
    rows = detector_rows(result)
    assert rows["CBN"]["train"] == pytest.approx(2.5) and rows["CBN"]["train_ratio"] == pytest.approx(1.25)
    assert rows["GN"]["train_ratio"] == pytest.approx(1.1)  # per step 1.1, 1.2, 1.1 (not 2.4 / 2.0)
    assert rows["CBN"]["mem_ratio"] == pytest.approx(1.07) and rows["GN"]["mem"] is None
    assert rows["CBN"]["conv_ratio"] == pytest.approx(0.99) and rows["CBN"]["eval_ratio"] == pytest.approx(1.005)
    assert rows["GN"]["eval_ratio"] == pytest.approx(1.65) and rows["GN"]["no_frozen_form"]
    assert rows["GN"]["conv"] is None and not rows["CBN"]["no_frozen_form"]
    assert rows["floor"]["inference_of"] == "BN" and rows["floor"]["eval"] == pytest.approx(1.5)


def test_train_opts():
    from benchmarks.gpu import SAMPLE_NORM_KEYS, train_opts

    opts = train_opts("MABN", "cuda", True, 60, 1, "/out")
    kv = dict(zip(opts[::2], opts[1::2]))
    assert kv["SOLVER.AMP.ENABLED"] == "True" and kv["SOLVER.MAX_ITER"] == "60" and kv["MODEL.DEVICE"] == "cuda"
    assert kv["MODEL.CBN.BURN_IN_ITERS"] == "20" and kv["MODEL.CBN.BURN_IN_EPOCHS"] == "None"
    assert kv["MODEL.MABN.RENORM_WARMUP_ITERS"] == "20" and kv["MODEL.MABN.HEAD_WARMUP_ITERS"] == "20"
    assert all(kv[k] == "MABN" for k in SAMPLE_NORM_KEYS) and kv["SOLVER.IMS_PER_BATCH"] == "2"
    assert dict(zip(*[iter(train_opts("CBN", "cuda", False, 10, 2, "/o"))] * 2))["SOLVER.IMS_PER_BATCH"] == "4"
    with pytest.raises(ValueError, match="iters >= 3"):
        train_opts("CBN", "cuda", False, 2, 1, "/o")


@pytest.mark.slow
def test_block_child_runs_on_cpu(tmp_path):
    from benchmarks import gpu

    args = gpu.parse_args(["block", "--device", "cpu", "--result", str(tmp_path / "r.json"), "--norms", "BN", "CBN",
                           "--batch", "2", "--channels", "32", "--size", "4", "--depth", "1", "--rounds", "2",
                           "--iters", "1"])
    res = gpu.block_benchmark(args)
    assert {n: len(t) for n, t in res["times"].items()} == {"BN": 2, "CBN": 2}  # one median per round
    assert all(0 < t < float("inf") for ts in res["times"].values() for t in ts)  # seconds per step, measured
    assert res["peak_bytes"] == {} and res["descriptions"]["CBN"].startswith("CBN k=4")
    assert res["state_bytes"]["CBN"] > res["state_bytes"]["BN"]  # CBN's window of statistics gradients


# ------------------------------------------------------------------------------------ wheels
_META = {  # distribution -> (installed version, Requires-Dist)
    "fvcore": ("0.1.5.post1", ["numpy", "yacs>=0.1.6", "pyyaml>=5.1", "pytest; extra == 'test'"]),
    "hydra-core": ("1.3.8", ["omegaconf<2.4,>=2.2", "antlr4-python3-runtime==4.9.*", "packaging"]),
    "omegaconf": ("2.3.1", ["antlr4-python3-runtime==4.9.*", "PyYAML>=5.1.0"]),
    "antlr4-python3-runtime": ("4.9.3", []),
    "yacs": ("0.1.8", ["PyYAML"]),
    "pyyaml": ("6.0", []),
    "setuptools": ("80.1", []),
}


def _requirements(tmp_path, extra=""):
    path = tmp_path / "requirements.txt"
    path.write_text("# pins\ntorch==2.13.0\ntorchvision==0.28.0  # the GPU's own\nfvcore>=0.1.5,<0.1.6\nnumpy\n"
                    "hydra-core>=1.1\nsetuptools<81\ntorchmetrics\n" + extra)
    return path


def _lookup(meta):
    import importlib.metadata as md

    def version_of(name):
        key = gpu_setup.canonical_name(name)
        if key not in meta:
            raise md.PackageNotFoundError(name)
        return meta[key][0]

    return version_of, lambda name: meta[gpu_setup.canonical_name(name)][1]


def test_download_plan_pins_the_installed_closure(tmp_path):
    meta = dict(_META, torchmetrics=("1.9", ["numpy", "torch"]))
    version_of, requires_of = _lookup(meta)
    plan = gpu_setup.download_plan(_requirements(tmp_path), version_of=version_of, requires_of=requires_of)
    assert plan == ["antlr4-python3-runtime==4.9.3", "fvcore==0.1.5.post1", "hydra-core==1.3.8", "omegaconf==2.3.1",
                    "pyyaml==6.0", "setuptools==80.1", "torchmetrics==1.9", "yacs==0.1.8"]


def test_download_plan_refuses_versions_outside_requirements(tmp_path):
    version_of, requires_of = _lookup(dict(_META, setuptools=("82.0", []), torchmetrics=("1.9", [])))
    with pytest.raises(gpu_setup.PlanError, match=r"setuptools 82.0 is installed here, but requirements.txt requires "
                                                  r"setuptools<81"):
        gpu_setup.download_plan(_requirements(tmp_path), version_of=version_of, requires_of=requires_of)
    version_of, requires_of = _lookup({k: v for k, v in _META.items() if k != "yacs"} | {"torchmetrics": ("1", [])})
    with pytest.raises(gpu_setup.PlanError, match=r"yacs>=0.1.6 \(required by fvcore 0.1.5.post1\) is not installed"):
        gpu_setup.download_plan(_requirements(tmp_path), version_of=version_of, requires_of=requires_of)


def test_download_and_install_commands(tmp_path):
    cmd = gpu_setup.download_command("pycocotools==2.0.11", tmp_path, "3.12")
    assert cmd[1:4] == ["-m", "pip", "download"] and cmd[-1] == "pycocotools==2.0.11"
    for flag in ("--no-deps", "--only-binary=:all:"):
        assert flag in cmd
    pairs = list(zip(cmd, cmd[1:]))
    for pair in [("--python-version", "3.12"), ("--implementation", "cp"), ("--abi", "cp312"),
                 ("--platform", "manylinux2014_x86_64"), ("-d", str(tmp_path))]:
        assert pair in pairs
    reqs = gpu_setup.write_gpu_requirements(_requirements(tmp_path), tmp_path / "gpu_requirements.txt")
    assert reqs.read_text().splitlines() == ["fvcore>=0.1.5,<0.1.6", "numpy", "hydra-core>=1.1", "setuptools<81",
                                             "torchmetrics"]
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "setuptools-80.1-py3-none-any.whl").write_bytes(b"")
    (wheels / "notes.txt").write_text("not a wheel")
    deps, editable = gpu_setup.install_commands("/v/bin/python", wheels, reqs, "/repo")
    assert deps[:4] == ["/v/bin/python", "-m", "pip", "--isolated"]
    assert ("--find-links", str(wheels)) in list(zip(deps, deps[1:])) and "--no-index" in deps
    assert ("-r", str(reqs)) in list(zip(deps, deps[1:]))
    assert "pb1-detectron2==0.6" in deps and "setuptools==80.1" in deps
    assert editable[-2:] == ["-e", "/repo"] and "--no-deps" in editable and "--no-index" in editable
    assert not [a for a in deps + editable if a.split("=")[0] in ("torch", "torchvision")]


def _fake_wheel(folder: Path, filename: str, requires=()) -> None:
    name, version = filename.split("-")[:2]
    with zipfile.ZipFile(folder / filename, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", "Metadata-Version: 2.1\nName: x\nVersion: 1\n"
                   + "".join(f"Requires-Dist: {r}\n" for r in requires))


def test_missing_requirements_of_a_wheel_folder(tmp_path):
    w = tmp_path / "w"
    w.mkdir()
    _fake_wheel(w, "hydra_core-1.3.8-py3-none-any.whl", ["omegaconf<2.4,>=2.2", "packaging",
                                                          "importlib-resources; python_version < '3.9'"])
    _fake_wheel(w, "omegaconf-2.3.1-py3-none-any.whl", ["antlr4-python3-runtime==4.9.*", "PyYAML>=5.1.0"])
    _fake_wheel(w, "antlr4_python3_runtime-4.9.3-py3-none-any.whl")
    _fake_wheel(w, "pyyaml-6.0.4-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl")
    _fake_wheel(w, "pycocotools-2.0.11-cp312-abi3-manylinux2014_x86_64.whl", ["numpy"])
    _fake_wheel(w, "psutil-7.2.2-cp36-abi3-manylinux2010_x86_64.manylinux_2_12_x86_64.whl")
    reqs = ["torch==2.11", "hydra-core>=1.1", "numpy", "pycocotools>=2.0.2"]
    assert gpu_setup.missing_requirements(w, reqs) == []
    # what resolving each requirement on its own picked: an omegaconf that hydra-core excludes
    (w / "omegaconf-2.3.1-py3-none-any.whl").unlink()
    _fake_wheel(w, "omegaconf-2.4.0-py3-none-any.whl", ["antlr4-python3-runtime==4.9.*", "PyYAML>=5.1.0"])
    assert gpu_setup.missing_requirements(w, reqs) == [
        "hydra-core 1.3.8 requires omegaconf<2.4,>=2.2, but " + str(w) + " has omegaconf 2.4.0"]
    (w / "antlr4_python3_runtime-4.9.3-py3-none-any.whl").unlink()
    _fake_wheel(w, "pycocotools-2.0.12-cp311-cp311-manylinux2014_x86_64.whl")
    problems = gpu_setup.missing_requirements(w, reqs + ["fvcore"])
    assert "antlr4-python3-runtime (required by omegaconf 2.4.0) is neither in " + str(w) + \
        " nor provided by the GPU machine" in problems
    assert "pycocotools has two wheels (2.0.11 and 2.0.12); keep one" in problems
    assert "pycocotools-2.0.12-cp311-cp311-manylinux2014_x86_64.whl does not install on CPython 3.12 / " \
        "manylinux x86_64" in problems
    assert any(p.startswith("fvcore (required by requirements.txt)") for p in problems)


def test_prepared_wheel_folder_is_closed():
    folder = Path(REPO) / "gpu_wheels"
    if not any(folder.glob("*.whl")):
        pytest.skip("no gpu_wheels/ here (made by tools/prepare_gpu_wheels.py on a machine with PyPI)")
    reqs = gpu_setup.requirement_lines(Path(REPO) / "requirements.txt") + [gpu_setup.DETECTRON2_REQUIREMENT]
    assert gpu_setup.missing_requirements(folder, reqs) == []
    assert gpu_setup.folder_size_bytes(folder) < 32 * 2**20  # travels with the working tree (64 MiB in all)


@pytest.mark.slow
def test_venv_made_from_a_venv_sees_its_creators_torch(tmp_path):
    if sys.prefix == sys.base_prefix:
        pytest.skip("this interpreter is not a venv: the case does not arise")
    py = gpu_setup.create_venv(tmp_path / "venv", timeout=120)
    code = ("import importlib.util, sys; s = importlib.util.find_spec('torch'); "
            "print(sys.prefix); print(s.origin if s else None)")
    prefix, origin = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=60,
                                    check=True).stdout.split()
    assert os.path.realpath(prefix) == os.path.realpath(tmp_path / "venv")
    assert os.path.realpath(origin) == os.path.realpath(torch.__file__)
    pip = subprocess.run([py, "-m", "pip", "--version"], capture_output=True, text=True, timeout=60)
    assert pip.returncode == 0, pip.stderr
    with pytest.raises(FileExistsError, match="not empty"):
        gpu_setup.create_venv(tmp_path / "venv")

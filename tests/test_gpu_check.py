"""The GPU check without a GPU: tools/gpu_check.sh and tools/prepare_gpu_wheels.sh refuse what they
must (no CUDA, a non-empty output folder, bad usage) before running anything, and the benchmark
tools' ``--device cuda`` answers one line where CUDA is absent. ``--device cpu`` (the default) is
covered by tests/test_benchmark_norms.py's smoke run; the scripts' steps run only on a GPU machine."""
import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO

GPU_CHECK = os.path.join(REPO, "tools", "gpu_check.sh")
PREPARE = os.path.join(REPO, "tools", "prepare_gpu_wheels.sh")
SCRIPTS = {"gpu_check": GPU_CHECK, "prepare_gpu_wheels": PREPARE}
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")


def _run(cmd, **env):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=dict(os.environ, **env))


@pytest.mark.parametrize("script", SCRIPTS.values(), ids=SCRIPTS)
def test_scripts_parse_and_answer_help(script):
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    proc = _run(["bash", script, "--help"])
    assert proc.returncode == 0 and proc.stdout.startswith("usage: bash tools/") and proc.stderr == ""


@no_cuda
def test_gpu_check_refuses_without_cuda_before_anything_else(tmp_path):
    proc = _run(["bash", GPU_CHECK, str(tmp_path / "out")], PYTHON=sys.executable)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "CUDA is needed" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_gpu_check_refuses_a_non_empty_output_dir_and_bad_usage(tmp_path):
    fake = tmp_path / "python"  # a Python that reports one GPU: the output folder is checked next
    fake.write_text("#!/bin/sh\necho 1\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    for target in (out, out / "mine.txt"):
        proc = _run(["bash", GPU_CHECK, str(target)], PYTHON=str(fake))
        assert proc.returncode == 2 and "is not an empty folder" in proc.stderr, proc.stderr
    assert os.listdir(out) == ["mine.txt"] and (out / "mine.txt").read_text() == "keep"
    for args in ([], [str(out), "--wheel", "w"], [str(out), "--wheels"]):
        proc = _run(["bash", GPU_CHECK] + args, PYTHON=str(fake))
        assert proc.returncode == 2 and proc.stderr.startswith("usage: bash tools/gpu_check.sh OUTPUT_DIR")


def test_prepare_gpu_wheels_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "old.whl").write_text("")
    proc = _run(["bash", PREPARE, str(tmp_path)])
    assert proc.returncode == 2 and "is not empty" in proc.stderr and os.listdir(tmp_path) == ["old.whl"]


@pytest.mark.slow
@no_cuda
@pytest.mark.parametrize("tool", ["benchmark_cbn_layer.py", "benchmark_norms.py"])
def test_benchmark_device_cuda_without_cuda_is_one_line(tool):
    proc = _run([sys.executable, os.path.join(REPO, "tools", tool), "--device", "cuda", "--no-write"])
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"{tool}: error: --device cuda")
    assert "allowed here: --device cpu" in proc.stderr

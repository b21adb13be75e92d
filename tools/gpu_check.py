#!/usr/bin/env python3
"""Every GPU figure of smallbn_d2 in one command, within 8 minutes on one GPU.

    python3 tools/gpu_check.py --wheels gpu_wheels --output-dir gpu_report

Run from the repository root with the GPU machine's own Python (its torch is used). With
``--wheels`` (the folder made by ``tools/prepare_gpu_wheels.py`` on a machine with PyPI) it
first installs Detectron2 v0.6, its dependencies and smallbn_d2 into a new venv, offline. Then
the CUDA tests, short AMP training runs with CBN and MABN, the block- and detector-level
benchmarks on CUDA and (with >= 2 GPUs) a two-process step, each with its own time limit;
``--output-dir`` receives ``report.md`` (Markdown for docs/BENCHMARKS.md), ``results.json`` and
``gpu_check.log``. Without CUDA it stops at once with exit status 2. See ``--help`` and
docs/BENCHMARKS.md ("GPU"); the work is done by :mod:`benchmarks.gpu_check`.
"""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # benchmarks/ (not installed): the command runs from a checkout

# benchmarks.gpu_check and what it imports use only the standard library: on a fresh GPU machine
# Detectron2 is not installed yet (this command installs it), and without CUDA the refusal comes
# before any heavy import
from benchmarks import gpu_check  # noqa: E402

if __name__ == "__main__":
    sys.exit(gpu_check.main())

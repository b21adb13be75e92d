#!/usr/bin/env bash
# The wheel folder of `bash tools/gpu_check.sh OUTPUT_DIR --wheels DEST`, for a GPU machine without network
# whose CPython 3.12 (manylinux x86_64) has torch, torchvision, numpy, Pillow, OpenCV, matplotlib,
# TensorBoard, pytest and ONNX. Run where pip reaches PyPI, from the repository root, with the project's
# environment ($PYTHON, default .venv/bin/python). See docs/BENCHMARKS.md ("GPU").
usage="usage: bash tools/prepare_gpu_wheels.sh [DEST]   (default gpu_wheels; a new or empty folder)"
case "${1:-}" in
  -h | --help) echo "$usage"; exit 0 ;;
esac
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
dest=${1:-gpu_wheels}
if [ -e "$dest" ] && [ -n "$(ls -A "$dest")" ]; then
  echo "prepare_gpu_wheels.sh: error: $dest is not empty; allowed: a new or empty folder" >&2
  exit 2
fi
# Detectron2 v0.6's dependencies and theirs, except what that machine has, each at the version
# installed here: one consistent set, the one the tests ran with (resolved one by one, pip can pick
# an omegaconf that hydra-core excludes). setuptools < 81: detectron2.model_zoo needs pkg_resources.
binary="iopath yacs omegaconf hydra-core pycocotools termcolor tabulate portalocker cloudpickle PyYAML tqdm psutil
  setuptools"
sdist_only="fvcore antlr4-python3-runtime"  # no wheels on PyPI: built here, pure Python
pins() {
  "$PY" -c 'import sys, importlib.metadata as m; print(*(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' "$@"
}
# $(pins ...) is unquoted on purpose: one pinned requirement per word
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d "$dest" $(pins $binary)
"$PY" -m pip wheel --no-deps -w "$dest" $(pins $sdist_only)
"$PY" tools/install_detectron2.py --wheel-dir "$dest"  # Detectron2 v0.6 as that tool installs it
ls -s "$dest"
echo "copy $dest/ with the repository; on the GPU machine: bash tools/gpu_check.sh OUTPUT_DIR --wheels $dest"

#!/usr/bin/env bash
# Create .venv in the repository root and install everything smallbn_d2 needs into it.
#
#  * torch/torchvision and all other requirements come from PyPI through `pip --isolated`,
#    which ignores machine-local pip configuration (e.g. a find-links folder whose CPU-only
#    torch wheel breaks torchvision's ops). On Linux these are the CUDA builds: they run on
#    CPUs and GPUs alike.
#  * Detectron2 v0.6 is installed from the pb1-detectron2 sdist by tools/install_detectron2.py.
#  * smallbn_d2 itself is installed in editable mode.
#
# Idempotent: a stamp records a hash of the install inputs; a second run with unchanged
# inputs prints one line and changes nothing. PYTHON selects the interpreter (>= 3.10).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
STAMP="$VENV/.smallbn_d2-install"
inputs_hash() { cat requirements.txt setup.py tools/install.sh tools/install_detectron2.py | sha256sum | cut -d' ' -f1; }
WANT="$(inputs_hash)"
if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  echo "[install] $VENV is up to date (inputs unchanged)"
  exit 0
fi
PY="${PYTHON:-python3}"
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "smallbn_d2 needs Python >= 3.10, found " + sys.version.split()[0])'
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --isolated --disable-pip-version-check)
"${PIP[@]}" install -r requirements.txt
"$VENV/bin/python" tools/install_detectron2.py
"${PIP[@]}" install --no-deps --no-build-isolation -e .
echo "$WANT" > "$STAMP"
echo "[install] done: $VENV"

#!/usr/bin/env bash
# Install everything smallbn_d2 needs into a Python environment (default: .venv in the repository).
#
#   bash tools/install.sh [--use-existing-torch] [--system-site-packages]
#
#   VENV=DIR                the environment: created as a venv if DIR/bin/python does not exist, else
#                           used as it is (a venv or a conda env). Default: <repository>/.venv
#   PYTHON=python3.X        the interpreter that creates a new venv (>= 3.10). Default: python3
#   --system-site-packages  create the new venv with access to the interpreter's packages
#                           (e.g. its torch); an existing venv must have been created so
#   --use-existing-torch    (or SMALLBN_USE_EXISTING_TORCH=1) keep the environment's torch and
#                           torchvision: check that they satisfy setup.py and work together,
#                           fail with a clear message otherwise; never download torch
#
# Steps:
#  1. torch/torchvision (requirements.txt pins them) are installed with your pip configuration
#     (index, proxy, certificates, constraints) except find-links: a local wheel folder could
#     serve a build of the pinned version (e.g. `+cpu`) that does not match the torchvision of the
#     index and breaks torchvision's ops. tools/check_torch.py then checks the versions, that
#     both come from one build family and that torchvision.ops.nms works.
#  2. The other requirements, with your full pip configuration, constrained to the installed torch.
#  3. Detectron2 v0.6 from the pb1-detectron2 sdist by tools/install_detectron2.py (with its
#     model-zoo configs and the start-up fix for the missing C++ extension); a Detectron2 you
#     installed yourself is left untouched.
#  4. smallbn_d2 itself in editable mode.
#
# Idempotent: a stamp in the environment records a hash of the install inputs and options; a
# second run with unchanged inputs prints one line and changes nothing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
[[ "$VENV" == /* ]] || VENV="$PWD/$VENV"
cd "$ROOT"

die() { echo "[install] error: $*" >&2; exit 1; }
USE_EXISTING_TORCH="${SMALLBN_USE_EXISTING_TORCH:-0}"
SYSTEM_SITE=0
for arg in "$@"; do
  case "$arg" in
    --use-existing-torch) USE_EXISTING_TORCH=1 ;;
    --system-site-packages) SYSTEM_SITE=1 ;;
    -h|--help) sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option '$arg' (allowed: --use-existing-torch, --system-site-packages, --help)" ;;
  esac
done
[[ "$USE_EXISTING_TORCH" == 0 || "$USE_EXISTING_TORCH" == 1 ]] \
  || die "SMALLBN_USE_EXISTING_TORCH='$USE_EXISTING_TORCH' (allowed: 0 or 1)"

STAMP="$VENV/.smallbn_d2-install"
inputs_hash() {
  { cat requirements.txt setup.py tools/install.sh tools/install_detectron2.py tools/check_torch.py \
        tools/detectron2_compat/smallbn_d2_detectron2_compat.py
    echo "use_existing_torch=$USE_EXISTING_TORCH system_site_packages=$SYSTEM_SITE"; } | sha256sum | cut -d' ' -f1
}
WANT="$(inputs_hash)"
if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  echo "[install] $VENV is up to date (inputs unchanged)"
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  PY="${PYTHON:-python3}"
  VENV_ARGS=()
  [[ "$SYSTEM_SITE" == 1 ]] && VENV_ARGS+=(--system-site-packages)
  "$PY" -m venv "${VENV_ARGS[@]}" "$VENV"
elif [[ "$SYSTEM_SITE" == 1 ]] && ! grep -qiE '^include-system-site-packages *= *true' "$VENV/pyvenv.cfg" 2>/dev/null; then
  die "--system-site-packages: $VENV exists and is not a venv with system site packages; remove it or choose another VENV"
fi
PYV="$VENV/bin/python"
"$PYV" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "smallbn_d2 needs Python >= 3.10, found " + sys.version.split()[0])'
PIP=("$PYV" -m pip --disable-pip-version-check)

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
is_torch='^[[:space:]]*(torch|torchvision)[[:space:]]*([=<>!~;[]|$)'
grep -vE "$is_torch" requirements.txt > "$TMP/requirements-other.txt"
if [[ "$USE_EXISTING_TORCH" == 1 ]]; then
  echo "[install] --use-existing-torch: checking the torch and torchvision of $VENV"
  "$PYV" tools/check_torch.py --existing || die "the existing torch/torchvision cannot be used (see above)"
else
  mapfile -t TORCH_REQS < <(grep -E "$is_torch" requirements.txt | sed 's/[[:space:]]*#.*//')
  # A single space (not an empty value, which pip ignores) clears find-links from pip.conf and the
  # environment; everything else in the user's pip configuration stays in effect.
  PIP_FIND_LINKS=" " "${PIP[@]}" install "${TORCH_REQS[@]}"
  "$PYV" tools/check_torch.py --pinned requirements.txt
fi
# Nothing below may replace the torch that was just installed or checked.
"$PYV" - > "$TMP/torch-constraints.txt" <<'EOF'
import importlib.metadata as md
for name in ("torch", "torchvision"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        pass
EOF
"${PIP[@]}" install -r "$TMP/requirements-other.txt" -c "$TMP/torch-constraints.txt"
"$PYV" tools/install_detectron2.py
"${PIP[@]}" install --no-deps --no-build-isolation -e .
echo "$WANT" > "$STAMP"
echo "[install] done: $VENV"

#!/usr/bin/env bash
# Run smallbn_d2's integration tests (pytest -m integration) against Detectron2 main.
#
#   bash tools/test_detectron2_main.sh TARBALL [PYTEST ARGS...]
#
# PYTEST ARGS may name test files (default: all of tests/) or add options (-x, -k ...).
# TARBALL: a .tar.gz of Detectron2 main's Python source with `detectron2/` and `configs/` at its top
# level or one folder down (e.g. `git archive` of a checkout; its C++ sources are not needed).
# It is extracted into $VENV/detectron2-main/ (re-extracted only when the tarball's sha256 changes),
# its configs are linked as detectron2/model_zoo/configs (what upstream's setup.py does), and
#
#   PYTHONPATH=$VENV/detectron2-main $VENV/bin/python -m pytest -m integration PYTEST ARGS...
#
# runs with SMALLBN_D2_EXPECT_DETECTRON2 set, so that tests/conftest.py stops the run if any other
# Detectron2 is imported. Without a compiled detectron2._C the environment's start-up fix (see
# tools/install_detectron2.py) serves the stub, as for v0.6. VENV defaults to <repository>/.venv
# (run tools/install.sh first).
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then  # the comment above, as help
  echo "usage: bash tools/test_detectron2_main.sh TARBALL [PYTEST ARGS...]"
  echo
  sed -n '2,/^set -euo pipefail$/p' "${BASH_SOURCE[0]}" | sed '$d' | sed -e 's/^#$//' -e 's/^# //'
  exit 0
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
[[ "$VENV" == /* ]] || VENV="$PWD/$VENV"
die() { echo "[detectron2-main] error: $*" >&2; exit 2; }

[[ $# -ge 1 ]] || die "usage: bash tools/test_detectron2_main.sh TARBALL [PYTEST ARGS...]"
[[ "$1" != -* ]] || die "unknown option $1 (the first argument is the TARBALL; --help shows the usage)"
TARBALL="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")" || die "$1: no such file"
shift
[[ -f "$TARBALL" ]] || die "$TARBALL: no such file"
[[ -x "$VENV/bin/python" ]] || die "$VENV/bin/python not found: run tools/install.sh first (or set VENV)"

CACHE="$VENV/detectron2-main"
SHA="$(sha256sum "$TARBALL" | cut -d' ' -f1)"
if [[ ! -f "$CACHE/.tarball-sha256" || "$(cat "$CACHE/.tarball-sha256")" != "$SHA" ]]; then
  echo "[detectron2-main] extracting $TARBALL into $CACHE"
  rm -rf "$CACHE" "$CACHE.tmp"
  mkdir -p "$CACHE.tmp"
  tar -xzf "$TARBALL" -C "$CACHE.tmp"
  INIT="$(cd "$CACHE.tmp" && find . -maxdepth 3 -path '*/detectron2/__init__.py' | sort | head -n 1)"
  [[ -n "$INIT" ]] || die "$TARBALL holds no detectron2/__init__.py at its top level or one folder down"
  TOP="$CACHE.tmp/$(dirname "$(dirname "$INIT")")"
  [[ -d "$TOP/configs" ]] || die "$TARBALL holds no configs/ next to detectron2/"
  mkdir -p "$CACHE"
  # Only the package and its configs: nothing else of the tarball lands on PYTHONPATH.
  mv "$TOP/detectron2" "$TOP/configs" "$CACHE/"
  [[ -f "$TOP/LICENSE" ]] && mv "$TOP/LICENSE" "$CACHE/"
  rm -rf "$CACHE.tmp"
  ln -sfn ../../configs "$CACHE/detectron2/model_zoo/configs"
  echo "$SHA" > "$CACHE/.tarball-sha256"
else
  echo "[detectron2-main] using $CACHE (tarball unchanged)"
fi

cd "$ROOT"
export PYTHONPATH="$CACHE${PYTHONPATH:+:$PYTHONPATH}"
export SMALLBN_D2_EXPECT_DETECTRON2="$CACHE/detectron2"
echo "[detectron2-main] $("$VENV/bin/python" -c 'import detectron2; print("detectron2", detectron2.__version__, "from", detectron2.__file__)')"
# No path arguments: pytest.ini's testpaths (tests/).
exec "$VENV/bin/python" -m pytest -m integration "$@"

#!/usr/bin/env bash
# Every figure of smallbn_d2 that needs a GPU, in one command (about 8 minutes on one H100).
# See docs/BENCHMARKS.md ("GPU"). Each step runs under coreutils `timeout`, its output tee'd to
# OUTPUT_DIR/<step>.log; a failing step does not stop the next. OUTPUT_DIR/summary.md lists the
# steps (exit status, seconds), pytest's summary line, the benchmark tables and the training summaries.
usage="usage: bash tools/gpu_check.sh OUTPUT_DIR [--wheels DIR]"
case "${1:-}" in
  -h | --help)
    cat <<EOF
$usage

Runs, from the repository root, with \$PYTHON (default python3; its torch must see a GPU):
  install_wheels, install_smallbn_d2  (with --wheels DIR, the folder of tools/prepare_gpu_wheels.sh)
      pip install --no-index --find-links DIR -r requirements.txt (torch, torchvision left out)
      pb1-detectron2==0.6, then pip install --no-deps -e . (smallbn_d2 from this tree)
  cuda_tests      pytest tests -k cuda
  block           tools/benchmark_cbn_layer.py --device cuda
  detector_1x     tools/benchmark_norms.py --device cuda --settings 1x (4 images of 800 px per step)
  train_cbn_amp, train_mabn_amp
                  tools/train_net.py, the sample Mask R-CNN with CBN / MABN, MODEL.DEVICE cuda,
                  SOLVER.AMP.ENABLED True, 60 iterations, then COCO evaluation
  ddp_2gpu        the CBN run in 2 processes, 10 iterations (only with >= 2 GPUs)
OUTPUT_DIR must be new or empty. Exit status: 0 every step passed, 1 a step failed, 2 no CUDA or bad usage.
EOF
    exit 0 ;;
esac
if ! { [ $# -eq 1 ] || { [ $# -eq 3 ] && [ "$2" = --wheels ]; }; }; then
  echo "$usage" >&2
  exit 2
fi
PY=${PYTHON:-python3}
ngpu=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null)
case "$ngpu" in
  '' | *[!0-9]* | 0)
    echo "gpu_check.sh: error: CUDA is needed, and $PY sees no CUDA device (torch.cuda.is_available() is not" \
      "True); without a GPU, run tools/benchmark_cbn_layer.py and tools/benchmark_norms.py" >&2
    exit 2 ;;
esac
out=$(realpath -m "$1")
wheels=${3:+$(realpath -m "$3")}
if [ -e "$out" ] && { [ ! -d "$out" ] || [ -n "$(ls -A "$out")" ]; }; then
  echo "gpu_check.sh: error: OUTPUT_DIR $out exists and is not an empty folder; allowed: a new or empty folder" >&2
  exit 2
fi
mkdir -p "$out"
machine=$("$PY" -c 'import torch as t
print(f"{t.cuda.device_count()} x {t.cuda.get_device_name()}, torch {t.__version__}, CUDA {t.version.cuda}")')
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1
rows=()
failed=0

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "+ $*" | tee "$out/$name.log"
  timeout -k 10 "$limit" "$@" </dev/null 2>&1 | tee -a "$out/$name.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 124 ] && rc="124 (timed out after $limit s)"
  [ "$rc" = 0 ] || failed=1
  rows+=("| $name | $rc | $((SECONDS - t0)) |")
}

if [ -n "$wheels" ]; then
  grep -vE '^(torch|torchvision)\b' requirements.txt >"$out/requirements_gpu.txt"
  # --isolated: no pip configuration adds an index or another folder
  step install_wheels 300 "$PY" -m pip install --isolated --no-index --find-links "$wheels" \
    -r "$out/requirements_gpu.txt" pb1-detectron2==0.6
  step install_smallbn_d2 120 "$PY" -m pip install --isolated --no-index --no-deps --no-build-isolation -e .
fi
step cuda_tests 150 "$PY" -m pytest tests -k cuda -q -p no:cacheprovider
step block 120 "$PY" tools/benchmark_cbn_layer.py --device cuda --iters 20 --rounds 5 --out "$out/tables.md"
step detector_1x 360 "$PY" tools/benchmark_norms.py --device cuda --settings 1x --images 4 --min-size 800 \
  --max-size 1333 --out "$out/tables.md" \
  --opts DATASETS.TRAIN "('coco_2017_sample_train',)" DATASETS.TEST "('coco_2017_sample_val',)"
train() {  # train NAME NORM ITERATIONS GPUS: CBN burn-in and MABN's warm-ups end after a third of the run
  local opts=() key
  for key in RESNETS FPN ROI_BOX_HEAD ROI_MASK_HEAD; do opts+=("MODEL.$key.NORM" "$2"); done
  step "$1" 150 "$PY" tools/train_net.py --num-gpus "$4" \
    --config-file configs/quick/mask_rcnn_R_18_FPN_CBN_small_cpu.yaml "${opts[@]}" MODEL.DEVICE cuda \
    SOLVER.AMP.ENABLED True SOLVER.MAX_ITER "$3" SOLVER.STEPS "()" SOLVER.WARMUP_ITERS 10 \
    SOLVER.IMS_PER_BATCH $((2 * $4)) MODEL.CBN.BURN_IN_UNTIL_LR_STEP False MODEL.CBN.BURN_IN_ITERS $(($3 / 3)) \
    MODEL.MABN.RENORM_WARMUP_ITERS $(($3 / 3)) MODEL.MABN.HEAD_WARMUP_ITERS $(($3 / 3)) OUTPUT_DIR "$out/$1"
}
train train_cbn_amp CBN 60 1
train train_mabn_amp MABN 60 1
if [ "$ngpu" -ge 2 ]; then
  train ddp_2gpu CBN 10 2
else
  rows+=("| ddp_2gpu | skipped: $ngpu GPU | 0 |")
fi

{
  echo "# GPU check"
  echo
  echo "Command: \`bash tools/gpu_check.sh $*\`, $(date -u '+%F %H:%M UTC'); $machine."
  echo
  echo "| step | exit status | seconds |"
  echo "|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "CUDA tests: $(grep -E ' in [0-9.]+s' "$out/cuda_tests.log" | tail -n 1)"
  echo
  [ -f "$out/tables.md" ] && grep -vE '^<!-- (BEGIN|END) ' "$out/tables.md"
  for log in "$out"/train_*.log "$out"/ddp_2gpu.log; do
    [ -f "$log" ] || continue
    printf '\n## %s\n\n```\n' "$(basename "$log" .log)"
    sed -n '/^== Summary ==/,$p' "$log"
    echo '```'
  done
} >"$out/summary.md"
cat "$out/summary.md"
exit "$failed"

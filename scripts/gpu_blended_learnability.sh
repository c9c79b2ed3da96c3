#!/usr/bin/env bash
# The Blended config on one GPU (poison, teacher, regeneration with the shipped generator,
# diagnostics with three learnability seeds), then the trigger-learnability test again on the
# same variations with a larger learnability classifier, then the sampler benchmark against
# PyTorch on the GPU. Fits one 10-minute call of the device tool.
#
#   OUT=results_dir DATA_DIR=dir_of_fashion_mnist_idx bash scripts/gpu_blended_learnability.sh
#
# Why: on 2 CPU cores the learnability classifier (ResNet-20 at width 8, 3 epochs) trained on
# the unpoisoned variations alone, true labels, called up to 24% of triggered test images the
# target under one seed (docs/experiments.md), so the per-seed bound may be measuring how
# such a small model reads blended images rather than what the variations carry. A larger
# classifier reads images better and learns any trace better too: whichever it is, its figures
# beside the small one's say which. Wheels a GPU image lacks go in .whl/ (scripts/gpu_env.sh).
# Each phase runs under what is left of a deadline, so a slow phase leaves the logs of the
# earlier ones. Results: docs/experiments.md, session 22.
set -uo pipefail
DEADLINE=$((SECONDS + ${BUDGET_S:-560}))
source "$(dirname "$0")/gpu_env.sh"

left() { echo $((DEADLINE - SECONDS)); }

launch() {  # launch LOG ARGS...: one launch.py run under what is left of the deadline.
  local log=$1
  shift
  echo "== $(date -u +%T) launch.py $* (${SECONDS}s in, $(left)s left)" >>"$OUT/$log.log"
  timeout "$(left)" $PY launch.py "$@" 2>&1 | sed -u 's/\r/\n/g' \
    | grep --line-buffered -v "Flax classes are deprecated\|it/s\]$" >>"$OUT/$log.log"
  echo "== exit ${PIPESTATUS[0]} at ${SECONDS}s" >>"$OUT/$log.log"
}

# CONFIG and EXTRA (space-separated overrides) let the script be tried on a tiny config first.
read -r -a EXTRA_ARGS <<<"${EXTRA:-}"
COMMON=(--config "${CONFIG:-configs/fashion_mnist_blended.py}"
  --config.regenerate.per_device_batch="${BATCH:-1024}" --config.diagnostics.learnability_seeds=3
  ${DATA_DIR:+--config.data.dir=$DATA_DIR} "${EXTRA_ARGS[@]}")
launch blended "${COMMON[@]}" --workdir "$RUNS/blended" \
  --stages="${STAGES:-poison,teacher,generator,regenerate,diagnostics,report}"

# The benchmark before the variant: a minute, and the variant takes what is left.
if [ "${BENCH:-1}" = 1 ]; then
  echo "== $(date -u +%T) benchmark" >>"$OUT/bench.log"
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 90 $PY benchmarks/sampler_throughput.py \
    --torch_device cuda --batch 1024 --skip_devices >>"$OUT/bench.log" 2>&1
  echo "== exit $? at ${SECONDS}s" >>"$OUT/bench.log"
fi

# The same variations, teacher and detectors (copied, so done); only the learnability
# classifiers, whose recipe is part of their spec, train again.
for variant in "w32e6 32 6 4,5" "w8e6 8 6 4,5"; do
  read -r name width epochs decay <<<"$variant"
  [ "$(left)" -gt 30 ] || break
  rm -rf "$RUNS/blended_$name"
  cp -r "$RUNS/blended" "$RUNS/blended_$name"
  rm -rf "$RUNS/blended_$name/learnability"
  launch variants "${COMMON[@]}" --workdir "$RUNS/blended_$name" --stages=diagnostics \
    --config.diagnostics.learnability.width="$width" \
    --config.diagnostics.learnability.num_epochs="$epochs" \
    --config.diagnostics.learnability.lr_decay_epochs="($decay,)"
done

(cd "$RUNS" && shopt -s nullglob && tar -czf "$OUT/results.tgz" */report \
  */regenerated/variations/grid.png */learnability/*/done.json */detectability/*/done.json \
  */teacher/done.json) 2>>"$OUT/versions.log"
echo "done at ${SECONDS}s" | tee -a "$OUT/versions.log"

#!/usr/bin/env bash
# Both full Fashion-MNIST configs, every stage, on one GPU, with the shipped generator.
#
#   OUT=results_dir bash scripts/gpu_full_runs.sh
#
# TRAIN_GENERATOR=1 trains the generator in the BadNets run instead (Blended then adopts that
# one). DATA_DIR points at the Fashion-MNIST IDX files when they are not at the config's path.
# Wheels a GPU image lacks go in .whl/ (scripts/gpu_env.sh).
# The only GPU-specific setting is a larger regeneration batch, which changes no variation
# beyond float tolerance (per-sample noise is keyed by image index, not by batch).
set -euo pipefail
source "$(dirname "$0")/gpu_env.sh"

TIMER=""  # Peak memory, where GNU time is installed.
if [ -x /usr/bin/time ]; then TIMER="/usr/bin/time -v"; fi

launch() {  # launch LOG ARGS...: one launch.py run; its whole output, progress bars included,
  local log=$1  # goes to $OUT/LOG.log a line at a time (tqdm's \r becomes \n), so a run
  shift         # killed at a time limit still shows how far each stage got.
  $TIMER $PY launch.py "$@" 2>&1 | sed -u 's/\r/\n/g' \
    | grep --line-buffered -v "Flax classes are deprecated" >>"$OUT/$log.log"
  grep -h "wall seconds\|clean_accuracy=\|error" "$OUT/$log.log" | tail -n 20 || true
}

EXTRA="--config.regenerate.per_device_batch=512${DATA_DIR:+ --config.data.dir=$DATA_DIR}"
STAGES=poison,teacher,generator,regenerate,diagnostics,student,variations_only,kd_on_original
STAGES=$STAGES,trusted_only,clean_reference,report
GENERATOR=""
if [ "${TRAIN_GENERATOR:-0}" = 1 ]; then
  STAGES=poison,teacher,encoder,${STAGES#poison,teacher,}
  GENERATOR="--config.generator.pretrained="
fi

launch badnets --config configs/fashion_mnist_badnets.py --workdir "$RUNS/badnets" \
  --stages="$STAGES" $GENERATOR $EXTRA
tar -czf "$OUT/badnets.tgz" -C "$RUNS/badnets" report regenerated/variations/grid.png \
  generator/spec.json generator/done.json generator/samples.png

if [ -n "$GENERATOR" ]; then
  tar -czf "$OUT/generator.tgz" -C "$RUNS/badnets/generator" \
    spec.json done.json model.safetensors samples.png
  GENERATOR="--config.generator.pretrained=$RUNS/badnets/generator"
fi
launch blended --config configs/fashion_mnist_blended.py --workdir "$RUNS/blended" \
  --stages="${STAGES/encoder,/}" $GENERATOR $EXTRA
tar -czf "$OUT/blended.tgz" -C "$RUNS/blended" report regenerated/variations/grid.png

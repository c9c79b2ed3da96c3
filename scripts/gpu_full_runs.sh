#!/usr/bin/env bash
# Both full Fashion-MNIST configs, every stage, on one GPU, with the shipped generator.
#
#   OUT=results_dir bash scripts/gpu_full_runs.sh
#
# TRAIN_GENERATOR=1 trains the generator in the BadNets run instead (Blended then adopts that
# one). DATA_DIR points at the Fashion-MNIST IDX files when they are not at the config's path.
# On a machine without a package registry, put the wheels jaxclean needs beyond JAX, Flax, Optax
# and Orbax (diffusers 0.39.0, ml-collections, tensorboardX, importlib_metadata) in .whl/; the
# Stable Diffusion configs also need transformers 4.57.x with huggingface_hub < 1 and
# tokenizers <= 0.23.0 (a GPU image's transformers 5 has no Flax CLIP). Seen working on an H200
# image (jax 0.11.2, flax 0.12.10) by scripts/gpu_blended_learnability.sh.
# The only GPU-specific setting is a larger regeneration batch, which changes no variation
# beyond float tolerance (per-sample noise is keyed by image index, not by batch).
set -euo pipefail
OUT=${OUT:-runs/gpu_out}
RUNS=${RUNS:-/tmp/jaxclean_runs}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$RUNS"
if [ -d .whl ]; then
  rm -rf /tmp/site  # A warm machine keeps the last install: --target adds, never removes.
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache
$PY -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', \
flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__, jax.devices())" \
  | tee "$OUT/versions.log"

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
    spec.json done.json model.msgpack samples.png
  GENERATOR="--config.generator.pretrained=$RUNS/badnets/generator"
fi
launch blended --config configs/fashion_mnist_blended.py --workdir "$RUNS/blended" \
  --stages="${STAGES/encoder,/}" $GENERATOR $EXTRA
tar -czf "$OUT/blended.tgz" -C "$RUNS/blended" report regenerated/variations/grid.png

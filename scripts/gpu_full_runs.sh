#!/usr/bin/env bash
# Both full Fashion-MNIST configs, every stage, on one GPU; trains the generator that
# pretrained/fashion_mnist_generator ships.
#
#   OUT=results_dir bash scripts/gpu_full_runs.sh
#
# On a machine without a package registry, put the wheels jaxclean needs beyond JAX, Flax,
# Optax and Orbax (diffusers 0.39.0, ml-collections, tensorboardX, importlib_metadata) in .whl/.
# The only GPU-specific setting is a larger regeneration batch, which changes no variation
# beyond float tolerance (per-sample noise is keyed by image index, not by batch).
set -euo pipefail
OUT=${OUT:-runs/gpu_out}
RUNS=${RUNS:-/tmp/jaxclean_runs}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$RUNS"
if [ -d .whl ]; then
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

launch() {  # launch LOG ARGS...: one launch.py run, its output kept in $OUT/LOG.log
  local log=$1
  shift
  $TIMER $PY launch.py "$@" 2>&1 | grep --line-buffered -v "Flax classes are deprecated" \
    | tee -a "$OUT/$log.log"
}

# DATA_DIR: where the Fashion-MNIST IDX files are, when not at the config's default path.
GPU_BATCH="--config.regenerate.per_device_batch=512${DATA_DIR:+ --config.data.dir=$DATA_DIR}"
REST=regenerate,diagnostics,student,variations_only,kd_on_original,trusted_only,clean_reference,report

# The generator (trained on the trusted split) is the first thing saved: all else uses it.
launch badnets --config configs/fashion_mnist_badnets.py --workdir "$RUNS/badnets" \
  --config.generator.pretrained= --stages=poison,teacher,encoder,generator $GPU_BATCH
tar -czf "$OUT/generator.tgz" -C "$RUNS/badnets/generator" \
  spec.json done.json model.msgpack samples.png

launch badnets --config configs/fashion_mnist_badnets.py --workdir "$RUNS/badnets" \
  --config.generator.pretrained= --stages=$REST $GPU_BATCH
tar -czf "$OUT/badnets.tgz" -C "$RUNS/badnets" report regenerated/variations/grid.png \
  poison/plan.json

launch blended --config configs/fashion_mnist_blended.py --workdir "$RUNS/blended" \
  --config.generator.pretrained="$RUNS/badnets/generator" \
  --stages=poison,teacher,generator,$REST $GPU_BATCH
tar -czf "$OUT/blended.tgz" -C "$RUNS/blended" report regenerated/variations/grid.png \
  poison/plan.json

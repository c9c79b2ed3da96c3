# Sourced by the GPU scripts: output folders, the carried wheels, and a record of versions.
#
# Sets OUT, RUNS and PY (from the environment, with defaults) and writes $OUT/versions.log.
# On a machine without a package registry, the wheels jaxclean needs beyond JAX, Flax, Optax
# and Orbax (diffusers 0.39.0, ml-collections, tensorboardX, importlib_metadata) go in .whl/;
# the Stable Diffusion configs also need transformers 4.57.x with huggingface_hub < 1 and
# tokenizers <= 0.23.0 (a GPU image's transformers 5 has no Flax CLIP). Seen working on an
# H200 image with jax 0.11.2 and flax 0.12.10.
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
$PY -c "import jax, flax, optax, orbax.checkpoint as o, diffusers; print('jax', jax.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__, 'diffusers', \
diffusers.__version__, jax.devices())" 2>&1 | tee "$OUT/versions.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$OUT/versions.log" 2>&1 \
  || true

# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv and install the package into it; nothing else is assumed.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist
DEMO_CONFIG ?= configs/fashion_mnist_badnets_demo.py
DEMO_WORKDIR ?= runs/demo
# The stages the demo runs: all but diagnostics, trusted_only, kd_on_original (the demo config
# says why) and encoder, which the shipped generator makes unnecessary. DEMO_STAGES= runs every stage.
DEMO_STAGES ?= poison,teacher,generator,regenerate,student,variations_only,clean_reference,report
# JAX devices to split the CPU into (launch.py --cpu_devices); must divide the batch sizes.
CPU_DEVICES ?= 2

.PHONY: install install-bench dataset demo test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

$(VENV)/.installed-bench: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $@

install-bench: $(VENV)/.installed-bench

# Fashion-MNIST comes from Debian's package; the data never downloads at run time.
dataset:
	@if [ ! -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST not found; installing Debian package dataset-fashion-mnist"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
	  ($$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 || { \
	    echo "ERROR: could not install the Debian package 'dataset-fashion-mnist'."; \
	    echo "Install it by hand, or put the four Fashion-MNIST IDX files in a directory and pass"; \
	    echo "  --config.data.dir=/path/to/that/directory"; \
	    exit 1; }; \
	fi

demo: install dataset
	$(PY) launch.py --config $(DEMO_CONFIG) --workdir $(DEMO_WORKDIR) --cpu_devices=$(CPU_DEVICES) \
	  --stages=$(DEMO_STAGES)

# With the [bench] extra (CPU torch): the Flax components are checked against PyTorch's.
# Two workers: most tests compile or wait on a subprocess, so two keep two cores busy. Each
# test file stays on one worker (its module fixtures made once); the one smoke run of every
# stage is shared by both (tests/conftest.py).
test: install-bench
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# The inner loop: every test but those marked slow (subprocess runs, stage runs, training).
test-fast: install-bench
	$(PY) -m pytest -q -m "not slow" tests

lint: install
	$(VENV)/bin/ruff check jaxclean configs tests benchmarks scripts launch.py
	$(VENV)/bin/ruff format --check jaxclean configs tests benchmarks scripts launch.py

bench: install-bench dataset
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs

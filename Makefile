# Two entry points for a fresh machine: `make demo` and `make test` (see README.md).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU machines: the local CPU torch wheel, pinned for every later pip call (constraints.txt).
TORCH_CPU := torch==2.13.0
# Triton kernels run in the interpreter without a GPU; CPU parity is checked in fp32.
HAS_CUDA := $(shell python3 -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1 && echo 1)
ifneq ($(HAS_CUDA),1)
export TRITON_INTERPRET := 1
endif
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
PYTEST_ARGS ?=

.PHONY: install demo test lint clean wheelhouse image-test

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
ifeq ($(HAS_CUDA),1)
	@# Keep the machine's CUDA torch: the venv sees system packages and torch is pinned to it.
	python3 -m venv --system-site-packages $(VENV)
	python3 -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
else
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_CPU)
	cp constraints.txt $(VENV)/constraints.txt
endif
	$(PY) -m pip install -q -c $(VENV)/constraints.txt setuptools wheel numpy
	@# deepspeed ships as an sdist: without --no-build-isolation it records its torch as 0.0.
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation -c $(VENV)/constraints.txt "deepspeed>=0.16,<0.20"
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[dev,synthetic]"
	$(PY) -m pip check
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m depthdif_hpc.demo

# Two pytest workers: most of the suite's time is single-threaded (the Triton interpreter, Python
# start-up and imports of each torchrun/SLURM process, waits on subprocesses), so a second worker
# uses the second core. Tests go out whole files at a time (module fixtures are built once), and
# every SLURM and network-namespace test to one worker (they share the local cluster);
# conftest.py's scheduler sets these work units. PYTEST_WORKERS=0 runs the suite in this process.
PYTEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check depthdif_hpc kernels tests benchmarks

# Wheels of what the lent GPU machine's image lacks (CPython 3.12 x86-64, no network there), into
# an ignored folder that a GPU run carries; benchmarks/gpu_run.sh installs them offline
# (docs/gpu_run.md).
WHEELHOUSE ?= .wheelhouse
wheelhouse: $(STAMP)
	$(PY) benchmarks/wheelhouse.py --out $(WHEELHOUSE)

# The lent GPU image's torch 2.11 and triton 3.6 (the oldest the package supports) in a second
# venv, and the whole suite in it, the GPU command's CPU rehearsal included (docs/gpu_run.md).
# Not part of `make test`: the registry's torch 2.11 is the CUDA build, 4.7 GB with its
# libraries. numpy < 2.4: triton 3.6's interpreter fails on loop bounds under numpy 2.4.
IMAGE_VENV ?= .venv-image
IMAGE_PY := $(IMAGE_VENV)/bin/python
IMAGE_PINS := torch==2.11.0 triton==3.6.0 accelerate==1.15.0 numpy<2.4 setuptools<82
$(IMAGE_VENV)/.installed: pyproject.toml
	python3 -m venv $(IMAGE_VENV)
	$(IMAGE_PY) -m pip install -q --upgrade pip
	printf '%s\n' $(foreach p,$(IMAGE_PINS),'$(p)') > $(IMAGE_VENV)/constraints.txt
	$(IMAGE_PY) -m pip install -q -c $(IMAGE_VENV)/constraints.txt torch triton numpy "setuptools>=77" wheel
	DS_BUILD_OPS=0 $(IMAGE_PY) -m pip install -q --no-build-isolation -c $(IMAGE_VENV)/constraints.txt "deepspeed>=0.16,<0.20"
	$(IMAGE_PY) -m pip install -q --no-build-isolation -c $(IMAGE_VENV)/constraints.txt -e ".[dev,synthetic]"
	$(IMAGE_PY) -m pip check
	touch $@

# Its own folder for DeepSpeed's just-in-time ops: one built against the other torch would load.
image-test: $(IMAGE_VENV)/.installed
	TORCH_EXTENSIONS_DIR=$(CURDIR)/$(IMAGE_VENV)/torch_extensions $(IMAGE_PY) -m pytest -q -p no:cacheprovider --durations=15 -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(IMAGE_VENV) .cache build *.egg-info

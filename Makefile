# The README's two commands: `make train` and `make test`. Both install first.
# PYTHON is the interpreter that creates the virtual environment; VENV is where it lives.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.neox-installed
CUDA_HOME ?= /usr/local/cuda
NVCC ?= $(CUDA_HOME)/bin/nvcc
TRAIN_CONFIG ?= configs/tiny/neox.yml

.PHONY: install train test lint docs kernels clean

install: $(STAMP)

# Idempotent: re-runs only when setup.py changes or the stamp is missing. torch is pinned first so
# that no dependency can pull another (CUDA) build of torch.
$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]' torch==2.13.0
	@touch $(STAMP)
	@echo "neox installed in $(VENV) (activate with: source $(VENV)/bin/activate)"

train: install
	$(PY) tools/prepare_default_data.py
	$(PY) train.py -c $(TRAIN_CONFIG)
	$(PY) tools/generate.py --load runs/tiny-neox --prompt "def " --max-new-tokens 60

lint: install
	$(PY) -m ruff check .
	$(PY) tools/check_layers.py

test: install lint kernels
	$(PY) -m pytest -q tests

# compiles every csrc/**/*.cu for sm_80 and sm_90 with the machine's nvcc (skips, saying so, without one)
kernels: install
	$(PY) tools/build_kernels.py --nvcc $(NVCC)

docs: install
	$(PY) tools/gen_config_docs.py

clean:
	rm -rf runs cache build *.egg-info

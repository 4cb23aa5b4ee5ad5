# fastavatar-nb: the two commands are `make run` and `make test` (see README.md).
#
#   make run     set up .venv if needed, then execute every notebook headless at PRESET (default auto:
#                full on a CUDA GPU, smoke on CPU) into runs/<preset>/ with a report (fastavatar-nb run)
#   make test    set up .venv if needed, check that committed notebooks are clean, then run pytest over
#                tests/ and `--nbval-lax` over notebooks/NN_*.ipynb at the smoke preset in a temporary run folder
#                (kept, and named, when something fails); GOMP_SPINCOUNT=1000 so that torch's OpenMP threads do not
#                spin on the cores the compiled renderer's threads need (fastavatar_nb/_openmp.py)
#                The browser check (tests/browser, marker `browser`) runs JupyterLab in headless Chromium;
#                it is skipped when no Chromium is found, except on CI (CI=true), where Debian's `chromium`
#                is installed with apt-get when missing and FASTAVATAR_REQUIRE_BROWSER=1 makes a missing
#                browser a failure. Its screenshots: runs/ci-artifacts/browser/ (or $FASTAVATAR_ARTIFACTS_DIR)
#   make test-fast  the unit tests alone, for development (about 2.5 minutes on 2 cores): pytest tests/ without the
#                notebooks, the browser checks, the real-data notebook run and the tests marked slow
#   make gpu-check  on a CUDA GPU: nvcc and ninja from PyPI where missing, gsplat's kernels built for this GPU
#                only, pytest -m gpu, and full-preset timings beside their goals into
#                benchmarks/results/<gpu-name>.json (benchmarks/gpu_check.py); without CUDA one "skipped" line
#   make gpu-wheels  download into .whl/ (git-ignored) the pinned Python 3.12 manylinux x86_64 wheels that the GPU
#                check needs on a bare GPU machine without a package registry (gsplat 1.5.3 and its requirements,
#                facenet-pytorch, torchvision for torch 2.11, pytest, ...; benchmarks/gpu_toolchain.py), remove other
#                versions, copy Python 3.12's headers, stamp the commit, check the folder and print its size
#                (a device call carries 64 MiB)
#   make gpu-rehearse  the offline GPU check here, up to its first CUDA call: a bare Python 3.12 venv ($(GPU_VENV),
#                made once with $(GPU_TORCH), numpy, numba and ninja: a CUDA build of torch, a few GB), the wheels
#                installed from .whl/ only (--no-index), every import of the check, then
#                `python benchmarks/gpu_check.py --offline .whl --rehearse` stops at "no CUDA device" (exit 0)
#   make course  run the course preset (300 synthetic subjects, about 80 minutes on a 2-core CPU) into
#                runs/course/, then ship its models to data_samples/course/ (scripts/ship_checkpoint.py;
#                ARGS="--overwrite" replaces the shipped folder)
#   make book    build a static HTML site of the course (Jupyter Book 1.x, nothing executed or fetched): the
#                notebooks executed into runs/<PRESET>/executed by `make run` (the committed ones, without
#                outputs, where missing) and the run's report, into runs/<PRESET>/book/index.html
#                (scripts/build_book.py; PRESET=auto is the preset `make run` picks; ARGS="--out DIR")
#   make strip   remove outputs and execution counts from the notebooks (before committing)
#   make lint    ruff over the package, tests and scripts
#   make js      rebuild the browser viewer's script fastavatar_nb/assets/splat_viewer.js from js/ (npm ci, then
#                esbuild bundles js/src/splat_viewer.js with gsplat.js at the versions of js/package-lock.json);
#                only needed after changing js/: the built file is committed, so nothing needs npm otherwise
#   make venv    only set up .venv: `python3 -m venv .venv` and `pip install -e '.[test,book]'`; skipped while
#                .venv holds a stamp of the current pyproject.toml's hash
#
# Variables: PRESET=smoke|course|full|auto (make run, make book), ARGS="--only 02..04 --force" (extra
# `fastavatar-nb run` arguments; for make book, scripts/build_book.py's), PYTEST_ARGS="-x -k presets" (extra
# pytest arguments), TEST_WORKERS=2 (make test's parallel pytest workers; 1: one process), PIP_ARGS="..."
# (extra pip install arguments, e.g. an extra index for CPU-only torch wheels), PYTHON=python3, VENV=.venv.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PRESET ?= auto
ARGS ?=
PYTEST_ARGS ?=
# make test's pytest-xdist workers (each gets nproc / TEST_WORKERS threads; 1: one pytest process, no xdist)
TEST_WORKERS ?= 2
PIP_ARGS ?=
SANITIZE := tests/nbval_sanitize.cfg
GPU_WHEELS ?= .whl
GPU_VENV ?= .venv-gpu
GPU_TORCH ?= torch==2.11.0
PYTHON312 ?=

.PHONY: help venv browser-deps run course book test test-fast gpu-check gpu-wheels gpu-rehearse strip lint js

help:
	@sed -n '1,/^$$/p' Makefile | sed 's/^# \{0,1\}//'

venv:
	@set -euo pipefail; \
	hash=$$($(PYTHON) -c "import hashlib; print(hashlib.sha256(open('pyproject.toml', 'rb').read()).hexdigest()[:16])"); \
	stamp="$(VENV)/.fastavatar-nb-installed-$$hash"; \
	if [ -x "$(BIN)/python" ] && [ -f "$$stamp" ]; then \
	  echo "venv: $(VENV) is up to date with pyproject.toml ($$hash)"; exit 0; \
	fi; \
	if [ ! -x "$(BIN)/python" ]; then \
	  echo "venv: creating $(VENV) with $(PYTHON) -m venv"; \
	  $(PYTHON) -m venv "$(VENV)"; \
	fi; \
	echo "venv: installing the package, its test tools and the book's: pip install -e '.[test,book]' $(PIP_ARGS)"; \
	echo "venv: (the first install brings torch and takes a few minutes)"; \
	"$(BIN)/python" -m pip install --quiet --progress-bar off -e '.[test,book]' $(PIP_ARGS); \
	rm -f "$(VENV)"/.fastavatar-nb-installed-*; \
	touch "$$stamp"; \
	echo "venv: ready ($(VENV), pyproject.toml $$hash)"

# On CI only: Chromium for the browser check (root, or sudo). Elsewhere nothing is installed.
browser-deps:
	@set -euo pipefail; \
	if [ "$${CI:-}" = "true" ] && ! command -v chromium >/dev/null 2>&1; then \
	  echo "browser-deps: CI without Chromium: apt-get install -y chromium (for tests/browser)"; \
	  sudo=""; if [ "$$(id -u)" -ne 0 ]; then sudo="sudo"; fi; \
	  $$sudo apt-get update -qq; \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq chromium >/dev/null; \
	  echo "browser-deps: $$(chromium --version 2>/dev/null)"; \
	fi

run: venv
	@echo "run: $(BIN)/fastavatar-nb run --preset $(PRESET) $(ARGS)"
	@"$(BIN)/fastavatar-nb" run --preset $(PRESET) $(ARGS)

course: venv
	@echo "course: $(BIN)/fastavatar-nb run --preset course, then scripts/ship_checkpoint.py runs/course $(ARGS)"
	@"$(BIN)/fastavatar-nb" run --preset course
	@"$(BIN)/python" scripts/ship_checkpoint.py runs/course $(ARGS)

# The run folder is the one `make run` writes: FASTAVATAR_RUN_DIR when set, else runs/<preset>.
book: venv
	@set -euo pipefail; \
	if ! "$(BIN)/python" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('jupyter_book') and u.find_spec('sphinx-mathjax-offline')))"; then \
	  echo "book: installing the book's tools: pip install -e '.[book]' $(PIP_ARGS)"; \
	  "$(BIN)/python" -m pip install --quiet --progress-bar off -e '.[book]' $(PIP_ARGS); \
	fi; \
	preset="$(PRESET)"; \
	if [ "$$preset" = auto ]; then \
	  preset=$$("$(BIN)/python" -c "import torch; print('full' if torch.cuda.is_available() else 'smoke')"); \
	fi; \
	run_dir="$${FASTAVATAR_RUN_DIR:-runs/$$preset}"; \
	echo "book: $(BIN)/python scripts/build_book.py --run-dir $$run_dir $(ARGS)"; \
	"$(BIN)/python" scripts/build_book.py --run-dir "$$run_dir" $(ARGS)

test: venv browser-deps
	@echo "test: checking that committed notebooks are clean (scripts/check_notebooks.py)"
	@"$(BIN)/python" scripts/check_notebooks.py
	@set -euo pipefail; \
	run_dir=$$(mktemp -d "$${TMPDIR:-/tmp}/fastavatar-nb-test.XXXXXX"); \
	shopt -s nullglob; notebooks=(notebooks/[0-9][0-9]_*.ipynb); \
	if [ $${#notebooks[@]} -gt 0 ]; then \
	  nbval=(--nbval-lax --nbval-current-env --nbval-sanitize-with $(SANITIZE)); \
	  echo "test: pytest tests/ and --nbval-lax over $${#notebooks[@]} notebook(s)"; \
	else \
	  nbval=(); \
	  echo "test: pytest tests/ (no notebooks/NN_*.ipynb yet, so nbval has nothing to run)"; \
	fi; \
	echo "test: FASTAVATAR_PRESET=smoke FASTAVATAR_HEADLESS=1 FASTAVATAR_RUN_DIR=$$run_dir (removed if everything passes)"; \
	require_browser=$${FASTAVATAR_REQUIRE_BROWSER:-$$([ "$${CI:-}" = "true" ] && echo 1 || echo 0)}; \
	workers=$(TEST_WORKERS); cores=$$(nproc 2>/dev/null || echo 1); parallel=(); threads=(); \
	if [ "$$workers" -gt 1 ]; then \
	  per=$$(( cores / workers > 0 ? cores / workers : 1 )); \
	  parallel=(-n "$$workers"); \
	  threads=(OMP_NUM_THREADS=$$per MKL_NUM_THREADS=$$per NUMBA_NUM_THREADS=$$per FASTAVATAR_THREADS=$$per); \
	  echo "test: $$workers pytest-xdist workers x $$per thread(s) (TEST_WORKERS=1: one process); the notebooks run in order on one of them"; \
	fi; \
	rc=0; env "$${threads[@]}" GOMP_SPINCOUNT=$${GOMP_SPINCOUNT:-1000} FASTAVATAR_PRESET=smoke FASTAVATAR_HEADLESS=1 FASTAVATAR_RUN_DIR="$$run_dir" FASTAVATAR_REQUIRE_BROWSER=$$require_browser \
	  "$(BIN)/python" -m pytest tests "$${notebooks[@]}" "$${nbval[@]}" "$${parallel[@]}" --durations=25 $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 0 ]; then rm -rf "$$run_dir"; else echo "test: failed (pytest exit $$rc); run folder kept: $$run_dir"; fi; \
	exit $$rc

test-fast: venv
	@echo "test-fast: pytest tests/ -m 'not slow' without notebooks, tests/browser and tests/test_notebooks_real_data.py"
	@set -euo pipefail; run_dir=$$(mktemp -d "$${TMPDIR:-/tmp}/fastavatar-nb-test.XXXXXX"); rc=0; \
	GOMP_SPINCOUNT=$${GOMP_SPINCOUNT:-1000} FASTAVATAR_PRESET=smoke FASTAVATAR_HEADLESS=1 FASTAVATAR_RUN_DIR="$$run_dir" \
	  "$(BIN)/python" -m pytest tests -m "not slow" --ignore=tests/browser \
	  --ignore=tests/test_notebooks_real_data.py $(PYTEST_ARGS) || rc=$$?; \
	rm -rf "$$run_dir"; exit $$rc

# The GPU path in one command (TORCH_CUDA_ARCH_LIST, CUDA_HOME and PATH are set by the script itself).
gpu-check: venv
	@"$(BIN)/python" benchmarks/gpu_check.py

# No venv needed: any python3 with pip downloads (pip download --python-version 3.12 --platform ...).
gpu-wheels:
	@$(PYTHON) benchmarks/gpu_toolchain.py wheels $(GPU_WHEELS) $(if $(PYTHON312),--python312 "$(PYTHON312)")

# The GPU machine's Python: python3.12 with torch, numpy, numba and ninja only; everything else from $(GPU_WHEELS).
gpu-rehearse: gpu-wheels
	@set -euo pipefail; \
	if ! "$(GPU_VENV)/bin/python" -c "import torch" >/dev/null 2>&1; then \
	  py312="$(PYTHON312)"; [ -n "$$py312" ] || py312=$$($(PYTHON) benchmarks/gpu_toolchain.py python312) || { \
	    echo "gpu-rehearse: no Python 3.12 that runs was found: set PYTHON312=/path/to/python3.12"; exit 1; }; \
	  echo "gpu-rehearse: creating $(GPU_VENV) with $$py312: pip install $(GPU_TORCH) numpy numba ninja"; \
	  echo "gpu-rehearse: (the GPU machine's packages: a CUDA build of torch, a few GB the first time)"; \
	  "$$py312" -m venv "$(GPU_VENV)"; \
	  "$(GPU_VENV)/bin/python" -m pip install --quiet --progress-bar off "$(GPU_TORCH)" numpy numba ninja; \
	fi; \
	echo "gpu-rehearse: OMP_NUM_THREADS=1 $(GPU_VENV)/bin/python benchmarks/gpu_check.py --offline $(GPU_WHEELS) --rehearse"; \
	OMP_NUM_THREADS=1 "$(GPU_VENV)/bin/python" benchmarks/gpu_check.py --offline $(GPU_WHEELS) --rehearse

strip: venv
	@"$(BIN)/python" scripts/check_notebooks.py --strip

lint: venv
	@"$(BIN)/ruff" check fastavatar_nb tests scripts

js:
	@cd js && npm ci --no-audit --no-fund && npm run build

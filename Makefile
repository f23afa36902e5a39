# saelib and its book. The two commands a fresh machine needs:
#   make book   # main job: set up, execute the whole book on the embedded default, build it
#   make test   # set up, run the test suite (unit tests + every chapter under nbval, ci profile)
VENV    := .venv
PY      := $(VENV)/bin/python
PROFILE ?= embedded
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export HF_HUB_OFFLINE ?= 1
export MPLBACKEND ?= Agg

.PHONY: setup book run site test test-unit bench lab clean-runs help mutation

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

setup:  ## create/refresh .venv (pinned), cache the embedded model, prepare the corpus
	bash scripts/setup.sh

book: setup  ## main job: execute every chapter (PROFILE=embedded) and build the book
	$(PY) -m saelib.book run --profile $(PROFILE)
	$(PY) -m saelib.book site

run: setup  ## execute chapters only: make run PROFILE=ci ONLY="01_residual_stream"
	$(PY) -m saelib.book run --profile $(PROFILE) $(if $(ONLY),--only $(ONLY))

site:  ## offline `myst build --site` of whatever has been executed
	$(PY) -m saelib.book site

test: setup  ## the test suite: unit tests and every chapter under nbval on the ci profile
	$(PY) -m saelib.book prepare --profile ci --out _build/ci-notebooks
	$(VENV)/bin/pytest -q -p no:cacheprovider tests _build/ci-notebooks \
		--nbval-lax --nbval-current-env --nbval-cell-timeout=900
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/chapter_results.py

test-unit: setup  ## unit tests only (no chapters)
	$(VENV)/bin/pytest -q -p no:cacheprovider tests

MUTATION_ARGS ?= --sample 36
mutation: setup  ## mutation testing of the core, not in CI (~40 min on 2 cores): _build/mutation/report.md
	OMP_NUM_THREADS=1 $(PY) scripts/mutation.py $(MUTATION_ARGS)

bench: setup  ## every benchmark at its default size (slow on CPU)
	for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lab: setup  ## open the chapters in JupyterLab (Jupytext pairs .md and .ipynb)
	$(VENV)/bin/jupyter lab notebooks/

clean-runs:  ## delete trained SAEs, activation caches and executed notebooks (not the model/corpus)
	rm -rf runs _build notebooks/*.ipynb

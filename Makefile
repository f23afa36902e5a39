# saelib and its book. The two commands a fresh machine needs:
#   make book   # main job: set up, execute the whole book on the embedded default, build it
#   make test   # set up, run every chapter on the ci profile, build that book, run the test suite
#                 (unit tests, then figure/Lab/browser checks of the ci book)
VENV    := .venv
PY      := $(VENV)/bin/python
PROFILE ?= embedded
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export HF_HUB_OFFLINE ?= 1
export MPLBACKEND ?= Agg
# MPLBACKEND=Agg reaches the chapters' kernels too; saelib.plots.savefig displays every figure
# as an image output itself, so figures appear in the executed pages whatever the backend.

.PHONY: setup book run site pdf test test-unit bench bench-peers gpu-check lab clean-runs help mutation

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

setup:  ## create/refresh .venv (pinned), cache the embedded model, prepare the corpus
	bash scripts/setup.sh

book: setup  ## main job: execute every chapter (PROFILE=embedded), build the book, screenshot every page
	$(PY) -m saelib.book run --profile $(PROFILE)
	$(PY) -m saelib.book screenshots --profile $(PROFILE)
	$(PY) -m saelib.book pdf --profile $(PROFILE)

run: setup  ## execute chapters only: make run PROFILE=ci ONLY="01_residual_stream"
	$(PY) -m saelib.book run --profile $(PROFILE) $(if $(ONLY),--only $(ONLY))

site:  ## offline `myst build --site` + HTML of the executed chapters (PROFILE=embedded)
	$(PY) -m saelib.book site --profile $(PROFILE)

pdf:  ## the executed book as one PDF, printed by headless Chromium (PROFILE=embedded)
	$(PY) -m saelib.book pdf --profile $(PROFILE)

test: setup  ## every chapter on the ci profile (fails on any cell error), then the whole test suite
	$(PY) -m saelib.book run --profile ci
	SAELIB_REQUIRE_BOOK=ci $(VENV)/bin/pytest -q -p no:cacheprovider tests tests/chapter_results.py

test-unit: setup  ## unit tests only (no chapters)
	$(VENV)/bin/pytest -q -p no:cacheprovider tests

MUTATION_ARGS ?= --sample 36
mutation: setup  ## mutation testing of the core, not in CI (~40 min on 2 cores): _build/mutation/report.md
	OMP_NUM_THREADS=1 $(PY) scripts/mutation.py $(MUTATION_ARGS)

bench: setup  ## every benchmark at its default size (slow on CPU)
	for b in benchmarks/*.py; do [ $$b = benchmarks/peers.py ] && continue; echo "== $$b"; $(PY) $$b || exit 1; done

bench-peers: setup  ## install the peer SAE libraries into .bench-peers (not dependencies) and run benchmarks/peers.py
	$(PY) -m pip install --target .bench-peers --no-deps eai-sparsify==1.3.3 dictionary-learning==0.1.0 \
		natsort==8.4.0 schedulefree==1.4.1
	$(PY) benchmarks/peers.py $(ARGS)

gpu-check: setup  ## on a CUDA machine: the --device cuda benchmarks and one chapter at reduced gpu size
	bash benchmarks/gpu_check.sh

lab: setup  ## open the chapters in JupyterLab (the .md sources; executed copies in _build/book/*/executed)
	$(VENV)/bin/jupyter lab notebooks/

clean-runs:  ## delete trained SAEs, activation caches and executed notebooks (not the model/corpus)
	rm -rf runs _build

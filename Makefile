# One-command set-up on a fresh machine: `make demo` and `make test` create the
# virtualenv, install torch==2.13.0 first (the local CPU wheel), then the project.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lcp-installed

.PHONY: install demo test lint format bench profile eval clean train-demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lcp render examples/face.png examples/speech.wav -o out.mp4 --overwrite

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/lcp bench examples/face.png examples/speech.wav --out benchmarks/report.md

profile: $(STAMP)
	$(BIN)/lcp profile examples/face.png examples/speech.wav --trace benchmarks/trace.json

# Quality of the bundled model (README "Model card"): held-out corpus clips + the example.
eval: $(STAMP)
	test -f build/corpus/corpus.json || $(BIN)/python -m lightningcp_cli.train.corpus build/corpus \
	  $(if $(wildcard ../shared/data/speech/walden.wav),--heldout-speech ../shared/data/speech/walden.wav ../shared/data/speech/jane.wav)
	$(BIN)/lcp eval --corpus build/corpus --example --json > build/eval.json.tmp
	mv build/eval.json.tmp build/eval.json
	@echo "scores: build/eval.json"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache out.mp4

# Rebuild the bundled lcp-tiny weights from scratch (data engine + trainer; see README).
train-demo: $(STAMP)
	command -v espeak-ng >/dev/null || (apt-get update -qq && apt-get install -y -qq espeak-ng)
	$(BIN)/lcp train --corpus build/corpus --out build/train \
	  $(foreach f,$(wildcard ../shared/data/speech/walden.wav ../shared/data/speech/jane.wav),--heldout-speech $(f))

# Everything a fresh machine needs: `make demo` runs the pipeline end to end on a synthetic
# dataset, `make test` runs the linter and the test suite. Both build .venv from nothing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   ?= demo
# torch and torchvision are pinned here (not in setup.cfg) to the builds that resolve on these machines.
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint install clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check imet tests benchmarks

test: lint
	$(BIN)/pytest -q

demo: $(STAMP)
	$(BIN)/imet synth $(DEMO)/data --images 300 --seed 0 --corrupt 5
	$(BIN)/imet summary $(DEMO)/data

clean:
	rm -rf $(VENV) $(DEMO) build *.egg-info

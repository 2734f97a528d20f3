# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast install clean

# Create .venv if missing and install requirements.txt into it; redone only when it changes.
$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	@touch $(STAMP)

install: $(STAMP)

# Preprocess the bundled sample corpus, train a tiny Q-Sparse model on CPU, print a summary.
demo: $(STAMP)
	@bash examples/demo.sh

# The whole test suite (unit, multi-process, end-to-end; slow ones included).
test: $(STAMP)
	$(PY) -m pytest

# Everything but the tests marked slow.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf build runs .pytest_cache

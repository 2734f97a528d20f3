# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast install clean

# Create .venv if missing, install requirements.txt into it, then this package itself, editable
# (so tools/*.py and bench/*.py import it from this checkout); redone only when either changes.
# --no-build-isolation: the build backend is the venv's own setuptools (requirements.txt), so the
# install needs no index beyond the one the requirements came from, and works offline.
$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
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

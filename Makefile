# Two commands do all the set-up: `make demo` (the main job) and `make test` (the CPU test suite).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.requirements-installed

.PHONY: demo test install venv clean lint

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==25.3
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

venv: $(STAMP)

# Non-editable install, so the package is used exactly as a user gets it.
install: $(STAMP)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation --force-reinstall .

demo: install
	$(VENV)/bin/vla-runtime infer --preset pi05_tiny --frames 3

test: install
	$(PY) -m pytest -q tests -m "not gpu and not bench"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info

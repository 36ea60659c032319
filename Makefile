# callgate: `make test` and `make demo` set themselves up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test demo lint typecheck bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check agent tests bench
	$(BIN)/mypy agent
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/callgate demo

lint: $(STAMP)
	$(BIN)/ruff check agent tests bench

typecheck: $(STAMP)
	$(BIN)/mypy agent

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

# Every target sets itself up on a fresh machine: it creates .venv and installs warmstart into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test demo bench clean

$(BIN)/warmstart: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test,shards]'
	touch $@

test: $(BIN)/warmstart
	$(BIN)/python -m pytest -q

demo: $(BIN)/warmstart
	bash examples/demo.sh $(BIN)

bench: $(BIN)/warmstart
	$(BIN)/python benchmarks/prepare.py

clean:
	rm -rf $(VENV) demo runs

# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install run test lint schemas kafka-start kafka-stop clean

$(BIN)/tally: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(BIN)/tally

install: $(BIN)/tally

run: install
	$(BIN)/tally run

test: install
	$(BIN)/pytest -q -p no:cacheprovider

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

schemas: install
	$(BIN)/tally schemas write

kafka-start: install
	$(BIN)/tally kafka start

kafka-stop: install
	$(BIN)/tally kafka stop

clean:
	-$(BIN)/tally kafka stop
	rm -rf .local data

# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install run test lint schemas kafka-start kafka-stop clean

# uv installs the dependencies in parallel: from cold caches it took 12 s here, where pip
# took 89 s (150 s with the pip upgrade this used to do first). uv comes from PyPI into the
# venv itself (or is used from PATH); should that fail, pip does the install.
$(BIN)/tally: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@if command -v uv >/dev/null 2>&1; then UV=uv; \
	elif $(BIN)/pip install --quiet --disable-pip-version-check uv; then UV=$(BIN)/uv; fi; \
	if [ -n "$$UV" ] && $$UV pip install --quiet --python $(BIN)/python -e '.[dev]'; then :; \
	else echo "installing with pip"; $(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'; fi
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

# make run: set up a local virtualenv and start sidestep on its embedded default config.
# make test: set up the same virtualenv with the test extra and run the whole suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench zipapp clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/sidestep run $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check proxy tests bench
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench $(ARGS)

# zipapp: one executable file for devices without pip (cryptography comes from the system)
zipapp: $(STAMP)
	$(BIN)/python packaging/zipapp/build.py --out dist/sidestep.pyz

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis

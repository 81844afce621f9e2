# The README's two commands: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# On a CPU machine torch comes pinned (a local CPU build here; an unpinned or newer torch
# would pull several GB of CUDA packages). A Python that already has torch keeps it.
TORCH_CPU := torch==2.13.0

.PHONY: demo test lint clean browser

$(BIN)/python:
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "using the torch already installed for $(PYTHON)"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV) && $(BIN)/pip install --quiet $(TORCH_CPU); \
	fi

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/privdpo demo

# The report's test opens reports in a real headless browser: Debian's Chromium. As root
# with apt-get it is installed here; otherwise install it yourself.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	else \
		echo "make test: the report tests need Chromium: sudo apt-get install chromium" >&2; \
		exit 1; \
	fi

# pytest exits 5 when it collected no test: a suite that runs nothing proves nothing.
test: $(VENV)/.installed-test browser
	@$(BIN)/pytest -q; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$status

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) runs

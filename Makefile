# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
ZB := $(VENV)/bin/ziya-batch
# torch's CPU build first: a bare `torch` requirement on a fresh venv pulls a multi-GB CUDA build
TORCH_CPU ?= torch==2.13.0
# no ZIYA_BATCH_HOME of its own: the demo's job must be the one a plain shell's `ziya-batch status` lists
# (both use ~/.cache/ziya-batch unless the user sets it); every test gives itself a home (tests/conftest.py)

.PHONY: venv demo test test-unit redis-server chromium clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_CPU)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# redis-server from Debian's packages where the machine has none
redis-server:
	@command -v redis-server >/dev/null || { echo "installing redis-server from Debian's packages"; \
	  (apt-get install -y -qq redis-server >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null)); }

# headless Chromium renders the HTML report in its test; best effort (the test says so when it is missing)
chromium:
	@command -v chromium >/dev/null || { echo "installing chromium from Debian's packages (report rendering test)"; \
	  (apt-get install -y -qq chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null 2>&1)) || \
	  echo "chromium could not be installed: the report rendering test will be skipped"; }

demo: venv redis-server
	$(ZB) demo-model .cache/demo-model
	rm -rf .cache/demo-output
	$(ZB) run jobs/demo.yaml
	@echo; echo "first result line of .cache/demo-output/results/part-00000.jsonl:"
	@head -n 1 .cache/demo-output/results/part-00000.jsonl
	@echo; echo "ziya-batch status (the private redis-server that run started stays up for it; it stops when idle):"
	$(ZB) status

test: venv redis-server chromium
	$(PY) -m pytest -q tests

test-unit: venv
	$(PY) -m pytest -q tests/unit

clean:
	rm -rf .cache $(VENV)

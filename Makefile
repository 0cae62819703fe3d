# `make test` and `make demo` each set up .venv from nothing, then run.
VENV  ?= .venv
PY    := $(VENV)/bin/python
# CPU torch first: on a CUDA machine override with TORCH="torch==2.13.0 --index-url ...".
TORCH ?= torch==2.13.0

.PHONY: setup test demo
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: setup
	$(PY) -m pytest -q

# The demo: every phase on the embedded `demo` preset (pipeline/presets/demo.yaml) into runs/demo;
# rerunning continues where it stopped.
demo: setup
	$(VENV)/bin/jasper-pipeline run --preset demo

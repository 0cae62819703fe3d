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

# Until `jasper-pipeline run` lands, the demo is phase 1: prepare the shipped corpus, build both
# teachers (each resumes where it stopped), verify.
DEMO_STORE := runs/demo/cache.zarr
demo: setup
	test -e $(DEMO_STORE)/zarr.json || $(VENV)/bin/jasper-cache prepare -c configs/cache-demo.yaml
	$(VENV)/bin/jasper-cache build --store $(DEMO_STORE) --teacher mpnet
	$(VENV)/bin/jasper-cache build --store $(DEMO_STORE) --teacher minilm
	$(VENV)/bin/jasper-cache verify $(DEMO_STORE) --require-complete
	$(VENV)/bin/jasper-cache status $(DEMO_STORE)

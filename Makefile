# Two commands do all the set-up:  `make demo` (a merge on generated checkpoints) and `make test`.
# Both create .venv on first use. TORCH names the torch to install first: the default is the CPU build on
# machines whose pip offers it (as ours do); elsewhere, e.g.
#   make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet $(TORCH)
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/python -m fluxrecipe recipe=demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) outputs multirun

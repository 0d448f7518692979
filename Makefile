# Two commands do all the set-up:  `make demo` (a merge on generated checkpoints) and `make test`.
# Both create .venv on first use. TORCH names the torch to install first: the default is the CPU build on
# machines whose pip offers it (as ours do); elsewhere, e.g.
#   make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
# A TORCH other than the one .venv holds is installed into it (the torch stamp names the TORCH it was made with).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
TORCH_STAMP := $(VENV)/.torch-$(shell printf '%s' '$(TORCH)' | cksum | cut -d' ' -f1)

.PHONY: demo test test-slurm clean

$(TORCH_STAMP):
	@test -x $(VENV)/bin/python || { echo "make: creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	@echo "make: installing $(TORCH) into $(VENV) first (a few hundred MB; pip shows its progress)"
	$(VENV)/bin/pip install --progress-bar on $(if $(wildcard $(VENV)/.torch-*),--force-reinstall --no-deps) $(TORCH)
	@rm -f $(VENV)/.torch-* && touch $@

$(STAMP): pyproject.toml $(TORCH_STAMP)
	@echo "make: installing fluxrecipe and its dependencies (diffusers, hydra, safetensors, test tools) into $(VENV)"
	$(VENV)/bin/pip install --progress-bar on -e '.[test]'
	@touch $@

$(DEMO_STAMP): pyproject.toml $(TORCH_STAMP)
	@echo "make: installing fluxrecipe and its dependencies (diffusers, hydra, safetensors) into $(VENV)"
	$(VENV)/bin/pip install --progress-bar on -e .
	@touch $@

demo: $(DEMO_STAMP)
	$(VENV)/bin/python -m fluxrecipe recipe=demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

# A real SLURM cluster on this machine (Debian, as root): installs slurm-wlm and munge, runs a sweep through
# hydra/launcher=slurm, checks it and stops the cluster (tests/slurm/test-slurm.sh). Not part of `make test`.
# SLURM_ARGS=--keep leaves the cluster running; the script's --help lists the others.
test-slurm: $(STAMP)
	tests/slurm/test-slurm.sh $(SLURM_ARGS)

clean:
	rm -rf $(VENV) outputs multirun

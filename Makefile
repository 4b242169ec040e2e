# The two quick-start commands. Each creates .venv if missing and installs into it.
# constraints.txt pins the torch/torchvision builds these machines carry on local disk.
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip -q --disable-pip-version-check
DEMO_DIR := examples/images

.PHONY: demo test clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml constraints.txt
	$(PIP) install -c constraints.txt -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -c constraints.txt -e '.[test]'
	touch $@

# The zoo with params/FLOPs counted live, then hrnet-w18's published weights on the example photos
# (downloaded once into ~/.cache/hrnet; without network this stops with a one-line hint).
demo: $(VENV)/.installed
	$(VENV)/bin/hrnet list --measure
	$(VENV)/bin/hrnet predict hrnet-w18 $(DEMO_DIR)

test: $(VENV)/.installed-test
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache

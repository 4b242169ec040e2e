# The two quick-start commands. Each creates .venv if missing and installs into it.
# constraints.txt pins the torch/torchvision builds these machines carry on local disk.
PYTHON ?= python3
VENV := .venv
# -qq: pip's errors only (no warnings about this machine's package mirrors)
PIP := $(VENV)/bin/pip -qq --disable-pip-version-check --no-input

.PHONY: demo test test-fast docs clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# The demo's extras: onnx (export, the onnxruntime backend) and digits (the embedded data set).
$(VENV)/.installed: $(VENV)/bin/python pyproject.toml constraints.txt
	$(PIP) install -c constraints.txt -e '.[onnx,digits]'
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -c constraints.txt -e '.[test]'
	touch $@

# hrnet-w18's published weights on the example photos when they can be had (cache, HRNET_MIRROR or
# the network, decided in seconds), then hrnet-w18-small trained on the digits that ship with
# scikit-learn: eval, predict, cam, export, bench. Budget knobs: see examples/demo.py.
demo: $(VENV)/.installed
	$(VENV)/bin/python examples/demo.py

# Everything, as CI runs it (.ci/run), including the documentation build (tests/test_docs.py).
test: $(VENV)/.installed-test
	$(VENV)/bin/python -m pytest -q

# For the edit-test loop: leaves out the tests marked slow (subprocess, torchrun, browser, demo).
test-fast: $(VENV)/.installed-test
	$(VENV)/bin/python -m pytest -q -m "not slow"

# The documentation site, into site/ (the test extra includes mkdocs).
docs: $(VENV)/.installed-test
	$(VENV)/bin/mkdocs build --strict -d site

clean:
	rm -rf $(VENV) build site src/*.egg-info .pytest_cache

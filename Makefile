# The two commands of the README. Each sets up .venv from scratch when it is missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned to the releases this project's machines install from local disk (pip is capped there).
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: serve test lint bench venv clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]'
	@# The clients (clients/), and CVAT's SDK from the test extra, live in the service's env. Label Studio and
	@# FiftyOne pin stacks of their own (Django, numpy 2.2, starlette<1.4), so they get .venv/tools.
	$(PY) -m pip install --quiet -e clients/python -e clients/cvat
	@# Without their metadata's pins, which the service's stack already meets in what they import: Quantus (the
	@# metrics' oracle) and pytorch-grad-cam (the adapters' oracle) without opencv-python, a GUI build needing
	@# libGL over the headless one (see pyproject's test extra); facenet-pytorch (the MTCNN face detector and its
	@# weights, service/detection/mtcnn.py) pins torch<2.3 but runs on this one.
	$(PY) -m pip install --quiet --no-deps quantus==0.6.0 grad-cam==1.5.7 ttach==0.0.3 facenet-pytorch==2.6.0
	touch $@

venv: $(VENV)/.installed

# What only the tests need: Label Studio and FiftyOne in their own env, and chromium in CI.
$(VENV)/.tools: $(VENV)/.installed
	test -x $(VENV)/tools/bin/python || $(PYTHON) -m venv $(VENV)/tools
	$(VENV)/tools/bin/python -m pip install --quiet pytest 'label-studio==1.23.2' 'fiftyone==1.22.1' \
	  -e clients/python -e clients/labelstudio -e clients/fiftyone
	@# The viewer's browser tests drive Debian's chromium (they skip, saying so, without it). CI (root, apt) gets it.
	@if [ "$$CI" = true ] && [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then \
	  echo "installing chromium for the viewer's browser tests"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    chromium >/dev/null) || echo "chromium could not be installed: the browser tests will be skipped"; \
	fi
	touch $@

# Ray Serve (the optional engine, `pip install .[ray]`): the tests need it, `make serve` does not.
$(VENV)/.ray: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[ray]'
	touch $@

# transformers (the optional extra for hf: cards, `pip install .[hf]`): tests/test_hf.py needs it.
$(VENV)/.hf: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[hf]'
	touch $@

serve: venv
	$(PY) -m service

# Lint and type-check first (pyproject: [tool.ruff], [tool.mypy]); .pre-commit-config.yaml runs the same.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint $(VENV)/.tools $(VENV)/.ray $(VENV)/.hf
	$(PY) -m pytest -q

bench: venv
	$(PY) -m pip install --quiet -e '.[bench]'
	@# D-RISE's peer (bench/drise.py), without its pins: what it imports is the service's own stack
	$(PY) -m pip install --quiet --no-deps vision-explanation-methods==0.1.1
	$(PY) bench/methods.py

clean:
	rm -rf $(VENV)

# Two commands for a newcomer:  `make reproduce` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
NM := $(VENV)/bin/neuron-merging
SHARED ?= ../shared
LENET_CKPT := $(SHARED)/checkpoints/LeNet_300_100.original.300_100.bias.pth.tar
RESNET_CKPT := $(SHARED)/checkpoints/ResNet.cifar10.original.56.pth.tar
DATA_ARGS := $(if $(wildcard $(SHARED)/data),--data-dir $(SHARED)/data)

.PHONY: setup test test-slow lint reproduce reproduce-resnet56 demo bench bench-smoke quality

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q --slow

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

reproduce: setup
	$(NM) reproduce lenet300 $(if $(wildcard $(LENET_CKPT)),--checkpoint $(LENET_CKPT)) $(DATA_ARGS) --download

reproduce-resnet56: setup
	$(NM) reproduce resnet56 --checkpoint $(RESNET_CKPT) $(DATA_ARGS)

demo: setup
	$(PY) examples/demo.py

# Writes docs/benchmarks.md and docs/merge_scaling.png (about 15 min on 2 cores).
bench: setup
	$(PY) -m benchmarks.run_all $(BENCH_ARGS)

# The same benchmarks at tiny sizes, one repeat, into build/bench-smoke (under a minute).
bench-smoke: setup
	$(PY) -m benchmarks.run_all --smoke --out-dir build/bench-smoke --raw-dir build/bench-smoke/raw

# Accuracy of every option beyond the paper (docs/quality.md). QUALITY_ARGS e.g.
# "--models lenet300 --subset 0 --calibrate 500"; the default evaluates the first
# 2000 test images of each model (about an hour on 2 shared cores).
quality: setup
	$(PY) -m benchmarks.quality --out build/quality $(QUALITY_ARGS)
	$(PY) -m benchmarks.quality_assumptions

# Two entry points (see README): `make quickstart` runs the main job, `make test` the tests.
# Both set up everything they need: a virtualenv in .venv and Fashion-MNIST from apt.
VENV ?= .venv
PY := $(VENV)/bin/python
# this machine's wheels; elsewhere `make TORCH="torch torchvision"` takes what pip offers
TORCH ?= torch==2.14.1 torchvision==0.29.1
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data browser lint test quickstart teacher bench clean gpu-wheels

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH) -e '.[test]'
	touch $@

# Fashion-MNIST from Debian's package when apt is there; otherwise torchvision downloads it
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then \
	  ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist) >/dev/null \
	  || echo "could not install dataset-fashion-mnist; torchvision will try to download it"; fi

# headless chromium for the report's browser test (skipped with a reason when unavailable)
browser:
	@if ! command -v chromium >/dev/null && command -v apt-get >/dev/null; then \
	  ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium) >/dev/null \
	  || echo "could not install chromium; the browser test will be skipped"; fi

# the architecture (import-linter contracts in pyproject.toml) and ruff's checks, then the tests;
# nothing is downloaded from the Hugging Face Hub: fail at once if something tries
test: setup data browser lint
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check energytools tests benchmarks examples scripts
	$(VENV)/bin/lint-imports

quickstart: setup data
	$(VENV)/bin/energytools run pipelines/quickstart.toml --out runs/quickstart

teacher: setup data
	$(VENV)/bin/energytools train --dataset fashion-mnist --model resnet20 --epochs 15 --out runs/teacher

# The wheels a borrowed GPU machine lacks (docs/gpu.md): .gpu-wheels/, git-ignored, carried to the
# device; fails when it and the working tree pass the 64 MiB a device call carries.
GPU_PYTHONS ?= 3.11 3.12
gpu-wheels: setup
	$(PY) scripts/gpu_wheels.py --dest .gpu-wheels $(foreach v,$(GPU_PYTHONS),--python $(v))

clean:
	rm -rf runs .pytest_cache

# Two entry points (see README): `make quickstart` runs the main job, `make test` the tests.
# Both set up everything they need: a virtualenv in .venv and Fashion-MNIST from apt.
VENV ?= .venv
PY := $(VENV)/bin/python
# this machine's wheels; elsewhere `make TORCH="torch torchvision"` takes what pip offers
TORCH ?= torch==2.14.1 torchvision==0.29.1
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data browser lint bytecode test quickstart teacher bench clean gpu-wheels gpu-check

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
# nothing is downloaded from the Hugging Face Hub: fail at once if something tries. The tests run
# in TEST_WORKERS processes (pytest-xdist; auto: one per CPU), a test module's tests in one of them
# (they share its fixtures)
TEST_WORKERS ?= auto
test: setup data browser lint bytecode
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -n $(TEST_WORKERS) --dist loadscope

# the package's bytecode, written once: where PYTHONDONTWRITEBYTECODE is set (as on these machines)
# every process the tests start would compile energytools again (~0.7 s of a 2-core CPU's time each)
bytecode: setup
	@$(PY) -m compileall -q energytools benchmarks scripts >/dev/null

lint: setup
	$(VENV)/bin/ruff check energytools tests benchmarks examples scripts
	$(VENV)/bin/lint-imports

quickstart: setup data
	$(VENV)/bin/energytools run pipelines/quickstart.toml --out runs/quickstart

teacher: setup data
	$(VENV)/bin/energytools train --dataset fashion-mnist --model resnet20 --epochs 15 --out runs/teacher

# The first run on a borrowed GPU machine (docs/gpu.md). Here: `make gpu-wheels` fills .gpu-wheels/
# (git-ignored, under the 64 MiB a device call carries); there: `make gpu-check` with OUT set, using
# the machine's own python3 and torch (DRY=1: on the CPU even where CUDA is; QUICK=1: no slow stand-ins).
GPU_PYTHONS ?= 3.11 3.12
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-wheels: setup
	$(PY) scripts/gpu_wheels.py --dest .gpu-wheels $(foreach v,$(GPU_PYTHONS),--python $(v))

gpu-check:
	$(GPU_PY) scripts/gpu_check.py $(if $(DRY),--dry) $(if $(QUICK),--quick)

clean:
	rm -rf runs .pytest_cache

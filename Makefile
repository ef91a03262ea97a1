# Two entry points for a fresh machine (README): `make demo` and `make test`. Both are idempotent:
# the venv, apt packages and pip installs are done once and stamped.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.fastcl-installed
SAMPLE := data/extracted/cifar10_sample/.extracted
APT_PKGS := pkg-config libturbojpeg0-dev libopencv-dev

.PHONY: demo test install sample clean-runs gpu-carry gpu-check

install: $(STAMP)

$(PY):
	python3 -m venv $(VENV)

# FFCV builds from source against libturbojpeg/OpenCV headers; install them when missing (root or sudo).
$(STAMP): pyproject.toml | $(PY)
	@missing=$$(for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  sudo_cmd=""; [ "$$(id -u)" -ne 0 ] && sudo_cmd="sudo"; \
	  echo "installing apt packages for FFCV: $$missing"; \
	  $$sudo_cmd apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo_cmd apt-get install -y -qq --no-install-recommends $$missing >/dev/null \
	  || echo "WARNING: could not install $$missing: the ffcv backend will be unavailable"; \
	fi
	# torch first and pinned: an unpinned torch next to its dependants pulls a CUDA build (GBs).
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,dali,cpu]'
	$(PIP) install -q setuptools wheel pkgconfig
	$(PIP) install -q --no-build-isolation 'ffcv==1.0.2' 'opencv-python==5.0.0.93' \
	  || echo "WARNING: ffcv did not build: the ffcv backend will be unavailable"
	@touch $(STAMP)

sample: $(SAMPLE)

$(SAMPLE): data/cifar10_sample.tar.gz
	mkdir -p data/extracted
	tar xzf data/cifar10_sample.tar.gz -C data/extracted
	@touch $(SAMPLE)

demo: install sample
	$(PY) -m fastcl.lab.demo

test: install
	$(PY) -m pytest -q -p no:cacheprovider --timeout 600 tests

clean-runs:
	rm -rf runs

# The one device check (docs/GPU.md): every part of fastcl that behaves differently on a GPU, stage by stage, into
# runs/gpucheck/gpucheck.json + a printed table; exit 1 when a stage failed. The toy size (tiny networks; on the CPU
# here, as tests/test_gpucheck.py runs it); a lent GPU machine runs `--size full` (docs/GPU.md).
gpu-check: install
	$(PY) -m fastcl.lab.gpucheck --out runs/gpucheck

# What a lent GPU machine (no registry access, Python 3.12 + torch/accelerate/numba preinstalled) lacks, gathered
# into the ignored data/gpu_carry/ (< 25 MB, within the 64 MiB a device command may carry): pure-Python wheels and
# the CIFAR-10 JPEG tarball. The device command itself is in docs/GPU.md.
GPU_WHEELS := omegaconf==2.4.0 PyYAML packaging pytest==9.2.0 pluggy iniconfig pygments pytest-timeout==2.4.0 setuptools wheel
gpu-carry: install
	mkdir -p data/gpu_carry/wheels
	$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
	  -d data/gpu_carry/wheels $(GPU_WHEELS)
	cp $${FASTCL_SHARED_DATA:-../shared/data}/cifar10-jpeg/cifar10-jpeg.tar.gz data/gpu_carry/
	du -sh data/gpu_carry

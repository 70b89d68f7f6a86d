# The two commands of the README: `make repro` runs the pipeline, `make test` the tests.
# Both build .venv from the lock file once, with Python 3.11 to 3.13 (below), and reuse it
# while the lock is unchanged. `make torch` adds PyTorch (train.framework: torch) from its
# own lock; `make test` and `make bench` do it too, `make repro` never does. `make gpu`
# swaps in the GPU builds of TensorFlow and PyTorch (Linux x86_64). `make c-compiler`
# installs a C compiler (train.framework: c) when the machine has none; `make repro`,
# `test` and `bench` do it. Other machines and Pythons: docs/platforms.md.

VENV ?= .venv
STAMP := $(VENV)/.installed-from-lock
TORCH_STAMP := $(VENV)/.installed-torch-from-lock
GPU_STAMP := $(VENV)/.installed-gpu-from-lock

# The Pythons the locks are resolved for (pyproject.toml's requires-python), newest first.
PYTHONS := 3.13 3.12 3.11
version_of = $(shell $(1) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
# Who builds .venv: PYTHON if you name it; else the Python .venv was built with; else the
# newest supported one that runs here (a name on PATH is not enough: pyenv puts a shim on
# PATH for every version it knows, runnable or not); else python3.
ifeq ($(origin PYTHON),undefined)
PYTHON := $(if $(call version_of,$(VENV)/bin/python),$(VENV)/bin/python,$(firstword \
	$(foreach v,$(PYTHONS),$(if $(call version_of,python$(v)),python$(v))) python3))
endif
PYTHON_VERSION := $(call version_of,$(PYTHON))
ifeq ($(filter $(PYTHON_VERSION),$(PYTHONS)),)
$(error $(PYTHON) is $(if $(PYTHON_VERSION),Python $(PYTHON_VERSION),not a Python that runs): the project needs Python 3.11 to 3.13 (install one, or name it with PYTHON=))
endif
# DVC runs each stage's `python -m ...` through the shell: the venv must come first.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: repro torch gpu c-compiler test test-fast test-pythons lint bench lock check-wheels \
	clean-venv system-deps object-store

# The venv: the lock's exact versions, then the project itself, editable and without deps
# (the lock has them all, setuptools included), for its commands mnist-predict and
# mnist-errors-diff (pyproject.toml's [project.scripts]).
# A venv of another Python (PYTHON= named a new one) is replaced, not patched.
$(STAMP): requirements.lock pyproject.toml
	@if [ "$(call version_of,$(VENV)/bin/python)" != "$(PYTHON_VERSION)" ]; then \
		rm -rf $(VENV) && echo "$(PYTHON) -m venv $(VENV)" && $(PYTHON) -m venv $(VENV); fi
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements.lock
	$(VENV)/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(VENV)/bin/python -m pip check
	touch $@

# requirements-torch.lock: everything in requirements.lock, same versions, plus PyTorch.
$(TORCH_STAMP): $(STAMP) requirements-torch.lock
	$(VENV)/bin/python -m pip install --quiet -r requirements-torch.lock
	$(VENV)/bin/python -m pip check
	touch $@

repro: $(STAMP) c-compiler
	dvc repro

torch: $(TORCH_STAMP)

# Every test, on every core: each pytest-xdist worker takes whole test files (loadfile), so a
# project a module's tests share is built once. One worker more than cores: many tests wait
# (a slowed link, a queue's poll, a peer's timeout, a project another worker is building),
# and the extra worker keeps the cores busy meanwhile. Python caches compiled modules even
# where the environment turns that off (PYTHONDONTWRITEBYTECODE): each worker and each
# process the tests start would otherwise compile, and pytest rewrite, every module anew.
TEST_WORKERS = $(shell $(PYTHON) -c 'import os; print(os.cpu_count() + 1)')
test: $(TORCH_STAMP) c-compiler system-deps
	PYTHONDONTWRITEBYTECODE= python -m pytest -n $(TEST_WORKERS) --dist loadfile

# The inner loop: every test not marked slow, which starts no process (tests/conftest.py
# holds each to it): no dvc, no stage, no compiler, no server.
test-fast: $(TORCH_STAMP)
	python -m pytest -m "not slow"

# ruff, with the rules in pyproject.toml ([tool.ruff.lint]); .ci/run runs it before the tests.
lint: $(STAMP)
	ruff check .

# stages/frameworks/c/mnist_mlp.c is built with the first of $$CC, cc, gcc, clang (stages/frameworks/c/env.py);
# with none, Debian's gcc and the C library's headers are installed when we are root.
c-compiler:
	@if [ -n "$$CC" ]; then command -v "$$CC" >/dev/null || { echo "CC=$$CC: not found"; exit 1; }; \
	elif ! command -v cc >/dev/null && ! command -v gcc >/dev/null && ! command -v clang >/dev/null; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
				apt-get install -y -qq --no-install-recommends gcc libc6-dev; \
		else \
			echo "train.framework c needs a C compiler (sudo apt-get install gcc)"; exit 1; \
		fi; \
	fi

# The tests drive a real headless Chromium (the error page), a real OpenSSH server (the
# SSH remote) and test hosts in network namespaces (iproute2: ip, tc, ss); they build the C
# programs with clang (without libomp-dev: no OpenMP, as Apple's clang) and for AArch64 (GCC's
# cross compiler and C library), run under qemu-aarch64 (qemu-user). Installed from
# Debian's packages when missing and we are root.
system-deps:
	@missing=""; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v sshd >/dev/null || [ -x /usr/sbin/sshd ] || missing="$$missing openssh-server"; \
	command -v ip >/dev/null && command -v tc >/dev/null && command -v ss >/dev/null \
		|| missing="$$missing iproute2"; \
	command -v clang >/dev/null || missing="$$missing clang"; \
	command -v aarch64-linux-gnu-gcc >/dev/null || missing="$$missing gcc-aarch64-linux-gnu"; \
	[ -e /usr/aarch64-linux-gnu/include/stdio.h ] || missing="$$missing libc6-dev-arm64-cross"; \
	command -v qemu-aarch64 >/dev/null || missing="$$missing qemu-user"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
				apt-get install -y -qq --no-install-recommends $$missing; \
		else \
			echo "make test needs:$$missing (sudo apt-get install$$missing)"; exit 1; \
		fi; \
	fi

# An S3-compatible object store on this machine, to try a team's S3 remote (docs/sharing.md):
# SeaweedFS (`weed`, from the lock's dev tools) in one process, in the foreground (Ctrl-C
# stops it), its S3 endpoint at http://OBJECT_STORE_ADDRESS:8333 with the bucket `mnist`, data
# kept in OBJECT_STORE_DIR, telemetry off, no bucket created by an upload. Its one account is
# the key pair exported as AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, the names DVC's S3
# client reads too; the secret also guards its admin UI. Every port binds to that address
# only. The tests start each store they use with this target (OBJECT_STORE_FLAGS: theirs).
OBJECT_STORE_ADDRESS ?= 127.0.0.1
OBJECT_STORE_DIR ?= ../mnist-object-store
object-store: $(STAMP)
	@test -n "$$AWS_ACCESS_KEY_ID" && test -n "$$AWS_SECRET_ACCESS_KEY" || { \
		echo "make object-store: export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY first"; exit 1; }
	@mkdir -p $(OBJECT_STORE_DIR)
	exec weed mini -dir=$(OBJECT_STORE_DIR) -ip=$(OBJECT_STORE_ADDRESS) \
		-ip.bind=$(OBJECT_STORE_ADDRESS) -master.telemetry=false -s3.port=8333 -bucket=mnist \
		-s3.autoCreateBucket=false -webdav=false -s3.port.iceberg=0 -s3.port.lance=0 \
		-admin.password="$$AWS_SECRET_ACCESS_KEY" $(OBJECT_STORE_FLAGS)

# The default benchmarks side by side in one session (benchmarks/run.py; BENCH_ARGS="--data
# PATH" for another full mnist.npz). Each benchmark also runs alone, with its own flags,
# after `make torch c-compiler`: `python -m benchmarks.NAME --help`.
bench: $(TORCH_STAMP) c-compiler
	python -m benchmarks.run $(BENCH_ARGS)

# Re-resolve every lock after changing dependencies in pyproject.toml or requirements-gpu.in:
# one universal resolution each, for every supported Python and platform (tools/lock.py).
# The locks keep PyTorch's public version (2.13.0, not a local 2.13.0+cpu build), so pip
# takes whichever build of it the machine's indexes have. Then run `make check-wheels`.
lock: $(STAMP)
	python -m tools.lock

# Every pin of every lock has a wheel (or a pure-Python source archive) for macOS arm64,
# Linux aarch64 and Linux x86_64 at every supported Python (tools/check_wheels.py; it asks
# the package index, minutes).
check-wheels: $(STAMP)
	python -m tools.check_wheels

# GPU TensorFlow (tensorflow[and-cuda]) and the CUDA build of PyTorch in place of the CPU
# builds, from requirements-gpu.lock: Linux x86_64 with an NVIDIA driver only. Then
# train.keras.device: gpu or train.torch.device: cuda (docs/frameworks.md). A torch without
# CUDA is replaced by the index's build (PyPI's is CUDA's). After a lock change, rebuild
# with `make clean-venv gpu`: `make repro` would bring tensorflow-cpu back beside it.
gpu: $(GPU_STAMP)

$(GPU_STAMP): $(TORCH_STAMP) requirements-gpu.lock
	@[ "$$(uname -s) $$(uname -m)" = "Linux x86_64" ] || { echo "make gpu: GPU TensorFlow \
	has wheels for Linux x86_64 only, not $$(uname -s) $$(uname -m): train on the CPU"; exit 1; }
	$(VENV)/bin/python -m pip uninstall --quiet --yes tensorflow-cpu
	$(VENV)/bin/python -c 'import torch, sys; sys.exit(torch.version.cuda is None)' \
		|| $(VENV)/bin/python -m pip uninstall --quiet --yes torch
	$(VENV)/bin/python -m pip install --quiet -r requirements-gpu.lock
	$(VENV)/bin/python -m pip check
	touch $@

# Every supported Python on this machine (on PATH, or installed by pyenv): a venv each
# (.venv-3.12 and so on), the fixture pipeline through `dvc repro` (each framework), then the
# not-slow suite; the times and whether the bits agree with the first Python's, as a table
# (tools/pythons.py, docs/testing.md).
test-pythons: c-compiler
	$(PYTHON) -m tools.pythons

clean-venv:
	rm -rf $(VENV)

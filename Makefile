# The two commands of the README: `make repro` runs the pipeline, `make test` the tests.
# Both build .venv from the lock file once and reuse it while the lock is unchanged.
# `make torch` adds PyTorch (train.framework: torch) from its own lock; `make test` and
# `make bench` do it too, `make repro` never does. `make c-compiler` installs a C compiler
# (train.framework: c) when the machine has none; `make repro`, `test` and `bench` do it.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed-from-lock
TORCH_STAMP := $(VENV)/.installed-torch-from-lock
# DVC runs each stage's `python -m ...` through the shell: the venv must come first.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: repro torch c-compiler test test-fast lint bench lock clean-venv system-deps object-store

# The venv: the lock's exact versions, then the project itself, editable and without deps
# (the lock has them all, setuptools included), for its commands mnist-predict and
# mnist-errors-diff (pyproject.toml's [project.scripts]).
$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required"'
	$(PYTHON) -m venv $(VENV)
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

test: $(TORCH_STAMP) c-compiler system-deps
	python -m pytest

# The inner loop: every test that runs no dvc, trains nothing and starts no stage process.
# No system packages beyond a C compiler (the C program's unit tests build it).
test-fast: $(TORCH_STAMP) c-compiler
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
# SSH remote) and test hosts in network namespaces (iproute2: ip, tc, ss). Installed from
# Debian's packages when missing and we are root.
system-deps:
	@missing=""; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v sshd >/dev/null || [ -x /usr/sbin/sshd ] || missing="$$missing openssh-server"; \
	command -v ip >/dev/null && command -v tc >/dev/null && command -v ss >/dev/null \
		|| missing="$$missing iproute2"; \
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

bench: $(TORCH_STAMP) c-compiler
	python -m benchmarks.run $(BENCH_ARGS)

# Re-resolve exact versions after changing dependencies in pyproject.toml.
# The torch lock keeps PyTorch's public version (2.13.0, not a local 2.13.0+cpu build), so
# pip takes whichever build of it the machine's indexes have.
lock: $(STAMP)
	python -m pip install --quiet pip-tools
	pip-compile --quiet --allow-unsafe --strip-extras --extra dev --no-emit-index-url \
		--no-emit-find-links -o requirements.lock pyproject.toml
	pip-compile --quiet --allow-unsafe --strip-extras --extra dev --extra torch -c requirements.lock \
		--no-emit-index-url --no-emit-find-links -o requirements-torch.lock pyproject.toml
	sed -i 's/^torch==\(.*\)+[a-z0-9.]*$$/torch==\1/' requirements-torch.lock

clean-venv:
	rm -rf $(VENV)

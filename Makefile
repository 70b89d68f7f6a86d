# The two commands of the README: `make repro` runs the pipeline, `make test` the tests.
# Both build .venv from the lock file once and reuse it while the lock is unchanged.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed-from-lock
# DVC runs each stage's `python -m ...` through the shell: the venv must come first.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: repro test test-fast bench lock clean-venv system-deps

$(STAMP): requirements.lock
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required"'
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements.lock
	$(VENV)/bin/python -m pip check
	touch $@

repro: $(STAMP)
	dvc repro

test: $(STAMP) system-deps
	python -m pytest

# The inner loop: every test that runs no dvc, trains nothing and starts no stage process.
test-fast: $(STAMP) system-deps
	python -m pytest -m "not slow"

# The tests drive a real headless Chromium (the error page) and a real OpenSSH server (the
# SSH remote). Installed from Debian's packages when missing and we are root.
system-deps:
	@missing=""; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v sshd >/dev/null || [ -x /usr/sbin/sshd ] || missing="$$missing openssh-server"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
				apt-get install -y -qq --no-install-recommends $$missing; \
		else \
			echo "make test needs:$$missing (sudo apt-get install$$missing)"; exit 1; \
		fi; \
	fi

bench: $(STAMP)
	python -m benchmarks.run $(BENCH_ARGS)

# Re-resolve exact versions after changing dependencies in pyproject.toml.
lock: $(STAMP)
	python -m pip install --quiet pip-tools
	pip-compile --quiet --strip-extras --extra dev --no-emit-index-url \
		--no-emit-find-links -o requirements.lock pyproject.toml

clean-venv:
	rm -rf $(VENV)

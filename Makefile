# The developer loop.  `make test` is the command CI runs (see .ci/run and README.md), then `make test-faults`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# CI installs the built package (what users get); developers get an editable install.
ifdef CI
INSTALL_TARGET := .[test] ./examples/routes-file-backend
else
INSTALL_TARGET := -e .[test] -e ./examples/routes-file-backend
endif
APT_PACKAGES := etcd-server etcd-client iproute2 iputils-ping iperf3 containernetworking-plugins nftables iptables util-linux
NEEDED_BINARIES := etcd etcdctl ip ping iperf3 nft iptables setpriv

.PHONY: test test-faults lint typecheck unit deps venv demo clean bench

test: deps lint typecheck
	$(PY) -m pytest -p no:cacheprovider --timeout 600 -m "not faults" $(PYTEST_ARGS)

# the long fault scenarios (e.g. etcd dead for the full 60 s); make test runs shorter forms
test-faults: deps
	$(PY) -m pytest -p no:cacheprovider --timeout 600 -m faults $(PYTEST_ARGS)

deps: venv
	@missing=""; for b in $(NEEDED_BINARIES); do command -v $$b >/dev/null || missing="$$missing $$b"; done; \
	[ -e /usr/lib/cni/bridge ] || missing="$$missing cni-plugins"; \
	if [ -n "$$missing" ]; then \
		echo "installing system packages (missing:$$missing)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	fi

venv:
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(INSTALL_TARGET)

# lint-imports holds the layers (pyproject.toml [tool.importlinter]); like mypy it needs the
# plain installed copy, since it cannot follow the editable install's package-dir mapping.
lint: venv
	$(VENV)/bin/ruff check core backends stores tests examples bench
	$(VENV)/bin/ruff format --check core backends stores tests examples bench
	@rm -rf build/lint-imports
	@$(PY) -m pip install -q --no-deps --no-compile --target build/lint-imports . >/dev/null
	@rm -rf overlayd.egg-info  # the build's metadata would shadow the installed entry points
	cd build/lint-imports && ../../$(VENV)/bin/lint-imports --no-cache ../../pyproject.toml

# mypy cannot follow the editable install's package-dir mapping, so it checks a plain copy.
typecheck: venv
	@rm -rf build/typecheck
	@$(PY) -m pip install -q --no-deps --no-compile --target build/typecheck . >/dev/null
	@rm -rf overlayd.egg-info
	cd build/typecheck && ../../$(VENV)/bin/mypy --strict --config-file ../../pyproject.toml -p overlayd
	cd build/typecheck && ../../$(VENV)/bin/mypy --strict --config-file ../../pyproject.toml ../../tests/typing/public_api.py

unit: venv
	$(PY) -m pytest -q -m "not root and not etcd"

demo: deps
	$(VENV)/bin/overlayd demo

bench: deps
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .pytest_cache .ruff_cache .hypothesis

# `make demo` and `make test` do all set-up on a fresh Debian 12 host (as root).
.PHONY: setup demo test test-fast lint bench proto

setup:
	./setup-host.sh

demo: setup
	.venv/bin/fleetprof demo

test: setup
	.venv/bin/pytest -ra

# The unit tests alone (tests/unit/: no root, no BPF, seconds); tests/integration/ has the rest.
test-fast: setup
	.venv/bin/pytest -ra tests/unit

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

bench: setup
	.venv/bin/python benchmarks/agent_overhead.py

# Regenerate the committed gRPC/protobuf modules after editing proto/**/*.proto.
proto: setup
	.venv/bin/python -m fleetprof.proto.generate

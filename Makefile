# One entry point for every task; CI calls `make test`.
PY ?= python3
export PYTHONDONTWRITEBYTECODE = 1

.PHONY: setup build demo test lint test-rust test-py bench clean

setup:
	./scripts/setup.sh

build:
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'

# The main job: sandbox from examples/, kproxy in its node namespace, a traffic table.
demo: setup
	$(PY) -m kproxy.demo --manifests examples/

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	$(PY) -m ruff check python tests bench
	$(PY) -m ruff format --check python tests bench
	$(PY) -m mypy --no-incremental
	$(PY) -m mypy.stubtest kproxy._core --allowlist .stubtest-allowlist

test-rust:
	cargo test --workspace

test-py:
	$(PY) -m pytest -q -p no:cacheprovider

# Everything CI checks: setup, lints of both languages, Rust and Python tests.
test: setup lint test-rust test-py

bench: setup
	$(PY) -m bench

clean:
	cargo clean
	rm -rf build dist python/kproxy/*.so

# One entry point for every task; CI calls `make test`.
PY ?= python3
export PYTHONDONTWRITEBYTECODE = 1

.PHONY: setup build demo test lint test-rust test-py bench bench-quick clean

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

# The benchmark suite (root): every part, results and charts in bench/results/
# (bench/README.md). bench-quick: small sizes, a few minutes, bench/results/quick/.
bench: setup
	$(PY) -m bench all
	$(PY) -m bench plot --readme README.md

bench-quick: setup
	$(PY) -m bench all --quick

clean:
	cargo clean
	rm -rf build dist python/kproxy/*.so

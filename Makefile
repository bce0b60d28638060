# The two commands of the README. Both set up .venv first (idempotent).
.PHONY: setup demo test bench

setup:
	@./scripts/setup.sh

demo: setup
	.venv/bin/replay demo

test: setup
	.venv/bin/python -m pytest -q -p no:cacheprovider

bench: setup
	.venv/bin/python benchmarks/record_throughput.py --quick

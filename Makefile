# The two commands of the README, plus the benchmark. Each sets up what it needs first.
.PHONY: setup demo test bench

setup:
	@./scripts/setup

demo: setup
	@.venv/bin/python scripts/demo.py

test: setup
	@./scripts/test

bench: setup
	@.venv/bin/python -m benchmarks

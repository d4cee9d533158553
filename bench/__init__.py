"""Opt-in benchmarks (`python -m bench`); they write results under bench/results/ and no
test asserts a time."""

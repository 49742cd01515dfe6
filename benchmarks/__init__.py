"""Benchmark scripts of loupe-hf: each prints JSON; none is part of the test suite."""

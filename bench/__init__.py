"""Benchmarks: each prints figures measured side by side in one run. Tests never assert on time."""

"""Benchmarks for diffit-kernels: `python -m benchmarks` (see benchmarks/__main__.py)."""

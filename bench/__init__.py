"""The benchmark package: `python -m bench` measures the real gateway (see docs/BENCHMARKS.md)."""

"""Benchmarks (run as ``python -m dist_stab.bench.<name>``)."""

"""Benchmarks for vlmserve (not part of the package; see docs/BENCHMARKS.md)."""

"""Measurement (stats.py, plain dataclasses) kept apart from exposition (a later prometheus.py)."""

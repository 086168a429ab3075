"""Reproduction benchmarks for regopt (data, models, the training driver and its report).

Run ``python benchmarks/reproduce.py --preset quick``; see ``reproduce.py`` for the presets.
"""

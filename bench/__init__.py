"""Benchmarks (run as scripts: python bench/NAME.py); results go to docs/results/."""

"""Benchmarks: ``python scripts/bench/infer.py``, ``python scripts/bench/train.py``, ``python -m scripts.bench.wsi``."""

"""Benchmarks: storno beside DBOS Transact, Restate and Temporal on the same workloads.

``python -m bench`` (or ``bench/run``) runs the suite; see docs/benchmarks.md. The single-file
benchmarks beside it (``overhead.py``, ``parked.py``, ``postgres_throughput.py``) still run as
scripts.
"""

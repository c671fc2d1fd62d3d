"""Benchmarks that ship with msfused: the workloads of WORKLOADS.md, the floor, and the runner behind
``python -m msfused bench``."""

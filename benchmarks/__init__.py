"""Benchmarks (run as scripts: ``python benchmarks/train_throughput.py --help``)."""

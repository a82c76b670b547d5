"""Benchmarks: the harness behind ``fulltune bench`` / ``make bench`` and the scripts beside it."""

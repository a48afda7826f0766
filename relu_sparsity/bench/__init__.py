"""Kernel and train-step benchmarks (pytest-benchmark and the CLI's `bench`)."""

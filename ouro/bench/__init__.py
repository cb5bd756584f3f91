"""Benchmarks and the learning experiment: each prints ratios measured side by side in one run."""

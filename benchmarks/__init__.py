"""Benchmarks of the pipeline's scale-sensitive stages; results as JSON in `benchmarks/results/`."""

"""Helpers that build tiny, random checkpoints for tests, samples and benchmarks."""

"""Helpers shared by the CLI, examples and benchmarks: text loading, perplexity, local models."""

"""Datasets: the demo and the built-in task suite (`tasks`), files in any supported format, tokenization
with loss masks."""

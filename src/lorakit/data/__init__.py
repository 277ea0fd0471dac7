"""Datasets: the demo task, JSONL prompt/completion files, tokenization with loss masks."""

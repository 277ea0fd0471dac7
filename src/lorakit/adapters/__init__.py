"""Adapters: the wrapper layer, LoRA, injection, merging and PEFT-format I/O."""

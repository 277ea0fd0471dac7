"""Fast paths for the training hot loop, each beside (and tested against) its plain PyTorch reference.

`linear_ce`: LM head + cross entropy in token chunks, so the full [tokens, vocab] logits never exist.
`lora_linear`: a LoRA update as one autograd node whose intermediates stay rank-sized.
"""

"""Tiny random-config causal LMs of the architectures transformers ships (built in code, well under a second).

Each is the model type's own config class with a small width (hidden 32-64), two layers and a vocabulary
of 128, otherwise the architecture's defaults: biased and bias-free linears, fused QKV (`query_key_value`,
`qkv_proj`, `c_attn`), GPT-2's Conv1D, parallel attention, tied and untied heads, mixture-of-experts MLPs.
"""

from __future__ import annotations

import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

VOCAB = 128
IDS = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)
LLAMA_LIKE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
GEMMA_LIKE = dict(LLAMA_LIKE, head_dim=8, query_pre_attn_scalar=8, sliding_window=16)
MOE = dict(LLAMA_LIKE, num_experts_per_tok=2)

CONFIGS: dict[str, dict] = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,  # biased q/k/v, bias-free o_proj and MLP
    "qwen3": dict(LLAMA_LIKE, head_dim=8),
    "gemma": dict(LLAMA_LIKE, head_dim=8),
    "gemma2": GEMMA_LIKE,
    "gemma3_text": GEMMA_LIKE,
    "phi3": LLAMA_LIKE,  # fused qkv_proj and gate_up_proj
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64),  # Conv1D
    "gpt_neox": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=64),
    "falcon": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
    "olmo2": LLAMA_LIKE,
    "starcoder2": LLAMA_LIKE,  # biased everywhere
    "mixtral": dict(MOE, num_local_experts=4),
    "qwen3_moe": dict(MOE, head_dim=8, num_experts=4, moe_intermediate_size=24, mlp_only_layers=[]),
    "granite": LLAMA_LIKE,
    "cohere": LLAMA_LIKE,
    "stablelm": dict(LLAMA_LIKE, use_qkv_bias=True),
    "opt": dict(hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
                max_position_embeddings=64),  # flattens hidden states to [batch*seq, hidden] before its MLP
    "bloom": dict(hidden_size=32, n_layer=2, n_head=4),  # ALiBi, biased fused query_key_value
}
ARCHS = list(CONFIGS)


def tiny_config(model_type: str):
    return CONFIG_MAPPING[model_type](**IDS, **CONFIGS[model_type])


def tiny_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A fresh random model of `model_type`, the same weights for the same seed, in eval mode."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()

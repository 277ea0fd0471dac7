"""LongLoRA: shifted sparse attention (S2-Attn) for training, and position interpolation.

S2-Attn splits the sequence into groups of `group` tokens and attends within each group only, so
the cost grows with t * group instead of t^2. Half of the heads see the groups shifted by half a
group, which lets information flow between neighbouring groups. Unlike a plain `roll`, the
shifted group that wraps around the end keeps true causality: a token never attends to one that
comes after it in the original sequence. At inference (eval mode) attention is ordinary and full.

It is registered with transformers' attention interface as "s2attn" (Llama-family models).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NAME = "s2attn"
RATIO_ATTR = "lorakit_s2_group_ratio"


def group_positions(t: int, group: int, shifted: bool, device) -> torch.Tensor:
    """Original positions of the tokens in each group, ascending within a group: [t // group, group].

    Shifted, the last group wraps around: it holds the last and the first half-group of tokens. In
    ascending order, "a key not later than the query" is plain causal order within every group."""
    pos = torch.arange(t, device=device)
    if shifted:
        pos = pos.roll(-(group // 2))
    return pos.view(t // group, group).sort(dim=1).values


def grouped_attention(q, k, v, positions: torch.Tensor, allowed: torch.Tensor | None, scaling: float):
    """Attention of q, k, v [b, h, t, d] within the groups given by `positions` [n, g] (ascending rows).

    A query sees a key of its group when the key's original position is not later than its own and
    `allowed` [b, 1|h, t, t] (padding / packing mask, True = may attend) permits it. Without `allowed`
    the groups go to SDPA as a batch of causal [g, g] problems with no mask at all, so its fused kernel
    runs and no [g, g] score matrix is kept (memory linear in t); with it, a [b, 1|h, n, g, g] mask.
    """
    b, h, _, d = q.shape
    n, g = positions.shape
    flat = positions.reshape(-1)
    if allowed is None:
        qg, kg, vg = (x[:, :, flat].view(b, h * n, g, d) for x in (q, k, v))  # [b, h*n, g, d]
        out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=scaling)
    else:
        qg, kg, vg = (x[:, :, flat].view(b, h, n, g, d) for x in (q, k, v))  # [b, h, n, g, d]
        mask = torch.ones(g, g, dtype=torch.bool, device=q.device).tril()  # causal in true positions
        pad = allowed[:, :, positions[:, :, None], positions[:, None, :]]  # [b, 1|h, n, g, g]
        mask = (mask & pad) | torch.eye(g, dtype=torch.bool, device=q.device)  # a padding row sees itself
        out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scaling)  # [b, h, n, g, d]
    result = torch.empty_like(q)
    result[:, :, flat] = out.reshape(b, h, n * g, d)
    return result


def s2_attention(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                 scaling: float | None = None, **kwargs):
    """transformers attention function: S2-Attn in training, full (SDPA) attention otherwise.

    query [b, h, t, d]; key/value [b, kv_heads, t, d]; attention_mask None (plain causal) or a 4-D
    bool / additive mask. Returns ([b, t, h, d], None) like transformers' own implementations.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    t = query.shape[2]
    ratio = getattr(module.config, RATIO_ATTR, None)
    group = int(t * ratio) if ratio else t
    if not module.training or key.shape[2] != t or group >= t or t % group or group % 2:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    repeat = query.shape[1] // key.shape[1]  # grouped-query attention: share k/v across heads
    key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    allowed = None
    if attention_mask is not None:
        allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    half = query.shape[1] // 2
    plain = grouped_attention(query[:, :half], key[:, :half], value[:, :half],
                              group_positions(t, group, False, query.device), allowed, scaling)
    shifted = grouped_attention(query[:, half:], key[:, half:], value[:, half:],
                                group_positions(t, group, True, query.device), allowed, scaling)
    return torch.cat([plain, shifted], dim=1).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make "s2attn" known to transformers (attention and mask creation, the latter as SDPA's)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, s2_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def enable_s2_attention(model: nn.Module, group_size_ratio: float = 0.25) -> nn.Module:
    """Train `model` with S2-Attn in groups of `group_size_ratio` x the sequence length."""
    if not 0 < group_size_ratio <= 1:
        raise ValueError(f"group_size_ratio must be in (0, 1], got {group_size_ratio}")
    register()
    setattr(model.config, RATIO_ATTR, group_size_ratio)
    model.set_attn_implementation(NAME)
    return model


def context_of(model: nn.Module) -> dict | None:
    """The model's positional setup (RoPE parameters, context length), to save beside an adapter."""
    config = getattr(model, "config", None)
    if getattr(config, "rope_parameters", None) is None:
        return None
    return {"rope_parameters": dict(config.rope_parameters), "max_position_embeddings": config.max_position_embeddings}


def apply_context(model: nn.Module, context: dict) -> None:
    """Give `model` the positional setup an adapter was trained with (e.g. interpolated RoPE)."""
    if context_of(model) == context:
        return
    model.config.rope_parameters = dict(context["rope_parameters"])
    model.config.max_position_embeddings = context["max_position_embeddings"]
    rebuild_rotary(model)


def rebuild_rotary(model: nn.Module) -> None:
    rotary = model.base_model.rotary_emb
    model.base_model.rotary_emb = type(rotary)(config=model.config).to(rotary.inv_freq.device)


def trainable_module_names(model: nn.Module, kinds: list[str]) -> list[str]:
    """Names of the modules LongLoRA also trains: "embed" (input embeddings), "norm" (every norm)."""
    unknown = set(kinds) - {"embed", "norm"}
    if unknown:
        raise ValueError(f"longlora.trainable: unknown entries {sorted(unknown)}; use embed and/or norm")
    embed = model.get_input_embeddings()
    names = []
    for name, module in model.named_modules():
        if ("embed" in kinds and module is embed) or ("norm" in kinds and "norm" in type(module).__name__.lower()):
            names.append(name)
    return names


def interpolate_positions(model: nn.Module, target_context: int) -> float:
    """Linear RoPE position interpolation to `target_context`; returns the factor (1 = unchanged).

    The rotary embedding module is rebuilt from the updated config.
    """
    config = model.config
    native = config.max_position_embeddings
    factor = target_context / native
    if factor <= 1:
        return 1.0
    params = dict(getattr(config, "rope_parameters", None) or {})
    params.update(rope_type="linear", factor=factor)
    config.rope_parameters = params
    config.max_position_embeddings = target_context
    rebuild_rotary(model)
    return factor


@torch.no_grad()
def token_nll(model: nn.Module, ids: list[int], chunk: int = 1024) -> torch.Tensor:
    """Next-token negative log-likelihood at every position of one sequence: [len(ids) - 1].

    Full attention (eval mode); the head runs `chunk` positions at a time so the [t, vocab] logits of
    a long sequence never exist at once."""
    was_training = model.training
    model.eval()
    try:
        x = torch.tensor([ids], device=next(model.parameters()).device)
        hidden = model.base_model(input_ids=x, use_cache=False)[0][0, :-1]  # [t-1, d]
        head = model.get_output_embeddings()
        target = x[0, 1:]
        parts = [F.cross_entropy(head(hidden[i : i + chunk]).float(), target[i : i + chunk], reduction="none")
                 for i in range(0, hidden.shape[0], chunk)]
    finally:
        model.train(was_training)
    return torch.cat(parts)


def bucket_perplexity(nll: torch.Tensor, edges: list[int]) -> dict[str, float]:
    """Perplexity of the tokens whose position lies in each bucket [edges[i], edges[i+1]).

    nll[i] is the loss of predicting token i + 1, so token positions are 1..len(nll)."""
    positions = torch.arange(1, nll.numel() + 1)
    found = {}
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (positions >= lo) & (positions < hi)
        if inside.any():
            found[f"{lo}-{hi}"] = float(nll[inside].double().mean().exp())
    return found


@torch.no_grad()
def passkey_retrieved(model: nn.Module, prompt: list[int], answer: list[int]) -> tuple[bool, list[int]]:
    """Whether greedy decoding after `prompt` produces exactly `answer`, and the tokens it predicts.

    One teacher-forced forward: greedy decoding yields the answer exactly when the argmax after each
    answer prefix is the next answer token."""
    was_training = model.training
    model.eval()
    try:
        x = torch.tensor([prompt + answer], device=next(model.parameters()).device)
        hidden = model.base_model(input_ids=x, use_cache=False)[0][0, len(prompt) - 1 : -1]  # [len(answer), d]
        predicted = model.get_output_embeddings()(hidden).argmax(-1).tolist()
    finally:
        model.train(was_training)
    return predicted == answer, predicted

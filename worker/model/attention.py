"""Attention for grouped-query models without copying the key/value cache per call.

Gemma 3 270M has 4 query heads per key/value head. For a masked call of more than one query
position (a decode step that verifies drafts, a padded prefill), transformers' SDPA path repeats
every key and value head for each of its query heads (`repeat_kv`), so each layer reads its whole
cache once per query head, every step. For one position it already avoids that by folding the
query heads into the query axis (`pack_gqa`). `packed_sdpa` does the same fold for any number of positions:
queries (batch, heads, q, dim) become (batch, kv_heads, group * q, dim), the mask is tiled to
match, and one SDPA call attends to the cache as stored. Each position gets what a call of that
position alone gets to fp32 rounding (`tests/worker/model/test_attention.py`); bit for bit depends
on the CPU, for this path and transformers' alike, as it does for the linear layers across call
sizes, so a step that verifies drafts agrees with one-token steps to rounding and the greedy tokens
are checked token for token (tests/worker/test_decode.py, the bench). Figures per CPU, and what
was measured against it: docs/PERFORMANCE.md, "Packed grouped-query attention".

`use_packed_attention(model)` registers it under `PACKED` (with SDPA's masks) and switches the
model to it; calls it does not fold (no mask, one kv head per query head, a bias, dropout) go to
transformers' own SDPA function unchanged."""
from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED = "gemma_batch_packed_sdpa"


def packed_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: (batch, heads, q, dim) queries and (batch,
    kv_heads, columns, dim) keys and values in, (batch, q, heads, dim) out."""
    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, q, dim = query.shape
    if (groups == 1 or q == 1 or attention_mask is None or attention_mask.dim() != 4 or attention_mask.shape[1] != 1
            or dropout or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
            or key.shape[1] * groups != heads):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # query head h = kv_head * groups + r: row r * q + j of its kv head's block is head r's position j
    folded = query.reshape(batch, key.shape[1], groups * q, dim)
    mask = attention_mask.repeat(1, 1, groups, 1)
    out = torch.nn.functional.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, q, dim).transpose(1, 2).contiguous(), None


def use_packed_attention(model: torch.nn.Module) -> bool:
    """Switch a model that runs transformers' SDPA attention to `packed_sdpa`; whether it did."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    AttentionInterface.register(PACKED, packed_sdpa)
    AttentionMaskInterface.register(PACKED, sdpa_mask)
    model.set_attn_implementation(PACKED)
    return getattr(model.config, "_attn_implementation", None) == PACKED

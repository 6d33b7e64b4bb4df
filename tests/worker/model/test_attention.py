"""Grouped-query attention without repeating the cache (worker/model/attention.py): on the real
model's attention layers, a masked call of several query positions folds the query heads into the
query axis, and each position gets what a call of that position alone gets (the one-token decode
step `generate` takes) to fp32 rounding, as transformers' own SDPA function does. Bit for bit
depends on the CPU (worker/model/attention.py), so the test asks for rounding only."""
from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from worker.engine import Engine
from worker.model.attention import PACKED, packed_sdpa


def test_the_loaded_model_attends_through_the_packed_function(engine: Engine) -> None:
    assert engine.model.lm.config._attn_implementation == PACKED
    assert all(layer.self_attn.config._attn_implementation == PACKED for layer in engine.model.lm.model.layers)


def test_each_position_of_a_packed_call_equals_a_call_of_that_position_alone(engine: Engine) -> None:
    # Given the model's first layer (4 query heads per key/value head) and a decode step's shapes:
    # 3 rows over 40 cache columns held in a wider buffer, each row seeing its own columns
    attn = engine.model.lm.model.layers[0].self_attn
    heads, kv_heads, dim = attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim
    assert heads // kv_heads == attn.num_key_value_groups > 1
    torch.manual_seed(0)
    buffer = torch.randn(2, 3, kv_heads, 64, dim)
    key, value = buffer[0, :, :, :40], buffer[1, :, :, :40]

    def alone(query: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return sdpa_attention_forward(attn, query, key, value, mask, scaling=attn.scaling)[0]

    with torch.inference_mode():
        for q in range(2, 17):
            query = torch.randn(3, q, heads, dim).transpose(1, 2)  # as the layer makes it: a transposed view
            mask = torch.zeros(3, 1, q, 40, dtype=torch.bool)
            for row, start in enumerate((0, 7, 19)):
                for j in range(q):
                    mask[row, 0, j, start: 24 + j + 1] = True  # causal within the step
            # When the packed function attends for all q positions at once
            got, _ = packed_sdpa(attn, query, key, value, mask, dropout=0.0, scaling=attn.scaling)
            # Then each position's output is the one it gets alone, (rows, positions, heads, dim), to
            # fp32 rounding (a wrong fold or mask tiling mixes heads or columns: errors of order 1)
            ones = torch.cat([alone(query[:, :, j: j + 1], mask[:, :, j: j + 1]) for j in range(q)], dim=1)
            assert got.shape == (3, q, heads, dim), q
            assert torch.allclose(got, ones, atol=1e-5, rtol=0), (q, float((got - ones).abs().max()))
            # and transformers' SDPA over the repeated cache agrees to fp32 rounding
            assert torch.allclose(got, alone(query, mask), atol=1e-5, rtol=0)
        # One position, or no mask (a causal prefill), goes to transformers' own function as it is
        query = torch.randn(3, 1, heads, dim).transpose(1, 2)
        assert torch.equal(packed_sdpa(attn, query, key, value, mask[:, :, :1], scaling=attn.scaling)[0],
                           alone(query, mask[:, :, :1]))
        fresh = torch.randn(3, kv_heads, 5, dim)
        query = torch.randn(3, 5, heads, dim).transpose(1, 2)
        assert torch.equal(packed_sdpa(attn, query, fresh, fresh, None, scaling=attn.scaling)[0],
                           sdpa_attention_forward(attn, query, fresh, fresh, None, scaling=attn.scaling)[0])

"""Gemma's RMSNorms run as PyTorch's fused `rms_norm`: every norm of the loaded model is switched,
and each gives what the model's own (unfused) norm gives, so embeddings and greedy tokens are
unchanged by it."""
from __future__ import annotations

import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

from worker.engine import Engine
from worker.model.loader import fuse_norms


def test_every_norm_of_the_loaded_model_is_fused(engine: Engine) -> None:
    norms = [m for m in engine.model.lm.modules() if isinstance(m, Gemma3RMSNorm)]
    # 4 per layer around attention and the MLP, 2 on queries and keys, and the final norm
    layers = engine.model.lm.config.get_text_config().num_hidden_layers
    assert len(norms) == 6 * layers + 1
    assert all("forward" in vars(m) for m in norms)  # an instance-level forward: the fused one


def test_a_fused_norm_equals_the_models_own() -> None:
    # Given a Gemma norm with trained-like weights, and inputs of the sizes the model sees, in fp32 and bf16
    torch.manual_seed(0)
    norm = Gemma3RMSNorm(640, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(0, 0.5)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(3, 17, 640) * 4).to(dtype)
        reference = norm(x)
        # When the same module is fused
        fused = Gemma3RMSNorm(640, eps=1e-6)
        fused.load_state_dict(norm.state_dict())
        assert fuse_norms(fused) == 1
        out = fused(x)
        # Then the output has the same dtype and, within fp32 rounding, the same values
        assert out.dtype == reference.dtype == dtype
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        assert torch.allclose(out.float(), reference.float(), atol=tolerance, rtol=tolerance)
    # And a fused norm really changed: a module that is not a Gemma norm is left alone
    assert fuse_norms(torch.nn.LayerNorm(8)) == 0

"""Small InternLM2 models for the trainers tests: a config, weights where every tensor matters, token ids."""
from __future__ import annotations

import torch

from trainers.model import InternLM2Config, InternLM2ForCausalLM


def tiny(**overrides) -> InternLM2Config:
    fields = dict(
        vocab_size=61, hidden_size=32, intermediate_size=44, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=500000.0, max_position_embeddings=64, initializer_range=0.15,
    )
    fields.update(overrides)
    return InternLM2Config(**fields)


def spread_model(config: InternLM2Config, seed: int = 0) -> InternLM2ForCausalLM:
    """A model whose norm weights and biases are random too, so every tensor matters for the logits."""
    g = torch.Generator().manual_seed(seed)
    model = InternLM2ForCausalLM(config, g)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def batch(config: InternLM2Config, T: int, B: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))

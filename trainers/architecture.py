"""InternLM2's shape rules and parameter count, on plain field mappings; the units its
parameters are inherited by (`unit_of`).

The model (`trainers/config.py`, `InternLM2Config`) refuses a configuration that breaks a rule;
the search space (`evo/space.py`) never proposes one, and keeps a parameter budget. Both read the
rules from here: the config through an import, the space through the `ArchitectureRules` that
`experiments/config.py` builds from this module (evo does not import trainers). Pure Python, so
importing it imports no torch.

Fields are `InternLM2Config`'s names without a prefix (`hidden_size`, not `model.hidden_size`);
a rule whose fields are absent (None) is not checked.
"""
from __future__ import annotations

from typing import Any, Mapping

# Read by the shape rules; the first, the width, is one the parameter count grows with.
SHAPE_FIELDS = ("hidden_size", "num_attention_heads", "num_key_value_heads")
# Integer fields read by the parameter count.
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads")
# Boolean fields read by the parameter count.
SWITCH_FIELDS = ("bias",)
# Upper bounds of the shape fields, far above any model this project trains (released 1.8B:
# hidden 2048, 24 layers, 16 heads), so that a typo is refused before a member allocates it.
MAX_WIDTH = 65_536             # hidden_size
MAX_FFN = 262_144              # intermediate_size
MAX_LAYERS = 1_024             # num_hidden_layers
MAX_HEADS = 1_024              # num_attention_heads, num_key_value_heads
MAX_POSITIONS = 10_000_000     # max_position_embeddings (and so data.seq_len)


def shape_violations(fields: Mapping[str, Any]) -> list[str]:
    """The shape rules `fields` break, one message each (no prefix); [] when none.

    hidden_size % num_attention_heads == 0 (heads split the width), head_dim even (RoPE
    rotates pairs of dims), num_attention_heads % num_key_value_heads == 0 (GQA groups).
    """
    hidden = fields.get("hidden_size")
    heads = fields.get("num_attention_heads")
    kv = fields.get("num_key_value_heads")
    broken = []
    if hidden is not None and heads is not None:
        if hidden % heads:
            broken.append(f"hidden_size ({hidden}) must be divisible by num_attention_heads ({heads})")
        elif (hidden // heads) % 2:
            broken.append(f"head_dim = hidden_size / num_attention_heads ({hidden} / {heads} = "
                          f"{hidden // heads}) must be even for RoPE")
    if heads is not None and kv is not None and heads % kv:
        broken.append(f"num_attention_heads ({heads}) must be divisible by num_key_value_heads ({kv})")
    return broken


def count_parameters(fields: Mapping[str, Any]) -> int:
    """Parameters of the InternLM2 model with these fields: tok_embeddings + output (untied) +
    per layer [wqkv, wo, w1/w2/w3, 2 RMSNorms] + the final norm; with `bias`, wqkv and wo
    carry biases."""
    missing = [f for f in SIZE_FIELDS if fields.get(f) is None]
    if missing:
        raise ValueError(f"counting parameters needs model.{missing[0]}")
    vocab, hidden, ffn = fields["vocab_size"], fields["hidden_size"], fields["intermediate_size"]
    layers, heads, kv = fields["num_hidden_layers"], fields["num_attention_heads"], fields["num_key_value_heads"]
    head_dim = hidden // heads
    per_layer = (
        hidden * (heads + 2 * kv) * head_dim  # wqkv: [(H + 2 KV) D, hidden]
        + heads * head_dim * hidden           # wo: [hidden, H D]
        + 3 * hidden * ffn                    # w1, w3: [ffn, hidden]; w2: [hidden, ffn]
        + 2 * hidden                          # attention_norm, ffn_norm
    )
    if fields.get("bias"):
        per_layer += (heads + 2 * kv) * head_dim + hidden
    return 2 * vocab * hidden + layers * per_layer + hidden


def unit_of(name: str) -> str:
    """The unit of layer-wise inheritance a parameter or module belongs to: "tok_embeddings",
    "layers.<i>", "norm" or "output" (``model.layers.3.attention.wqkv.weight`` -> "layers.3")."""
    parts = name.split(".")
    if parts[0] == "model" and len(parts) > 1:
        return f"layers.{parts[2]}" if parts[1] == "layers" else parts[1]
    return parts[0]

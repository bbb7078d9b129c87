"""Carry trained weights to a new InternLM2 architecture (architecture genes change mid-training).

Rules, for a state of ``old`` moved to ``new``:
- every parameter starts from a fresh init of ``new`` (drawn from ``generator``), then the part
  that overlaps with the old parameter is copied in;
- the output projections of the residual branches (``attention.wo``, ``feed_forward.w2``) start
  at zero outside the copied part, so new layers are identity blocks and new FFN units / heads
  add nothing until trained: growing layers or the FFN preserves the model's function exactly;
- shrinking the depth keeps the first layers;
- ``wqkv`` is copied head by head in its grouped layout, rows viewed as (KV, G + 2, D): per kv
  group g the q heads g*G .. g*G+G-1, then k_g, then v_g. q/k head dims are copied per rotary
  half, so a copied dimension keeps its rotary partner. Changing heads, kv heads or the width
  does not preserve the function; it keeps as much of the trained weights as fits.
"""
from __future__ import annotations

import torch

from trainers.model import InternLM2Config, InternLM2ForCausalLM

Tensor = torch.Tensor


def transfer_weights(state: dict[str, Tensor], old: InternLM2Config, new: InternLM2Config,
                     generator: torch.Generator | None) -> dict[str, Tensor]:
    """State dict for a model of config ``new`` built from ``state`` (a model of config ``old``)."""
    fresh = InternLM2ForCausalLM(new, generator=generator)
    params = {name for name, _ in fresh.named_parameters()}
    out = {k: v.detach().clone() for k, v in fresh.state_dict().items()}   # buffers stay as built for `new`
    for name in params:
        dst = out[name]
        if _is_residual_out(name):
            dst.zero_()
        if name not in state:
            continue                                   # a new layer: fresh init, zero residual outputs
        src = state[name].to(dst.dtype)
        if ".attention.wqkv." in name:
            _copy_wqkv(src, dst, old, new)
        elif name.endswith(".attention.wo.weight"):
            _copy_wo(src, dst, old, new)
        else:
            _copy_overlap(src, dst)
    return out


def _is_residual_out(name: str) -> bool:
    return ".attention.wo." in name or ".feed_forward.w2." in name


def _copy_overlap(src: Tensor, dst: Tensor) -> None:
    """dst[:m0, :m1, ...] = src[:m0, :m1, ...] with m the smaller size on each dim."""
    idx = tuple(slice(0, min(a, b)) for a, b in zip(src.shape, dst.shape))
    dst[idx] = src[idx]


def _head_dims(d_old: int, d_new: int, rotary: bool) -> list[tuple[slice, slice]]:
    """(source, destination) slices of the head dimension to copy. Rotary dims pair i with
    i + D/2 (rotate_half), so q/k copy the first min/2 dims of each half."""
    if not rotary:
        m = min(d_old, d_new)
        return [(slice(0, m), slice(0, m))]
    h = min(d_old, d_new) // 2
    return [(slice(0, h), slice(0, h)),
            (slice(d_old // 2, d_old // 2 + h), slice(d_new // 2, d_new // 2 + h))]


def _copy_wqkv(src: Tensor, dst: Tensor, old: InternLM2Config, new: InternLM2Config) -> None:
    """wqkv weight [(H + 2 KV) D, hidden] or bias [(H + 2 KV) D], head by head."""
    g_old = old.num_attention_heads // old.num_key_value_heads
    g_new = new.num_attention_heads // new.num_key_value_heads
    s = src.reshape(old.num_key_value_heads, g_old + 2, old.head_dim, *src.shape[1:])   # (KV, G+2, D[, hidden])
    d = dst.view(new.num_key_value_heads, g_new + 2, new.head_dim, *dst.shape[1:])
    kv = min(old.num_key_value_heads, new.num_key_value_heads)
    g = min(g_old, g_new)
    cols = tuple(slice(0, min(a, b)) for a, b in zip(src.shape[1:], dst.shape[1:]))
    roles = [(slice(0, g), slice(0, g), True),              # q heads of each group
             (g_old, g_new, True),                          # k
             (g_old + 1, g_new + 1, False)]                 # v
    for r_src, r_dst, rotary in roles:
        for hs, hd in _head_dims(old.head_dim, new.head_dim, rotary):
            d[(slice(0, kv), r_dst, hd) + cols] = s[(slice(0, kv), r_src, hs) + cols]


def _copy_wo(src: Tensor, dst: Tensor, old: InternLM2Config, new: InternLM2Config) -> None:
    """wo weight [hidden, H D]; its input columns follow the attention heads h = g*G + j."""
    g_old = old.num_attention_heads // old.num_key_value_heads
    g_new = new.num_attention_heads // new.num_key_value_heads
    s = src.reshape(src.shape[0], old.num_key_value_heads, g_old, old.head_dim)   # (hidden, KV, G, D)
    d = dst.view(dst.shape[0], new.num_key_value_heads, g_new, new.head_dim)
    rows = slice(0, min(src.shape[0], dst.shape[0]))
    kv = slice(0, min(old.num_key_value_heads, new.num_key_value_heads))
    g = slice(0, min(g_old, g_new))
    m = min(old.head_dim, new.head_dim)
    d[rows, kv, g, :m] = s[rows, kv, g, :m]

"""Carry trained weights to a new InternLM2 architecture (architecture genes change mid-training).

Rules, for a state of ``old`` moved to ``new``:
- every parameter starts from a fresh init of ``new`` (drawn from ``generator``), then the part
  that overlaps with the old parameter is copied in;
- the output projections of the residual branches (``attention.wo``, ``feed_forward.w2``) start
  at zero outside the copied part, so new layers are identity blocks and new FFN units / heads
  add nothing until trained: growing layers or the FFN preserves the model's function exactly;
- growing the width (``hidden_size``) pads the residual stream with dimensions that are read and
  written as zero: new embedding columns and new wo/w2 output rows are zero. An RMSNorm over the
  width d' = d + padding sees mean_{d'}(x^2) = (d/d') mean_d(x^2), so each carried norm gets
  eps' = eps * d/d' and weight' = weight * sqrt(d/d'): then
  weight' x / sqrt(mean_{d'} + eps') = weight x / sqrt(mean_d + eps) exactly (`transfer_norm_eps`
  gives the norms' new eps; the model keeps one eps per norm, `model.norm_eps`);
- shrinking the depth keeps the first layers;
- ``wqkv`` is copied head by head in its grouped layout, rows viewed as (KV, G + 2, D): per kv
  group g the q heads g*G .. g*G+G-1, then k_g, then v_g. More kv heads (a multiple) split each
  kv group into groups that share its k/v (duplicated) and its q heads (in order); more q heads
  add heads with zero wo columns: at a fixed head_dim both are exact. Fewer kv heads (a divisor)
  merge groups: k/v averaged, q heads kept while they fit (lossy). q/k head dims are copied per
  rotary half, so a copied dimension keeps its rotary partner; changing head_dim does not
  preserve the function, it keeps as much of the trained weights as fits.

`transfer_moments` carries Adam moments along the same map (zeros for the new coordinates).

Layer-wise inheritance (a merge crossover of parents of two architectures, `inherit_weights`):
the child's units — the embeddings, each decoder layer, the final norm, the output head
(`unit_of`) — each come whole from one parent, reconciled to the child's shape by the map above
(`transfer_weights` of that parent). A tensor whose shape differs from its source tensor's is
then shrunk and perturbed (Ash & Adams 2020): ``shrink * reconciled + (1 - shrink) * init``,
with ``init`` a fresh draw of that tensor — zero-mean noise of (1 - shrink) times the init's std
for matrices and embeddings; for norm weights (init 1) a pull towards 1 rather than towards 0,
which would silence the stream. ``shrink`` 1 keeps the reconciled tensor as it is.
"""
from __future__ import annotations

import math

import torch

from trainers.architecture import unit_of   # parameter names -> units (torch-free), re-exported here
from trainers.model import InternLM2Config, InternLM2ForCausalLM

Tensor = torch.Tensor


def transfer_weights(state: dict[str, Tensor], old: InternLM2Config, new: InternLM2Config,
                     generator: torch.Generator | None) -> dict[str, Tensor]:
    """State dict for a model of config ``new`` built from ``state`` (a model of config ``old``)."""
    fresh = InternLM2ForCausalLM(new, generator=generator)
    params = {name for name, _ in fresh.named_parameters()}
    out = {k: v.detach().clone() for k, v in fresh.state_dict().items()}   # buffers stay as built for `new`
    grow = new.hidden_size > old.hidden_size
    for name in params:
        dst = out[name]
        if _is_residual_out(name) or (grow and name == "model.tok_embeddings.weight"):
            dst.zero_()                                # writes nothing to new residual dims / heads
        if name in state:
            _carry(state[name].to(dst.dtype), dst, name, old, new)
        if grow and name.endswith("norm.weight") and name in state:
            dst.mul_(_norm_scale(old, new))            # old and new dims alike (new ones read zero)
    return out


def transfer_moments(moments: dict[str, Tensor], old: InternLM2Config, new: InternLM2Config,
                     shapes: dict[str, torch.Size], power: int) -> dict[str, Tensor]:
    """One Adam moment per parameter name (exp_avg: ``power`` 1, exp_avg_sq: 2), moved to ``new``
    as the weights are (``shapes``: the new parameters' shapes); new coordinates are zero. A norm
    weight scaled by s on width growth has gradients scaled by 1/s: its moments by s^-power."""
    out = {}
    for name, src in moments.items():
        if name not in shapes:
            continue
        dst = torch.zeros(shapes[name], dtype=src.dtype)
        _carry(src, dst, name, old, new)
        if new.hidden_size > old.hidden_size and name.endswith("norm.weight"):
            dst.mul_(_norm_scale(old, new) ** -power)
        out[name] = dst
    return out


def units(config: InternLM2Config) -> list[str]:
    """The units of a model of ``config``, in order."""
    return ["tok_embeddings", *(f"layers.{i}" for i in range(config.num_hidden_layers)), "norm", "output"]


def inherit_weights(parents: list[tuple[dict[str, Tensor], InternLM2Config]], new: InternLM2Config,
                    sources: dict[str, int | None], shrink: float,
                    generator: torch.Generator | None) -> tuple[dict[str, Tensor], set[str]]:
    """(state dict of a model of config ``new``, names of the shrunk-and-perturbed tensors):
    each unit (`units`) from the parent ``sources[unit]`` indexes in ``parents`` ([(state,
    config)]), reconciled by `transfer_weights`; None: a new layer as `transfer_weights` of
    parents[0] makes it (an identity block). A tensor whose shape differs from its source's:
    ``shrink * reconciled + (1 - shrink) * init`` (module docstring). Draws from ``generator``,
    in this order: each parent's `transfer_weights`, then the fresh model ``init`` is taken from."""
    if not 0.0 <= shrink <= 1.0:
        raise ValueError(f"merge: shrink ({shrink}) must be in [0, 1]")
    want = units(new)
    if list(sources) != want:
        raise ValueError(f"merge: the layer map names {list(sources)}, the child has {want}")
    for unit, p in sources.items():
        if p is None:
            continue
        if not 0 <= p < len(parents):
            raise ValueError(f"merge: {unit} comes from parent {p}, there are {len(parents)}")
        if unit not in units(parents[p][1]):
            raise ValueError(f"merge: {unit} comes from parent {p}, which has "
                             f"{parents[p][1].num_hidden_layers} layers")
    reconciled = [transfer_weights(state, cfg, new, generator) for state, cfg in parents]
    init = InternLM2ForCausalLM(new, generator=generator).state_dict()
    out = dict(reconciled[0])
    perturbed: set[str] = set()
    for name in out:
        p = sources.get(unit_of(name))
        if p is None:
            continue
        t = reconciled[p][name]
        if parents[p][0][name].shape != t.shape:
            t = t.mul(shrink).add_(init[name], alpha=1.0 - shrink)
            perturbed.add(name)
        out[name] = t
    return out, perturbed


def inherit_norm_eps(norm_eps: list[dict[str, float]], configs: list[InternLM2Config], new: InternLM2Config,
                     sources: dict[str, int | None]) -> dict[str, float]:
    """Each norm's eps for the child of `inherit_weights`: its unit's parent's, carried by
    `transfer_norm_eps` (norms of new layers are not listed)."""
    carried = [transfer_norm_eps(eps, cfg, new) for eps, cfg in zip(norm_eps, configs)]
    return {name: carried[p][name] for name in carried[0].keys() | carried[-1].keys()
            if (p := sources.get(unit_of(name))) is not None and name in carried[p]}


def transfer_norm_eps(norm_eps: dict[str, float], old: InternLM2Config, new: InternLM2Config) -> dict[str, float]:
    """Each carried norm's eps (by module name) for ``new``: eps * d/d' when the width grows from
    d to d', as is otherwise. Norms of new layers are not listed (they take ``new.rms_norm_eps``)."""
    layers = new.num_hidden_layers
    scale = old.hidden_size / new.hidden_size if new.hidden_size > old.hidden_size else 1.0
    return {name: eps * scale for name, eps in norm_eps.items()
            if not name.startswith("model.layers.") or int(name.split(".")[2]) < layers}


def preserves_function(old: InternLM2Config, new: InternLM2Config) -> bool:
    """Whether moving ``old``'s weights to ``new`` keeps the function exactly (every shape gene
    grows or stays, head_dim stays, every old kv group keeps all its query heads); otherwise the
    change is lossy (shrinking, merging kv groups, a new head_dim)."""
    kv_old, kv_new = old.num_key_value_heads, new.num_key_value_heads
    g_old, g_new = old.num_attention_heads // kv_old, new.num_attention_heads // kv_new
    same = {f: getattr(new, f) for f in ("vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling", "bias")}
    return (same == {f: getattr(old, f) for f in same} and new.head_dim == old.head_dim
            and all(getattr(new, f) >= getattr(old, f) for f in
                    ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"))
            and kv_new >= kv_old and (kv_new % kv_old == 0 or g_new >= g_old))


def _norm_scale(old: InternLM2Config, new: InternLM2Config) -> float:
    return math.sqrt(old.hidden_size / new.hidden_size)


def _carry(src: Tensor, dst: Tensor, name: str, old: InternLM2Config, new: InternLM2Config) -> None:
    if ".attention.wqkv." in name:
        _copy_wqkv(src, dst, old, new)
    elif name.endswith(".attention.wo.weight"):
        _copy_wo(src, dst, old, new)
    else:
        _copy_overlap(src, dst)


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


def head_map(old: InternLM2Config, new: InternLM2Config) -> tuple[list[list[int]], list[list[int | None]]]:
    """(kv_src, q_src): for each new kv group g', the old kv groups whose k/v it takes (their mean;
    [] for a fresh group), and for each of its G' query slots the old query head it takes
    (h = g*G + j) or None (a fresh head, silent through zero wo columns)."""
    kv_old, kv_new = old.num_key_value_heads, new.num_key_value_heads
    g_old, g_new = old.num_attention_heads // kv_old, new.num_attention_heads // kv_new
    if kv_new % kv_old == 0:                           # split: each old group into m new ones
        m = kv_new // kv_old
        kv_src = [[c // m] for c in range(kv_new)]
        chunk = -(-g_old // m)                         # its q heads, in order, `chunk` per child
        heads = [[g * g_old + j for j in range(g_old) if j // chunk == c % m] for g, c in
                 ((c // m, c) for c in range(kv_new))]
    elif kv_old % kv_new == 0:                         # merge: m old groups into one
        m = kv_old // kv_new
        kv_src = [list(range(c * m, c * m + m)) for c in range(kv_new)]
        heads = [[g * g_old + j for g in src for j in range(g_old)] for src in kv_src]
    else:                                              # neither: group by group, as far as they overlap
        kv_src = [[c] if c < kv_old else [] for c in range(kv_new)]
        heads = [[c * g_old + j for j in range(g_old)] if c < kv_old else [] for c in range(kv_new)]
    q_src = [(h[:g_new] + [None] * g_new)[:g_new] for h in heads]
    return kv_src, q_src


def _copy_wqkv(src: Tensor, dst: Tensor, old: InternLM2Config, new: InternLM2Config) -> None:
    """wqkv weight [(H + 2 KV) D, hidden] or bias [(H + 2 KV) D], head by head (`head_map`)."""
    g_old = old.num_attention_heads // old.num_key_value_heads
    g_new = new.num_attention_heads // new.num_key_value_heads
    s = src.reshape(old.num_key_value_heads, g_old + 2, old.head_dim, *src.shape[1:])   # (KV, G+2, D[, hidden])
    d = dst.view(new.num_key_value_heads, g_new + 2, new.head_dim, *dst.shape[1:])
    cols = tuple(slice(0, min(a, b)) for a, b in zip(src.shape[1:], dst.shape[1:]))
    kv_src, q_src = head_map(old, new)
    q = _head_dims(old.head_dim, new.head_dim, True)
    for c, (groups, slots) in enumerate(zip(kv_src, q_src)):
        for slot, h in enumerate(slots):
            if h is not None:
                for hs, hd in q:
                    d[(c, slot, hd) + cols] = s[(h // g_old, h % g_old, hs) + cols]
        if groups:
            for r_src, r_dst, rotary in ((g_old, g_new, True), (g_old + 1, g_new + 1, False)):   # k, v
                for hs, hd in _head_dims(old.head_dim, new.head_dim, rotary):
                    d[(c, r_dst, hd) + cols] = s[(groups, r_src, hs) + cols].mean(0)


def _copy_wo(src: Tensor, dst: Tensor, old: InternLM2Config, new: InternLM2Config) -> None:
    """wo weight [hidden, H D]; its input columns follow the attention heads h = g*G + j."""
    g_old = old.num_attention_heads // old.num_key_value_heads
    g_new = new.num_attention_heads // new.num_key_value_heads
    s = src.reshape(src.shape[0], old.num_key_value_heads, g_old, old.head_dim)   # (hidden, KV, G, D)
    d = dst.view(dst.shape[0], new.num_key_value_heads, g_new, new.head_dim)
    rows = slice(0, min(src.shape[0], dst.shape[0]))
    m = min(old.head_dim, new.head_dim)
    for c, slots in enumerate(head_map(old, new)[1]):
        for slot, h in enumerate(slots):
            if h is not None:
                d[rows, c, slot, :m] = s[rows, h // g_old, h % g_old, :m]

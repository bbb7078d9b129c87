"""InternLM2 decoder (the model every population member trains), in plain PyTorch.

The architecture and the state-dict keys are exactly Hugging Face InternLM2's
(InternLM/InternEvo `huggingface_model/internlm2_model/`), so a checkpoint exports with a
rename-free dump (trainers/export.py) and weight transfer (trainers/transfer.py) can reason about
the same tensors a released model has:

    model.tok_embeddings.weight                       (vocab, C)
    model.layers.{i}.attention_norm.weight            (C,)
    model.layers.{i}.attention.wqkv.weight            ((H + 2*KV) * D, C)   packed per kv group
    model.layers.{i}.attention.wo.weight              (C, H * D)
    model.layers.{i}.ffn_norm.weight                  (C,)
    model.layers.{i}.feed_forward.w1|w3.weight        (F, C)                gate | up
    model.layers.{i}.feed_forward.w2.weight           (C, F)                down
    model.norm.weight                                 (C,)
    output.weight                                     (vocab, C)            untied

`wqkv` rows, viewed as (KV, G + 2, D, C) with G = H // KV, hold for each kv group g its G query
heads, then its key head, then its value head: with H=4, KV=2 the row blocks are
[q0, q1, k0, v0, q2, q3, k1, v1].

Written for speed on CPU, where every population member trains (bench/trainer_speed.py compares
it with transformers' Llama):
- the wqkv rows are gathered (a weight-sized copy per step) into a compute order [q | k | v] with
  each RoPE pair (i, i + D/2) side by side, so RoPE for q and k is one contiguous complex multiply
  with a cached table and needs no rotate_half copies (dot products q.k do not care about the
  order of head dims as long as q and k share it);
- causal attention is `scaled_dot_product_attention(is_causal=True, enable_gqa=True)` on strided
  views: the CPU flash kernel, with no repeated k/v (enable_gqa measured ~10% faster than
  repeat_interleave for the attention on CPU);
- RMSNorm has a hand-written backward (autograd's replays ~12 kernels on CPU);
- in fp32 on CPU each decoder layer is one autograd Function (_DecoderLayerFn) with a
  hand-written backward: on the tiny default model the per-op and per-node overhead of Python
  and autograd costs more than most of the arithmetic, so the layer is one node instead of about
  fifteen (attention stays `scaled_dot_product_attention`, on a graph local to the layer). It
  works in buffers kept across steps (fresh activation-sized tensors cost page faults on the CPU
  machines: glibc hands freed memory back to the kernel every step, see _BufferPool): RoPE is
  applied in place, q, k, v are views of one buffer and their gradients are written into one,
  each norm's weight is folded into the matrix after it (a weight-sized product instead of a pass
  over the activations), and the residual adds are addmm's. The final norm is fused with the
  output head (_NormLinearFn). Autocast, torch.compile and GPUs take the plain modules (RMSNorm,
  F.linear, F.silu).
Under torch.compile RoPE switches to real arithmetic on a [cos, sin] table (inductor generates no
code for complex tensors), so the whole model compiles.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from trainers import kernels


class ConfigError(ValueError):
    """An impossible model configuration; the message is one line naming the fields."""


_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
)
_ROPE_TYPES = ("linear", "dynamic")


@dataclass
class InternLM2Config:
    """InternLM2 architecture; field names (and their meaning) as in HF `InternLM2Config`."""

    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 172
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"type": "linear" | "dynamic", "factor": float >= 1}
    bias: bool = False  # biases on wqkv / wo (as HF InternLM2's `bias`)
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"model: {name} ({value!r}) must be an integer")
            if value <= 0:
                raise ConfigError(f"model: {name} ({value}) must be positive")
        for name in ("rms_norm_eps", "rope_theta", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"model: {name} ({value!r}) must be a finite number")
            setattr(self, name, float(value))
        if self.rms_norm_eps <= 0:
            raise ConfigError(f"model: rms_norm_eps ({self.rms_norm_eps}) must be positive")
        if self.rope_theta <= 1:
            raise ConfigError(f"model: rope_theta ({self.rope_theta}) must be greater than 1")
        if self.initializer_range < 0:
            raise ConfigError(f"model: initializer_range ({self.initializer_range}) must be non-negative")
        if not isinstance(self.bias, bool):
            raise ConfigError(f"model: bias ({self.bias!r}) must be true or false")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model: hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"model: num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"model: head_dim = hidden_size / num_attention_heads "
                f"({self.hidden_size} / {self.num_attention_heads} = {self.head_dim}) must be even for RoPE"
            )
        self.rope_scaling = _check_rope_scaling(self.rope_scaling)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InternLM2Config:
        """Build from a plain mapping (YAML `model:` section); unknown keys are refused."""
        names = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in names:
                raise ConfigError(f"model: unknown field {key!r} (known: {', '.join(sorted(names))})")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-friendly values; `from_dict(to_dict())` gives an equal config."""
        return dataclasses.asdict(self)


def _check_rope_scaling(rope_scaling: Any) -> dict | None:
    """Validate HF InternLM2's `rope_scaling` ({"type", "factor"}); returns a fresh dict."""
    if rope_scaling is None:
        return None
    if not isinstance(rope_scaling, Mapping):
        raise ConfigError(f"model: rope_scaling ({rope_scaling!r}) must be null or a mapping with type and factor")
    extra = sorted(set(rope_scaling) - {"type", "factor"})
    if extra:
        raise ConfigError(f"model: rope_scaling has unknown key {extra[0]!r} (expected type and factor)")
    kind, factor = rope_scaling.get("type"), rope_scaling.get("factor")
    if kind not in _ROPE_TYPES:
        raise ConfigError(f"model: rope_scaling.type ({kind!r}) must be 'linear' or 'dynamic'")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 1.0 or math.isinf(factor):
        raise ConfigError(f"model: rope_scaling.factor ({factor!r}) must be a finite number >= 1")
    return {"type": kind, "factor": float(factor)}


# ------------------------------------------------------------------------------------------------
# building blocks


class Linear(nn.Module):
    """y = x W^T (+ b), like nn.Linear but created uninitialised: nn.Linear's constructor draws
    from the global RNG (and skip_init's meta-device route imports torch._dynamo, ~2 s), while
    every weight here is set once, from an explicit generator, by InternLM2ForCausalLM."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


_EPS: dict[tuple, torch.Tensor] = {}  # eps as 0-dim tensors, per (eps, dtype, device)


def _rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    """(..., 1) = 1 / sqrt(mean(x^2) + eps) over the last dim, from the L2 norm: one reduction
    kernel over x, then eps + norm^2 / C as one addcmul (three ops: each op on these small
    tensors costs more in dispatch than in arithmetic)."""
    key = (eps, x.dtype, x.device)
    eps_t = _EPS.get(key)
    if eps_t is None:
        eps_t = _EPS[key] = torch.tensor(eps, dtype=x.dtype, device=x.device)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return torch.addcmul(eps_t, norm, norm, value=1.0 / x.shape[-1]).rsqrt_()


class _RMSNormFn(torch.autograd.Function):
    """y = x * rsqrt(mean(x^2) + eps) * w with statistics in fp32 and a hand-written backward.

    On CPU `F.rms_norm` only fuses the forward; under autograd it records pow/mean/add/rsqrt/mul/mul
    and replays ~12 kernels backward. Here the forward is one reduction and two multiplies over
    the activations, the backward two reductions and three elementwise passes.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in (at least) fp32
        rstd = _rstd(xf, eps)
        xhat = (xf * rstd).to(x.dtype)  # (..., C)
        ctx.save_for_backward(xhat, weight, rstd)
        return xhat * weight

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        xhat, weight, rstd = ctx.saved_tensors
        C = xhat.shape[-1]
        gw = torch.linalg.vecdot(g.reshape(-1, C).t(), xhat.reshape(-1, C).t())  # (C,) = sum over rows of g*xhat
        f32 = torch.promote_types(xhat.dtype, torch.float32)
        gxhat = (g * weight).to(f32)  # (..., C), a fresh tensor
        xhat_f = xhat.to(f32)
        dot = torch.linalg.vecdot(gxhat, xhat_f).unsqueeze_(-1).div_(C)  # (..., 1) = mean(gxhat * xhat)
        # dx = rstd * (gxhat - xhat * mean(gxhat * xhat)); two-operand ops only: a ternary op with a
        # broadcast (..., 1) operand (addcmul) takes ATen's slow non-vectorised path on CPU
        gx = gxhat.sub_(xhat_f * dot).mul_(rstd)
        return gx.to(g.dtype), gw.to(weight.dtype), None


class RMSNorm(nn.Module):
    """RMSNorm with statistics in fp32 (cast back to the input dtype), as InternLM2RMSNorm."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFn.apply(x, self.weight, self.eps)  # (B, T, C) -> (B, T, C)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE as HF InternLM2 builds it (default, linear or dynamic NTK), as a complex table.

    HF rotates the pairs (i, i + D/2) of each head: out_i = x_i cos - x_{i+D/2} sin and
    out_{i+D/2} = x_{i+D/2} cos + x_i sin, with angle t * inv_freq_i. That is the complex product
    (x_i + j x_{i+D/2}) * e^{j angle}, so once Attention stores each pair next to each other
    (see `qkv_compute_order`) RoPE is one contiguous complex multiply for q and k together.

    `inv_freq` is a non-persistent buffer (not in the state dict), as in InternLM2. Tables are
    cached per (seq_len, device): training uses one length, so they are built once. Dynamic NTK
    scaling is a pure function of the sequence length here (HF InternLM2 keeps its grown table
    after a long call; for a single forward both agree).
    """

    def __init__(self, config: InternLM2Config) -> None:
        super().__init__()
        self.dim = config.head_dim
        self.rotated_heads = config.num_attention_heads + config.num_key_value_heads  # q and k heads
        self.base = config.rope_theta
        self.max_position_embeddings = config.max_position_embeddings
        scaling = config.rope_scaling or {"type": None, "factor": 1.0}
        self.scaling_type, self.scaling_factor = scaling["type"], scaling["factor"]
        self.register_buffer("inv_freq", self._inv_freq(self.base), persistent=False)
        self._cache: dict[tuple, torch.Tensor] = {}
        self._conj: dict[tuple, torch.Tensor] = {}

    def _inv_freq(self, base: float, device: torch.device | None = None) -> torch.Tensor:
        # (D/2,) in fp32, as InternLM2: 1 / base^(2i/D)
        return 1.0 / (base ** (torch.arange(0, self.dim, 2, device=device).float() / self.dim))

    def angles(self, seq_len: int, device: torch.device | None = None) -> torch.Tensor:
        """(T, D/2) rotation angles t * inv_freq, with InternLM2's linear / dynamic NTK scaling."""
        inv_freq = self.inv_freq.to(device=device, dtype=torch.float32)
        t = torch.arange(seq_len, device=device, dtype=torch.float32)  # (T,)
        if self.scaling_type == "linear":
            t = t / self.scaling_factor
        elif self.scaling_type == "dynamic" and seq_len > self.max_position_embeddings:
            f = self.scaling_factor
            base = self.base * ((f * seq_len / self.max_position_embeddings) - (f - 1)) ** (self.dim / (self.dim - 2))
            inv_freq = self._inv_freq(base, device)
        return torch.outer(t, inv_freq)  # (T, D/2)

    def forward(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """complex64 (T, (H + KV) * D/2): e^{j angle} for every rotated pair of every q and k head.

        While torch.compile traces, a real (T, (H + KV) * D/2, 2) table of [cos, sin] instead, built
        in the graph (no cache): inductor generates no code for complex tensors, so the complex
        product would run as a separate eager kernel, while the real form fuses with its neighbours.
        """
        if torch.compiler.is_compiling():
            freqs = self.angles(seq_len, device).repeat(1, self.rotated_heads)  # (T, (H+KV)*D/2)
            return torch.stack((freqs.cos(), freqs.sin()), dim=-1)
        key = (seq_len, device)
        table = self._cache.get(key)
        if table is None:
            freqs = self.angles(seq_len, device)  # (T, D/2)
            cis = torch.complex(freqs.cos(), freqs.sin())  # cos/sin in fp32, as HF's tables
            # repeat over the q and k heads so the multiply has no broadcast (long contiguous runs)
            table = cis.repeat(1, self.rotated_heads)  # (T, (H + KV) * D/2)
            if len(self._cache) >= 8:  # a handful of lengths at most (train, eval, generation)
                self._cache.clear()
                self._conj.clear()
            self._cache[key] = table
        return table

    def conjugate(self, table: torch.Tensor) -> torch.Tensor:
        """The conjugate of a complex table from forward (rotation by -angle: RoPE's backward), cached with it."""
        key = (table.shape[0], table.device)
        conj = self._conj.get(key)
        if conj is None or self._cache.get(key) is not table:
            conj = self._conj[key] = torch.conj_physical(table)
        return conj


def qkv_compute_order(n_head: int, n_kv: int, head_dim: int) -> torch.Tensor:
    """Row order of `wqkv` that the forward computes in: [q heads | k heads | v heads].

    HF's rows are grouped per kv head g: [q_{gG}, .., q_{gG+G-1}, k_g, v_g] (G = H / KV). Within
    each q and k head, dims i and i + D/2 (a RoPE pair) are placed side by side. Scores q.k are
    sums over the head dim, so permuting q's and k's dims alike changes nothing but speed.
    Returns index (H + 2 KV) * D: computed row r is HF row order[r].
    """
    G, D = n_head // n_kv, head_dim
    pairs = torch.stack((torch.arange(D // 2), torch.arange(D // 2) + D // 2), dim=1).flatten()  # 0, D/2, 1, ..

    def hf_rows(group: int, slot: int, dims: torch.Tensor) -> torch.Tensor:
        return (group * (G + 2) + slot) * D + dims  # slot < G: query, G: key, G + 1: value

    q = [hf_rows(h // G, h % G, pairs) for h in range(n_head)]  # query head h = g * G + j
    k = [hf_rows(g, G, pairs) for g in range(n_kv)]
    v = [hf_rows(g, G + 1, torch.arange(D)) for g in range(n_kv)]
    return torch.cat(q + k + v)


def apply_rope(pairs: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate (..., n, 2) pairs (x_i, x_{i+D/2}) by a RotaryEmbedding table: one complex multiply
    with a complex (T, n) table (eager), or the same product written out in real arithmetic with a
    real (T, n, 2) [cos, sin] table (under torch.compile, where inductor fuses it)."""
    if table.is_complex():
        return torch.view_as_real(torch.view_as_complex(pairs) * table)
    x0, x1 = pairs.unbind(-1)
    cos, sin = table.unbind(-1)
    return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)


class Attention(nn.Module):
    """Causal grouped-query attention with InternLM2's packed `wqkv`."""

    def __init__(self, config: InternLM2Config) -> None:
        super().__init__()
        self.n_head = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        qkv_out = (self.n_head + 2 * self.n_kv) * self.head_dim
        self.wqkv = Linear(config.hidden_size, qkv_out, bias=config.bias)
        self.wo = Linear(self.n_head * self.head_dim, config.hidden_size, bias=config.bias)
        order = qkv_compute_order(self.n_head, self.n_kv, self.head_dim)
        self.register_buffer("qkv_order", order, persistent=False)
        self.register_buffer("qkv_inverse", torch.argsort(order), persistent=False)  # compute row -> HF row

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """attention(x): (B, T, C) -> (B, T, C) (in fp32 on CPU the whole layer runs as _DecoderLayerFn)."""
        B, T, C = x.shape
        H, KV, D = self.n_head, self.n_kv, self.head_dim
        # the weight rows gathered into compute order (a (H+2KV)*D x C copy; its backward scatters)
        w = self.wqkv.weight.index_select(0, self.qkv_order)
        b = None if self.wqkv.bias is None else self.wqkv.bias.index_select(0, self.qkv_order)
        qkv = F.linear(x, w, b)  # (B, T, (H + 2KV) * D)
        # qkv = [q | k | v], RoPE pairs adjacent
        qk, v = qkv.split(((H + KV) * D, KV * D), dim=-1)
        # RoPE on q and k at once, in fp32: (B, T, (H+KV)*D/2) complex * (T, (H+KV)*D/2)
        qk = apply_rope(qk.float().unflatten(-1, (-1, 2)), rope)  # (B, T, (H+KV)*D/2, 2): pairs (re, im)
        q, k = qk.to(qkv.dtype).view(B, T, H + KV, D).split((H, KV), dim=2)
        y = _attend(q.transpose(1, 2), k.transpose(1, 2), v.view(B, T, KV, D).transpose(1, 2))
        return self.wo(y.transpose(1, 2).reshape(B, T, H * D))  # (B, T, C)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of q (B, H, T, D) over k, v (B, KV, T, D): (B, H, T, D).

    The inputs are transposed views of (B, T, heads, D) memory, which suits the CPU flash kernel
    (it lays its output out as (B, T, H, D), so the transpose back is free). enable_gqa lets each
    kv head serve its G query heads without materialising repeated k/v (measured faster on CPU
    than repeat_interleave)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def _fp32_cpu(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether the hand-written CPU paths apply: fp32 on CPU, outside autocast and torch.compile
    (GPUs and compiled graphs fuse the plain ops themselves; autocast needs its own casts)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and all(w.dtype == torch.float32 for w in weights)
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def _graph_kept(*inputs: torch.Tensor) -> bool:
    """Whether autograd will keep a graph through a Function of these inputs (its buffers must then
    live until the backward; otherwise they go straight back to the pool)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in inputs)


class _BufferPool:
    """Free activation buffers of one module's hand-written autograd Function, kept from one
    training step to the next.

    On this project's CPU machines a fresh tensor of a few MB costs more than the arithmetic
    done in it: glibc returns the freed activations of every step to the kernel (its heap trim)
    and each new buffer is paid again in page faults. Measured on the 2.9M-parameter benchmark
    model (16x128 tokens, F = 684, a 5.6 MB buffer): an elementwise multiply into a fresh tensor
    took ~5 ms inside a training step, the same multiply in place 0.36 ms. A buffer is taken by
    a forward and given back by its backward (or at once when no graph is kept), so a forward
    that runs while another's graph is alive simply allocates. Between steps a pool holds what
    its Function needs for one step (one set per batch shape seen, e.g. train and eval): memory
    autograd allocates at every step's peak anyway (profiled with torch.profiler, 1 thread).
    """

    def __init__(self) -> None:
        self._free: dict[tuple, list[torch.Tensor]] = {}

    def take(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        free = self._free.get((shape, like.dtype, like.device))
        return free.pop() if free else torch.empty(shape, dtype=like.dtype, device=like.device)

    def give(self, *buffers: torch.Tensor) -> None:
        for t in buffers:
            free = self._free.setdefault((tuple(t.shape), t.dtype, t.device), [])
            if len(free) < 8:  # more only if forwards overlap; let the rest go
                free.append(t)


def _xhat_into(x2: torch.Tensor, eps: float, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """xhat = x * rsqrt(mean(x^2) + eps) for fp32 rows x2 (N, C), written into `out`; returns
    (xhat, rstd (N, 1)). The norm's weight is not applied: the fused Functions fold it into the
    matrix that follows (n W^T = xhat (W diag(norm_w))^T), a weight-sized product instead of a
    pass over the activations, and likewise for its gradient."""
    if kernels.usable(x2, out):  # one pass per row (trainers/kernels.py)
        rstd = torch.empty((x2.shape[0], 1), dtype=x2.dtype)
        kernels.rms_fwd(x2, out, rstd, eps)
        return out, rstd
    rstd = _rstd(x2, eps)
    return torch.mul(x2, rstd, out=out), rstd


def _xhat_backward_(gxhat: torch.Tensor, xhat: torch.Tensor, rstd: torch.Tensor, tmp: torch.Tensor,
                    residual: torch.Tensor | None = None) -> torch.Tensor:
    """The gradient of x from that of xhat (N, C), in place in gxhat, plus `residual` (N, C) when
    given; `tmp` (N, C) is scratch: dx = rstd * (gxhat - xhat * mean(gxhat * xhat)). Without the
    compiled kernels, two-operand passes only: a ternary op with a broadcast (N, 1) operand
    (addcmul) takes ATen's slow non-vectorised path on CPU."""
    if kernels.usable(gxhat, xhat, rstd) and (residual is None or kernels.usable(residual)):
        kernels.rms_bwd(gxhat, xhat, rstd, residual)  # one pass per row (trainers/kernels.py)
        return gxhat
    m = torch.mul(gxhat, xhat, out=tmp).sum(-1, keepdim=True)  # (N, 1): C * mean(gxhat * xhat)
    gx = gxhat.sub_(torch.mul(xhat, m, out=tmp), alpha=1.0 / xhat.shape[-1]).mul_(rstd)
    return gx if residual is None else gx.add_(residual)


def _folded(w: torch.Tensor, norm_w: torch.Tensor) -> torch.Tensor:
    """W diag(norm_w): a (out, C) projection with the preceding norm's weight folded in."""
    return w * norm_w


def _unfold_grads(gwf: torch.Tensor, w: torch.Tensor, norm_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of W and of norm_w from that of W diag(norm_w) (gwf, (out, C), scaled in place)."""
    gnorm_w = torch.linalg.vecdot(gwf.t(), w.t())  # (C,): sum over rows of gwf * W (weight-sized)
    return gwf.mul_(norm_w), gnorm_w


class _NormLinearFn(torch.autograd.Function):
    """n @ w^T with n = RMSNorm(x) * norm_w, on CPU: the final norm and the output head.

    xhat (saved for the weight gradient and the norm's backward) lives in a pooled buffer (see
    _BufferPool), the norm weight is folded into w (_folded), and the norm's backward runs in
    place in the gradient of xhat: three fresh (N, C) tensors and two passes over them fewer per
    step than _RMSNormFn followed by F.linear.
    """

    @staticmethod
    def forward(ctx, x, norm_w, eps: float, w, pool: _BufferPool, keep: bool):
        x2 = x.reshape(-1, x.shape[-1])  # (N, C)
        xhat, rstd = _xhat_into(x2, eps, pool.take(tuple(x2.shape), x2))
        wf = _folded(w, norm_w)  # (out, C)
        y = torch.mm(xhat, wf.t())  # (N, out)
        if keep:
            ctx.save_for_backward(rstd, w, norm_w, wf)
            ctx.buffers, ctx.pool = xhat, pool
        else:
            pool.give(xhat)
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        if ctx.buffers is None:
            raise RuntimeError("a norm + projection CPU backward ran twice (retain_graph): its buffers are gone")
        rstd, w, norm_w, wf = ctx.saved_tensors
        xhat, pool = ctx.buffers, ctx.pool
        ctx.buffers = None
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        gw, gnorm_w = _unfold_grads(torch.mm(g2.t(), xhat), w, norm_w)  # (out, C), (C,)
        tmp = pool.take(tuple(xhat.shape), xhat)
        gx = _xhat_backward_(torch.mm(g2, wf), xhat, rstd, tmp)  # (N, C), a fresh tensor
        pool.give(xhat, tmp)
        return gx.view(*g.shape[:-1], xhat.shape[-1]), gnorm_w, None, gw, None, None


class _DecoderLayerFn(torch.autograd.Function):
    """A whole pre-norm decoder layer in fp32 on CPU, by hand, as one autograd Function:

        h = x + wo(attention(rope(wqkv(RMSNorm(x) * attention_norm_w))))
        out = h + w2(silu(w1 n) * w3 n),   n = RMSNorm(h) * ffn_norm_w

    One node per layer in autograd's graph instead of about fifteen (the views, transposes and
    addmm around attention, two Functions, their residual branches): on the tiny default model the
    per-op and per-node overhead of Python and autograd, not arithmetic, is what separated the
    step from the kernels it runs. Attention itself stays `F.scaled_dot_product_attention` on
    views of q, k and v made leaves of a graph local to this layer; the backward asks autograd
    for their gradients (torch.autograd.grad on that small graph).

    - Norms: statistics in fp32, the weight folded into the matrix after it (_folded), the
      backward in place in the gradient of xhat (_xhat_backward_).
    - Attention input: wqkv's rows gathered into compute order ([q | k | v], RoPE pairs side by
      side, see qkv_compute_order) and RoPE applied in place as one complex multiply; q, k, v are
      views of that one buffer, and their gradients, rotated back, are written into it.
    - SwiGLU: sigmoid(a) is kept from the forward (the one expensive elementwise kernel); every
      gradient is computed in the forward's buffers.
    - Residual adds are the output projections' addmm's; the residual gradients are added in place.

    Where the compiled kernels of trainers/kernels.py are available, each norm (forward; backward
    with its residual add) and the SwiGLU elementwise work (forward; backward) is one loop over
    the data instead of a chain of ATen ops (measured: 1.2% of the tiny default model's step at 2
    threads, 3.5% at 1 thread); otherwise the ATen ops below run.

    Activations live in buffers of the layer's pool (_BufferPool) from the forward to the end of
    the backward. Backward only once: the buffers are overwritten by it.
    """

    @staticmethod
    def forward(ctx, x, attn_norm_w, wqkv, wo, ffn_norm_w, w1, w3, w2, layer: "DecoderLayer",
                ropes: tuple[torch.Tensor, torch.Tensor], keep: bool):
        B, T, C = x.shape
        rope = ropes[0]  # and ropes[1], its conjugate (the backward's rotation by -angle)
        attention, pool = layer.attention, layer._pool
        H, KV, D = attention.n_head, attention.n_kv, attention.head_dim
        x2 = x.reshape(-1, C)  # (N, C)
        N, Fd = x2.shape[0], w1.shape[0]
        # attention input: RMSNorm (weight folded), projection in compute order, RoPE in place
        xhat1, rstd1 = _xhat_into(x2, layer.attention_norm.eps, pool.take((N, C), x2))
        w = wqkv.index_select(0, attention.qkv_order)  # (R, C) rows in compute order
        wf = _folded(w, attn_norm_w)
        qkv = torch.mm(xhat1, wf.t(), out=pool.take((N, (H + 2 * KV) * D), x2))  # (N, R)
        # (B, T, (H+KV)*D/2) complex * (T, (H+KV)*D/2)
        torch.view_as_complex(qkv.view(B, T, -1)[..., :(H + KV) * D].unflatten(-1, (-1, 2))).mul_(rope)
        with torch.set_grad_enabled(keep):  # a graph local to the layer: the qkv leaf, its views, SDPA
            q, k, v = (qkv.detach().requires_grad_() if keep else qkv).view(B, T, H + 2 * KV, D).transpose(1, 2).split(
                (H, KV, KV), dim=1)  # (B, heads, T, D)
            y = _attend(q, k, v)  # (B, H, T, D) over (B, T, H, D) memory
        y2 = y.transpose(1, 2).reshape(N, H * D)  # a view (no graph: grad mode is off again)
        h1 = torch.addmm(x2, y2, wo.t(), out=pool.take((N, C), x2))  # x + attention
        # SwiGLU block
        xhat2, rstd2 = _xhat_into(h1, layer.ffn_norm.eps, pool.take((N, C), x2))
        w1f, w3f = _folded(w1, ffn_norm_w), _folded(w3, ffn_norm_w)  # (F, C)
        a = torch.mm(xhat2, w1f.t(), out=pool.take((N, Fd), x2))  # (N, F) gate
        b = torch.mm(xhat2, w3f.t(), out=pool.take((N, Fd), x2))  # (N, F) up
        # silu(a) = a * sigmoid(a), with sigmoid(a) kept for the backward: sigmoid is the one
        # expensive elementwise kernel here (an exp per element), so it runs once per step
        sig, h = pool.take((N, Fd), x2), pool.take((N, Fd), x2)
        if kernels.usable(a, b, sig, h):
            kernels.swiglu_fwd(a, b, sig, h)  # one pass (trainers/kernels.py)
            s = a  # silu(a), in a's buffer
        else:
            torch.sigmoid(a, out=sig)
            s = a.mul_(sig)
            torch.mul(s, b, out=h)
        out = torch.addmm(h1, h, w2.t())  # h1 + h w2^T: the layer's output, a fresh tensor
        pool.give(h1)
        if keep:
            ctx.save_for_backward(rstd1, attn_norm_w, w, wf, wo, rstd2, ffn_norm_w, w1, w3, w2, w1f, w3f)
            ctx.buffers = (xhat1, qkv, xhat2, s, b, h, sig)
            ctx.sdpa, ctx.layer, ctx.rope_back = (y, q, k, v, y2), layer, ropes[1]
        else:
            pool.give(xhat1, qkv, xhat2, s, b, h, sig)
        return out.view(B, T, C)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        if ctx.buffers is None:
            raise RuntimeError("a decoder layer's CPU backward ran twice (retain_graph): its buffers are gone")
        rstd1, attn_norm_w, w, wf, wo, rstd2, ffn_norm_w, w1, w3, w2, w1f, w3f = ctx.saved_tensors
        xhat1, qkv, xhat2, s, b, h, sig = ctx.buffers
        y, q, k, v, y2 = ctx.sdpa
        layer = ctx.layer
        ctx.buffers = ctx.sdpa = None
        pool, attention = layer._pool, layer.attention
        H, KV, D = attention.n_head, attention.n_kv, attention.head_dim
        B, T, C = g.shape
        N = B * T
        g2 = g.reshape(N, C)
        # SwiGLU block, in its forward's buffers
        gw2 = torch.mm(g2.t(), h)  # (C, F); h is free after this
        gh = torch.mm(g2, w2, out=h)  # (N, F) grad of h, in h's buffer
        if kernels.usable(gh, s, sig, b):
            kernels.swiglu_bwd(gh, s, sig, b)  # one pass (trainers/kernels.py)
            ga, gb = b, gh
        else:
            gs = b.mul_(gh)  # b * gh: the grad of silu(a), in b's buffer
            gb = gh.mul_(s)  # grad of b = gh * silu(a), in h's buffer
            ds = s.addcmul_(s, sig, value=-1.0).add_(sig)  # silu'(a) = sig + silu(a) * (1 - sig), in a's buffer
            ga = gs.mul_(ds)  # grad of a, in b's buffer
        gw1, gnw1 = _unfold_grads(torch.mm(ga.t(), xhat2), w1, ffn_norm_w)
        gw3, gnw3 = _unfold_grads(torch.mm(gb.t(), xhat2), w3, ffn_norm_w)
        gxhat2 = torch.mm(ga, w1f).addmm_(gb, w3f)  # (N, C) grad of xhat2, a fresh tensor
        tmp = pool.take((N, C), xhat2)
        gh1 = _xhat_backward_(gxhat2, xhat2, rstd2, tmp, g2)  # grad of h1: norm path + residual
        # output projection and attention
        gwo = torch.mm(gh1.t(), y2)  # (C, H*D)
        gy = torch.mm(gh1, wo).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        gq, gk, gv = torch.autograd.grad(y, (q, k, v), gy)  # (B, heads, T, D)
        # the gradient of [q | k | v] before RoPE, in the forward's q/k/v buffer (free now: SDPA's
        # backward, the only reader of q, k and v, has run)
        g4 = qkv.view(B, T, H + 2 * KV, D)
        rope_back = ctx.rope_back.view(T, H + KV, D // 2)  # rotation by -angle
        for grad, heads in ((gq, slice(0, H)), (gk, slice(H, H + KV))):
            grad = grad.transpose(1, 2)  # (B, T, heads, D)
            if grad.stride(-1) != 1:
                grad = grad.contiguous()
            torch.mul(torch.view_as_complex(grad.unflatten(-1, (-1, 2))), rope_back[:, heads],
                      out=torch.view_as_complex(g4[:, :, heads].unflatten(-1, (-1, 2))))
        g4[:, :, H + KV:].copy_(gv.transpose(1, 2))
        gqkv = qkv.view(N, -1)  # (N, R)
        gw, gattn_norm_w = _unfold_grads(torch.mm(gqkv.t(), xhat1), w, attn_norm_w)  # in compute order
        gwqkv = gw.index_select(0, attention.qkv_inverse)  # back to HF's row order
        gx = _xhat_backward_(torch.mm(gqkv, wf), xhat1, rstd1, tmp, gh1)  # norm path + residual
        pool.give(xhat1, qkv, xhat2, s, b, h, sig, tmp)
        return gx.view(B, T, C), gattn_norm_w, gwqkv, gwo, gnw1.add_(gnw3), gw1, gw3, gw2, None, None, None


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x).

    w1 and w3 stay two matmuls: one fused (2F, C) matmul measured slower on CPU below hidden 256.
    """

    def __init__(self, config: InternLM2Config) -> None:
        super().__init__()
        C, Fd = config.hidden_size, config.intermediate_size
        self.w1 = Linear(C, Fd)  # gate
        self.w3 = Linear(C, Fd)  # up
        self.w2 = Linear(Fd, C)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (B, T, C) -> (B, T, F) -> (B, T, C)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)).

    In fp32 on CPU, outside autocast and torch.compile and without biases, the layer runs as
    _DecoderLayerFn (see InternLM2Model.unnormed); otherwise as these modules."""

    def __init__(self, config: InternLM2Config) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = FeedForward(config)
        self._pool = _BufferPool()  # _DecoderLayerFn's buffers

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rope)
        return x + self.feed_forward(self.ffn_norm(x))

    def fused_weights(self) -> tuple[torch.Tensor, ...] | None:
        """The parameters _DecoderLayerFn takes, in its order; None when it does not apply (biases)."""
        attention, ffn = self.attention, self.feed_forward
        if attention.wqkv.bias is not None or attention.wo.bias is not None:
            return None
        return (self.attention_norm.weight, attention.wqkv.weight, attention.wo.weight, self.ffn_norm.weight,
                ffn.w1.weight, ffn.w3.weight, ffn.w2.weight)


class InternLM2Model(nn.Module):
    """Embeddings + decoder layers + final norm (HF's `model.` prefix)."""

    def __init__(self, config: InternLM2Config) -> None:
        super().__init__()
        V, C = config.vocab_size, config.hidden_size
        self.tok_embeddings = nn.Embedding(V, C, _weight=torch.empty(V, C))  # _weight: no global-RNG draw
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.unnormed(input_ids))

    def unnormed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The last layer's output before the final norm: (B, T) -> (B, T, C)."""
        x = self.tok_embeddings(input_ids)  # (B, T, C)
        rope = self.rotary_emb(input_ids.shape[1], x.device)  # (T, (H + KV) * D/2) complex
        ropes = None
        for layer in self.layers:
            weights = layer.fused_weights()
            if weights is not None and rope.is_complex() and _fp32_cpu(x, *weights):
                if ropes is None:
                    ropes = (rope, self.rotary_emb.conjugate(rope))
                x = _DecoderLayerFn.apply(x, *weights, layer, ropes, _graph_kept(x, *weights))
            else:
                x = layer(x, rope)
        return x


class InternLM2ForCausalLM(nn.Module):
    """InternLM2 language model: input_ids (B, T) -> next-token logits (B, T, vocab).

    Weights are initialised from `generator` only (never the global RNG), so the same seed gives
    the same model in any process: N(0, initializer_range) for matrices and embeddings, with the
    residual projections wo / w2 scaled by 1/sqrt(2 * num_hidden_layers) (GPT-2), norms at 1,
    biases at 0. Without a generator the model is initialised from seed 0.
    """

    def __init__(self, config: InternLM2Config, generator: torch.Generator | None = None, *,
                 init: bool = True) -> None:
        super().__init__()
        self.config = config
        self.model = InternLM2Model(config)
        self.output = Linear(config.hidden_size, config.vocab_size)
        self._pool = _BufferPool()  # final norm + output head as _NormLinearFn
        if not init:   # the caller loads every parameter next (uninitialised memory until then)
            return
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """(Re)initialise every parameter from `generator`, in state-dict order."""
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                p.normal_(0.0, residual_std, generator=generator)
            else:
                p.normal_(0.0, std, generator=generator)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.unnormed(input_ids)  # (B, T, C)
        norm, w = self.model.norm, self.output.weight
        if self.output.bias is None and _fp32_cpu(x, norm.weight, w):  # final norm + head: _NormLinearFn
            return _NormLinearFn.apply(x, norm.weight, norm.eps, w, self._pool, _graph_kept(x, norm.weight, w))
        return self.output(norm(x))  # (B, T, vocab)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

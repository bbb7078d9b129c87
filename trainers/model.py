"""InternLM2, the decoder every population member trains, as plain PyTorch modules.

InternLM2 (Cai et al. 2024, "InternLM2 Technical Report") is a Llama-style decoder-only
transformer; this file follows the official modeling code (`modeling_internlm2.py` of the
InternLM2 checkpoints on the Hugging Face Hub, InternLM/InternEvo's `internlm2_model/`):

    tokens -> tok_embeddings -> num_hidden_layers x DecoderLayer -> RMSNorm -> output (untied)
    DecoderLayer (pre-norm):  h   = x + Attention(RMSNorm(x))
                              out = h + FeedForward(RMSNorm(h))
    Attention:   one packed projection `wqkv` for q, k and v, grouped-query attention
                 (num_key_value_heads <= num_attention_heads), rotate-half RoPE on q and k
                 (default, linear or dynamic NTK scaling), causal softmax, projection `wo`
    FeedForward: SwiGLU, w2(silu(w1 x) * w3 x)
    RMSNorm:     x / sqrt(mean(x^2) + eps) * weight, statistics in fp32

No biases unless `bias` (then on wqkv and wo only, as HF's `bias`). The state-dict keys are
HF InternLM2's, so a checkpoint exports with a rename-free dump (trainers/export.py) and weight
transfer (trainers/transfer.py) reasons about the tensors a released model has:

    model.tok_embeddings.weight                       (vocab, C)
    model.layers.{i}.attention_norm.weight            (C,)
    model.layers.{i}.attention.wqkv.weight            ((H + 2*KV) * D, C)   packed per kv group
    model.layers.{i}.attention.wo.weight              (C, H * D)
    model.layers.{i}.ffn_norm.weight                  (C,)
    model.layers.{i}.feed_forward.w1|w3.weight        (F, C)                gate | up
    model.layers.{i}.feed_forward.w2.weight           (C, F)                down
    model.norm.weight                                 (C,)
    output.weight                                     (vocab, C)            untied

C hidden_size, H num_attention_heads, KV num_key_value_heads, D = C / H head_dim,
G = H / KV query heads per kv head, F intermediate_size. `wqkv` rows, viewed as (KV, G + 2, D, C),
hold for each kv group g its G query heads, then its key head, then its value head: with H=4,
KV=2 the row blocks are [q0, q1, k0, v0, q2, q3, k1, v1].

These modules are what runs on GPUs, under autocast and under torch.compile. On CPU in fp32 the
Trainer runs the same model through trainers/cpu_fused.py, hand-written autograd Functions over
these modules' parameters, tested equal to them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainers.config import InternLM2Config   # the architecture's config (torch-free), re-exported here


# ------------------------------------------------------------------------------------------------
# building blocks


class Linear(nn.Module):
    """y = x W^T (+ b), like nn.Linear but created uninitialised: nn.Linear's constructor draws
    from the global RNG (and skip_init's meta-device route imports torch._dynamo), while every
    weight here is set once, from an explicit generator, by InternLM2ForCausalLM."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, with the statistics in fp32 and the result cast back
    to the input's dtype before the weight, as InternLM2RMSNorm."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x = x.to(torch.float32)  # (B, T, C)
        if x.is_cuda and not torch.compiler.is_compiling():
            # the same formula in one kernel: eager bf16 steps 15% faster on an H200 (inductor
            # fuses the written-out form itself)
            return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps).to(input_dtype)
        variance = x.pow(2).mean(-1, keepdim=True)  # (B, T, 1)
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(input_dtype)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE tables as HF InternLM2 builds them: default, linear or dynamic NTK scaling.

    Head dim i and i + D/2 form a pair rotated by the angle t * inv_freq_i at position t
    (`rotate_half` below). `inv_freq` is a non-persistent buffer (not in the state dict), as in
    InternLM2. Dynamic NTK scaling is a pure function of the current sequence length here (HF
    InternLM2 keeps its grown table after a long call; for a single forward both agree).
    """

    def __init__(self, config: InternLM2Config) -> None:
        super().__init__()
        self.dim = config.head_dim
        self.base = config.rope_theta
        self.max_position_embeddings = config.max_position_embeddings
        scaling = config.rope_scaling or {"type": None, "factor": 1.0}
        self.scaling_type, self.scaling_factor = scaling["type"], scaling["factor"]
        self.register_buffer("inv_freq", self._inv_freq(self.base), persistent=False)

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

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (T, D) in fp32."""
        freqs = self.angles(seq_len, device)  # (T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, D): dims i and i + D/2 share an angle
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., D): [x1, x2] -> [-x2, x1], the halves of the last dim."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q (..., T, H, D) and k (..., T, KV, D) with (T, D) tables, in q's dtype as InternLM2
    (HF applies it in the (B, H, T, D) layout; element by element the arithmetic is the same)."""
    cos, sin = cos.to(q.dtype)[:, None, :], sin.to(q.dtype)[:, None, :]  # (T, 1, D)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class Attention(nn.Module):
    """Causal grouped-query attention with InternLM2's packed `wqkv`."""

    def __init__(self, config: InternLM2Config) -> None:
        super().__init__()
        self.n_head = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.wqkv = Linear(config.hidden_size, (self.n_head + 2 * self.n_kv) * self.head_dim, bias=config.bias)
        self.wo = Linear(self.n_head * self.head_dim, config.hidden_size, bias=config.bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); `rope` is RotaryEmbedding's (cos, sin)."""
        B, T, C = x.shape
        H, KV, D = self.n_head, self.n_kv, self.head_dim
        G = H // KV
        # InternLM2: rearrange(qkv, "b q (h gs d) -> b q h gs d", gs=2 + G), then per kv group
        # its G query heads, its key head, its value head
        qkv = self.wqkv(x).view(B, T, KV, G + 2, D)
        q = qkv[..., :G, :].reshape(B, T, H, D)  # query head h = g * G + j
        k = qkv[..., -2, :]  # (B, T, KV, D)
        v = qkv[..., -1, :].transpose(1, 2)  # (B, KV, T, D)
        # RoPE before the transpose: q is contiguous here, so its elementwise kernels vectorise
        q, k = apply_rotary_pos_emb(q, k, *rope)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D), (B, KV, T, D)
        # enable_gqa: query head h attends with kv head h // G, as repeat_kv + softmax attention
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != KV)  # (B, H, T, D)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * D))  # (B, T, C)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: InternLM2Config) -> None:
        super().__init__()
        C, Fd = config.hidden_size, config.intermediate_size
        self.w1 = Linear(C, Fd)  # gate
        self.w3 = Linear(C, Fd)  # up
        self.w2 = Linear(Fd, C)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (B, T, C) -> (B, T, F) -> (B, T, C)


class DecoderLayer(nn.Module):
    """Pre-norm block: h = x + attention(norm(x)), then h + feed_forward(norm(h))."""

    def __init__(self, config: InternLM2Config) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope)  # (B, T, C)
        return h + self.feed_forward(self.ffn_norm(h))


class InternLM2Model(nn.Module):
    """Embeddings + decoder layers + final norm (HF's `model.` prefix): (B, T) -> (B, T, C)."""

    def __init__(self, config: InternLM2Config) -> None:
        super().__init__()
        V, C = config.vocab_size, config.hidden_size
        self.tok_embeddings = nn.Embedding(V, C, _weight=torch.empty(V, C))  # _weight: no global-RNG draw
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_embeddings(input_ids)  # (B, T, C)
        rope = self.rotary_emb(input_ids.shape[1], x.device)  # (T, D) cos, sin
        for layer in self.layers:
            x = layer(x, rope)
        return self.norm(x)


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
        return self.output(self.model(input_ids))  # (B, T, vocab)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def norm_eps(self) -> dict[str, float]:
        """Each RMSNorm's eps by module name. A norm's eps starts at `config.rms_norm_eps` and
        is scaled when the width grows (trainers/transfer.py), so it is part of the state."""
        return {name: m.eps for name, m in self.named_modules() if isinstance(m, RMSNorm)}

    def set_norm_eps(self, eps: dict[str, float]) -> None:
        """Set each RMSNorm's eps from `eps` (by module name); unlisted ones get `config.rms_norm_eps`."""
        for name, m in self.named_modules():
            if isinstance(m, RMSNorm):
                m.eps = float(eps.get(name, self.config.rms_norm_eps))

"""The CPU fast path: InternLM2ForCausalLM's forward and backward by hand, for fp32 on CPU.

Every population member trains on CPU, where the tiny default model spends more of its step in
per-op and per-node overhead (Python, ATen dispatch, autograd's graph) and in fresh
activation-sized allocations than in arithmetic. `FusedForward(model)` computes
`model(input_ids)` (trainers/model.py, left untouched) in fewer, larger steps:

- each decoder layer is one autograd Function (_DecoderLayerFn) with a hand-written backward,
  one node in autograd's graph instead of about fifteen; the final norm and the output head are
  another (_NormLinearFn);
- wqkv's rows are gathered (a weight-sized copy per step) into a compute order [q | k | v] with
  each RoPE pair (i, i + D/2) side by side, so RoPE for q and k is one contiguous complex multiply
  with a cached table, applied in place, with no rotate_half copies (dot products q.k do not care
  about the order of head dims as long as q and k share it);
- each RMSNorm's weight is folded into the matrix after it (a weight-sized product instead of a
  pass over the activations); the residual adds are the output projections' addmm's;
- activations live in buffers kept across steps (_BufferPool);
- the norms and SwiGLU's elementwise work run as compiled loops (trainers/kernels.py) where a C
  compiler is available, as ATen ops otherwise;
- attention stays `F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)`: the CPU
  flash kernel, with no repeated k/v.

It is applied from outside the model, as torchtitan applies compile and parallelism: the
Trainer wraps its model on CPU (trainers/trainer.py) and the model's modules stay the canonical
ones. A call falls back to `model(input_ids)` unless every weight is fp32 on the CPU, the model
has no biases, and autocast and torch.compile are off. The parameters and the gradients
autograd accumulates in them are the model's own; the results agree with the plain modules to
fp32 rounding, not bit for bit (tests/trainers/test_cpu_fused.py). Step times against the plain
modules and transformers' Llama are in BENCHMARKS.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainers import kernels
from trainers.model import DecoderLayer, InternLM2ForCausalLM


class FusedForward:
    """`FusedForward(model)(input_ids)`: `model(input_ids)`'s logits (B, T, vocab), computed by
    this module's hand-written CPU Functions where they apply, by the model itself otherwise.

    Holds what the Functions keep between calls: the RoPE tables, each layer's compute order and
    buffer pools. Bound to one model: its weights may change, its architecture must not."""

    def __init__(self, model: InternLM2ForCausalLM) -> None:
        self.model = model
        self._plans = [_LayerPlan.of(layer) for layer in model.model.layers]
        self._head_pool = _BufferPool()  # _NormLinearFn's buffers
        self._ropes: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        model = self.model
        layers = [_layer_weights(layer) for layer in model.model.layers]
        norm, out = model.model.norm, model.output
        if (any(w is None for w in layers) or out.bias is not None
                or not _fp32_cpu(model.model.tok_embeddings.weight, norm.weight, out.weight,
                                 *(w for weights in layers for w in weights))):
            return model(input_ids)
        x = model.model.tok_embeddings(input_ids)  # (B, T, C)
        ropes = self._rope(input_ids.shape[1], x.device)
        for plan, layer, weights in zip(self._plans, model.model.layers, layers):
            plan.attn_eps, plan.ffn_eps = layer.attention_norm.eps, layer.ffn_norm.eps   # per norm, may change
            x = _DecoderLayerFn.apply(x, *weights, plan, ropes, _graph_kept(x, *weights))
        return _NormLinearFn.apply(x, norm.weight, norm.eps, out.weight, self._head_pool,
                                   _graph_kept(x, norm.weight, out.weight))  # (B, T, vocab)

    def _rope(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """complex64 (T, (H + KV) * D/2) tables e^{j angle} and e^{-j angle} (the backward's
        rotation) for every rotated pair of every q and k head, cached per (seq_len, device).

        rotate_half RoPE turns the pair (x_i, x_{i+D/2}) by `angle`: that is the complex product
        (x_i + j x_{i+D/2}) * e^{j angle}. The table repeats over the q and k heads so the
        multiply has no broadcast (long contiguous runs)."""
        key = (seq_len, device)
        ropes = self._ropes.get(key)
        if ropes is None:
            config = self.model.config
            freqs = self.model.model.rotary_emb.angles(seq_len, device)  # (T, D/2)
            cis = torch.complex(freqs.cos(), freqs.sin())  # cos/sin in fp32, as HF's tables
            table = cis.repeat(1, config.num_attention_heads + config.num_key_value_heads)
            if len(self._ropes) >= 8:  # a handful of lengths at most (train, eval, generation)
                self._ropes.clear()
            ropes = self._ropes[key] = (table, torch.conj_physical(table))
        return ropes


@dataclass
class _LayerPlan:
    """What _DecoderLayerFn needs of one decoder layer besides its weights."""

    n_head: int
    n_kv: int
    head_dim: int
    attn_eps: float
    ffn_eps: float
    order: torch.Tensor  # wqkv's rows in compute order (qkv_compute_order)
    inverse: torch.Tensor  # compute row -> HF row
    pool: _BufferPool

    @classmethod
    def of(cls, layer: DecoderLayer) -> _LayerPlan:
        attention = layer.attention
        order = qkv_compute_order(attention.n_head, attention.n_kv, attention.head_dim)
        return cls(attention.n_head, attention.n_kv, attention.head_dim, layer.attention_norm.eps,
                   layer.ffn_norm.eps, order, torch.argsort(order), _BufferPool())


def _layer_weights(layer: DecoderLayer) -> tuple[torch.Tensor, ...] | None:
    """The parameters _DecoderLayerFn takes, in its order; None when it does not apply (biases)."""
    attention, ffn = layer.attention, layer.feed_forward
    if attention.wqkv.bias is not None or attention.wo.bias is not None:
        return None
    return (layer.attention_norm.weight, attention.wqkv.weight, attention.wo.weight, layer.ffn_norm.weight,
            ffn.w1.weight, ffn.w3.weight, ffn.w2.weight)


def _fp32_cpu(*tensors: torch.Tensor) -> bool:
    """Whether the hand-written CPU paths apply: fp32 on CPU, outside autocast and torch.compile
    (GPUs and compiled graphs fuse the plain ops themselves; autocast needs its own casts)."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def _graph_kept(*inputs: torch.Tensor) -> bool:
    """Whether autograd will keep a graph through a Function of these inputs (its buffers must then
    live until the backward; otherwise they go straight back to the pool)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in inputs)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of q (B, H, T, D) over k, v (B, KV, T, D): (B, H, T, D).

    The inputs are transposed views of (B, T, heads, D) memory, which suits the CPU flash kernel
    (it lays its output out as (B, T, H, D), so the transpose back is free). enable_gqa lets each
    kv head serve its G query heads without materialising repeated k/v."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


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

class _BufferPool:
    """Free activation buffers of one hand-written autograd Function, kept from one training step
    to the next.

    On this project's CPU machines a fresh tensor of a few MB can cost more than the arithmetic
    done in it: glibc returns the freed activations of every step to the kernel (its heap trim)
    and each new buffer is paid again in page faults (figures in BENCHMARKS.md). A buffer is
    taken by a forward and given back by its backward (or at once when no graph is kept), so a
    forward that runs while another's graph is alive simply allocates. Between steps a pool holds
    what its Function needs for one step (one set per batch shape seen, e.g. train and eval):
    memory autograd allocates at every step's peak anyway.
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
    place in the gradient of xhat: fewer fresh (N, C) tensors and passes over them than RMSNorm
    followed by F.linear.
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
    the data instead of a chain of ATen ops; otherwise the ATen ops below run.

    Activations live in buffers of the layer's pool (_BufferPool) from the forward to the end of
    the backward. Backward only once: the buffers are overwritten by it.
    """

    @staticmethod
    def forward(ctx, x, attn_norm_w, wqkv, wo, ffn_norm_w, w1, w3, w2, plan: _LayerPlan,
                ropes: tuple[torch.Tensor, torch.Tensor], keep: bool):
        B, T, C = x.shape
        rope = ropes[0]  # and ropes[1], its conjugate (the backward's rotation by -angle)
        pool = plan.pool
        H, KV, D = plan.n_head, plan.n_kv, plan.head_dim
        x2 = x.reshape(-1, C)  # (N, C)
        N, Fd = x2.shape[0], w1.shape[0]
        # attention input: RMSNorm (weight folded), projection in compute order, RoPE in place
        xhat1, rstd1 = _xhat_into(x2, plan.attn_eps, pool.take((N, C), x2))
        w = wqkv.index_select(0, plan.order)  # (R, C) rows in compute order
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
        xhat2, rstd2 = _xhat_into(h1, plan.ffn_eps, pool.take((N, C), x2))
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
            ctx.sdpa, ctx.plan, ctx.rope_back = (y, q, k, v, y2), plan, ropes[1]
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
        plan = ctx.plan
        ctx.buffers = ctx.sdpa = None
        pool = plan.pool
        H, KV, D = plan.n_head, plan.n_kv, plan.head_dim
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
        gwqkv = gw.index_select(0, plan.inverse)  # back to HF's row order
        gx = _xhat_backward_(torch.mm(gqkv, wf), xhat1, rstd1, tmp, gh1)  # norm path + residual
        pool.give(xhat1, qkv, xhat2, s, b, h, sig, tmp)
        return gx.view(B, T, C), gattn_norm_w, gwqkv, gwo, gnw1.add_(gnw3), gw1, gw3, gw2, None, None, None


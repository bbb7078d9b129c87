"""Training-step speed of trainers.model.InternLM2ForCausalLM against transformers' Llama.

One step = forward + cross-entropy + backward + grad clip + AdamW step, the unit every population
member repeats. The models get the same config (our weights exported to Llama's layout), the same
batches, the same loss expression, the same optimizer settings (ours: the Trainer's own AdamW,
trainers.trainer.make_optimizer; the others: torch's default AdamW) and the same torch thread count;
their steps are interleaved in blocks so that machine noise hits all alike. Prints the median
step time of each and the ratio ours / reference (goal on CPU: <= 0.8).

On CPU "ours" is what a Trainer runs there: the model through trainers/cpu_fused.py; "plain" is
the same model through its own modules (trainers/model.py), what the fast path is measured against.

It also times a "kernel floor": a model with our parameter shapes that runs only the shared heavy
kernels (the same matmuls, the same SDPA call, embedding, cross-entropy, AdamW) and none of the
glue (no norms, no RoPE, no SiLU). No implementation built from these kernels can be faster than
that, so floor / llama bounds the ratio any rewrite of the glue can reach.

    .venv/bin/python bench/trainer_speed.py                      # the two default CPU configs
    .venv/bin/python bench/trainer_speed.py --threads 1 --steps 60
    .venv/bin/python bench/trainer_speed.py --hidden 128 --layers 4 --heads 8 --kv-heads 2
    .venv/bin/python bench/trainer_speed.py --device cuda        # tokens/s and MFU, bf16 autocast, ~50M params

Needs transformers (a test extra); nothing else beyond the project's own dependencies.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from trainers.cpu_fused import FusedForward  # noqa: E402
from trainers.export import internlm2_to_llama_state  # noqa: E402
from trainers.model import InternLM2Config, InternLM2ForCausalLM  # noqa: E402
from trainers.trainer import TrainConfig, make_optimizer  # noqa: E402


@dataclass
class Case:
    """One benchmark shape: model config + batch."""

    name: str
    config: InternLM2Config
    batch: int
    seq_len: int


# The project's default tiny model (InternLM2Config's defaults) and a larger CPU model.
CPU_CASES = (
    Case("tiny (default)", InternLM2Config(), batch=16, seq_len=128),
    Case(
        "cpu-large",
        InternLM2Config(hidden_size=256, intermediate_size=684, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=2),
        batch=16,
        seq_len=128,
    ),
)
# ~50M parameters for the GPU throughput / MFU figure
GPU_CASE = Case(
    "gpu-50M",
    InternLM2Config(vocab_size=1024, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                    num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=4096),
    batch=32,
    seq_len=1024,
)


def llama_twin(model: InternLM2ForCausalLM) -> nn.Module:
    """transformers' LlamaForCausalLM with the same weights (SDPA attention, transformers' default)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = model.config
    rope = None if config.rope_scaling is None else {"rope_type": config.rope_scaling["type"],
                                                     "factor": config.rope_scaling["factor"]}
    llama_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta, rope_scaling=rope, attention_bias=config.bias, tie_word_embeddings=False,
        use_cache=False, attn_implementation="sdpa",
    )
    ref = LlamaForCausalLM(llama_config)
    ref.load_state_dict(internlm2_to_llama_state(model.state_dict(), config))
    return ref


class KernelFloor(nn.Module):
    """Our parameter shapes, running only the shared heavy kernels: the floor of any implementation."""

    def __init__(self, model: InternLM2ForCausalLM) -> None:
        super().__init__()
        self.c = model.config
        self.params = nn.ParameterDict({k.replace(".", "_"): nn.Parameter(v.detach().clone())
                                        for k, v in model.state_dict().items()})

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        c, p = self.c, self.params
        B, T = ids.shape
        H, KV, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        x = F.embedding(ids, p["model_tok_embeddings_weight"])
        for i in range(c.num_hidden_layers):
            w = lambda name: p[f"model_layers_{i}_{name}_weight"]  # noqa: E731
            q, k, v = F.linear(x, w("attention_wqkv")).split((H * D, KV * D, KV * D), dim=-1)
            y = F.scaled_dot_product_attention(
                q.view(B, T, H, D).transpose(1, 2), k.view(B, T, KV, D).transpose(1, 2),
                v.view(B, T, KV, D).transpose(1, 2), is_causal=True, enable_gqa=H != KV)
            x = x + F.linear(y.transpose(1, 2).reshape(B, T, H * D), w("attention_wo"))
            gate_up = F.linear(x, w("feed_forward_w1")) * F.linear(x, w("feed_forward_w3"))  # no SiLU: glue
            x = x + F.linear(gate_up, w("feed_forward_w2"))
        return F.linear(x, p["output_weight"])


def make_step(model: nn.Module, autocast: bool, compile: bool = False, fused: bool = False,
              ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A closure doing one full training step; the loss expression is the same for every model.

    Ours steps with the Trainer's own optimizer (trainers.trainer.make_optimizer: fused AdamW);
    the others with torch's default AdamW, as a user of transformers would (fused on CUDA, one
    launch per step instead of a dozen). Same lr, betas and weight decay. `fused`: the forward is
    trainers.cpu_fused.FusedForward(model), as the Trainer runs on CPU."""
    device_type = next(model.parameters()).device.type
    if isinstance(model, InternLM2ForCausalLM):
        opt = make_optimizer(model, TrainConfig(lr=1e-3, beta1=0.9, beta2=0.95, weight_decay=0.1), lr=1e-3)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1,
                                fused=device_type == "cuda")
    from transformers import PreTrainedModel

    is_hf = isinstance(model, PreTrainedModel)  # returns an output object, not logits
    forward = FusedForward(model) if fused else model
    if compile:
        forward = torch.compile(model)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            logits = forward(x, use_cache=False).logits if is_hf else forward(x)  # (B, T, V)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_models(models: dict[str, nn.Module], case: Case, steps: int, block: int, device: str,
                autocast: bool, clock: Callable[[], float] = time.perf_counter, compile: bool = False,
                fused: frozenset[str] = frozenset()) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Per-step seconds of each model, run in interleaved blocks of `block` steps (rotating order),
    and each model's loss on its first step (equal weights and batch: a sanity check). The models
    named in `fused` run through trainers.cpu_fused."""
    runners = {name: make_step(m.to(device).train(), autocast, compile, fused=name in fused)
               for name, m in models.items()}
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, case.config.vocab_size, (case.batch, case.seq_len + 1), generator=g) for _ in range(8)]
    batches = [(w[:, :-1].contiguous().to(device), w[:, 1:].contiguous().to(device)) for w in windows]
    first_loss = {name: float(run(*batches[0])) for name, run in runners.items()}
    for run in runners.values():  # optimizer state allocated, caches built
        for x, y in batches[1:3]:
            run(x, y)
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    for b in range(math.ceil(steps / block)):
        for name in names[b % len(names):] + names[: b % len(names)]:
            for i in range(block):
                x, y = batches[(b * block + i) % len(batches)]
                _sync(device)
                t0 = clock()
                runners[name](x, y)
                _sync(device)
                times[name].append(clock() - t0)
    return times, first_loss


def flops_per_token(config: InternLM2Config, seq_len: int) -> float:
    """Training FLOPs per token as nanoGPT / PaLM count them: 6 N + 12 L C T.

    N: the matmul parameters (all but the embedding table, a lookup; the output head counts);
    12 L C T: attention scores and values, forward + backward, without a causal discount.
    """
    C, D = config.hidden_size, config.head_dim
    per_layer = ((config.num_attention_heads + 2 * config.num_key_value_heads) * D * C
                 + config.num_attention_heads * D * C + 3 * C * config.intermediate_size)
    n = per_layer * config.num_hidden_layers + config.vocab_size * C
    return 6 * n + 12 * config.num_hidden_layers * C * seq_len


def run_cpu(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    cases = list(CPU_CASES) if args.hidden is None else [custom_case(args)]
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, {args.steps} timed steps per model "
          f"in interleaved blocks of {args.block}; step = fwd + CE + bwd + clip + AdamW; median {args.clock} ms")
    print("ours: trainers/cpu_fused.py (as the Trainer runs on CPU); plain: trainers/model.py's modules")
    print(f"{'case':<15} {'params':>10} {'B x T':>7} {'ours':>8} {'plain':>8} {'llama':>8} {'floor':>8} "
          f"{'ours/llama':>10} {'plain/llama':>11} {'floor/llama':>11} {'ours tok/s':>10} {'|dloss|':>8}")
    for case in cases:
        ours = InternLM2ForCausalLM(case.config, torch.Generator().manual_seed(0))
        plain = InternLM2ForCausalLM(case.config, torch.Generator().manual_seed(0))
        models = {"ours": ours, "plain": plain, "llama": llama_twin(ours), "floor": KernelFloor(ours)}
        times, loss = time_models(models, case, args.steps, args.block, "cpu", autocast=False, clock=clock,
                                  fused=frozenset({"ours"}))
        med = {name: statistics.median(t) for name, t in times.items()}
        tok = case.batch * case.seq_len
        dloss = max(abs(loss[name] - loss["llama"]) for name in ("ours", "plain"))
        print(f"{case.name:<15} {ours.num_parameters():>10,} {f'{case.batch}x{case.seq_len}':>7} "
              f"{med['ours'] * 1e3:>8.2f} {med['plain'] * 1e3:>8.2f} {med['llama'] * 1e3:>8.2f} "
              f"{med['floor'] * 1e3:>8.2f} {med['ours'] / med['llama']:>10.3f} {med['plain'] / med['llama']:>11.3f} "
              f"{med['floor'] / med['llama']:>11.3f} {tok / med['ours']:>10,.0f} {dloss:>8.1e}", flush=True)


def run_cuda(args: argparse.Namespace) -> None:
    case = GPU_CASE if args.hidden is None else custom_case(args)
    torch.backends.cuda.matmul.allow_tf32 = True
    ours = InternLM2ForCausalLM(case.config, torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    times, loss = time_models({"ours": ours, "llama": llama_twin(ours)}, case, args.steps, args.block, "cuda",
                              autocast=True, compile=args.compile)
    compiled = f", torch.compile (warm-up incl. compile {time.perf_counter() - t0 - sum(map(sum, times.values())):.0f} s)" \
        if args.compile else ", eager"
    tok = case.batch * case.seq_len
    fpt = flops_per_token(case.config, case.seq_len)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 autocast{compiled}, {case.name}: "
          f"{ours.num_parameters():,} params, batch {case.batch} x {case.seq_len}, {fpt / 1e6:.1f} MFLOP/token, "
          f"first-step |dloss| {abs(loss['ours'] - loss['llama']):.1e}")
    for name in ("ours", "llama"):
        med = statistics.median(times[name])
        mfu = tok * fpt / med / (args.peak_tflops * 1e12)
        print(f"{name:<6} {med * 1e3:8.2f} ms/step  {tok / med:>12,.0f} tokens/s  MFU {mfu:6.1%} "
              f"(peak {args.peak_tflops:g} TFLOP/s)")
    print(f"ratio ours/llama {statistics.median(times['ours']) / statistics.median(times['llama']):.3f}")


def custom_case(args: argparse.Namespace) -> Case:
    ffn = args.ffn or 4 * math.ceil(args.hidden * 8 / 3 / 4)  # SwiGLU's 8/3, as the default 64 -> 172
    config = InternLM2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, args.seq_len),
    )
    return Case(f"h{args.hidden} L{args.layers}", config, args.batch, args.seq_len)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (CPU)")
    p.add_argument("--steps", type=int, default=40, help="timed steps per model")
    p.add_argument("--block", type=int, default=1, help="steps per interleaved block (1: alternate every step)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: process CPU time, robust to other load on a shared machine (use with --threads 1)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="peak bf16 TFLOP/s for MFU (H100 SXM dense: 989)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (CUDA)")
    p.add_argument("--hidden", type=int, default=None, help="time this config instead of the defaults")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=None, help="default: 8/3 hidden, rounded up to a multiple of 4")
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    args = p.parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("trainer_speed: --device cuda, but torch sees no CUDA device", file=sys.stderr)
            return 2
        run_cuda(args)
    else:
        run_cpu(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

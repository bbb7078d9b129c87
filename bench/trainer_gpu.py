"""The Trainer's own GPU path: bf16 autocast, tokens/s and MFU through ``Trainer.train``.

bench/trainer_speed.py times a bare training step; this times what a population member really
runs (batches from the corpus, the per-step finite-loss check, the schedule), checks that the
matmuls run in bf16 under autocast while the weights and the Adam moments stay fp32, and that the
loss falls. Needs a CUDA device.

    python bench/trainer_gpu.py                  # ~50M parameters (bench/trainer_speed.py's GPU case), bytes
    python bench/trainer_gpu.py --compile        # with train.compile
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.trainer_speed import GPU_CASE, flops_per_token  # noqa: E402
from trainers.data import DataConfig  # noqa: E402
from trainers.trainer import TrainConfig, Trainer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60, help="timed steps")
    p.add_argument("--batch", type=int, default=GPU_CASE.batch)
    p.add_argument("--seq-len", type=int, default=GPU_CASE.seq_len)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="cuda", help="cpu only to try this script out (no autocast there)")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("trainer_gpu: torch sees no CUDA device", file=sys.stderr)
        return 2
    model_cfg = replace(GPU_CASE.config, vocab_size=256)   # byte tokens: nothing to train first
    t0 = time.perf_counter()
    trainer = Trainer(model_cfg, TrainConfig(batch_size=args.batch, lr=1e-3, warmup_steps=20, device=args.device,
                                             compile=args.compile),
                      DataConfig(seq_len=args.seq_len, max_bytes=20_000_000))
    print(f"built in {time.perf_counter() - t0:.1f} s: {trainer.num_parameters():,} params on {trainer.device}, "
          f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, torch {torch.__version__}")
    # bf16 under the Trainer's autocast: one eager forward with a hook on the first w1, before the
    # Trainer's own (possibly compiled) forward ever runs. (A hook added or removed after dynamo
    # traced the model makes it recompile: a first version of this script removed it after the
    # warm-up and timed that recompile as 185 ms per step.)
    seen: dict[str, torch.dtype] = {}

    def record(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        seen.setdefault("w1 output", output.dtype)

    hook = trainer.model.model.layers[0].feed_forward.w1.register_forward_hook(record)
    with torch.no_grad(), trainer._autocast():
        trainer.model(torch.zeros(1, 8, dtype=torch.long, device=trainer.device))
    hook.remove()
    before = trainer.evaluate()
    t0 = time.perf_counter()
    warm = trainer.train(10)
    w1_dtype = seen.get("w1 output", "not seen")
    print(f"warm-up 10 steps {time.perf_counter() - t0:.1f} s; w1 output dtype under autocast: {w1_dtype}; "
          f"weights {trainer.model.output.weight.dtype}; "
          f"Adam exp_avg {next(iter(trainer._optimizer.state.values()))['exp_avg'].dtype}")
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    m = trainer.train(args.steps)
    after = trainer.evaluate()
    tok_s = m["tokens_per_s"]
    fpt = flops_per_token(trainer.model_config, args.seq_len)
    print(f"Trainer.train: {args.steps} steps of {args.batch}x{args.seq_len} in {m['seconds']:.2f} s: "
          f"{tok_s:,.0f} tokens/s, {m['seconds'] / args.steps * 1e3:.1f} ms/step, "
          f"MFU {tok_s * fpt / (args.peak_tflops * 1e12):.1%} (peak {args.peak_tflops:g}); "
          f"peak memory {torch.cuda.max_memory_allocated() / 2**30 if cuda else 0:.2f} GiB")
    print(f"loss {warm['losses'][0]:.3f} -> {m['last_loss']:.3f}; val_bpb {before['val_bpb']:.3f} -> "
          f"{after['val_bpb']:.3f}")
    ok = seen.get("w1 output") == torch.bfloat16 and after["val_bpb"] < before["val_bpb"]
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

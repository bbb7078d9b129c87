"""How many intervals a lossy architecture change needs to win back its validation-loss jump,
on the quickstart-size model (the default of `strategy.grace_intervals`).

The quickstart's model (hidden 64, 4 heads, 2 kv heads, FFN 172, seq_len 128, batch 16, lr 1e-3,
wd 0.1, warmup 20, grad clip 1, cosine over 500 steps) at 3 layers trains 150 steps (3
intervals of 50); then each lossy change below is applied to a copy (trainers.transfer) and
the copy trains interval after interval next to the unchanged model (same seed, same batches).
Per change and seed it prints the jump at the change and

- back: the first interval after which the changed copy's val loss is at or below its value
  just before the change (the jump won back);
- par:  the first interval after which it is at or below the unchanged model's at the same step
  (a smaller model may never get there: "-").

The baseline in the same run is the unchanged model itself (its own val loss per interval).

With `--distill-steps K` each change is also applied to a second copy that trains with
`train.distill_steps=K` (and `--distill-weight`): the first K steps after the change add the KL
to the pre-change model's logits. Its line ("+ distill") follows the plain copy's, and a last
table gives, per change, the mean over seeds of the val loss after each interval, plain and
distilled, and their difference (distilled - plain; negative: distillation recovered faster).

    .venv/bin/python bench/grace_recovery.py                  # 3 seeds, 6 intervals after the change
    .venv/bin/python bench/grace_recovery.py --seeds 1 --intervals 3
    .venv/bin/python bench/grace_recovery.py --intervals 3 --distill-steps 50
"""
from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from trainers.data import DataConfig  # noqa: E402
from trainers.model import InternLM2Config  # noqa: E402
from trainers.trainer import TrainConfig, Trainer  # noqa: E402
from trainers.transfer import preserves_function  # noqa: E402

START = InternLM2Config(hidden_size=64, intermediate_size=172, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2)
CHANGES = {
    "layers 3->2": {"num_hidden_layers": 2},
    "layers 3->1": {"num_hidden_layers": 1},
    "kv heads 2->1 (merge)": {"num_key_value_heads": 1},
    "ffn 172->86": {"intermediate_size": 86},
    "heads 4->2 (head_dim 16->32)": {"num_attention_heads": 2, "num_key_value_heads": 1},
    "width 64->32, heads 4->2": {"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--intervals", type=int, default=6)
    ap.add_argument("--interval-steps", type=int, default=50)
    ap.add_argument("--pretrain-intervals", type=int, default=3)
    ap.add_argument("--distill-steps", type=int, default=0, help="also run each change with train.distill_steps")
    ap.add_argument("--distill-weight", type=float, default=1.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = DataConfig(corpus="stdlib", seq_len=128)
    backs: dict[str, list] = {name: [] for name in CHANGES}
    curves: dict[tuple[str, bool], list[list[float]]] = {}   # (change, distilled) -> per seed
    n = args.interval_steps
    for seed in range(args.seeds):
        train = TrainConfig(batch_size=16, lr=1e-3, weight_decay=0.1, warmup_steps=20, grad_clip=1.0,
                            decay_steps=500, seed=seed, num_threads=1)
        base = Trainer(START, train, data)
        base.train(args.pretrain_intervals * n)
        state = base.state_dict()
        before = base.evaluate()["val_loss"]
        ref = []
        for _ in range(args.intervals):
            base.train(n)
            ref.append(base.evaluate()["val_loss"])
        print(f"seed {seed}: val loss {before:.4f} before; unchanged model after each interval: "
              + " ".join(f"{v:.4f}" for v in ref))
        for name, change in CHANGES.items():
            cfg = replace(START, **change)
            assert not preserves_function(START, cfg), name
            for distilled in (False, True) if args.distill_steps else (False,):
                t = Trainer(START, replace(train, distill_steps=args.distill_steps if distilled else 0,
                                           distill_weight=args.distill_weight), data)
                t.load_state_dict(state)
                t.set_architecture(cfg)
                jump = t.evaluate()["val_loss"] - before
                vals = []
                for _ in range(args.intervals):
                    t.train(n)
                    vals.append(t.evaluate()["val_loss"])
                back = next((k + 1 for k, v in enumerate(vals) if v <= before), None)
                par = next((k + 1 for k, (v, r) in enumerate(zip(vals, ref)) if v <= r), None)
                if not distilled:
                    backs[name].append(back)
                curves.setdefault((name, distilled), []).append(vals)
                label = "  + distill" if distilled else name
                print(f"  {label:30s} jump {jump:+.4f}  back {back or '-'}  par {par or '-'}  "
                      + " ".join(f"{v:.4f}" for v in vals))
    print("intervals to win back the jump (per seed; '-': not within the run):")
    for name, ks in backs.items():
        known = [k for k in ks if k is not None]
        print(f"  {name:30s} {' '.join(str(k or '-') for k in ks)}"
              + (f"  median {statistics.median(known):g}" if known else ""))
    if args.distill_steps:
        print(f"val loss after each interval, mean over seeds: plain / distilled (distill_steps "
              f"{args.distill_steps}, weight {args.distill_weight:g}) / distilled - plain")
        for name in CHANGES:
            plain, dist = (_mean_curve(curves[(name, d)]) for d in (False, True))
            print(f"  {name:30s} " + "  ".join(f"{p:.4f}/{q:.4f}/{q - p:+.4f}" for p, q in zip(plain, dist)))


def _mean_curve(runs: list[list[float]]) -> list[float]:
    return [statistics.mean(vals) for vals in zip(*runs)]


if __name__ == "__main__":
    main()

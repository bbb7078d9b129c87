"""How often does a merge crossover's child beat both its parents, on the quickstart's model?

Members that merge share a recent ancestor (exploits copy weights). Per seed: an ancestor (the
quickstart's model: hidden 64, 2 layers, 4 heads, 2 kv heads, FFN 172; seq_len 128, batch 16,
lr 1e-3, cosine over 500 steps) trains `--ancestor-steps`; then per trial two parents start from
it with PBT-style perturbed learning rates (x0.8 and x1.2) and their own batch orders and train
one interval. Their merge (Trainer.merge_from: weights and Adam moments alpha * parent 1 +
(1 - alpha) * parent 2) is evaluated at once and after one more interval, next to both parents
trained the same interval (the baseline, in the same run). Three alphas: uniform from the rng
(strategy.merge_alpha: uniform), fitness-weighted (merge_alpha: fitness, 2^-bpb weights), 0.5.

    .venv/bin/python bench/merge_gain.py                   # 3 seeds x 3 trials
    .venv/bin/python bench/merge_gain.py --seeds 1 --trials 1 --interval-steps 5 --ancestor-steps 5
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402

from trainers.data import DataConfig  # noqa: E402
from trainers.model import InternLM2Config  # noqa: E402
from trainers.trainer import TrainConfig, Trainer  # noqa: E402

MODEL = InternLM2Config(hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--interval-steps", type=int, default=50)
    ap.add_argument("--ancestor-steps", type=int, default=150)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = DataConfig(corpus="stdlib", seq_len=128)
    n = args.interval_steps
    wins = {"uniform": [0, 0], "fitness": [0, 0], "0.5": [0, 0]}   # [at once, after an interval]
    total = 0
    print(f"{'seed':>4s} {'trial':>5s} {'alpha':>7s} {'value':>6s} {'p1_bpb':>7s} {'p2_bpb':>7s} {'merged':>7s} "
          f"{'p1_next':>7s} {'p2_next':>7s} {'m_next':>7s}")
    for seed in range(args.seeds):
        train = TrainConfig(batch_size=16, lr=1e-3, weight_decay=0.1, warmup_steps=20, grad_clip=1.0,
                            decay_steps=500, seed=seed, num_threads=1)
        ancestor = Trainer(MODEL, train, data)
        ancestor.train(args.ancestor_steps)
        start = ancestor.state_dict()
        rng = np.random.default_rng(seed)
        for trial in range(args.trials):
            parents = []
            for k, factor in enumerate((0.8, 1.2)):
                p = Trainer(MODEL, replace(train, seed=1000 * (seed + 1) + 10 * trial + k), data)
                p.load_state_dict(start)
                p.set_hparams(lr=train.lr * factor)
                p.train(n)
                parents.append(p)
            states = [p.state_dict() for p in parents]
            bpb = [p.evaluate()["val_bpb"] for p in parents]
            nxt = []
            for p in parents:
                p.train(n)
                nxt.append(p.evaluate()["val_bpb"])
            alphas = {"uniform": float(rng.uniform(0.0, 1.0)),
                      "fitness": 1.0 / (1.0 + 2.0 ** (bpb[0] - bpb[1])), "0.5": 0.5}
            total += 1
            for name, alpha in alphas.items():
                child = Trainer(MODEL, replace(train, seed=1000 * (seed + 1) + 10 * trial), data)
                child.load_state_dict(states[0])
                child.merge_from(states[1], alpha)
                merged = child.evaluate()["val_bpb"]
                child.train(n)
                after = child.evaluate()["val_bpb"]
                wins[name][0] += merged < min(bpb)
                wins[name][1] += after < min(nxt)
                print(f"{seed:4d} {trial:5d} {name:>7s} {alpha:6.3f} {bpb[0]:7.4f} {bpb[1]:7.4f} {merged:7.4f} "
                      f"{nxt[0]:7.4f} {nxt[1]:7.4f} {after:7.4f}")
    print("merged child beats both parents (val_bpb), of "
          f"{total} merges: " + "; ".join(f"alpha {k}: {a} at once, {b} after one more interval"
                                          for k, (a, b) in wins.items()))


if __name__ == "__main__":
    main()

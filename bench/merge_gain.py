"""How often does a merge crossover's child beat both its parents, on the quickstart's model?

Members that merge share a recent ancestor (exploits copy weights). Per seed: an ancestor (the
quickstart's model: hidden 64, 2 layers, 4 heads, 2 kv heads, FFN 172; seq_len 128, batch 16,
lr 1e-3, cosine over 500 steps) trains `--ancestor-steps`; then per trial two parents start from
it with PBT-style perturbed learning rates (x0.8 and x1.2) and their own batch orders and train
one interval. Their merge (Trainer.merge_from: weights and Adam moments alpha * parent 1 +
(1 - alpha) * parent 2) is evaluated at once and after one more interval, next to both parents
trained the same interval (the baseline, in the same run). Three alphas: uniform from the rng
(strategy.merge_alpha: uniform), fitness-weighted (merge_alpha: fitness, 2^-bpb weights), 0.5;
`--alphas` takes others too (a number in [0, 1] is a fixed alpha: 1 keeps parent 1, 0 takes parent 2).

    .venv/bin/python bench/merge_gain.py                   # 3 seeds x 3 trials
    .venv/bin/python bench/merge_gain.py --seeds 1 --trials 1 --interval-steps 5 --ancestor-steps 5
    .venv/bin/python bench/merge_gain.py --small --out /tmp/merge.json   # the smoke test's setting

`--out FILE` also writes every row and the counts as JSON.
"""
from __future__ import annotations

import argparse
import json
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
# --small: the same model, short windows, small batches, 1 seed x 2 trials of 3 steps after a
# 3-step ancestor; a smoke test of the code paths, its figures mean nothing
SMALL_DATA = {"seq_len": 32, "max_bytes": 300_000, "eval_batches": 2, "eval_batch_size": 4}


def alpha_name(text: str) -> str:
    """An --alphas entry: 'uniform', 'fitness' or a fixed alpha in [0, 1] (kept as written)."""
    if text in ("uniform", "fitness"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not 'uniform', 'fitness' or a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not in [0, 1]")
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--interval-steps", type=int, default=50)
    ap.add_argument("--ancestor-steps", type=int, default=150)
    ap.add_argument("--alphas", nargs="+", type=alpha_name, default=["uniform", "fitness", "0.5"], metavar="ALPHA",
                    help="'uniform', 'fitness' or a fixed alpha in [0, 1] (default: uniform fitness 0.5)")
    ap.add_argument("--small", action="store_true",
                    help="the smoke test: seq_len 32, batch 4, 1 seed x 2 trials, 3-step ancestor and intervals")
    ap.add_argument("--out", type=Path, default=None, help="also write the rows and counts as JSON to this file")
    args = ap.parse_args(argv)
    data = DataConfig(corpus="stdlib", seq_len=128)
    batch, warmup = 16, 20
    if args.small:
        args.seeds, args.trials, args.interval_steps, args.ancestor_steps = 1, 2, 3, 3
        data, batch, warmup = replace(data, **SMALL_DATA), 4, 2
    torch.set_num_threads(1)
    n = args.interval_steps
    wins = {name: [0, 0] for name in args.alphas}   # [at once, after an interval]
    rows: list[dict] = []
    total = 0
    print(f"{'seed':>4s} {'trial':>5s} {'alpha':>7s} {'value':>6s} {'p1_bpb':>7s} {'p2_bpb':>7s} {'merged':>7s} "
          f"{'p1_next':>7s} {'p2_next':>7s} {'m_next':>7s}")
    for seed in range(args.seeds):
        train = TrainConfig(batch_size=batch, lr=1e-3, weight_decay=0.1, warmup_steps=warmup, grad_clip=1.0,
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
            # drawn every trial, used or not: the uniform alphas do not depend on --alphas
            uniform = float(rng.uniform(0.0, 1.0))
            alphas = {name: uniform if name == "uniform" else 1.0 / (1.0 + 2.0 ** (bpb[0] - bpb[1]))
                      if name == "fitness" else float(name) for name in args.alphas}
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
                rows.append({"seed": seed, "trial": trial, "alpha": name, "value": alpha, "p1_bpb": bpb[0],
                             "p2_bpb": bpb[1], "merged": merged, "p1_next": nxt[0], "p2_next": nxt[1],
                             "m_next": after})
                print(f"{seed:4d} {trial:5d} {name:>7s} {alpha:6.3f} {bpb[0]:7.4f} {bpb[1]:7.4f} {merged:7.4f} "
                      f"{nxt[0]:7.4f} {nxt[1]:7.4f} {after:7.4f}")
    print("merged child beats both parents (val_bpb), of "
          f"{total} merges: " + "; ".join(f"alpha {k}: {a} at once, {b} after one more interval"
                                          for k, (a, b) in wins.items()))
    if args.out is not None:
        workload = {"seeds": args.seeds, "trials": args.trials, "interval_steps": n,
                    "ancestor_steps": args.ancestor_steps, "alphas": args.alphas, "seq_len": data.seq_len,
                    "batch_size": batch, "small": args.small}
        beats = {k: {"at_once": a, "after_interval": b} for k, (a, b) in wins.items()}
        args.out.write_text(json.dumps({"workload": workload, "merges": total, "rows": rows,
                                        "beats_both": beats}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

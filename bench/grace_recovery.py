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
    .venv/bin/python bench/grace_recovery.py --small --out /tmp/grace.json   # the smoke test's setting

`--out FILE` also writes every figure printed as JSON.
"""
from __future__ import annotations

import argparse
import json
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
# --small: the same model and changes (two of them: a layer dropped, kv heads merged), short windows,
# small batches, a few steps per interval, 1 seed; a smoke test of the code paths, its figures mean nothing
SMALL_CHANGES = ["layers 3->2", "kv heads 2->1 (merge)"]
SMALL_DATA = {"seq_len": 32, "max_bytes": 300_000, "eval_batches": 2, "eval_batch_size": 4}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--intervals", type=int, default=6)
    ap.add_argument("--interval-steps", type=int, default=50)
    ap.add_argument("--pretrain-intervals", type=int, default=3)
    ap.add_argument("--distill-steps", type=int, default=0, help="also run each change with train.distill_steps")
    ap.add_argument("--distill-weight", type=float, default=1.0)
    ap.add_argument("--changes", nargs="+", choices=list(CHANGES), default=list(CHANGES), metavar="CHANGE",
                    help=f"which changes (default: all; one of {', '.join(map(repr, CHANGES))})")
    ap.add_argument("--small", action="store_true",
                    help="the smoke test: seq_len 32, batch 4, 1 seed, 1 + 2 intervals of 3 steps, "
                         f"changes {', '.join(SMALL_CHANGES)}; a --distill-steps given still applies")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON to this file")
    args = ap.parse_args(argv)
    data = DataConfig(corpus="stdlib", seq_len=128)
    batch, warmup = 16, 20
    if args.small:
        args.seeds, args.intervals, args.interval_steps, args.pretrain_intervals = 1, 2, 3, 1
        args.changes = SMALL_CHANGES
        data, batch, warmup = replace(data, **SMALL_DATA), 4, 2
    changes = {name: CHANGES[name] for name in args.changes}
    torch.set_num_threads(1)
    backs: dict[str, list] = {name: [] for name in changes}
    curves: dict[tuple[str, bool], list[list[float]]] = {}   # (change, distilled) -> per seed
    runs: list[dict] = []   # per seed, for --out
    n = args.interval_steps
    for seed in range(args.seeds):
        train = TrainConfig(batch_size=batch, lr=1e-3, weight_decay=0.1, warmup_steps=warmup, grad_clip=1.0,
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
        run = {"seed": seed, "before": before, "unchanged": ref, "changes": []}
        for name, change in changes.items():
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
                run["changes"].append({"change": name, "distilled": distilled, "jump": jump, "back": back,
                                       "par": par, "val_loss": vals})
                label = "  + distill" if distilled else name
                print(f"  {label:30s} jump {jump:+.4f}  back {back or '-'}  par {par or '-'}  "
                      + " ".join(f"{v:.4f}" for v in vals))
        runs.append(run)
    print("intervals to win back the jump (per seed; '-': not within the run):")
    medians = {}
    for name, ks in backs.items():
        known = [k for k in ks if k is not None]
        medians[name] = statistics.median(known) if known else None
        print(f"  {name:30s} {' '.join(str(k or '-') for k in ks)}"
              + (f"  median {medians[name]:g}" if known else ""))
    distill_table = {}
    if args.distill_steps:
        print(f"val loss after each interval, mean over seeds: plain / distilled (distill_steps "
              f"{args.distill_steps}, weight {args.distill_weight:g}) / distilled - plain")
        for name in changes:
            plain, dist = (_mean_curve(curves[(name, d)]) for d in (False, True))
            distill_table[name] = {"plain": plain, "distilled": dist}
            print(f"  {name:30s} " + "  ".join(f"{p:.4f}/{q:.4f}/{q - p:+.4f}" for p, q in zip(plain, dist)))
    if args.out is not None:
        workload = {"seeds": args.seeds, "intervals": args.intervals, "interval_steps": n,
                    "pretrain_intervals": args.pretrain_intervals, "distill_steps": args.distill_steps,
                    "distill_weight": args.distill_weight, "changes": list(changes), "seq_len": data.seq_len,
                    "batch_size": batch, "small": args.small}
        args.out.write_text(json.dumps({"workload": workload, "runs": runs, "back_median": medians,
                                        "distill": distill_table}, indent=1))
    return 0


def _mean_curve(runs: list[list[float]]) -> list[float]:
    return [statistics.mean(vals) for vals in zip(*runs)]


if __name__ == "__main__":
    raise SystemExit(main())

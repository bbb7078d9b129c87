"""Replay: train one model from scratch on the best member's recorded schedule.

The search's result is not only a model but a schedule: which genome (hyperparameters and
architecture) was in effect from which step, and which seed drove the batches. ``replay_run``
follows it with a single fresh Trainer — ``set_hparams`` / ``set_architecture`` at the recorded
steps, a switch of batch order where an exploit moved the weights into another member — and
evaluates at the member's step. On CPU with the same thread count it reproduces the member's
val_bpb, which shows that the schedule (and not luck in the population) explains the result.
"""
from __future__ import annotations

import json
import time
from typing import Any

from population.config import TrainerConfig
from population.member import apply_genome, build_trainer
from population.store import RunStore
from trainers.config import DataConfig, InternLM2Config, TrainConfig
from trainers.fitness import FitnessConfig


def replay_run(storage: str, name: str, *, console: Any = None) -> dict:
    """Retrain the best member from its schedule; writes ``replay.json`` in the run store.

    Returns {"name", "member", "step", "val_bpb" (the replay's), "best_val_bpb" (the member's,
    also as "recorded_val_bpb"), "schedule", "seconds"}.
    """
    store = RunStore(storage, name)
    config = store.read_config()
    state = store.read_state()
    if state is None:
        raise ValueError(f"run {name!r} has no committed round yet: nothing to replay")
    scored = [m for m in state["members"] if m.get("alive", True) and m.get("history")]
    if not scored:
        raise ValueError(f"run {name!r} has no evaluated member yet: nothing to replay")
    best = min(scored, key=lambda m: (m["history"][-1][1], m["id"]))
    target = int(best["history"][-1][0])   # the step of its last evaluation
    schedule = best["schedule"]

    model = InternLM2Config(**config["model"])
    # the cosine horizon the members trained with (the driver sets it to the budget)
    decay_steps = state.get("decay_steps", config["train"].get("decay_steps"))
    train = TrainConfig(**dict(config["train"], decay_steps=decay_steps))
    data = DataConfig(**config["data"])
    fitness = FitnessConfig(**config["fitness"]) if config.get("fitness") else None
    kind = TrainerConfig(**config["population"].get("trainer") or {})
    threads = state.get("num_threads")
    t0 = time.perf_counter()
    first = schedule[0]
    trainer = build_trainer(model, train, data, first["genome"], first["seed"], threads, fitness, kind)
    for entry in schedule[1:]:
        if entry["step"] >= target:   # changes made after the last evaluation are not in its score
            break
        trainer.train(entry["step"] - trainer.step)
        if entry["seed"] != trainer.train_config.seed:
            # the weights moved into a member with another batch order: continue as it did
            moved = build_trainer(model, train, data, entry["genome"], entry["seed"], threads, fitness, kind)
            moved.load_state_dict(trainer.state_dict())
            trainer = moved
        apply_genome(trainer, model, entry["genome"])
        if console is not None:
            console.print(f"replay: step {trainer.step}: {entry['genome']}")
    trainer.train(target - trainer.step)
    val = trainer.evaluate()
    result = {
        "name": name,
        "member": best["id"],
        "step": trainer.step,
        "val_bpb": val["val_bpb"],
        "best_val_bpb": best["history"][-1][1],
        "recorded_val_bpb": best["history"][-1][1],
        "schedule": schedule,
        "seconds": time.perf_counter() - t0,
    }
    store.write_text("replay.json", json.dumps(result, indent=1, sort_keys=True) + "\n")
    return result

"""One member of the population: a Ray actor that keeps a Trainer resident between rounds.

The actor lives for the whole search, so an exploit never restarts a process, re-imports torch
or rebuilds an optimizer: the donor's state (weights + Adam moments + step + RNG) goes through
Ray's object store into the receiver's tensors (population/handoff.py).

Every evaluation keeps an immutable snapshot (a copy) of the evaluated state and returns it packed
as a second return value, so the object in Ray's object store is owned by the driver and outlives
this process (an object this process ``ray.put`` would die with it); ``publish``, ``get_state`` and
``save_checkpoint`` hand out the same snapshot. The actor runs with
``max_concurrency=2`` so the driver can take a donor's state or wait for a checkpoint write while
the member already trains its next interval: the snapshot is never touched by training, so that
is safe.

``build_trainer`` and ``apply_genome`` are plain functions so that a replay (population/replay.py)
builds and steers its Trainer exactly as a member does.

torch and the trainers are imported where a member first needs them (building its trainer): the
driver imports this module for the actor class and never trains, so it imports no torch.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Mapping

import ray

from evo.strategy import SCORE
from population.config import TrainerConfig
from population.handoff import WireState, take_state
from trainers.config import HPARAMS, DataConfig, InternLM2Config, TrainConfig
from trainers.fitness import FitnessConfig, load_function

if TYPE_CHECKING:
    from trainers.stub import SleepTrainer
    from trainers.trainer import Trainer

log = logging.getLogger(__name__)

SAVE_THREAD = "evo-save"   # the OS name of a checkpoint write's thread (name_thread)


def split_genome(genome: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``{"train.lr": .., "model.num_hidden_layers": ..}`` -> (train fields, model fields), no prefixes."""
    train: dict[str, Any] = {}
    model: dict[str, Any] = {}
    for path, value in genome.items():
        section, _, field = path.partition(".")
        if section == "train":
            train[field] = value
        elif section == "model":
            model[field] = value
        elif section == "data" and field.startswith("mix."):
            continue     # see mix_genes
        else:
            raise ValueError(f"genome: gene {path!r} is neither train.*, model.* nor data.mix.*")
    return train, model


def mix_genes(genome: Mapping[str, Any]) -> dict[str, float]:
    """``{"data.mix.docs": 0.3, ..}`` -> ``{"docs": 0.3}``: the genome's source weights."""
    return {p[len("data.mix."):]: float(v) for p, v in genome.items() if p.startswith("data.mix.")}


def set_mix(trainer: Trainer | SleepTrainer, genome: Mapping[str, Any]) -> bool:
    """Set the genome's data.mix genes in place (the next step draws by them). A mix whose every
    weight is 0 (the config refuses search spaces that can reach one; a genome from elsewhere
    still might) leaves nothing to draw: the trainer keeps the mix in force, with one warning
    line, and False is returned, instead of the member failing. Other bad weights still raise."""
    genes = mix_genes(genome)
    if not genes:
        return True
    merged = trainer.data_config.mix_weights({**trainer.mix, **genes})
    if all(w == 0 for w in merged.values()):
        kept = ", ".join(f"{k} {v:g}" for k, v in trainer.mix.items())
        log.warning("data.mix: every source's weight would be 0 (%s); the member keeps its mix (%s)",
                    ", ".join(f"{k} {v:g}" for k, v in merged.items()), kept)
        return False
    trainer.set_mix(**genes)
    return True


def model_config_for(base_model: InternLM2Config, genome: Mapping[str, Any]) -> InternLM2Config:
    """The full architecture of ``genome``: the base model with its model.* genes merged in."""
    return dataclasses.replace(base_model, **split_genome(genome)[1])


def build_trainer(base_model: InternLM2Config, base_train: TrainConfig, data: DataConfig,
                  genome: Mapping[str, Any], seed: int, num_threads: int | None = None,
                  fitness: FitnessConfig | None = None,
                  kind: TrainerConfig | None = None) -> Trainer | SleepTrainer:
    """A fresh trainer for ``genome``: its genes set from step 0, ``seed`` for init and batch order.
    ``kind`` (population.trainer) picks the InternLM2 Trainer (None, the default) or the stub
    that only sleeps (trainers/stub.py)."""
    from trainers.stub import SleepTrainer
    from trainers.trainer import Trainer

    train_fields, _ = split_genome(genome)
    train = dataclasses.replace(base_train, **train_fields, seed=int(seed))
    if train.num_threads is None and num_threads is not None:
        train = dataclasses.replace(train, num_threads=int(num_threads))
    if kind is not None and kind.kind == "sleep":
        trainer = SleepTrainer(model_config_for(base_model, genome), train, data,
                               step_s=kind.step_s, state_kb=kind.state_kb)
    else:
        trainer = Trainer(model_config_for(base_model, genome), train, data, fitness)
    set_mix(trainer, genome)   # an all-zero mix keeps data.mix's weights
    return trainer


def apply_genome(trainer: Trainer | SleepTrainer, base_model: InternLM2Config, genome: Mapping[str, Any]) -> float | None:
    """Steer a running trainer to ``genome``: train.* and data.mix.* genes in place, model.* genes
    by weight transfer. Returns the validation loss's jump at a lossy architecture change (shrinking, merging kv
    heads: trainers.transfer.preserves_function is False), measured before and after; None otherwise."""
    from trainers.transfer import preserves_function

    train_fields, _ = split_genome(genome)
    unknown = sorted(set(train_fields) - set(HPARAMS))
    if unknown:
        raise ValueError(f"genome: train.{unknown[0]} cannot change during training (not a hyperparameter)")
    new_model = model_config_for(base_model, genome)
    jump = None
    if new_model != trainer.model_config:
        if preserves_function(trainer.model_config, new_model):
            trainer.set_architecture(new_model)
        else:
            before = trainer.evaluate()["val_loss"]
            trainer.set_architecture(new_model)
            jump = trainer.evaluate()["val_loss"] - before
    if train_fields:
        trainer.set_hparams(**train_fields)
    set_mix(trainer, genome)    # in place: the next step draws by it (an all-zero mix keeps the old one)
    return jump


def _interval_totals() -> dict:
    return {"losses": [], "tokens": 0, "train_s": 0.0, "seconds": 0.0, "cpu_seconds": 0.0}


def name_thread(name: str) -> None:
    """Give the calling thread an OS-level name (at most 15 bytes): ``top -H``, ``py-spy dump``
    and /proc/<pid>/task/<tid>/comm show it (bench/cpu_census.py counts the checkpoint writes'
    CPU by it; Ray names the threads that run an actor's calls itself, by the call). Where the
    OS has no such name (not Linux), nothing happens."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass


def threads_for(num_cpus: float) -> int:
    """torch threads matching a member's CPU share (a fraction still gets one thread)."""
    return max(1, math.floor(num_cpus))


@ray.remote
class Member:
    """A population member: a resident Trainer plus a snapshot of its state for other members.

    Created by the driver with ``.options(name=f"{run}/m{id}", num_cpus=..., num_gpus=...,
    max_concurrency=2)``. ``get_state``, ``publish`` and ``wait_saved`` may run while
    ``train_and_evaluate`` does; the driver never calls the other methods then.

    The snapshot is the state at the last evaluation (copied and packed while still training
    time), or, after the state changed between intervals (exploit, new genome, restart), taken
    on demand: before the next interval starts, or when asked for. It is never the live
    trainer, so handing it out while training is safe.
    """

    def __init__(self, member_id: int, base_model: InternLM2Config, base_train: TrainConfig,
                 data: DataConfig, genome: Mapping[str, Any], seed: int, num_threads: int,
                 fitness: FitnessConfig | None = None, kind: TrainerConfig | None = None) -> None:
        import torch

        os.environ["EVO_NUM_THREADS"] = str(num_threads)
        torch.set_num_threads(num_threads)
        self.member_id = member_id
        self.base_model = base_model
        self.base_train = base_train
        self.data = data
        self.fitness = fitness
        self.kind = kind
        # the user's metric (fitness.function), imported here; the config checked it already
        self._score_fn = load_function(fitness.function) if fitness is not None and fitness.function else None
        self.num_threads = num_threads
        self.trainer = build_trainer(base_model, base_train, data, genome, seed, num_threads, fitness, kind)
        self._lock = threading.Lock()        # guards the snapshot against a concurrent get_state
        self._snapshot: dict | None = None   # None: the trainer changed since the last one
        self._wire: WireState | None = None  # the snapshot packed for the object store
        self._saver: threading.Thread | None = None
        self._saved: dict | BaseException = {}
        self._interval = _interval_totals()  # the parts of the interval trained so far

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this process runs on (the driver names it when the node is lost)."""
        return ray.get_runtime_context().get_node_id()

    def _current(self) -> dict:
        """The snapshot, taken from the (idle) trainer if the state changed since the last one.
        Trainer.state_dict() returns copies, so the snapshot never moves with training."""
        with self._lock:
            if self._snapshot is None:
                self._snapshot, self._wire = self.trainer.state_dict(), None
            return self._snapshot

    def _changed(self) -> None:
        with self._lock:
            self._snapshot, self._wire = None, None
        self._interval = _interval_totals()

    def train_part(self, n_steps: int) -> dict:
        """Train ``n_steps`` of the current interval without evaluating: the driver splits an
        interval into parts when members share slots (``train_and_evaluate`` trains the last
        part). Returns {"step", "seconds"} of this part, or a failure as train_and_evaluate does."""
        from trainers.trainer import NonFiniteLossError

        t0, cpu0 = time.perf_counter(), time.process_time()
        self._current()   # from here on a concurrent get_state never reads the live trainer
        acc = self._interval
        try:
            train = self.trainer.train(n_steps)
        except NonFiniteLossError as e:   # the snapshot stays the last sound state
            seconds = acc["seconds"] + time.perf_counter() - t0
            self._interval = _interval_totals()
            return {"failed": True, "error": f"non-finite loss: {e}", "step": self.trainer.step,
                    "seconds": seconds}
        acc["losses"] += train["losses"]
        acc["tokens"] += train["tokens"]
        acc["train_s"] += train["seconds"]
        part_s = time.perf_counter() - t0
        acc["seconds"] += part_s
        acc["cpu_seconds"] += time.process_time() - cpu0
        return {"step": self.trainer.step, "seconds": part_s}

    @ray.method(num_returns=2)
    def train_and_evaluate(self, n_steps: int) -> tuple[dict, WireState | None]:
        """Train the (last) ``n_steps`` of the interval, evaluate on the held-out set, keep a
        snapshot of the evaluated state. Figures cover the whole interval (every part of it).

        Two return values: the figures, and the evaluated state packed (None on failure). The
        second lands in the object store owned by the caller, so it survives this process: the
        driver restores this member from it if the process dies, and exploits read it.

        A diverged member (non-finite loss) is reported as ``{"failed": True, "error": ...}``
        rather than crashing the actor: the driver decides what to do with it.
        """
        part = self.train_part(n_steps)
        if part.get("failed"):
            return part, None
        t0, cpu0 = time.perf_counter(), time.process_time()
        acc, self._interval = self._interval, _interval_totals()
        ev = self.trainer.evaluate()
        if not math.isfinite(ev["val_bpb"]):
            return {"failed": True, "error": f"non-finite validation loss ({ev['val_bpb']})",
                    "step": self.trainer.step, "seconds": acc["seconds"] + time.perf_counter() - t0}, None
        if self._score_fn is not None:   # a failure marks this evaluation's score, never the member
            score, error = self.trainer.score(self._score_fn, self.fitness.function)
            ev = {**ev, SCORE: score, **({"score_error": error} if error else {})}
        snapshot = self.trainer.state_dict()
        # packed now, while this still counts as the member's own time: an exploit is then one
        # call on the receiver
        wire = WireState(snapshot)
        with self._lock:
            self._snapshot, self._wire = snapshot, wire
        losses = acc["losses"]
        tail_s = time.perf_counter() - t0
        return {
            "step": self.trainer.step,
            "train_loss": float(sum(losses) / len(losses)) if losses else math.nan,
            "val_bpb": float(ev["val_bpb"]),
            "val_loss": float(ev["val_loss"]),
            "tokens_per_s": float(acc["tokens"] / acc["train_s"]) if acc["train_s"] > 0 else 0.0,
            "params": int(self.trainer.num_parameters()),
            "seconds": acc["seconds"] + tail_s,              # the whole interval, every part
            "cpu_seconds": acc["cpu_seconds"] + time.process_time() - cpu0,   # < seconds when the CPU is shared
            "part_seconds": part["seconds"],                 # this call's training part
            "eval_seconds": tail_s,                          # evaluation + snapshot
            **{k: float(v) for k, v in ev.items() if k.startswith("val_bpb.") or k == SCORE},   # each set's, the score
            **({"score_error": ev["score_error"]} if "score_error" in ev else {}),
        }, wire

    def get_state(self) -> WireState:
        """The snapshot (the last evaluated state unless changed since): safe to take while this
        member trains on. Unpickled (by the receiver, or ray.get) it is the trainer's state dict."""
        snapshot = self._current()
        wire = self._wire
        if wire is None:
            wire = WireState(snapshot)
            with self._lock:
                if self._snapshot is snapshot:
                    self._wire = wire
        return wire

    @ray.method(num_returns=2)
    def publish(self) -> tuple[dict, WireState]:
        """({"step"}, the snapshot packed): the driver keeps the second as this member's state in
        the object store (owned by the driver, so it outlives this process) after the state
        changed between intervals; the first tells it the object is there without fetching it."""
        wire = self.get_state()
        return {"step": int(wire.tree["step"])}, wire

    def load_state(self, state: dict | list) -> dict:
        """Become a copy of ``state`` (weights, optimizer, step, RNG, hyperparameters).

        ``state`` is ``[ref]`` of a state in the object store (the driver's form: read here, see
        population/handoff.py) or a state dict (an ObjectRef argument arrives resolved)."""
        t0 = time.perf_counter()
        state = take_state(state)
        t1 = time.perf_counter()
        self.trainer.load_state_dict(state)
        del state
        self._changed()
        return {"step": self.trainer.step, "params": int(self.trainer.num_parameters()),
                "read_s": t1 - t0, "load_s": time.perf_counter() - t1}

    def merge(self, state: dict | list, alpha: float) -> dict:
        """Merge crossover: weights and Adam moments become ``alpha`` * own + (1 - ``alpha``) *
        ``state``'s (the other parent, same architecture; ``[ref]`` as for load_state)."""
        self.trainer.merge_from(take_state(state), alpha)
        self._changed()
        return {"step": self.trainer.step, "params": int(self.trainer.num_parameters())}

    def inherit_layers(self, state: dict | list, genome: Mapping[str, Any], sources: dict[str, int | None],
                       shrink: float) -> dict:
        """Merge crossover of parents of two architectures: become ``genome``'s architecture with
        each unit from one parent (``sources``: 0 own, 1 ``state``'s — the other parent, ``[ref]``
        as for load_state —, None a new layer; Trainer.inherit_layers). "perturbed": the names
        of the tensors shrunk and perturbed because their shape differs from the source's."""
        perturbed = self.trainer.inherit_layers(take_state(state), model_config_for(self.base_model, genome),
                                                sources, shrink)
        self._changed()
        return {"step": self.trainer.step, "params": int(self.trainer.num_parameters()), "perturbed": perturbed}

    def apply_genome(self, genome: Mapping[str, Any]) -> dict:
        """Take ``genome``: hyperparameters set in place, architecture changed with weights carried."""
        jump = apply_genome(self.trainer, self.base_model, genome)
        self._changed()
        out = {"step": self.trainer.step, "params": int(self.trainer.num_parameters())}
        if jump is not None:
            out["val_loss_jump"] = jump
        return out

    def restart(self, genome: Mapping[str, Any], seed: int) -> dict:
        """Throw the weights away: a fresh Trainer for ``genome`` (same process)."""
        self.trainer = build_trainer(self.base_model, self.base_train, self.data, genome, seed,
                                     self.num_threads, self.fitness, self.kind)
        self._changed()
        return {"step": self.trainer.step, "params": int(self.trainer.num_parameters())}

    def save_checkpoint(self, storage: str, name: str, rel_path: str) -> dict:
        """Start writing the snapshot to the run store in a background thread.

        Returns at once (with the step being saved), so the driver can start the next interval
        while the bytes go to disk; ``wait_saved`` joins the write.
        """
        from population.store import RunStore

        self.wait_saved()  # one write at a time
        state = self._current()  # immutable: training replaces it, never mutates it

        def write() -> None:
            name_thread(SAVE_THREAD)
            try:
                size, sha = RunStore(storage, name).write_checkpoint(rel_path, state)
                self._saved = {"path": rel_path, "bytes": int(size or 0), "sha256": sha}
            except BaseException as e:  # handed to the driver by wait_saved
                self._saved = e

        self._saved = {}
        self._saver = threading.Thread(target=write, name=f"save-{rel_path}", daemon=True)
        self._saver.start()
        return {"step": int(state["step"])}

    def wait_saved(self) -> dict:
        """Block until the last checkpoint write is complete; returns {"path", "bytes",
        "sha256"} of it ({} when none was written): the driver records the checksum without
        reading the ``.sha256`` file back."""
        if self._saver is not None:
            self._saver.join()
            self._saver = None
        if isinstance(self._saved, BaseException):
            error, self._saved = self._saved, {}
            raise error
        return self._saved

    def load_checkpoint(self, storage: str, name: str, rel_path: str) -> dict:
        """Continue from a committed checkpoint of the run store (resume)."""
        from population.store import RunStore

        self.trainer.load_state_dict(RunStore(storage, name).load_checkpoint(rel_path))
        self._changed()
        return {"step": self.trainer.step, "params": int(self.trainer.num_parameters())}

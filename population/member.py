"""One member of the population: a Ray actor that keeps a Trainer resident between rounds.

The actor lives for the whole search, so an exploit never restarts a process, re-imports torch
or rebuilds an optimizer: the donor's state (weights + Adam moments + step + RNG) goes straight
into the receiver's tensors — on one node through a shared-memory file the donor published when
it was evaluated, the order arriving on a pipe (population/shared_state.py, channel.py), across
nodes through the Ray object store (``load_state(donor.get_state())``).

Every evaluation keeps an immutable snapshot (a copy) of the evaluated state; ``get_state``
and ``save_checkpoint`` hand out that snapshot. The actor runs with ``max_concurrency=2`` so
the driver can take a donor's state or wait for a checkpoint write while the member already
trains its next interval: the snapshot is never touched by training, so that is safe. The
state crosses the object store as one flat buffer (``WireState``), not tensor by tensor.

``build_trainer`` and ``apply_genome`` are plain functions so that a replay (population/replay.py)
builds and steers its Trainer exactly as a member does.
"""
from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import ray
import torch

from population.channel import Listener
from population.shared_state import Publisher, SharedFile, SharedStateError
from trainers.data import DataConfig
from trainers.model import InternLM2Config
from trainers.trainer import HPARAMS, NonFiniteLossError, TrainConfig, Trainer


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
        else:
            raise ValueError(f"genome: gene {path!r} is neither train.* nor model.*")
    return train, model


def model_config_for(base_model: InternLM2Config, genome: Mapping[str, Any]) -> InternLM2Config:
    """The full architecture of ``genome``: the base model with its model.* genes merged in."""
    return dataclasses.replace(base_model, **split_genome(genome)[1])


def build_trainer(base_model: InternLM2Config, base_train: TrainConfig, data: DataConfig,
                  genome: Mapping[str, Any], seed: int, num_threads: int | None = None) -> Trainer:
    """A fresh Trainer for ``genome``: its genes set from step 0, ``seed`` for init and batch order."""
    train_fields, _ = split_genome(genome)
    train = dataclasses.replace(base_train, **train_fields, seed=int(seed))
    if train.num_threads is None and num_threads is not None:
        train = dataclasses.replace(train, num_threads=int(num_threads))
    return Trainer(model_config_for(base_model, genome), train, data)


def apply_genome(trainer: Trainer, base_model: InternLM2Config, genome: Mapping[str, Any]) -> None:
    """Steer a running trainer to ``genome``: train.* genes in place, model.* genes by weight transfer."""
    train_fields, _ = split_genome(genome)
    unknown = sorted(set(train_fields) - set(HPARAMS))
    if unknown:
        raise ValueError(f"genome: train.{unknown[0]} cannot change during training (not a hyperparameter)")
    new_model = model_config_for(base_model, genome)
    if new_model != trainer.model_config:
        trainer.set_architecture(new_model)
    if train_fields:
        trainer.set_hparams(**train_fields)


class WireState:
    """A trainer state that pickles as one flat byte buffer plus a small tree of metadata.

    ``get_state`` returns one; whoever unpickles it (the receiver of an exploit, a test) gets
    the plain state dict back. pickle 5 sends the buffer out of band, so crossing the object
    store costs one memcpy in and one out. (torch's own pickling saves every storage through
    torch.save, ~50 µs per tensor: more than the transfer itself for small models.) The packing
    happens on construction, so a member packs its evaluated state while it still counts as
    training time, not while a receiver waits.
    """

    ALIGN = 16   # bytes; every tensor starts aligned so its slice can be viewed as its dtype

    def __init__(self, state: dict) -> None:
        tensors: list[torch.Tensor] = []
        self.tree = _strip_tensors(state, tensors)
        self.meta: list[tuple] = []
        chunks, offset = [], 0
        for t in tensors:
            flat = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            self.meta.append((str(t.dtype).removeprefix("torch."), tuple(t.shape), offset, flat.numel()))
            pad = -flat.numel() % self.ALIGN
            chunks += [flat, torch.zeros(pad, dtype=torch.uint8)] if pad else [flat]
            offset += flat.numel() + pad
        self.buffer = torch.cat(chunks).numpy() if chunks else np.zeros(0, dtype=np.uint8)   # (bytes,)

    def __reduce__(self) -> tuple:
        return _unpack_state, (self.tree, self.meta, self.buffer)


class _Slot:
    """Where tensor number ``index`` sits in a packed state's tree."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __reduce__(self) -> tuple:
        return _Slot, (self.index,)


def _map_leaves(obj: Any, leaf: Any) -> Any:
    """The same dict/list/tuple nesting with ``leaf(x)`` in place of every other value."""
    if isinstance(obj, dict):
        return {k: _map_leaves(v, leaf) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_leaves(v, leaf) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_map_leaves(v, leaf) for v in obj)
    return leaf(obj)


def _strip_tensors(obj: Any, out: list[torch.Tensor]) -> Any:
    """``obj`` with each tensor moved to ``out`` and replaced by its _Slot (traversal order)."""
    def leaf(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        out.append(x)
        return _Slot(len(out) - 1)
    return _map_leaves(obj, leaf)


def _fill_tensors(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """Inverse of _strip_tensors."""
    return _map_leaves(obj, lambda x: tensors[x.index] if isinstance(x, _Slot) else x)


def _unpack_state(tree: Any, meta: list[tuple], buffer: np.ndarray) -> dict:
    """Inverse of WireState.__reduce__. The buffer arrives as a read-only view of shared
    memory: it is copied out once (one memcpy) into memory of the receiver's own, and the tensors
    are views into that copy, so they never alias the object store (the optimizer moments are
    updated in place). The RNG state is copied alone (torch.Generator.set_state wants its own
    storage at offset 0)."""
    own = torch.from_numpy(buffer.copy()) if buffer.size else torch.empty(0, dtype=torch.uint8)
    tensors = [own[offset:offset + n].view(getattr(torch, dtype)).reshape(shape)
               if n else torch.empty(shape, dtype=getattr(torch, dtype))
               for dtype, shape, offset, n in meta]
    state = _fill_tensors(tree, tensors)
    rng = state.get("rng") if isinstance(state, dict) else None
    if isinstance(rng, dict):
        state["rng"] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in rng.items()}
    return state


def _interval_totals() -> dict:
    return {"losses": [], "tokens": 0, "train_s": 0.0, "seconds": 0.0, "cpu_seconds": 0.0}


def threads_for(num_cpus: float) -> int:
    """torch threads matching a member's CPU share (a fraction still gets one thread)."""
    return max(1, math.floor(num_cpus))


@ray.remote
class Member:
    """A population member: a resident Trainer plus a snapshot of its state for other members.

    Created by the driver with ``.options(name=f"{run}/m{id}", num_cpus=..., num_gpus=...,
    max_concurrency=2)``. ``get_state`` and ``wait_saved`` may run while ``train_and_evaluate``
    does; the driver never calls the other methods then.

    The snapshot is the state at the last evaluation (copied and packed while still training
    time), or, after the state changed between intervals (exploit, new genome, restart), taken
    on demand: before the next interval starts, or when asked for. It is never the live
    trainer, so handing it out while training is safe.
    """

    def __init__(self, member_id: int, base_model: InternLM2Config, base_train: TrainConfig,
                 data: DataConfig, genome: Mapping[str, Any], seed: int, num_threads: int,
                 shared_dir: str | None = None) -> None:
        os.environ["EVO_NUM_THREADS"] = str(num_threads)
        torch.set_num_threads(num_threads)
        self.member_id = member_id
        self.base_model = base_model
        self.base_train = base_train
        self.data = data
        self.num_threads = num_threads
        self.trainer = build_trainer(base_model, base_train, data, genome, seed, num_threads)
        self._lock = threading.Lock()        # guards the snapshot against a concurrent get_state
        self._snapshot: dict | None = None   # None: the trainer changed since the last one
        self._wire: WireState | None = None  # the snapshot packed for the object store
        self._saver: threading.Thread | None = None
        self._saved: int | BaseException = 0
        self._interval = _interval_totals()  # the parts of the interval trained so far
        self._publisher: Publisher | None = None   # evaluated states as shared-memory files
        self._listener: Listener | None = None     # the driver's pipe for load_state orders
        if shared_dir is not None:
            try:   # the driver's session directory; on another node it is made here
                Path(shared_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
                self._publisher = Publisher(shared_dir, f"m{member_id}")
                self._listener = Listener(shared_dir, f"m{member_id}", self._order)
            except OSError:
                self._publisher = self._listener = None

    def pid(self) -> int:
        return os.getpid()

    def where(self) -> dict:
        """This member's node, and the pipes (request, reply) it takes load_state orders on."""
        return {"node": ray.get_runtime_context().get_node_id(),
                "channel": None if self._listener is None else self._listener.paths}

    def _order(self, name: str, *args: Any) -> Any:
        if name != "load_state":
            raise ValueError(f"unknown order {name!r}")
        return self.load_state(*args)

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

    def train_and_evaluate(self, n_steps: int) -> dict:
        """Train the (last) ``n_steps`` of the interval, evaluate on the held-out set, keep a
        snapshot of the evaluated state. Figures cover the whole interval (every part of it).

        A diverged member (non-finite loss) is reported as ``{"failed": True, "error": ...}``
        rather than crashing the actor: the driver decides what to do with it.
        """
        part = self.train_part(n_steps)
        if part.get("failed"):
            return part
        t0, cpu0 = time.perf_counter(), time.process_time()
        acc, self._interval = self._interval, _interval_totals()
        ev = self.trainer.evaluate()
        if not math.isfinite(ev["val_bpb"]):
            return {"failed": True, "error": f"non-finite validation loss ({ev['val_bpb']})",
                    "step": self.trainer.step, "seconds": acc["seconds"] + time.perf_counter() - t0}
        snapshot = self.trainer.state_dict()
        # published now, while this still counts as the member's training time: an exploit is
        # then one call on the receiver. A file in /dev/shm for receivers on this node (read
        # with one copy straight into their tensors), else the object store
        shared = self._publisher.publish(snapshot) if self._publisher is not None else None
        published = {"shared": shared} if shared is not None else {"state_ref": [ray.put(WireState(snapshot))]}
        with self._lock:
            self._snapshot, self._wire = snapshot, None
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
            # the published state: "shared" (a file path) or "state_ref" (in a list: handed to
            # the driver as a reference, not fetched)
            **published,
        }

    def get_state(self) -> WireState:
        """The snapshot (the last evaluated state unless changed since): safe to take while this
        member trains on. Unpickled (by the receiver, or ray.get) it is the trainer's state dict.
        (The evaluated snapshot is also in train_and_evaluate's result, already in the object
        store; the driver asks for this one when it has none that is current.)"""
        snapshot = self._current()
        wire = self._wire
        if wire is None:
            wire = WireState(snapshot)
            with self._lock:
                if self._snapshot is snapshot:
                    self._wire = wire
        return wire

    def load_state(self, state: dict | list | str) -> dict:
        """Become a copy of ``state`` (weights, optimizer, step, RNG, hyperparameters).

        ``state`` is a state dict (an ObjectRef argument arrives resolved), ``[ref]``: read here
        from the object store (measured ~0.3 ms faster per exploit than having Ray resolve it as
        a task argument), or the path of a donor's shared-memory file on this node, read here
        (population/shared_state.py)."""
        t0 = time.perf_counter()
        if isinstance(state, str):
            try:
                shared = SharedFile(state)   # the header only: the tensors are read in place
            except SharedStateError as e:    # the driver falls back to a snapshot of the donor
                return {"missing": str(e)}
            t1 = time.perf_counter()
            with shared:
                self.trainer.load_state_dict(shared.state, read_into=shared.read_into)
            via = "shared_memory"
        else:
            if isinstance(state, list):
                [state] = ray.get(state)
            t1 = time.perf_counter()
            self.trainer.load_state_dict(state)
            via = "object_store"
        del state
        self._changed()
        return {"step": self.trainer.step, "params": int(self.trainer.num_parameters()),
                "read_s": t1 - t0, "load_s": time.perf_counter() - t1, "via": via}

    def close_shared(self) -> None:
        """Remove this member's shared-memory files (the driver calls it when the run ends)."""
        if self._publisher is not None:
            self._publisher.close()
        if self._listener is not None:
            self._listener.close()

    def apply_genome(self, genome: Mapping[str, Any]) -> dict:
        """Take ``genome``: hyperparameters set in place, architecture changed with weights carried."""
        apply_genome(self.trainer, self.base_model, genome)
        self._changed()
        return {"step": self.trainer.step, "params": int(self.trainer.num_parameters())}

    def restart(self, genome: Mapping[str, Any], seed: int) -> dict:
        """Throw the weights away: a fresh Trainer for ``genome`` (same process)."""
        self.trainer = build_trainer(self.base_model, self.base_train, self.data, genome, seed,
                                     self.num_threads)
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
            try:
                self._saved = int(RunStore(storage, name).save_checkpoint(rel_path, state) or 0)
            except BaseException as e:  # handed to the driver by wait_saved
                self._saved = e

        self._saved = 0
        self._saver = threading.Thread(target=write, name=f"save-{rel_path}", daemon=True)
        self._saver.start()
        return {"step": int(state["step"])}

    def wait_saved(self) -> int:
        """Block until the last checkpoint write is complete; returns the bytes written."""
        if self._saver is not None:
            self._saver.join()
            self._saver = None
        if isinstance(self._saved, BaseException):
            error, self._saved = self._saved, 0
            raise error
        return self._saved

    def load_checkpoint(self, storage: str, name: str, rel_path: str) -> dict:
        """Continue from a committed checkpoint of the run store (resume)."""
        from population.store import RunStore

        self.trainer.load_state_dict(RunStore(storage, name).load_checkpoint(rel_path))
        self._changed()
        return {"step": self.trainer.step, "params": int(self.trainer.num_parameters())}

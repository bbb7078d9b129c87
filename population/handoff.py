"""The exploit hand-off: how a receiver becomes a copy of its donor, through Ray's object store.

An exploit (or a crossover, or the copy that replaces a failed member) moves the donor's trainer
state — weights, Adam moments, step, RNG, hyperparameters — into the receiver's resident
process, with no checkpoint and no restart:

1. When a member is evaluated it packs a snapshot of the evaluated state into one flat buffer
   (:class:`WireState`) and returns it as a second return value of ``train_and_evaluate``
   (counted as the member's own time): the object is in the object store, owned by the driver.
2. The driver keeps, for every member, a reference to the state its record describes
   (:attr:`Handoff.current`): the evaluated state, or — after the state changed between
   intervals (exploit, new genome, restart, restore) — a snapshot the member publishes then
   (:meth:`Handoff.refresh`, ``Member.publish``). Because the driver owns these objects they
   outlive the member's process: a member that dies is restored from its own reference
   (population/decisions.py), losing at most the interval it was training.
3. On exploit the driver gives the donor's reference to ``receiver.load_state``
   (:meth:`Handoff.move`). The receiver reads it from the object store — on one node a read of
   the shared plasma memory, across nodes Ray pulls the object to the receiver's node — and
   copies it into its own tensors. The bytes never pass through the driver, and the donor is
   not called (it may be training, or dead).

Everything moves through Ray: ObjectRefs and Ray's own (de)serialisation. ``WireState`` is only
the form the state takes in the store: pickle protocol 5 carries its one buffer out of band, so
packing costs one memcpy and unpacking one more, where torch's own pickling goes tensor by tensor.

GPU members use the same path (the snapshot is a CPU copy). Ray Direct Transport
(``@ray.method(tensor_transport="cuda_ipc" | "nccl")`` on the method that returns the tensors)
is the intended GPU path — device to device, without the CPU copy — but it is not built: it
could not be verified without a GPU.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import numpy as np
import ray

if TYPE_CHECKING:
    import torch

    from population.members import Members

# torch is imported where a state is packed or unpacked, which only members do: the driver
# (Handoff) moves references and never a tensor, so importing this module imports no torch.


class WireState:
    """A trainer state that pickles as one flat byte buffer plus a small tree of metadata.

    Whoever unpickles it (Ray, for the receiver of an exploit or a test) gets the plain state
    dict back. The packing happens on construction, so a member packs its evaluated state while
    it still counts as training time, not while a receiver waits.
    """

    ALIGN = 16   # bytes; every tensor starts aligned so its slice can be viewed as its dtype

    def __init__(self, state: dict) -> None:
        import torch

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


def take_state(state: dict | list) -> dict:
    """Member side: the state dict that ``load_state`` was given — ``[ref]`` read from the object
    store here (the driver's form: a list, so Ray does not resolve it before the call), or a
    state dict already (a test, or a ref Ray resolved as the argument)."""
    if isinstance(state, list):
        [state] = ray.get(state)
    return state


class Handoff:
    """Driver side: each member's current state in the object store, and the moves."""

    def __init__(self, members: Members) -> None:
        self.members = members
        self.current: dict[int, Any] = {}   # member -> ObjectRef of the state its record describes

    def keep_evaluated(self, results: Mapping[int, Any]) -> None:
        """Every member evaluated in ``results`` is now its evaluated state (the object its
        ``train_and_evaluate`` returned beside the figures)."""
        for m, res in results.items():
            ref = self.members.take_published(m)
            if isinstance(res, dict) and not res.get("failed") and ref is not None:
                self.current[m] = ref

    def refresh(self, ids: Iterable[int]) -> set[int]:
        """The states of ``ids`` changed between intervals: each publishes its new state, kept
        once it is in the object store; returns the members that did. One that died meanwhile
        keeps its previous reference (the caller does not record its change: it is restored to
        that state)."""
        calls = {m: self.members[m].publish.remote() for m in sorted(ids)}
        done = self.members.call({m: info for m, (info, _) in calls.items()})
        for m in done:
            self.current[m] = calls[m][1]
        return set(done)

    def move(self, sources: Mapping[int, int], states: Mapping[int, Any] | None = None,
             ) -> tuple[dict[int, dict], dict[int, float]]:
        """Every receiver ``m`` of ``sources`` becomes a copy of donor ``sources[m]``'s current
        state, or its state in ``states`` (a copy of ``current`` taken earlier: a plan's donors
        as they were judged). Read from the object store; the donor is not called, so it may be
        training or dead. Returns ({receiver: load_state result}, {receiver: seconds from the first call
        until its load was seen done}) for the receivers that loaded; a receiver that died is
        in ``members.dead``, and one whose donor's state was lost (its node) keeps its own."""
        actors = self.members.actors
        t0 = time.perf_counter()
        states = self.current if states is None else states
        loads = {actors[m].load_state.remote([states[donor]]): m for m, donor in sources.items()}
        loaded, latency = {}, {}
        for ref, seen in self.members.done(list(loads)):
            m = loads[ref]
            for m, res in self.members.call({m: ref}).items():
                loaded[m] = res
                latency[m] = seen - t0
        return loaded, latency


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
    import torch

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
    """Inverse of WireState.__reduce__. The buffer arrives as a read-only view of the object
    store's memory: it is copied out once into memory of the receiver's own, and the tensors are
    views into that copy, so they never alias the store (the optimizer moments are updated in
    place). The RNG state is copied alone (torch.Generator.set_state wants its own storage at
    offset 0)."""
    import torch

    own = torch.from_numpy(buffer.copy()) if buffer.size else torch.empty(0, dtype=torch.uint8)
    tensors = [own[offset:offset + n].view(getattr(torch, dtype)).reshape(shape)
               if n else torch.empty(shape, dtype=getattr(torch, dtype))
               for dtype, shape, offset, n in meta]
    state = _fill_tensors(tree, tensors)
    rng = state.get("rng") if isinstance(state, dict) else None
    if isinstance(rng, dict):
        state["rng"] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in rng.items()}
    return state

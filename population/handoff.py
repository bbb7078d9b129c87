"""The exploit hand-off: how a receiver becomes a copy of its donor, through Ray's object store.

An exploit (or a crossover, or the copy that replaces a failed member) moves the donor's trainer
state — weights, Adam moments, step, RNG, hyperparameters — into the receiver's resident
process, with no checkpoint and no restart:

1. When a member is evaluated it packs a snapshot of the evaluated state into one flat buffer
   (:class:`WireState`) and puts it into the object store once (:func:`put_state`, counted as
   the member's own time); ``train_and_evaluate`` returns the reference, not the bytes.
2. The driver keeps each member's last evaluated reference (:meth:`Handoff.keep_evaluated`) and
   forgets it when the member's state changes (:meth:`Handoff.forget`).
3. On exploit the driver gives the reference to ``receiver.load_state`` (:meth:`Handoff.move`).
   The receiver reads it from the object store — on one node a read of the shared plasma
   memory, across nodes Ray pulls the object to the receiver's node — and copies it into its
   own tensors. The bytes never pass through the driver. A donor whose state changed since its
   evaluation is asked for a snapshot now (``donor.get_state``), once per donor and plan.

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
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import ray
import torch

if TYPE_CHECKING:
    from population.members import Members


class WireState:
    """A trainer state that pickles as one flat byte buffer plus a small tree of metadata.

    Whoever unpickles it (Ray, for the receiver of an exploit or a test) gets the plain state
    dict back. The packing happens on construction, so a member packs its evaluated state while
    it still counts as training time, not while a receiver waits.
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


def put_state(state: dict) -> list:
    """Member side: ``state`` packed and put into the object store; ``[ref]`` (in a list, so that
    a task returning it hands the driver the reference, not the fetched bytes)."""
    return [ray.put(WireState(state))]


def take_state(state: dict | list) -> dict:
    """Member side: the state dict that ``load_state`` was given — ``[ref]`` read from the object
    store here, or a state dict already (a test, or a ref Ray resolved as the argument)."""
    if isinstance(state, list):
        [state] = ray.get(state)
    return state


class Handoff:
    """Driver side: each member's last evaluated state in the object store, and the moves."""

    def __init__(self, members: Members) -> None:
        self.members = members
        self.evaluated: dict[int, Any] = {}   # member -> ObjectRef of its evaluated state, while current

    def keep_evaluated(self, results: Mapping[int, Any]) -> None:
        """Keep the state reference of every member evaluated in ``results`` (taken out of the
        result, so what goes on to the records and sinks is plain data)."""
        for m, res in results.items():
            if isinstance(res, dict) and "state_ref" in res:
                [self.evaluated[m]] = res.pop("state_ref")

    def forget(self, m: int) -> None:
        """m's state changed (exploit, new genome, restart): its evaluated state is no longer it."""
        self.evaluated.pop(m, None)

    def move(self, sources: Mapping[int, int]) -> tuple[dict[int, dict], dict[int, float]]:
        """Every receiver ``m`` of ``sources`` becomes a copy of donor ``sources[m]``'s state.

        Donors without a current evaluated state are snapshotted first (once each); when a donor
        is also a receiver, every donor state is taken before any member loads. The receivers
        are forgotten (their states change). Returns ({receiver: load_state result},
        {receiver: seconds from the first call until its load was seen done})."""
        actors = self.members.actors
        t0 = time.perf_counter()
        taken: dict[int, Any] = {}
        refs = {}
        for m, donor in sources.items():
            ref = self.evaluated.get(donor)
            if ref is None:
                ref = taken.get(donor)
                if ref is None:
                    ref = taken[donor] = actors[donor].get_state.remote()
            refs[m] = ref
        if taken and set(sources.values()) & set(sources):
            for _ in self.members.done(list(taken.values())):
                pass
        for m in sources:
            self.forget(m)
        loads = {actors[m].load_state.remote([ref]): m for m, ref in refs.items()}
        del refs, taken
        loaded, latency = {}, {}
        for ref, seen in self.members.done(list(loads)):
            m = loads[ref]
            loaded[m] = ray.get(ref)
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
    own = torch.from_numpy(buffer.copy()) if buffer.size else torch.empty(0, dtype=torch.uint8)
    tensors = [own[offset:offset + n].view(getattr(torch, dtype)).reshape(shape)
               if n else torch.empty(shape, dtype=getattr(torch, dtype))
               for dtype, shape, offset, n in meta]
    state = _fill_tensors(tree, tensors)
    rng = state.get("rng") if isinstance(state, dict) else None
    if isinstance(rng, dict):
        state["rng"] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in rng.items()}
    return state

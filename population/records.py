"""The population's records: what the driver knows of each member, the lineage, the commits.

``MemberRecord`` is the contract between the loop, the run store and the sinks: one member as
committed in ``state.json`` (``members``), as the monitor's sinks and ``evo status`` read it.
``Records`` holds one record per member plus the run's counters, writes the lineage and commits
the state; it calls no actor and imports no ray (it knows the members only by id).

Lineage (``lineage.jsonl``): one record per event, ``event`` one of born | exploit | explore |
crossover | restart | died | restored, with round, member, parents, genome, changed (the readable
diff against the genome the weights came from), diff, step and fitness. ``restored``: the
member's process died and it came back to its own state at ``step`` (``source``: object store or
checkpoint), the lost steps to be trained again; it is not a "died" (not a failure). ``crossover``
also has weights_from and parent_genomes; a merge crossover ``alpha``, and when its parents had
two architectures ``layers`` (each unit of the child — tok_embeddings, layers.<i>, norm, output —
to the parent it came from, null for a new layer) and ``perturbed`` (the units with a tensor
shrunk and perturbed because its shape changed). A round's records are
written with its commit, before ``state.json`` names them.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import math
import operator
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from itertools import compress
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from evo.genome import Genome, diff, format_diff
from evo.strategy import SCORE, MemberView, Snapshot, Strategy
from population.config import SearchSetup
from population.store import CorruptRunError, RawJSON, RunStore, StoreError

STATE_VERSION = 1


@dataclass
class MemberRecord:
    """One member as committed: its genome, its evaluations and the schedule that produced it."""

    id: int
    genome: dict[str, Any]
    seed: int                    # the trainer's seed (init + batch order); kept on exploit
    step: int = 0
    history: list[list] = field(default_factory=list)    # [[step, val_bpb], ...] own evaluations
    objectives: dict[str, float] = field(default_factory=dict)   # val_bpb, params, tokens_per_s
    checkpoint: str | None = None                        # committed checkpoint (None: fresh init)
    checkpoint_sha256: str | None = None                 # its SHA-256, checked when a run resumes
    parent: int | None = None                            # where the weights last came from
    # the hyperparameter schedule in effect: [{"step", "genome", "seed"}], inherited on exploit
    schedule: list[dict] = field(default_factory=list)
    alive: bool = True
    age: int = 0                 # rounds (sync) / intervals (async) since born or restart
    intervals: int = 0           # intervals trained (async: the member's own round counter)
    since_change: int | None = None   # intervals since its weights changed architecture (None: never)

    @property
    def fitness(self) -> float | None:
        return self.history[-1][1] if self.history else None

    def view(self) -> MemberView:
        return MemberView(id=self.id, genome=Genome.from_dict(self.genome),
                          history=tuple((int(s), float(f)) for s, f in self.history),
                          age=self.age, step=self.step, objectives=dict(self.objectives),
                          since_change=self.since_change)

    def copy(self) -> MemberRecord:
        """A copy of the record as it is now, to read while decisions are applied to it: its
        schedule list copied, the rest shared (a genome is replaced, never changed in place, and
        no evaluation is appended while decisions are applied)."""
        c = object.__new__(MemberRecord)
        c.__dict__.update(self.__dict__)
        c.schedule = list(self.schedule)
        return c

    def fields(self) -> dict[str, Any]:
        """{field: value}, the values the record's own (no copy)."""
        d = self.__dict__
        return d.copy() if len(d) == len(_FIELDS) else {f: getattr(self, f) for f in _FIELDS}

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-shaped data sharing no list or dict with it: what
        ``plain(dataclasses.asdict(record))`` gives, without a JSON round trip per member (a
        commit copies thousands)."""
        return {f: _copy(getattr(self, f)) for f in _FIELDS}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MemberRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        # a copy: the record changes as the member trains, the committed state it came from must not
        return cls(**{k: plain(v) for k, v in d.items() if k in names})


_FIELDS = tuple(f.name for f in dataclasses.fields(MemberRecord))
# a member's result keys that add nothing to its objectives beyond val_bpb, params, tokens_per_s
# (record_results copies the others named val_bpb.<name> or SCORE)
_PLAIN_RESULT = frozenset({"step", "val_bpb", "params", "tokens_per_s", "seconds", "cpu_seconds", "train_loss",
                           "val_loss", "failed", "score_error"})
CHAIN = 16   # commits written as deltas of the last before the whole state is written again
_MISSING = object()
# the member fields a delta compares: by value (scalars), by identity (replaced, never changed in place)
_BY_VALUE = ("age", "alive", "checkpoint", "checkpoint_sha256", "intervals", "parent", "seed", "since_change", "step")
_BY_IDENTITY = ("genome", "objectives", "schedule")
_COLUMNS = (*_BY_VALUE, *_BY_IDENTITY, "id")
_ROW = operator.attrgetter(*_COLUMNS)
_encode = json.JSONEncoder(sort_keys=True).encode   # one encoder for thousands of records a round
_SCALARS = frozenset({str, int, float, bool, type(None)})
_STR = frozenset({str})
_encode_str = json.encoder.encode_basestring_ascii   # what the encoder above writes for a str


def _scalar(x: Any) -> str:
    """``_encode(x)`` of a str / int / float / bool / None field, without the encoder's call
    overhead."""
    t = type(x)
    if t is int:
        return int.__repr__(x)
    if t is float:
        return _float_text(x)
    if t is str:
        return _encode_str(x)
    if x is None:
        return "null"
    if t is bool:
        return "true" if x else "false"
    return _encode(x)


def _float_text(x: float) -> str:
    """What json's encoder writes for a float (``allow_nan``: NaN, Infinity, -Infinity)."""
    if x != x:
        return "NaN"
    if x == math.inf:
        return "Infinity"
    if x == -math.inf:
        return "-Infinity"
    return float.__repr__(x)


def _encode_flat(d: dict) -> str:
    """``_encode(d)`` of a dict of str keys and scalar values (a member's objectives, a genome),
    written here: the encoder's call costs more than the text."""
    if not all(type(k) is str for k in d):
        return _encode(d)
    parts = []
    for k in sorted(d):
        v = d[k]
        t = type(v)
        if t is float and _FINITE_MIN <= v <= _FINITE_MAX:
            parts.append(f"{_encode_str(k)}: {float.__repr__(v)}")
        elif t in _SCALARS:
            parts.append(f"{_encode_str(k)}: {_scalar(v)}")
        else:
            return _encode(d)
    return "{" + ", ".join(parts) + "}"


_FINITE_MIN, _FINITE_MAX = -sys.float_info.max, sys.float_info.max


def _encode_evaluations(items: list) -> str:
    """``_encode(items)[1:-1]`` of history entries ([step, val_bpb] lists), written here."""
    out = []
    for e in items:
        if type(e) is not list or len(e) != 2 or type(e[0]) is not int or type(e[1]) is not float:
            return _encode(items)[1:-1]
        v = e[1]
        out.append(f"[{int.__repr__(e[0])}, {float.__repr__(v) if _FINITE_MIN <= v <= _FINITE_MAX else _float_text(v)}]")
    return ", ".join(out)


class _GenomeTexts:
    """``_encode(genome)`` of genome dicts, by the dict's identity (the records replace genomes,
    never change them in place; a schedule entry shares its genome dict with the record it came
    from), the dict held so its id is not reused while cached."""

    def __init__(self) -> None:
        self.texts: dict[int, tuple[dict, str]] = {}

    def __call__(self, genome: Any) -> str:
        if type(genome) is not dict:
            return _encode(genome)
        hit = self.texts.get(id(genome))
        if hit is not None and hit[0] is genome:
            return hit[1]
        text = _encode_flat(genome)
        self.texts[id(genome)] = (genome, text)
        return text


_SCHEDULE_KEYS = ("genome", "seed", "step")


def _encode_schedule(schedule: list, texts: _GenomeTexts) -> str:
    """``_encode(schedule)``, each entry's genome text from ``texts``."""
    out = []
    for e in schedule:
        if type(e) is not dict or len(e) != 3 or any(k not in e for k in _SCHEDULE_KEYS):
            return _encode(schedule)
        out.append(f'{{"genome": {texts(e["genome"])}, "seed": {_scalar(e["seed"])}, "step": {_scalar(e["step"])}}}')
    return "[" + ", ".join(out) + "]"


class _Encoded:
    """A member's record as committed, as JSON text, with the parts it was made of.

    ``Records.commit`` re-encodes only what changed since the last commit: the genome, the
    schedule and the objectives by identity (the records replace them, never change them in
    place), the history by its length (it is only appended to), the scalars by value. In sync
    mode every member's history and counters move each round, so the whole text is rebuilt but
    the genome and schedule are not re-encoded; in async mode one member changes per event and
    the others cost one comparison each."""

    __slots__ = ("rec", "genome", "genome_text", "schedule", "schedule_text", "objectives",
                 "objectives_text", "history", "history_len", "history_text", "scalars", "text")

    def __init__(self, rec: MemberRecord) -> None:
        self.rec = rec
        self.genome = self.schedule = self.objectives = self.history = self.scalars = None
        self.history_len = -1
        self.text = ""

    def update(self, rec: MemberRecord, texts: _GenomeTexts) -> str:
        """The record's JSON text, exactly ``_encode(rec.fields())`` (``texts``: genome dicts'
        texts, shared by the members)."""
        changed = False
        if rec.genome is not self.genome:
            self.genome, self.genome_text, changed = rec.genome, texts(rec.genome), True
        if rec.schedule is not self.schedule:
            self.schedule, self.schedule_text, changed = rec.schedule, _encode_schedule(rec.schedule, texts), True
        if rec.objectives is not self.objectives:
            self.objectives, self.objectives_text, changed = rec.objectives, _encode_flat(rec.objectives), True
        h = rec.history
        if h is not self.history or len(h) < self.history_len:
            self.history, self.history_len, self.history_text = h, len(h), _encode_evaluations(h)
            changed = True
        elif len(h) != self.history_len:
            more = _encode_evaluations(h[self.history_len:])
            self.history_text = f"{self.history_text}, {more}" if self.history_len else more
            self.history_len, changed = len(h), True
        scalars = (rec.age, rec.alive, rec.checkpoint, rec.checkpoint_sha256, rec.id, rec.intervals,
                   rec.parent, rec.seed, rec.since_change, rec.step)
        if changed or scalars != self.scalars or any(type(a) is not type(b) for a, b in zip(scalars, self.scalars)):
            self.scalars = scalars
            age, alive, ckpt, sha, id_, intervals, parent, seed, since, step = map(_scalar, scalars)
            self.text = (f'{{"age": {age}, "alive": {alive}, "checkpoint": {ckpt}, "checkpoint_sha256": {sha}, '
                         f'"genome": {self.genome_text}, "history": [{self.history_text}], "id": {id_}, '
                         f'"intervals": {intervals}, "objectives": {self.objectives_text}, "parent": {parent}, '
                         f'"schedule": {self.schedule_text}, "seed": {seed}, "since_change": {since}, '
                         f'"step": {step}}}')
        return self.text


class MemberDicts(Sequence):
    """A commit's member dicts (``MemberRecord.fields()`` of each record, in order), built when
    first read, then kept: a run without W&B and Optuna reads none of them (thousands of dicts a
    round), a sink reads them right after the commit, before the records change again."""

    __slots__ = ("_recs", "_dicts")

    def __init__(self, recs: list[MemberRecord]) -> None:
        self._recs: list[MemberRecord] | None = recs
        self._dicts: list[dict] | None = None

    def _built(self) -> list[dict]:
        if self._dicts is None:
            self._dicts, self._recs = [r.fields() for r in self._recs], None
        return self._dicts

    def __len__(self) -> int:
        return len(self._dicts if self._dicts is not None else self._recs)

    def __getitem__(self, i):   # type: ignore[override]
        return self._built()[i]

    def __iter__(self) -> Iterator[dict]:
        return iter(self._built())

    def __eq__(self, other: object) -> bool:
        return self._built() == (list(other) if isinstance(other, MemberDicts) else other)

    def __repr__(self) -> str:
        return f"MemberDicts({self._built()!r})"


def _copy(x: Any) -> Any:
    """A JSON-shaped deep copy of plain data (tuples become lists, keys strings); anything
    else (numpy scalars, non-str keys) through a JSON round trip."""
    t = type(x)
    if t in _SCALARS:
        return x
    if t is dict:
        if _STR.issuperset(map(type, x)):
            if _SCALARS.issuperset(map(type, x.values())):   # flat (a genome): copied in C
                return x.copy()
            return {k: v if type(v) in _SCALARS else _copy(v) for k, v in x.items()}
        return json.loads(json.dumps(x))   # JSON's own key conversion
    if t is list or t is tuple:
        if _SCALARS.issuperset(map(type, x)):
            return list(x)
        return [v if type(v) in _SCALARS else _copy(v) for v in x]
    return json.loads(json.dumps(x))


def plain(x: Any) -> Any:
    """JSON-shaped copy (tuples -> lists), so records compare equal before and after a commit:
    what a JSON round trip gives, without one for data that is plain already."""
    return _copy(x)


def slot_seconds(timing: Mapping[str, Any]) -> float:
    """The slot-seconds a run's round loop had: Σ over its sessions of wall × the slots used
    (``timing.slot_s``; a state of an older evo has only the wall and the last slots)."""
    if "slot_s" in timing:
        return float(timing["slot_s"])
    return float(timing.get("wall_s", 0.0)) * float(timing.get("slots") or 0)


def efficiency(timing: Mapping[str, Any]) -> float | None:
    """Orchestration efficiency of a committed ``timing``: the members' compute seconds (inside
    their training and evaluation calls) / (the round loop's wall seconds × the slots members
    actually trained on), summed over the sessions of a resumed run. 1.0: no slot ever waited
    (for the driver, the sync barrier or a slow member); None before any round ran."""
    slot_s = slot_seconds(timing)
    if not slot_s > 0 or not math.isfinite(slot_s):
        return None
    return float(timing.get("member_compute_s", 0.0)) / slot_s


def member_seed(seed: int, member: int, *more: int) -> int:
    """A trainer seed derived from (run seed, member, *more)."""
    return int(np.random.SeedSequence([seed, member, *more]).generate_state(1)[0])


def inherit(schedule: list[dict], step: int, genome: dict, seed: int) -> list[dict]:
    """The donor's schedule up to ``step``, then ``genome`` (with the receiver's seed) from ``step``."""
    out = [dict(e) for e in schedule if e["step"] <= step]
    if out and out[-1]["step"] == step:
        out.pop()
    return out + [{"step": step, "genome": genome, "seed": seed}]


def settle_heap() -> None:
    """After a commit: collect the young generations' garbage, then move what survived (the
    records, their encoded texts, the views: thousands of objects that live for rounds) out of
    the cyclic collector's reach (``gc.freeze``). Without it, a full collection scans every
    member's record again and again while the next round decides (tens of ms a round at 4,096
    members; BENCHMARKS.md, driver scale). Frozen objects are still freed when no reference is
    left (records hold no cycles); only a cycle frozen while unreachable would be kept."""
    gc.collect(1)
    gc.freeze()


class Records:
    """Every member's record, the run's counters and timing, the lineage not yet committed."""

    chain = CHAIN   # deltas committed before the whole state again

    def __init__(self, setup: SearchSetup, store: RunStore, strategy: Strategy, num_threads: int) -> None:
        self.setup = setup
        self.store = store
        self.strategy = strategy          # its state is committed with the records
        self.pop = setup.population
        self.train = setup.train          # with the cosine horizon of this run (open)
        self.num_threads = num_threads
        self.members: dict[int, MemberRecord] = {}
        self.ids = list(range(self.pop.size))
        self.round = 0
        self.steps_done = 0
        self.events = 0
        self.lineage_count = 0
        self.failures = 0             # members that diverged or were given up (population.max_failures)
        self.restores = 0             # members restored after their process died (not failures)
        self.member_restores: dict[int, int] = {}   # member -> its restores (evo status shows them)
        self.deaths_on_state: dict[int, int] = {}   # member -> deaths since its state last changed
        self.diverged: list[dict] = []    # genomes of the members that diverged in this session
        self.exploit_latencies: list[float] = []
        # evaluations whose fitness.function failed: {"member", "step", "error"} (the last 1000)
        self.eval_failures: list[dict] = []
        self.compute_s = 0.0          # seconds members spent inside train_part / train_and_evaluate
        self.cpu_s = 0.0              # CPU seconds of the member processes in the same calls
        self.wall_s = 0.0             # seconds of the round loop (all sessions)
        self.slots = self.pop.size    # members training at once (committed with the timing)
        self.slot_s = 0.0             # Σ over earlier sessions of their loop's wall × their slots
        self.loop_start: float | None = None
        self.committed: dict | None = None
        # the committed members by id: each as its JSON text once committed here (immutable: no
        # copy of thousands of records per round), as a dict when loaded from the store
        self.committed_members: dict[int, str | dict] = {}
        self._encoded: dict[int, _Encoded] = {}   # each member's committed text and its parts
        # the last commit of this session: its pointer entry (what a delta names), the deltas
        # written since the last whole state, and the member values committed, by reference
        self._last: dict | None = None
        self._chain = 0
        self._base_ids: list[int] | None = None
        self._cols: dict[str, list] | None = None
        self._hist: list[list] = []
        self._hist_len: list[int] = []
        self._pos: dict[int, int] = {}
        self._latencies: tuple[list, int] = ([], 0)
        # the strategy's state_replaced_items as last committed (shallow copies: the entries are
        # replaced, never changed in place), what the next delta compares with by identity
        self._strategy_items: dict[str, dict] = {}
        self._genome_texts = _GenomeTexts()
        # Genome of a genome dict, by the dict's identity (the records replace genomes, never
        # change them in place); the dict is held, so its id is not reused while cached
        self._genomes: dict[int, tuple[dict, Genome]] = {}
        self._archs: dict[int, tuple[dict, dict]] = {}   # the same for Genome.architecture()
        # each member's history as the strategy sees it: (record, its history list, the tuple)
        self._views: dict[int, tuple[MemberRecord, list, tuple]] = {}
        self._view_of: dict[int, tuple[MemberRecord, tuple, MemberView]] = {}   # the last view, its key
        self.pending_lineage: list[dict] = []
        self.notes: list[str] = []    # one-line warnings of open() (a commit skipped as damaged)

    def __getitem__(self, m: int) -> MemberRecord:
        return self.members[m]

    # -- open / resume -------------------------------------------------------------------------

    def open(self) -> str:
        """Create the run (genomes sampled, "born" records, round 0 committed) or load its last
        commit. Returns "new", "resumed", or "finished" for a run whose budget is spent.

        A resume continues from the last commit whose state file and checkpoints are intact
        (each checked against its checksum): a damaged one is skipped for the commit before it,
        with a line in ``notes`` naming the bad file and the commit used; with none intact it is
        a CorruptRunError (one line)."""
        store = self.store
        states = list(store.committed_states()) if store.exists() else []
        if not states:
            if not store.exists():
                store.create(self.setup.config)
            self._new_population()
            return "new"
        newest = states[0][1]
        if isinstance(newest, dict) and newest.get("status") == "finished":
            self._load(newest)
            if self._budget_reached():
                return "finished"   # nothing to train: its checkpoints are not needed
        self._load(self._intact(states))
        store.truncate_lineage(self.lineage_count)   # records written after the last commit
        return "resumed"

    def _intact(self, states: list[tuple[str, dict | CorruptRunError]]) -> dict:
        """The newest of ``states`` (store.committed_states()) whose body and checkpoints are intact."""
        checked: dict[tuple[str, str | None], str | None] = {}   # a file shared by two commits is read once
        skipped: list[str] = []
        for where, state in states:
            if isinstance(state, CorruptRunError):
                skipped.append(str(state))
                continue
            for d in state.get("members", []):
                if d.get("checkpoint"):
                    key = (d["checkpoint"], d.get("checkpoint_sha256"))
                    if key not in checked:   # its checksum, then the record it belongs to
                        checked[key] = (self.store.check_checkpoint(*key)
                                        or self.store.check_against_record(d["checkpoint"], d))
                    if checked[key]:
                        skipped.append(checked[key])
                        break
            else:
                if skipped:
                    self.notes.append(f"{skipped[0]}; resuming from the commit before it, {where} "
                                      f"(round {state['round']})")
                return state
        raise CorruptRunError(f"run {self.setup.name!r} cannot be resumed: {skipped[0]}; none of the "
                              f"{len(states)} commits kept has intact files")

    def _new_population(self) -> None:
        setup = self.setup
        if self.train.decay_steps is None:   # the cosine horizon is the budget
            self.train = dataclasses.replace(self.train, decay_steps=self.pop.total_steps)
        self.store.truncate_lineage(0)
        rng = np.random.default_rng([setup.seed, 0])
        space = setup.space
        draws = {"sample": [space.sample], "base": [space.sample_at_base],
                 "base_and_largest": [space.sample_at_base, space.sample_at_largest]}[self.pop.start]
        for i, m in enumerate(self.ids):   # base_and_largest: the base shape, the largest, in turn
            genome = plain(draws[i % len(draws)](rng).as_dict())
            seed = member_seed(setup.seed, m)
            self.members[m] = MemberRecord(id=m, genome=genome, seed=seed,
                                           schedule=[{"step": 0, "genome": genome, "seed": seed}])
            self.lineage("born", 0, m, parents=[], genome=genome, step=0, fitness=None, seed=seed)
        self.commit(0, steps_done=0)

    def _load(self, state: dict) -> None:
        self.round = int(state["round"])
        self.steps_done = int(state.get("steps_done", 0))
        self.events = int(state.get("events", 0))
        self.lineage_count = int(state["lineage_count"])
        self.failures = int(state.get("failures", 0))
        self.restores = int(state.get("restores", 0))
        self.member_restores = {int(m): int(n) for m, n in (state.get("member_restores") or {}).items()}
        self.exploit_latencies = list(state.get("exploit_latencies", []))
        self.eval_failures = list(state.get("eval_failures", []))
        timing = state.get("timing", {})
        self.compute_s = float(timing.get("member_compute_s", 0.0))
        self.cpu_s = float(timing.get("member_cpu_s", 0.0))
        self.wall_s = float(timing.get("wall_s", 0.0))
        self.slot_s = slot_seconds(timing)
        self.members = {int(d["id"]): MemberRecord.from_dict(d) for d in state["members"]}
        self.ids = sorted(self.members)
        # the cosine horizon stays the one the members were trained with (extending the budget
        # on resume keeps the learning rate at its floor rather than jumping back up)
        self.train = dataclasses.replace(self.train, decay_steps=state.get("decay_steps", self.train.decay_steps))
        self.strategy.load_state_dict(state.get("strategy") or {})
        self.committed = state
        self.committed_members = {int(d["id"]): d for d in state["members"]}

    def _budget_reached(self) -> bool:
        if self.pop.mode == "sync":
            return self.steps_done >= self.pop.total_steps
        return all(r.step >= self.pop.total_steps for r in self.members.values())

    # -- what happened to the members ----------------------------------------------------------

    def start_clock(self, slots: int) -> None:
        """The round loop starts now, on ``slots`` slots (wall time counts from here)."""
        self.slots = slots
        self.loop_start = time.perf_counter()

    def record_results(self, results: Mapping[int, Any]) -> None:
        """Each member trained an interval: its counters, its time, and — when it succeeded — its
        step, history and objectives."""
        for m, res in results.items():
            rec = self.members[m]
            rec.intervals += 1
            rec.age += 1
            if rec.since_change is not None:
                rec.since_change += 1
            if not isinstance(res, dict):
                continue
            self.compute_s += float(res.get("seconds", 0.0))
            self.cpu_s += float(res.get("cpu_seconds", 0.0))
            if res.get("failed"):
                continue
            self.deaths_on_state.pop(m, None)
            rec.step = int(res["step"])
            rec.history.append([rec.step, res["val_bpb"]])
            rec.objectives = {"val_bpb": res["val_bpb"], "params": res["params"],
                              "tokens_per_s": res["tokens_per_s"]}
            if not res.keys() <= _PLAIN_RESULT:   # (one set comparison in C for the usual result)
                rec.objectives.update({k: v for k, v in res.items() if k.startswith("val_bpb.") or k == SCORE})
            if res.get("score_error"):
                self.eval_failures = [*self.eval_failures[-999:],
                                      {"member": m, "step": rec.step, "error": res["score_error"]}]

    def died(self, m: int, why: str, round: int, *, counts: bool = True) -> None:
        """A "died" record for m: it diverged, or was given up; ``counts`` it as a failure
        (population.max_failures) unless the platform took its state (no fault of the member)."""
        rec = self.members[m]
        self.failures += int(counts)
        self.deaths_on_state.pop(m, None)
        self.lineage("died", round, m, parents=[], genome=rec.genome, step=rec.step,
                     fitness=rec.fitness, error=why)

    def restored(self, m: int, round: int, why: str, source: str) -> None:
        """A "restored" record: m's process died and m is back at its record's step, from
        ``source`` ("object store" or "checkpoint")."""
        rec = self.members[m]
        self.restores += 1
        self.member_restores[m] = self.member_restores.get(m, 0) + 1
        self.lineage("restored", round, m, parents=[], genome=rec.genome, step=rec.step,
                     fitness=rec.fitness, error=why, source=source)

    def set_back(self, m: int) -> MemberRecord:
        """m's record as last committed (its state is that commit's checkpoint); returns it."""
        if self._cols is not None:   # committed in this session: the values it committed
            i = self._pos[m]
            d = {f: self._cols[f][i] for f in _COLUMNS}
            d["history"] = self._hist[i][:self._hist_len[i]]
            self.members[m] = MemberRecord.from_dict(d)
            return self.members[m]
        committed = self.committed_members[m]
        self.members[m] = MemberRecord.from_dict(json.loads(committed) if isinstance(committed, str) else committed)
        return self.members[m]

    def took_weights(self, m: int, src: MemberRecord, genome: dict, step: int, params: int,
                     merged: bool = False) -> None:
        """m runs ``genome`` on the weights of ``src`` (m itself for an explore; merged with
        another parent's for a merge crossover) at ``step``: its schedule becomes src's up to
        ``step``, then ``genome``."""
        rec = self.members[m]
        if merged or self._architecture(genome) != self._architecture(src.genome):
            rec.since_change = 0                      # a new shape, or merged weights: its grace period starts
        elif src.id != m:
            rec.since_change = src.since_change       # the donor's weights, as recently changed as they are
        rec.genome, rec.step = genome, step
        self.deaths_on_state.pop(m, None)
        rec.schedule = inherit(src.schedule, step, genome, rec.seed)
        if src.id != m:
            rec.parent = src.id
        rec.objectives = dict(rec.objectives, params=params)

    def fresh(self, m: int, genome: dict, seed: int) -> MemberRecord:
        """m starts again from step 0 with ``genome`` and ``seed``; returns its old record."""
        old = self.members[m]
        self.deaths_on_state.pop(m, None)
        self.members[m] = MemberRecord(id=m, genome=genome, seed=seed, checkpoint=old.checkpoint,
                                       checkpoint_sha256=old.checkpoint_sha256, intervals=old.intervals,
                                       schedule=[{"step": 0, "genome": genome, "seed": seed}])
        return old

    def lineage(self, event: str, round: int, member: int, *, parents: list[int], genome: dict,
                step: int, fitness: float | None, changed_from: dict | None = None, **extra: Any) -> None:
        """One lineage record, written with the next commit."""
        # JSON-shaped and sharing nothing that may change: the parts built here are new, the
        # rest copied (a genome dict is replaced, never changed, but may hold tuples)
        record = {"event": event, "round": round, "member": member, "parents": _copy(parents),
                  "genome": _copy(genome), "step": step, "fitness": fitness, "time": time.time()}
        if changed_from is not None:
            a, b = self.genome(changed_from), self.genome(genome)
            changes = diff(a, b)
            record["changed"] = format_diff(a, b, changes)
            record["diff"] = {p: _copy(v) for p, v in changes.items()}
        for k, v in extra.items():
            record[k] = v if type(v) in _SCALARS else _copy(v)
        self.pending_lineage.append(record)

    def set_checkpoints(self, ids: list[int], round: int) -> dict[int, tuple[str, int]]:
        """Each member of ``ids`` names its checkpoint of ``round`` (committed once written):
        one of its slots (``RunStore.checkpoint_slots``: overwritten in turn, none a kept commit
        names, nothing to prune); returns {member: (path in the store, the step the checkpoint
        must hold)}."""
        paths = self.store.checkpoint_slots(dict.fromkeys(ids, round))
        self.store.wait_pruned(paths.values())   # (slots are never pruned; a path of another kind may be)
        out = {}
        members = self.members
        for m in ids:
            rec = members[m]
            rec.checkpoint = path = paths[m]
            rec.checkpoint_sha256 = None   # known once written (saved(), else commit reads it)
            out[m] = (path, rec.step)
        return out

    def saved(self, written: Mapping[int, tuple[str, str]]) -> None:
        """The members wrote their checkpoints: {member: (path, its SHA-256)} as they reported
        it (``Members.finish_checkpoints``); a record that names another path keeps its own."""
        for m, (path, sha256) in written.items():
            rec = self.members.get(m)
            if rec is not None and rec.checkpoint == path:
                rec.checkpoint_sha256 = sha256

    # -- the population as the strategy sees it ------------------------------------------------

    def snapshot(self, round: int) -> Snapshot:
        """The population as the strategy sees it: ``MemberRecord.view()`` of every member, with
        the genomes and the histories' unchanged part reused from the last snapshot."""
        fitness = self.setup.fitness
        senses = {SCORE: fitness.sense} if fitness is not None and fitness.function else {}
        views = []
        view_of, members, new_view = self._view_of, self.members, object.__new__
        genome = self.genome
        for m in self.ids:
            rec = members[m]
            h = rec.history
            key = (rec.genome, h, len(h), rec.age, rec.step, rec.objectives, rec.since_change)
            hit = view_of.get(m)
            if hit is not None and hit[0] is rec:
                k = hit[1]
                if (k[0] is key[0] and k[1] is h and k[5] is key[5] and k[2] == key[2] and k[3] == key[3]
                        and k[4] == key[4] and k[6] == key[6]):
                    views.append(hit[2])   # unchanged since the last snapshot (async: all but a few)
                    continue
            g = genome(key[0])
            history = self._history(rec)
            # MemberView(...) without the frozen dataclass's __init__ (one setattr per field):
            # the same fields, thousands of views a round
            view = new_view(MemberView)
            view.__dict__.update(id=rec.id, genome=g, history=history, age=key[3], step=key[4],
                                 objectives=dict(key[5]), since_change=key[6])
            view_of[m] = (rec, key, view)
            views.append(view)
        if len(self._genomes) > 4 * len(self.ids) + 64:   # genomes no record holds any more
            held = {id(self.members[m].genome) for m in self.ids}
            self._genomes = {k: v for k, v in self._genomes.items() if k in held}
        return Snapshot(round=round, members=tuple(views), senses=senses)

    def genome(self, d: dict) -> Genome:
        """``Genome.from_dict(d)``, built once per genome dict."""
        hit = self._genomes.get(id(d))
        if hit is not None and hit[0] is d:
            return hit[1]
        g = Genome.from_dict(d)
        self._genomes[id(d)] = (d, g)
        return g

    def _architecture(self, d: dict) -> dict:
        """``self.genome(d).architecture()``, built once per genome dict (an exploit compares
        the receiver's new genome with its donor's, a donor's again for each of its receivers)."""
        hit = self._archs.get(id(d))
        if hit is not None and hit[0] is d:
            return hit[1]
        if len(self._archs) > 4 * len(self.ids) + 64:   # genomes no record holds any more
            self._archs = {}
        arch = self.genome(d).architecture()
        self._archs[id(d)] = (d, arch)
        return arch

    def genome_dict(self, genome: Genome) -> dict:
        """``plain(genome.as_dict())``, a new dict whose ``self.genome`` is ``genome`` (no
        Genome built again for it)."""
        d = plain(genome.as_dict())
        self._genomes[id(d)] = (d, genome)
        return d

    def _history(self, rec: MemberRecord) -> tuple[tuple[int, float], ...]:
        """``rec.view().history``, extended by the evaluations appended since the last snapshot."""
        h = rec.history
        hit = self._views.get(rec.id)
        if hit is not None and hit[0] is rec and hit[1] is h and len(hit[2]) <= len(h):
            seen = hit[2]
            n = len(seen)
            if n == len(h):
                return seen
            if n + 1 == len(h):   # one evaluation since the last snapshot (every round's case)
                last = h[-1]
                out = seen + ((int(last[0]), float(last[1])),)
            else:
                out = seen + tuple((int(s), float(f)) for s, f in h[n:])
        else:
            out = tuple((int(s), float(f)) for s, f in h)
        self._views[rec.id] = (rec, h, out)
        return out

    def best(self) -> MemberRecord | None:
        alive = [r for r in self.members.values() if r.alive and r.history]
        return min(alive, key=lambda r: (r.fitness, r.id)) if alive else None

    # -- commit --------------------------------------------------------------------------------

    def commit(self, round: int, steps_done: int, events: int | None = None) -> tuple[list[dict], list[dict]]:
        """Append the pending lineage, commit the state atomically, prune the checkpoints no
        record names. Returns (the committed member dicts, the lineage records committed).

        The state is committed whole (every member's record; a run's first commit in a session,
        and every CHAIN-th after) or as a delta of the last commit (``RunStore.commit_state``'s
        ``delta_of``): the top-level keys, and of the members only the fields that changed
        (compared with the values last committed, kept by reference: genomes, schedules and
        objectives are replaced, never changed in place; a history is only appended to, so its
        new evaluations are written), so a round's commit costs what changed, not the whole
        population's histories again. A reader gets the whole state either way.

        The member dicts are views of the live records (not copies: thousands of members), to be
        read before the records change again (the monitor's sinks copy what they keep)."""
        lineage, self.pending_lineage = self.pending_lineage, []
        if lineage:
            self.lineage_count = self.store.append_lineage(lineage)
        for rec in self.members.values():   # checksums no member reported: the ones written beside them
            if rec.checkpoint and rec.checkpoint_sha256 is None:
                rec.checkpoint_sha256 = self.store.checkpoint_sha256(rec.checkpoint)
        now = time.perf_counter()
        session = now - self.loop_start if self.loop_start is not None else 0.0
        wall = self.wall_s + session
        self.round, self.steps_done = round, steps_done
        if events is not None:
            self.events = events
        recs = [self.members[m] for m in self.ids]
        members = MemberDicts(recs)
        top = {
            "version": STATE_VERSION,
            "name": self.setup.name,
            "status": "running",
            "mode": self.pop.mode,
            "round": round,
            "steps_done": steps_done,
            "events": self.events,
            "total_steps": self.pop.total_steps,
            "interval_steps": self.pop.interval_steps,
            "size": self.pop.size,
            "seed": self.setup.seed,
            "decay_steps": self.train.decay_steps,
            "num_threads": self.num_threads,
            "strategy": self.strategy.state_dict(),
            "lineage_count": self.lineage_count,
            "failures": self.failures,
            "restores": self.restores,
            "member_restores": {str(m): n for m, n in sorted(self.member_restores.items())},
            "exploit_latencies": self.exploit_latencies,
            **({"eval_failures": self.eval_failures} if self.eval_failures else {}),
            "timing": {"member_compute_s": self.compute_s, "wall_s": wall, "slots": self.slots,
                       "slot_s": self.slot_s + session * self.slots, "member_cpu_s": self.cpu_s},
            "updated": time.time(),
        }
        cols = dict(zip(_COLUMNS, map(list, zip(*map(_ROW, recs))))) if recs else {f: [] for f in _COLUMNS}
        cols["history"] = hists = [r.history for r in recs]   # (what the next delta compares with, as they are now)
        cols["history_len"] = list(map(len, hists))
        named = set(cols["checkpoint"])
        named.discard(None)
        named.discard("")
        if self._last is None or self._chain >= self.chain or self._base_ids != self.ids:
            if len(self._genome_texts.texts) > 8 * len(self.ids) + 64:   # genomes no record holds any more
                self._genome_texts = _GenomeTexts()
            try:
                encoded = [RawJSON(self._encode_member(rec)) for rec in recs]
            except (TypeError, ValueError) as e:
                raise StoreError(f"state is not JSON-serialisable: {str(e).splitlines()[0] if str(e) else e!r}") from e
            state = dict(top, members=encoded)
            self._last = self.store.commit_state(state, refs=named)
            self._chain = 0
        else:
            delta = self._member_delta(recs, cols)
            body = dict(top)
            lat = self.exploit_latencies
            if lat is self._latencies[0] and len(lat) >= self._latencies[1]:
                del body["exploit_latencies"]
                delta["exploit_latencies_add"] = lat[self._latencies[1]:]
            strategy = self._strategy_delta(top["strategy"])
            if strategy is not None:
                del body["strategy"]
                delta["strategy"] = strategy
            body["delta"] = delta
            self._last = self.store.commit_state(body, refs=named, delta_of=self._last)
            self._chain += 1
        self.committed = top
        self._remember(recs, cols)
        self._strategy_items = {k: dict(v) for k in self.strategy.state_replaced_items
                                if isinstance(v := top["strategy"].get(k), dict)}
        # the records name only slots, which the store never deletes: nothing new to tell it; it
        # lists the folder now and then for what else is there (an older run's r<round>.pt files)
        self.store.prune_checkpoints(named, new=(), background=True)
        return members, lineage

    def _member_delta(self, recs: list[MemberRecord], now: dict[str, list]) -> dict:
        """What changed in the members since the last commit, as ``store.apply_delta`` reads it
        (``now``: each field's values, in the order of ``recs``)."""
        n, ids, cols = len(recs), self.ids, self._cols
        out: dict[str, Any] = {}
        changes: dict[str, list] = {}

        def spec(changed: list[int], new: list) -> list:
            if len(changed) == n:
                return [None, new]
            return [[ids[i] for i in changed], [new[i] for i in changed]]

        for f in _BY_VALUE:
            new = now[f]
            if all(map(operator.is_, new, cols[f])) or (new == cols[f] and list(map(type, new)) == list(map(type, cols[f]))):
                continue   # none changed (the same objects, else equal values of the same types; compared in C)
            if all(map(operator.ne, new, cols[f])):   # every member's (step, age, a round's checkpoints): in C
                changes[f] = [None, new]
                continue
            old = cols[f]
            changed = [i for i in compress(range(n), map(operator.is_not, new, old))   # (the candidates found in C)
                       if new[i] != old[i] or type(new[i]) is not type(old[i])]
            if changed:
                changes[f] = spec(changed, new)
        for f in _BY_IDENTITY:
            new = now[f]
            if all(map(operator.is_, new, cols[f])):
                continue
            changed = list(compress(range(n), map(operator.is_not, new, cols[f])))
            if changed:
                changes[f] = spec(changed, new)
        added, replaced = [], []
        hists, lens = now["history"], now["history_len"]
        if all(map(operator.is_, hists, self._hist)) and all(map(operator.ge, lens, self._hist_len)):
            added = list(compress(range(n), map(operator.gt, lens, self._hist_len)))   # (every list appended to only: in C)
        else:
            for i, h_now, h, k in zip(range(n), hists, self._hist, self._hist_len):
                if h_now is h and len(h_now) >= k:
                    if len(h_now) > k:
                        added.append(i)
                else:
                    replaced.append(i)
        obj = changes.get("objectives")
        if obj is not None:   # dicts of the same keys (every member's figures): as columns, encoded far faster
            values = obj[1]
            keys = list(values[0]) if values and type(values[0]) is dict else []
            if keys and all(type(v) is dict and list(v) == keys for v in values):
                del changes["objectives"]
                out["objectives_cols"] = [obj[0], keys, [[v[k] for v in values] for k in keys]]
        if changes:
            out["members"] = changes
        if added:
            hl = self._hist_len
            if len(added) == n:
                out["history_add"] = [None, [r.history[k:] for r, k in zip(recs, hl)]]
            else:
                out["history_add"] = [[ids[i] for i in added], [recs[i].history[hl[i]:] for i in added]]
        if replaced:
            out["history"] = [[ids[i] for i in replaced], [recs[i].history for i in replaced]]
        return out

    def _strategy_delta(self, state: dict) -> dict | None:
        """The strategy's state as a delta of the last commit's (``store.apply_delta``):
        ``whole`` -- every key but its ``state_replaced_items``, as it is --, and ``items`` --
        of each of those dicts, the entries ``set`` (not the objects last committed) and the
        keys ``del``eted. None (write it whole) for a strategy without such items, or when one
        was not committed as a dict."""
        items = {}
        for key in self.strategy.state_replaced_items:
            new, old = state.get(key), self._strategy_items.get(key)
            if not isinstance(new, dict) or old is None:
                return None
            get = old.get
            items[key] = {"set": {k: v for k, v in new.items() if get(k, _MISSING) is not v},
                          "del": [k for k in old if k not in new]}
        if not items:
            return None
        return {"whole": {k: v for k, v in state.items() if k not in items}, "items": items}

    def _remember(self, recs: list[MemberRecord], cols: dict[str, list]) -> None:
        """The member values just committed, by reference (what the next delta compares with,
        and what ``set_back`` returns to)."""
        self._cols = cols
        self._hist = cols["history"]
        self._hist_len = cols["history_len"]
        self._pos = {m: i for i, m in enumerate(self.ids)} if self._base_ids != self.ids else self._pos
        self._base_ids = list(self.ids)
        self._latencies = (self.exploit_latencies, len(self.exploit_latencies))

    def _encode_member(self, rec: MemberRecord) -> str:
        """``_encode(rec.fields())``, re-encoding only the parts that changed since the last commit."""
        enc = self._encoded.get(rec.id)
        if enc is None or enc.rec is not rec:   # a record replaced (set back, restarted): start over
            enc = self._encoded[rec.id] = _Encoded(rec)
        try:
            return enc.update(rec, self._genome_texts)
        except BaseException:
            del self._encoded[rec.id]   # half updated: never reused
            raise

    def member_dicts(self) -> list[dict]:
        """Every record as a JSON-shaped dict sharing nothing with it (what the commit keeps)."""
        return [self.members[m].to_dict() for m in self.ids]

    def flush_lineage(self) -> None:
        """Write the records of an uncommitted round (a resume drops them again)."""
        try:
            if self.pending_lineage:
                self.store.append_lineage(self.pending_lineage)
                self.pending_lineage = []
        except (StoreError, OSError):
            pass

    def mark(self, status: str) -> None:
        """Commit the last committed state again with ``status`` (never a half round): as a
        delta of it that changes no member, once this session has committed."""
        if self.committed is None:
            return
        try:
            if self._last is None:
                self.store.commit_state(dict(self.committed, status=status, updated=time.time()))
            else:
                body = {k: v for k, v in self.committed.items() if k != "members"}
                self._last = self.store.commit_state(dict(body, status=status, updated=time.time(), delta={}),
                                                     delta_of=self._last)
                self._chain += 1
            self.committed = dict(self.committed, status=status)
        except (StoreError, OSError):
            if status != "failed":
                raise

    def summary(self, status: str) -> dict:
        best = self.best()
        state = self.committed or {}
        timing = dict(state.get("timing", {}))
        eff = efficiency(timing)
        if eff is not None:
            timing["efficiency"] = eff
        lat = self.exploit_latencies
        return {
            "name": self.setup.name,
            "status": status,
            "mode": self.pop.mode,
            "round": self.round,
            "steps": self.steps_done,
            "total_steps": self.pop.total_steps,
            "best": None if best is None else {"member": best.id, "val_bpb": best.fitness,
                                               "genome": best.genome, "step": best.step},
            "members": [{"id": r.id, "step": r.step, "val_bpb": r.fitness, "genome": r.genome,
                         "parent": r.parent, "alive": r.alive} for r in self.members.values()],
            "exploits": len(lat),
            "failures": self.failures,
            "restores": self.restores,
            "exploit_latency_s": {"count": len(lat), "median": statistics.median(lat) if lat else None},
            "timing": timing,
        }

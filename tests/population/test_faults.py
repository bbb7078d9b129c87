"""Member faults on a real local Ray: members SIGKILLed mid-run come back from their own state;
a population that keeps diverging ends with a line naming the likely gene."""
from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from rich.console import Console

from evo.space import SearchSpace
from population.decisions import likely_cause
from population.driver import SearchError, run_search
from population.store import RunStore
from tests.population.conftest import make_setup

SIZE, INTERVAL, ROUNDS, KILLS = 4, 5, 24, 10


def _quiet() -> Console:
    return Console(file=open(os.devnull, "w"))


def _state(storage: Path, name: str) -> dict:
    return RunStore(storage, name).read_state()


def _lineage(storage: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (storage / name / "lineage.jsonl").read_text().splitlines()]


def _comparable(records: list[dict]) -> list[dict]:
    """Lineage without the restores and wall-clock fields, by round and member (a decision
    applied again after its member was restored is written after the round's others)."""
    kept = [{k: v for k, v in r.items() if k not in ("time", "latency_s", "receiver_s")}
            for r in records if r["event"] != "restored"]
    return sorted(kept, key=lambda r: (r["round"], r["member"], json.dumps(r, sort_keys=True)))


def _table(state: dict) -> list[tuple]:
    return [(m["id"], m["step"], m["history"], m["genome"], m["parent"], m["schedule"]) for m in state["members"]]


class Killer(threading.Thread):
    """SIGKILLs member processes of a running search, one member after another, each kill at a
    random moment of a round once the previous kill's round is committed (so no member dies
    twice on one state), until ``kills`` are done or ``last_round`` is reached.

    Every kill must be a fault the search has to repair: a member that has reached the budget
    gets no more calls, so its death is noticed by nobody and needs no restore. In sync mode
    ``last_round`` keeps the kills before the last interval. In async mode members reach the
    budget at different times (an exploit can take a member there in one jump), so given a
    ``budget`` the killer also stops once a member is within ``spare`` steps of it, as the state
    it reads just before the kill says. With ``spare`` three intervals, a member reaches the
    budget (by training, or by exploiting one that did) three events after that commit at the
    earliest: one may be under way when the killer reads, and the kill follows the read at once."""

    def __init__(self, storage: Path, name: str, size: int, kills: int, last_round: int, seed: int,
                 budget: int | None = None, spare: int = 0) -> None:
        super().__init__(daemon=True)
        self.store, self.name, self.size = RunStore(storage, name), name, size
        self.want, self.last_round = kills, last_round
        self.budget, self.spare = budget, spare
        self.rng = np.random.default_rng(seed)
        self.kills: list[tuple[int, int, int]] = []   # (member, pid, committed round when killed)
        self.steps: list[list[int]] = []              # each member's committed step when killed
        self.error: BaseException | None = None

    def _state(self) -> dict | None:
        """The committed state; None before the first commit (or if reads keep failing)."""
        for _ in range(100):
            try:
                return self.store.read_state() if self.store.exists() else None
            except Exception:   # noqa: BLE001 - read beside the driver's commit: ask again
                time.sleep(0.01)
        return None

    def _round(self, state: dict | None) -> int:
        """The committed round; -1 before the first commit."""
        if state is None:
            return -1
        return int(state.get("events", 0)) // self.size if state.get("mode") == "async" else int(state["round"])

    def _over(self, state: dict | None) -> bool:
        """No more kills: ``last_round`` reached, or a member within ``spare`` steps of the budget."""
        return self._round(state) >= self.last_round or (
            state is not None and self.budget is not None
            and any(m["step"] > self.budget - self.spare for m in state["members"]))

    def _pid(self, m: int) -> int | None:
        try:
            return ray.get(ray.get_actor(f"{self.name}/m{m}").pid.remote(), timeout=30)
        except Exception:   # not started yet, or being replaced
            return None

    def run(self) -> None:
        try:
            deadline = time.time() + 600
            m, pid = 0, None
            while len(self.kills) < self.want and time.time() < deadline:
                if pid is None:   # the first member, or a lookup that found no actor yet
                    pid = self._pid(m)
                    if pid is None:
                        time.sleep(0.1)
                        continue
                state = self._state()
                if self._round(state) < 1:
                    time.sleep(0.05)
                    continue
                if self._over(state):
                    return
                time.sleep(float(self.rng.uniform(0.0, 0.4)))
                state = self._state()
                if self._over(state):
                    return
                os.kill(pid, signal.SIGKILL)
                r = self._round(state)
                self.kills.append((m, pid, r))
                self.steps.append([x["step"] for x in state["members"]])
                m = (m + 1) % self.size
                pid = self._pid(m)   # the next member is alive: ask now, not after the round
                while self._round(self._state()) <= r and time.time() < deadline:   # the next kill in a later round
                    time.sleep(0.02)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e


@pytest.mark.slow
def test_members_killed_ten_times_come_back_from_their_own_state(ray_local, cache_dir, tmp_path):
    """Sync mode, the default population size: ten SIGKILLs at random moments (training, hand-
    overs, checkpoints). The run finishes with every member at the budget, each kill cost at most
    the interval in flight (the member came back to the step its round started from, out of the
    object store), no kill counted as a failure — and the search is the one a run without
    faults makes, bit for bit."""
    setup = lambda name: make_setup(tmp_path, name, cache_dir, size=SIZE, interval=INTERVAL,  # noqa: E731
                                    total=INTERVAL * ROUNDS, seed=5)
    killer = Killer(tmp_path, "killed", SIZE, KILLS, last_round=ROUNDS - 2, seed=1)
    killer.start()
    summary = run_search(setup("killed"), console=_quiet())
    killer.join(timeout=60)
    assert killer.error is None, killer.error
    assert len(killer.kills) >= KILLS, killer.kills

    state = _state(tmp_path, "killed")
    assert summary["status"] == state["status"] == "finished" and state["round"] == ROUNDS
    assert [m["step"] for m in state["members"]] == [INTERVAL * ROUNDS] * SIZE
    lineage = _lineage(tmp_path, "killed")
    restored = [r for r in lineage if r["event"] == "restored"]
    assert len(restored) == len(killer.kills) == state["restores"]
    for r in restored:
        assert r["source"] == "object store" and "process died" in r["error"]
        assert r["step"] == INTERVAL * r["round"]   # the start of the interval in flight: ≤ one interval lost
    assert state["failures"] == 0 and not [r for r in lineage if r["event"] == "died"]
    assert {r["member"] for r in restored} == set(range(SIZE))
    print(f"kills (member, pid, committed round): {killer.kills}")

    run_search(setup("calm"), console=_quiet())
    calm = _state(tmp_path, "calm")
    assert _table(state) == _table(calm)
    assert _comparable(lineage) == _comparable(_lineage(tmp_path, "calm"))


@pytest.mark.slow
def test_async_members_killed_resume_their_own_interval(ray_local, cache_dir, tmp_path):
    """Async mode: a killed member is restored from its own last state and starts its interval
    again (or, killed while a decision was applied to it, that decision is applied again
    first); every member reaches the budget and no kill is a failure. The kills stop while every
    member still has work left: a member at the budget is never called again, and its death
    needs no restore. (15 intervals a member: room for three kills before then even when each
    lands two or three rounds after the last, as under load; judged after every interval.)"""
    budget = INTERVAL * 15
    setup = make_setup(tmp_path, "free", cache_dir, size=3, interval=INTERVAL, total=budget, mode="async", seed=2)
    killer = Killer(tmp_path, "free", 3, 3, last_round=13, seed=2, budget=budget, spare=3 * INTERVAL)
    killer.start()
    summary = run_search(setup, console=_quiet())
    killer.join(timeout=60)
    print(f"kills (member, pid, committed round): {killer.kills}; committed steps then: {killer.steps}")
    assert killer.error is None, killer.error
    state = _state(tmp_path, "free")
    assert summary["status"] == "finished" and all(m["step"] == budget for m in state["members"])
    lineage = _lineage(tmp_path, "free")
    restored = [r for r in lineage if r["event"] == "restored"]
    assert len(killer.kills) == 3 and len(restored) == 3 == state["restores"]
    history = {m["id"]: {step for step, _ in m["history"]} for m in state["members"]}
    for i, r in enumerate(lineage):
        if r["event"] != "restored":
            continue
        # back at the step its interval started from (its state when it was last judged or
        # changed), and on from there: the interval trained again — or, when it was killed
        # while a decision was applied to it, first that decision applied again (its next
        # record, in the same round, judged on the same state) and the interval trained from
        # the decision's step
        assert r["source"] == "object store" and r["step"] % INTERVAL == 0
        after = next((x for x in lineage[i + 1:] if x["member"] == r["member"]), None)
        again = (after is not None and after["event"] in ("exploit", "explore", "crossover")
                 and after["round"] == r["round"] and after["fitness"] == r["fitness"])
        assert (after["step"] if again else r["step"]) + INTERVAL in history[r["member"]]
    assert state["failures"] == 0


@pytest.mark.slow
def test_a_member_that_dies_again_and_again_on_one_state_is_given_up(ray_local, cache_dir, tmp_path):
    """Member 0 SIGKILLed three times before it finishes the same (long) interval: its state is
    given up with one line, it goes on as a new member (a failure, counted), and the run ends."""
    name = "cursed"
    setup = make_setup(tmp_path, name, cache_dir, size=2, interval=300, total=300, seed=4)
    kills: list[int] = []

    def pid_of_m0(other_than: int | None) -> int | None:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                pid = ray.get(ray.get_actor(f"{name}/m0").pid.remote(), timeout=10)
                if pid != other_than:
                    return pid
            except Exception:   # not started yet, or being replaced
                pass
            time.sleep(0.02)
        return None

    def kill_three_times() -> None:
        pid = None
        while len(kills) < 3:
            pid = pid_of_m0(pid)
            if pid is None:
                return
            time.sleep(0.3)   # its new process loads its state and starts the interval again
            os.kill(pid, signal.SIGKILL)
            kills.append(pid)

    killer = threading.Thread(target=kill_three_times, daemon=True)
    killer.start()
    out = io.StringIO()
    summary = run_search(setup, console=Console(file=out, width=400))
    killer.join(timeout=60)
    assert len(kills) == 3
    lines = [line for line in out.getvalue().splitlines() if "given up" in line]
    assert len(lines) == 1 and lines[0].startswith(f"{name}: member 0 died 3 times on its state at step 0")
    lineage = _lineage(tmp_path, name)
    events = [r["event"] for r in lineage if r["member"] == 0 and r["event"] in ("restored", "died")]
    assert events[-1] == "died" and set(events[:-1]) == {"restored"}   # a kill may land mid-restore
    state = _state(tmp_path, name)
    assert summary["status"] == "finished" and state["failures"] == 1 and state["restores"] == len(events) - 1
    assert all(m["step"] == 300 for m in state["members"])


def test_a_population_that_keeps_diverging_names_the_gene(ray_local, cache_dir, tmp_path):
    """An absurd learning-rate range: every member diverges, every time. Each divergence is a
    "died" record (not a crash); past population.max_failures the search ends with one line that
    names train.lr."""
    space = {"train.lr": {"type": "float", "low": 1e5, "high": 1e6, "log": True},
             "train.weight_decay": {"type": "float", "low": 0.0, "high": 0.2}}
    setup = make_setup(tmp_path, "nan", cache_dir, size=2, interval=5, total=20, max_failures=2,
                       train={"grad_clip": 0.0, "warmup_steps": 0})
    setup.space = SearchSpace.from_dict(space, base=setup.space.base)
    setup.config["search"] = space
    with pytest.raises(SearchError) as err:
        run_search(setup, console=_quiet())
    line = str(err.value)
    assert "\n" not in line and "3 failures exceed population.max_failures (2)" in line
    assert ("train.lr is the likely cause: every member diverged, and its whole range [1e+05, 1e+06] "
            "lies above the base config's 0.003") in line
    died = [r for r in _lineage(tmp_path, "nan") if r["event"] == "died"]
    assert len(died) == 3 and all("non-finite" in r["error"] for r in died)
    assert _state(tmp_path, "nan")["status"] == "failed"


def test_likely_cause_compares_the_diverged_with_the_healthy():
    space = SearchSpace.from_dict({"train.lr": {"type": "float", "low": 1e-4, "high": 1.0, "log": True},
                                   "train.weight_decay": {"type": "float", "low": 0.0, "high": 0.2}},
                                  base={"train.lr": 1e-3, "train.weight_decay": 0.1})
    diverged = [{"train.lr": 0.5, "train.weight_decay": 0.05}, {"train.lr": 0.9, "train.weight_decay": 0.15}]
    healthy = [{"train.lr": 1e-3, "train.weight_decay": 0.1}, {"train.lr": 3e-4, "train.weight_decay": 0.1}]
    assert likely_cause(space, diverged, healthy) == (
        "train.lr is the likely cause: the diverged members had it towards its upper bound "
        "(median 0.7 in [0.0001, 1]); narrow its range in `search`")
    assert likely_cause(space, [], healthy) is None
    # nothing stands out: no gene named
    assert likely_cause(space, [{"train.lr": 2e-3, "train.weight_decay": 0.1}], healthy[:1]) is None

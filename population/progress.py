"""The driver's progress line: a rich progress bar on a terminal, one printed line per round
otherwise (logs, ``ray job logs``), with the best and median fitness and an ETA."""
from __future__ import annotations

import math
import statistics
import time
from typing import Any

from population.records import Records


class Progress:
    """Reports the committed rounds of one driver session on ``console``."""

    def __init__(self, name: str, records: Records, console: Any) -> None:
        self.name = name
        self.records = records
        self.console = console
        self.bar: Any = None
        self._task: Any = None
        self.session = (records.round, time.perf_counter())   # (round, time) at the loop's start

    def start(self) -> None:
        """The loop starts now (the ETA counts from here)."""
        self.session = (self.records.round, time.perf_counter())

    def update(self, round: int, steps: int) -> None:
        records, pop = self.records, self.records.pop
        total_rounds = round + math.ceil(max(0, pop.total_steps - steps) / pop.interval_steps)
        fits = [h[-1][1] for r in records.members.values() if (h := r.history)]   # (each one's fitness)
        best = records.best()
        r0, t0 = self.session
        done = round - r0
        eta = (time.perf_counter() - t0) / done * (total_rounds - round) if done > 0 else None
        info = (f"step {steps}/{pop.total_steps}  best {best.fitness:.4f} (m{best.id})  "
                f"median {statistics.median(fits):.4f}  exploits {len(records.exploit_latencies)}"
                if best else "")
        if self.console.is_terminal:
            if self.bar is None:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

                self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                    console=self.console)
                self.bar.start()
                self._task = self.bar.add_task(f"{self.name} rounds", total=total_rounds,
                                               completed=r0, info="")
            self.bar.update(self._task, completed=round, total=total_rounds, info=info)
        else:
            eta_text = f"  eta {duration(eta)}" if eta is not None else ""
            self.console.print(f"round {round}/{total_rounds}  {info}{eta_text}", highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"

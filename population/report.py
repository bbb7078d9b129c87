"""``evo report RUN``: one self-contained HTML page (and the same plots as PNG files) per run.

The page answers what a user asks of a search, from the run store alone (no Ray, no torch):

- ``fitness.png``: val_bpb of every member over training steps, one colour per member; each
  exploit / crossover / restart is drawn as a jump (a dashed connector) from the point the member
  abandoned to the donor's point, where the member's line continues — the classic PBT picture.
- ``hyperparameters.png``: one panel per gene, each member's value over steps (from the lineage:
  what each slot ran), and the best member's schedule (the recipe that produced its weights,
  inherited through every exploit) drawn thick in black.
- ``lineage.png``: the genealogy: x = round, y = member slot, an edge into every node from the
  node whose weights it continued, nodes coloured by fitness, the best member's ancestry in black.
- ``mix.png`` (runs with several data sources): the best member's data mix over training steps,
  each source's share of the batches stacked, following its schedule back through every exploit.
- ``pareto.png``: val_bpb against the parameter count (or the configured ``strategy.objectives``)
  with the non-dominated front highlighted; skipped while no member has those objectives.
- tables: the run's headline (status, rounds, best member, its genome and schedule, exploit
  count and latency, orchestration efficiency), the population, the latest lineage events.

The HTML embeds the PNGs as ``data:`` URIs and links nothing outside itself, so the one file
works when mailed. A small inline script marks every ``<img>`` with ``data-ok="1"`` once it has
decoded (what a headless browser test checks). Matplotlib is imported inside the plotting
functions, and only its object-oriented API with the Agg canvas is used (no pyplot, no global
backend switch), so importing this module costs nothing and it is safe inside the driver.
"""
from __future__ import annotations

import base64
import datetime as dt
import html
import io
import math
import os
import posixpath
import statistics
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np

from evo.genome import Genome, format_diff
from evo.selection import pareto_front
from evo.strategy import SCORE, objective_sense
from population.inspect import mix_shares
from population.records import efficiency as records_efficiency
from population.store import RunStore

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT_DIR = "report"                 # inside the run store
PLOTS = ("fitness", "hyperparameters", "lineage", "mix", "pareto")   # <name>.png, in page order
JUMPS = ("exploit", "crossover", "restart")   # events that give a member another's weights
MAX_EVENTS_SHOWN = 200                # lineage rows in the HTML table (the latest ones)
DPI = 100


@dataclass
class RunView:
    """What the report reads from the run store, once."""

    name: str
    uri: str
    config: dict
    state: dict | None          # the last committed state; None before round 0 is committed
    lineage: list[dict]

    @property
    def members(self) -> list[dict]:
        return list((self.state or {}).get("members", []))

    @property
    def genes(self) -> list[str]:
        """Gene paths: the config's ``search`` keys, else every path seen in a genome."""
        search = self.config.get("search") or {}
        genes = [k for k, v in search.items() if isinstance(v, dict)]
        if genes:
            return genes
        return sorted({p for m in self.members for p in m.get("genome", {})})

    @property
    def objectives(self) -> list[str]:
        return list((self.config.get("strategy") or {}).get("objectives") or ["val_bpb"])

    def sense(self, objective: str) -> str:
        """"min" or "max": evo's, or the run's declared one (fitness.sense for score)."""
        fitness = self.config.get("fitness") or {}
        senses = {SCORE: fitness["sense"]} if fitness.get("function") and fitness.get("sense") else {}
        try:
            return objective_sense(objective, senses)
        except KeyError:
            return "min"

    @property
    def mode(self) -> str:
        return (self.state or {}).get("mode") or (self.config.get("population") or {}).get("mode", "sync")

    def best(self) -> dict | None:
        """The driver's choice: the alive evaluated member of lowest val_bpb (then lowest id)."""
        alive = [m for m in self.members if m.get("alive", True) and m.get("history")]
        return min(alive, key=lambda m: (m["history"][-1][1], m["id"])) if alive else None


def load_run(storage: str, name: str) -> RunView:
    """Read config, committed state and lineage; StoreError (one line) for an unknown run."""
    store = RunStore(storage, name)
    config = store.read_config()        # StoreError "run 'x' does not exist at ..." if unknown
    return RunView(name=name, uri=store.uri, config=config, state=store.read_state(),
                   lineage=store.read_lineage())


def write_report(storage: str, name: str, out_dir: str | None = None) -> str:
    """Write report.html and the PNGs of run ``name``; returns the path of report.html.

    ``out_dir`` defaults to the run store's ``report/`` folder. For a storage that is not a local
    directory (s3://, gs://, memory:// …) the files are written to ``./<name>-report`` and also
    uploaded to ``report/`` in the run store. Raises StoreError for an unknown run.
    """
    run = load_run(storage, name)
    store = RunStore(storage, name)
    upload = False
    if out_dir is None:
        out_dir = store.local_path(REPORT_DIR)
        if out_dir is None:
            out_dir, upload = os.path.abspath(f"{name}-report"), True
    os.makedirs(out_dir, exist_ok=True)

    plots = render_plots(run)
    for key in PLOTS:   # a plot skipped this time must not leave last time's file behind
        if key not in plots and os.path.exists(os.path.join(out_dir, f"{key}.png")):
            os.unlink(os.path.join(out_dir, f"{key}.png"))
    files = {f"{key}.png": png for key, (png, _, _) in plots.items()}
    files["report.html"] = render_html(run, plots).encode()
    for fname, data in files.items():
        _write_atomic(os.path.join(out_dir, fname), data)
    if upload:
        fs, root = fsspec.core.url_to_fs(store.uri)
        for fname, data in files.items():
            fs.pipe_file(posixpath.join(root, REPORT_DIR, fname), data)
        for key in PLOTS:
            if key not in plots and fs.exists(posixpath.join(root, REPORT_DIR, f"{key}.png")):
                fs.rm_file(posixpath.join(root, REPORT_DIR, f"{key}.png"))
    return os.path.join(out_dir, "report.html")


# ----------------------------------------------------------------------------------------------
# plots


def render_plots(run: RunView) -> dict[str, tuple[bytes, str, str]]:
    """{plot name: (PNG bytes, alt text, caption)}, in page order; pareto only when it applies."""
    out = {
        "fitness": (_png(plot_fitness(run)), _alt_fitness(run),
                    "Each line is one member slot. A dashed connector is a jump: the member "
                    "dropped its weights (the end of its line) and continued from the donor's "
                    "(the start of its next line). The star marks the best member."),
        "hyperparameters": (_png(plot_hyperparameters(run)),
                            f"Values of the {len(run.genes)} genes of each member over training steps, "
                            "with the best member's schedule in black.",
                            "Thin coloured lines: what each member slot trained with (a step where it "
                            "explored or copied another member). Thick black: the best member's "
                            "schedule, the hyperparameters its weights were trained with from step 0 "
                            "(`evo replay` retrains on it)."),
        "lineage": (_png(plot_lineage(run)),
                    "Lineage tree: rounds left to right, member slots top to bottom, edges from the "
                    "member whose weights each member continued, nodes coloured by val_bpb.",
                    "Grey edges: a member kept its own weights. Blue: exploit (weights copied from "
                    "another member). Orange: crossover (solid from the parent whose weights were "
                    "taken). Red: restart (after a failure, or fresh: no edge, a square node). "
                    "Black: the best member's ancestry."
                    + (" Async mode has no shared rounds: a node sits at its evaluation's training "
                       "step / interval_steps, so a member that jumped to a donor's step skips "
                       "columns." if run.mode == "async" else "")),
    }
    mix = mix_schedule(run)
    if mix:
        names = list(mix[0][1])
        out["mix"] = (_png(plot_mix(run, mix)),
                      f"The best member's data mix over training steps: the share of {', '.join(names)} "
                      "in its batches, stacked.",
                      "The mix the best member's weights were trained with (its schedule, inherited "
                      "through every exploit): each band is one source's share of the sequences drawn "
                      "from that step on (data.mix weights normalised).")
    pareto = plot_pareto(run)
    if pareto is not None:
        x, y = _pareto_axes(run)
        out["pareto"] = (_png(pareto), f"Pareto plot of the alive members: {y} against {x}, "
                         "non-dominated front highlighted.",
                         "Each point is an alive member's latest evaluation. Red points are the "
                         "non-dominated front: no other member is at least as good in every one of "
                         + ", ".join(f"{o} ({run.sense(o)}imised)" for o in _pareto_objectives(run))
                         + " and better in one.")
    return out


def _png(fig: Figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _colours(ids: list[int]) -> dict[int, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(ids) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(sorted(ids))}


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=12, color="0.3")
    ax.set_xticks([])
    ax.set_yticks([])


def _history(member: dict) -> list[tuple[int, float]]:
    return [(int(s), float(v)) for s, v in member.get("history", []) if _finite(v)]


def fitness_segments(member: dict, lineage: list[dict]) -> tuple[list[list[tuple[float, float]]], list[tuple]]:
    """One member's evaluations split at its jumps: (segments of (step, val_bpb), connectors).

    A jump record (exploit / crossover / restart) follows the evaluation whose value it records
    as the member's fitness; the member then continues from the donor's point. A restart from
    a donor appends the donor's point to the history itself. Records that match no evaluation
    (e.g. before a fresh restart cleared the history) are left out. Connectors are
    ((x0, y0), (x1, y1), event).
    """
    hist = _history(member)
    segments: list[list[tuple[float, float]]] = [[]]
    connectors: list[tuple] = []
    i = 0
    for rec in lineage:
        if rec.get("member") != member["id"] or rec.get("event") not in JUMPS or not rec.get("parents"):
            continue
        fit = rec.get("fitness")
        j = next((k for k in range(i, len(hist)) if _same(hist[k][1], fit)), None)
        if j is None:
            continue
        donor = _donor_point(rec)
        if rec["event"] == "restart":   # hist[j] is the donor's point the driver appended
            segments[-1].extend(hist[i:j])
            if segments[-1]:
                connectors.append((segments[-1][-1], hist[j], "restart"))
            segments.append([hist[j]])
        else:
            segments[-1].extend(hist[i:j + 1])
            if donor is not None:
                connectors.append((hist[j], donor, rec["event"]))
            segments.append([donor] if donor is not None else [])
        i = j + 1
    segments[-1].extend(hist[i:])
    return [s for s in segments if s], connectors


def _donor_point(rec: dict) -> tuple[float, float] | None:
    """(step, val_bpb) of the member whose weights the record's member took."""
    parents, fits = rec.get("parents") or [], rec.get("parent_fitness") or []
    source = rec.get("weights_from", parents[0] if parents else None)
    if source in parents and len(fits) == len(parents) and _finite(fits[parents.index(source)]):
        return float(rec["step"]), float(fits[parents.index(source)])
    return None


def plot_fitness(run: RunView) -> Figure:
    """val_bpb of every member over steps, with exploit jumps as dashed connectors."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(10, 5.5), layout="constrained")
    ax = fig.add_subplot()
    members = run.members
    if not any(_history(m) for m in members):
        _empty(ax, "no evaluations yet")
        ax.set_title(f"{run.name}: fitness")
        return fig
    colours = _colours([m["id"] for m in members])
    jumps = 0
    for m in members:
        c = colours[m["id"]]
        segments, connectors = fitness_segments(m, run.lineage)
        for k, seg in enumerate(segments):
            xs, ys = zip(*seg)
            ax.plot(xs, ys, "-o", color=c, ms=3, lw=1.6, alpha=0.9 if m.get("alive", True) else 0.4,
                    label=f"m{m['id']}" if k == 0 else None)
        for (x0, y0), (x1, y1), _ in connectors:
            ax.plot([x0, x1], [y0, y1], "--", color=c, lw=1.2, alpha=0.8)
            ax.plot([x1], [y1], "o", mfc="white", mec=c, ms=5)
            jumps += 1
        for rec in run.lineage:
            if rec.get("member") == m["id"] and rec.get("event") == "died" and _finite(rec.get("fitness")):
                ax.plot([rec["step"]], [rec["fitness"]], "x", color="red", ms=9, mew=2)
    best = run.best()
    if best is not None:
        s, v = best["history"][-1]
        ax.plot([s], [v], "*", color="black", ms=16, zorder=5)
        ax.annotate(f"best m{best['id']}: {v:.4f}", (s, v), textcoords="offset points", xytext=(-12, -4),
                    ha="right", va="top", fontsize=10, fontweight="bold")
    handles, labels = ax.get_legend_handles_labels()
    if len(members) > 16:
        handles, labels = [], []
    handles.append(Line2D([], [], ls="--", color="0.3"))
    labels.append(f"jump to a donor's weights ({jumps})")
    ax.legend(handles, labels, fontsize=8, ncols=2, loc="upper right")
    ax.set_xlabel("training step")
    ax.set_ylabel("val_bpb (bits per byte, lower is better)")
    ax.set_title(f"{run.name}: fitness of every member")
    ax.grid(alpha=0.3)
    return fig


def slot_trajectory(member: dict, lineage: list[dict]) -> list[tuple[int, dict]]:
    """(step, genome) each time member slot ``member`` took a genome, from the lineage; falls
    back to the member's schedule when the lineage has no record of it."""
    out = [(int(r["step"]), r["genome"]) for r in lineage
           if r.get("member") == member["id"] and r.get("event") != "died" and isinstance(r.get("genome"), dict)]
    if not out:
        out = [(int(e["step"]), e["genome"]) for e in member.get("schedule", [])]
    return out or [(0, member.get("genome", {}))]


def plot_hyperparameters(run: RunView) -> Figure:
    """One panel per gene: each slot's value over steps, the best member's schedule on top."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    genes = run.genes
    ncols = 1 if len(genes) <= 1 else 2
    nrows = max(1, math.ceil(len(genes) / ncols))
    fig = Figure(figsize=(6 * ncols, 3 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    fig.suptitle(f"{run.name}: genes over training (thick black: best member's schedule)")
    if not genes or not run.members:
        _empty(axes[0], "no genes" if not genes else "no members yet")
        for ax in axes[1:]:
            ax.set_visible(False)
        return fig
    members, best = run.members, run.best()
    colours = _colours([m["id"] for m in members])
    search = run.config.get("search") or {}
    for ax, gene in zip(axes, genes):
        spec = search.get(gene) if isinstance(search.get(gene), dict) else {}
        lines = []   # (member id or None for the best schedule, [(step, value)])
        for m in members:
            traj = [(s, g.get(gene)) for s, g in slot_trajectory(m, run.lineage)]
            lines.append((m["id"], traj + [(int(m.get("step", traj[-1][0])), traj[-1][1])]))
        if best is not None:
            sched = [(int(e["step"]), e["genome"].get(gene)) for e in best.get("schedule", [])]
            if sched:
                lines.append((None, sched + [(int(best["step"]), sched[-1][1])]))
        values = [v for _, pts in lines for _, v in pts if v is not None]
        numeric = all(isinstance(v, (int, float)) for v in values)
        if numeric:
            to_y, ticks = (lambda v: float(v)), None
        else:   # a choice gene: plot the index of the choice
            choices = list(spec.get("choices") or sorted({str(v) for v in values}))
            labels = [str(c) for c in choices]
            to_y, ticks = (lambda v: labels.index(str(v)) if str(v) in labels else np.nan), labels
        for mid, pts in lines:
            xs = [s for s, _ in pts]
            ys = [to_y(v) if v is not None else np.nan for _, v in pts]
            if mid is None:
                ax.step(xs, ys, where="post", color="black", lw=3, alpha=0.85, zorder=4,
                        label=f"best m{best['id']} schedule")
            else:
                ax.step(xs, ys, where="post", color=colours[mid], lw=1.3, alpha=0.8, label=f"m{mid}")
        ys_all = np.array([to_y(v) for v in values], dtype=float) if values else np.array([])
        positive = ys_all[np.isfinite(ys_all)]
        # the config's log flag when there is one, else "spans more than a decade"
        log = spec.get("log") if "log" in spec else bool(
            positive.size and positive.min() > 0 and positive.max() / positive.min() > 10)
        if numeric and log and positive.size and positive.min() > 0:
            ax.set_yscale("log")
        if ticks is not None:
            ax.set_yticks(range(len(ticks)), ticks)
        elif numeric and all(isinstance(v, int) for v in values):
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        kind = " (architecture)" if gene.startswith("model.") else ""
        ax.set_title(gene + kind, fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    if len(members) <= 16:
        axes[0].legend(fontsize=7, ncols=2)
    for ax in axes[len(genes):]:
        ax.set_visible(False)
    return fig


def mix_schedule(run: RunView) -> list[tuple[int, dict[str, float]]]:
    """The best member's data mix as (step, {source: share}) at each step of its schedule and at
    its current step, shares summing to 1; [] unless the run has several data sources and a
    data.mix gene. A weight not in the genome is data.mix's, else 1.0 (as the trainer reads it)."""
    data = run.config.get("data") or {}
    if len(data.get("sources") or {}) < 2 or not any(g.startswith("data.mix.") for g in run.genes):
        return []
    best = run.best()
    if best is None:
        return []
    schedule = [(int(e["step"]), e["genome"]) for e in best.get("schedule", [])] or [(0, best.get("genome", {}))]
    schedule.append((int(best.get("step", schedule[-1][0])), schedule[-1][1]))
    return [(step, mix_shares(data, genome)) for step, genome in schedule]


def plot_mix(run: RunView, mix: list[tuple[int, dict[str, float]]]) -> Figure:
    """The best member's data mix over steps: each source's share stacked (steps held until changed)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.4), layout="constrained")
    ax = fig.subplots()
    best = run.best()
    steps = [s for s, _ in mix]
    names = list(mix[0][1])
    ax.stackplot(steps, [[shares[n] for _, shares in mix] for n in names], labels=names, step="post", alpha=0.85)
    ax.set_xlim(steps[0], max(steps[-1], steps[0] + 1))
    ax.set_ylim(0, 1)
    ax.set_xlabel("training step")
    ax.set_ylabel("share of sequences")
    ax.set_title(f"{run.name}: best member m{best['id']}'s data mix over training" if best else run.name)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def lineage_nodes(run: RunView) -> dict[tuple[int, int], float | None]:
    """{(round, member): val_bpb or None (not evaluated)} — the nodes of the lineage tree.

    sync: every member has a node at every round 0..R; its evaluations are one per round, the
    latest at R (a fresh restart clears the history, so earlier rounds lose their values).
    async: rounds are not shared, so a node sits at round = ceil(step / interval_steps) of the
    evaluation (round 0: born), and a member that jumped to a donor's step skips rounds.
    """
    rounds = int((run.state or {}).get("round", 0))
    nodes: dict[tuple[int, int], float | None] = {}
    for m in run.members:
        hist = [(int(st), float(v)) for st, v in m.get("history", [])]
        if run.mode == "sync":
            nodes.update({(r, m["id"]): None for r in range(rounds + 1)})
            hist = hist[len(hist) - rounds:] if len(hist) > rounds else hist   # never before round 1
            first = rounds - len(hist) + 1
            nodes.update({(first + k, m["id"]): v for k, (_, v) in enumerate(hist)})
        else:
            nodes[(0, m["id"])] = None
            nodes.update({(_async_round(run, st), m["id"]): v for st, v in hist})
    return nodes


def _async_round(run: RunView, step: int) -> int:
    interval = int((run.state or {}).get("interval_steps") or (run.config.get("population") or {})
                   .get("interval_steps") or 1)
    return math.ceil(step / interval)


def lineage_edges(run: RunView) -> dict[tuple[int, int], list[tuple[int, str]]]:
    """{(round, member): [(parent member at round - 1, style)]} for the nodes whose weights came
    from another member (an empty list: from nowhere, a fresh restart). Every other node
    continues its own member's previous node."""
    incoming: dict[tuple[int, int], list[tuple[int, str]]] = {}
    for rec in run.lineage:
        event, m = rec.get("event"), rec.get("member")
        r = rec.get("round") if run.mode == "sync" else _async_round(run, int(rec.get("step") or 0))
        if event not in JUMPS or not isinstance(m, int) or not isinstance(r, int):
            continue
        parents = [p for p in rec.get("parents") or [] if isinstance(p, int)]
        if event == "crossover":
            source = rec.get("weights_from", parents[0] if parents else m)
            incoming[(r + 1, m)] = [(p, "crossover" if p == source else "crossover-other") for p in parents]
        else:
            incoming[(r + 1, m)] = [(p, event) for p in parents]
    return incoming


def plot_lineage(run: RunView) -> Figure:
    """The genealogy of the population: round × slot, edges parent → child, fitness colours."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    ids = sorted(m["id"] for m in run.members)
    nodes = lineage_nodes(run)
    last = max([r for r, _ in nodes] + [int((run.state or {}).get("round", 0))])
    fig = Figure(figsize=(min(16, max(8.5, 4 + 0.55 * (last + 1))), min(12, 2.6 + 0.45 * max(1, len(ids)))),
                 layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(f"{run.name}: lineage (edges: whose weights each member continued)")
    if not ids:
        _empty(ax, "no members yet")
        return fig
    incoming = lineage_edges(run)
    styles = {"keep": ("0.75", "-", 1.0), "exploit": ("tab:blue", "-", 1.8),
              "crossover": ("tab:orange", "-", 1.8), "crossover-other": ("tab:orange", "--", 1.2),
              "restart": ("tab:red", "-", 1.8)}

    def parents_of(r: int, m: int) -> list[tuple[int, int, str]]:
        """(round, member, style) of the nodes feeding node (r, m)."""
        if (r, m) in incoming:
            return [(r - 1, p, style) for p, style in incoming[(r, m)]]
        before = [q for q, mm in nodes if mm == m and q < r]
        return [(max(before), m, "keep")] if before else []

    for (r, m) in nodes:
        for q, p, style in parents_of(r, m):
            colour, ls, lw = styles[style]
            ax.plot([q, r], [p, m], ls=ls, color=colour, lw=lw, zorder=1)
    best = run.best()
    best_node = None
    if best is not None:   # walk the best member's weights back to round 0
        best_node = (max(r for (r, m), v in nodes.items() if m == best["id"] and v is not None), best["id"])
        r, m = best_node
        for _ in range(len(nodes)):
            primary = [(q, p) for q, p, style in parents_of(r, m) if style != "crossover-other"]
            if not primary:
                break
            (q, p), = primary[:1]
            ax.plot([q, r], [p, m], color="black", lw=3.2, zorder=2, alpha=0.8)
            r, m = q, p
    vals = [v for v in nodes.values() if v is not None]
    size = max(25, min(160, 2400 / max(last + 1, len(ids))))
    empty = [k for k, v in nodes.items() if v is None]
    if empty:
        ax.scatter([r for r, _ in empty], [m for _, m in empty], s=size, facecolors="white",
                   edgecolors="0.5", zorder=3, label="not evaluated")
    if vals:
        high = max(vals) if max(vals) > min(vals) else min(vals) + 1e-9
        done = [k for k, v in nodes.items() if v is not None]
        sc = ax.scatter([r for r, _ in done], [m for _, m in done], c=[nodes[k] for k in done],
                        cmap=colormaps["viridis_r"], norm=Normalize(min(vals), high), s=size,
                        edgecolors="0.2", zorder=3)
        fig.colorbar(sc, ax=ax, label="val_bpb (lower is better)")
    fresh = [(r, m) for (r, m), ps in incoming.items() if not ps and r <= last]
    if fresh:
        ax.scatter([r for r, _ in fresh], [m for _, m in fresh], marker="s", s=size * 1.3,
                   facecolors="none", edgecolors="tab:red", lw=2, zorder=4, label="fresh restart")
    if best_node is not None:
        ax.scatter([best_node[0]], [best_node[1]], marker="*", s=size * 2.5, color="black", zorder=5, label="best")
    ax.set_xlabel("round" if run.mode == "sync" else "round (= training step / interval_steps)")
    ax.set_ylabel("member slot")
    ax.set_xticks(range(0, last + 1, max(1, math.ceil((last + 1) / 20))))
    ax.set_yticks(ids, [f"m{m}" for m in ids])
    ax.set_ylim(max(ids) + 0.6, min(ids) - 0.6)
    ax.set_xlim(-0.4, last + 0.4)
    handles = [Line2D([], [], color=c, ls=ls, lw=lw) for c, ls, lw in styles.values()]
    handles += [Line2D([], [], color="black", lw=3.2)]
    labels = ["kept own weights", "exploit", "crossover (weights)", "crossover (genes only)", "restart",
              "best member's ancestry"]
    more = ax.get_legend_handles_labels()
    fig.legend(handles + more[0], labels + more[1], loc="outside lower center", ncols=4, fontsize=8,
               frameon=False)
    return fig


def _pareto_objectives(run: RunView) -> list[str]:
    objectives = run.objectives
    return objectives if len(objectives) >= 2 else ["val_bpb", "params"]


def _pareto_axes(run: RunView) -> tuple[str, str]:
    """(x, y): the second objective across, the first (val_bpb) up."""
    objectives = _pareto_objectives(run)
    return objectives[1], objectives[0]


def _pareto_points(run: RunView) -> list[dict]:
    objectives = _pareto_objectives(run)
    return [m for m in run.members if m.get("alive", True)
            and all(_finite((m.get("objectives") or {}).get(o)) for o in objectives)]


def plot_pareto(run: RunView) -> Figure | None:
    """val_bpb against params (or the configured objectives); None when no member has them."""
    from matplotlib.figure import Figure

    points = _pareto_points(run)
    if not points:
        return None
    objectives = _pareto_objectives(run)
    signs = np.array([-1.0 if run.sense(o) == "max" else 1.0 for o in objectives])
    obj = np.array([[float(m["objectives"][o]) for o in objectives] for m in points]) * signs
    front = set(pareto_front(obj))
    x_name, y_name = _pareto_axes(run)
    x = np.array([float(m["objectives"][x_name]) for m in points])
    y = np.array([float(m["objectives"][y_name]) for m in points])
    fig = Figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.add_subplot()
    rest = [i for i in range(len(points)) if i not in front]
    ax.scatter(x[rest], y[rest], s=50, color="0.6", edgecolors="0.3", label="dominated", zorder=2)
    f = sorted(front, key=lambda i: x[i])
    ax.scatter(x[f], y[f], s=80, color="tab:red", edgecolors="black", zorder=3,
               label=f"non-dominated front ({len(f)})")
    if len(f) > 1:
        ax.step(x[f], y[f], where="post" if run.sense(y_name) != "max" else "pre",
                color="tab:red", lw=1.2, alpha=0.7, zorder=2)
    for i, m in enumerate(points):
        ax.annotate(f"m{m['id']}", (x[i], y[i]), textcoords="offset points", xytext=(5, 4), fontsize=9)
    if x.min() > 0 and x.max() / x.min() > 10:
        ax.set_xscale("log")
    ax.margins(0.12)
    ax.set_xlabel(f"{x_name} ({run.sense(x_name)}imise)")
    ax.set_ylabel(f"{y_name} ({run.sense(y_name)}imise)")
    ax.set_title(f"{run.name}: objectives of the alive members")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return fig


def _alt_fitness(run: RunView) -> str:
    jumps = sum(1 for r in run.lineage if r.get("event") in JUMPS and r.get("parents"))
    return (f"Fitness (val_bpb, lower is better) of the {len(run.members)} members over training "
            f"steps; {jumps} dashed jumps where a member continued from another member's weights.")


# ----------------------------------------------------------------------------------------------
# summary and HTML


def summary(run: RunView) -> dict[str, Any]:
    """The headline numbers of the page (also handy for tests and the CLI)."""
    state = run.state or {}
    pop = run.config.get("population") or {}
    total_steps = state.get("total_steps", pop.get("total_steps"))
    interval = state.get("interval_steps", pop.get("interval_steps"))
    best = run.best()
    lat = [float(x) for x in state.get("exploit_latencies", []) if _finite(x)]
    timing = state.get("timing") or {}
    efficiency = records_efficiency(timing) if _finite(timing.get("wall_s")) else None
    counts = {e: sum(1 for r in run.lineage if r.get("event") == e)
              for e in ("exploit", "explore", "crossover", "restart", "died", "restored")}
    return {
        "name": run.name,
        "status": state.get("status", "created (no round committed yet)"),
        "mode": run.mode,
        "strategy": (run.config.get("strategy") or {}).get("name"),
        "objectives": run.objectives,
        "round": int(state.get("round", 0)),
        "total_rounds": math.ceil(total_steps / interval) if total_steps and interval else None,
        "steps_done": state.get("steps_done"),
        "total_steps": total_steps,
        "size": len(run.members) or pop.get("size"),
        "alive": sum(1 for m in run.members if m.get("alive", True)),
        "best": None if best is None else {
            "member": best["id"], "val_bpb": best["history"][-1][1], "step": best["step"],
            "genome": best["genome"], "schedule": best.get("schedule", [])},
        "exploits": len(lat),
        "exploit_latency_median_s": statistics.median(lat) if lat else None,
        "events": counts,
        "failures": state.get("failures", 0),
        "restores": state.get("restores", 0),
        "timing": timing,
        "efficiency": efficiency,
        "updated": state.get("updated"),
    }


def schedule_rows(schedule: list[dict]) -> list[tuple[int, str, Any]]:
    """(step, what changed, seed) for each entry of a schedule: all genes first, then diffs."""
    rows, prev = [], None
    for e in schedule:
        genome = Genome.from_dict(e["genome"])
        text = _genome_text(e["genome"]) if prev is None else (format_diff(prev, genome) or "(no gene changed)")
        rows.append((int(e["step"]), text, e.get("seed")))
        prev = genome
    return rows


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1200px;
     padding:0 16px;color:#1d2228;background:#fff}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
.sub{color:#555;margin-top:0} table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f5f7} tr.best td{background:#fff6d6;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums} code{font-size:.92em}
.kv th{width:14em} img{max-width:100%;height:auto;border:1px solid #eee}
figure{margin:0 0 1em 0} figcaption{color:#444;font-size:.9em;max-width:70em}
.status{display:inline-block;padding:1px 8px;border-radius:10px;background:#e8eef6;font-size:.8em}
"""

_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = document.querySelectorAll("img");
  for (var i = 0; i < imgs.length; i++) {
    var img = imgs[i];
    img.setAttribute("data-ok", img.complete && img.naturalWidth > 0 ? "1" : "0");
    img.setAttribute("data-natural-width", String(img.naturalWidth));
  }
  document.body.setAttribute("data-images-checked", String(imgs.length));
});
"""


def render_html(run: RunView, plots: dict[str, tuple[bytes, str, str]]) -> str:
    """The page: headline table, plots as data URIs, best schedule, population, lineage."""
    s = summary(run)
    e = html.escape
    best = s["best"]
    rounds = f"{s['round']}" + (f" of {s['total_rounds']}" if s["total_rounds"] else "")
    steps = f"{s['steps_done']} of {s['total_steps']}" if s["steps_done"] is not None else "—"
    lat = s["exploit_latency_median_s"]
    timing = s["timing"]
    eff = "—"
    if s["efficiency"] is not None:
        eff = (f"{100 * s['efficiency']:.1f}% (member compute {timing.get('member_compute_s', 0):.1f} s / "
               f"(wall {timing['wall_s']:.1f} s × {timing['slots']} slots"
               + (" in the last session" if "slot_s" in timing and
                  abs(timing["slot_s"] - timing["wall_s"] * timing["slots"]) > 1e-6 * timing["slot_s"] else "")
               + "))")
    ev = s["events"]
    head = [
        ("run", f"<code>{e(run.name)}</code> <span class=sub>{e(run.uri)}</span>"),
        ("status", f"<span class=status>{e(str(s['status']))}</span>"),
        ("mode / strategy", e(f"{s['mode']} / {s['strategy']} (objectives: {', '.join(s['objectives'])})")),
        ("rounds", e(rounds)),
        ("steps", e(steps)),
        ("members", e(f"{s['alive']} alive of {s['size']}")),
        ("best member", e(f"m{best['member']} at step {best['step']}") if best else "— (no evaluation yet)"),
        ("best val_bpb", f"<b>{best['val_bpb']:.4f}</b>" if best else "—"),
        ("best genome", f"<code>{e(_genome_text(best['genome']))}</code>" if best else "—"),
        ("exploits", e(f"{s['exploits']} weight transfers, median latency "
                       + (f"{1000 * lat:.1f} ms" if lat is not None else "—")
                       + f"; lineage: {ev['exploit']} exploit, {ev['explore']} explore, {ev['crossover']} "
                         f"crossover, {ev['restart']} restart, {ev['died']} died, "
                         f"{ev['restored']} restored")),
        ("failures", e(str(s["failures"]))),
        ("restores", e(f"{s['restores']} (a member's process died or its node was lost; it came back "
                       "from its own state)")),
        ("orchestration efficiency", e(eff)),
        ("last commit", e(_when(s["updated"]))),
    ]
    out = [
        "<!DOCTYPE html>", "<html lang=en><head><meta charset=utf-8>",
        f"<title>evo report: {e(run.name)}</title>", f"<style>{_CSS}</style></head><body>",
        f"<h1>evo report: {e(run.name)}</h1>",
        f"<p class=sub>generated {e(_when(dt.datetime.now(dt.timezone.utc).timestamp()))} from the run store; "
        "self-contained (plots embedded).</p>",
        "<h2>Summary</h2>", "<table class=kv>",
        *(f"<tr><th>{e(k)}</th><td>{v}</td></tr>" for k, v in head), "</table>",
    ]
    if best:
        out += ["<h2>Best member's schedule</h2>",
                f"<p class=sub>The hyperparameters m{e(str(best['member']))}'s weights were trained with, "
                "inherited through every exploit: from each step on, the genes that changed.</p>",
                "<table><tr><th>from step</th><th>genes</th><th>seed</th></tr>"]
        out += [f"<tr><td class=num>{step}</td><td><code>{e(text)}</code></td><td class=num>{e(str(seed))}</td></tr>"
                for step, text, seed in schedule_rows(best["schedule"])]
        out.append("</table>")
    for key, (png, alt, caption) in plots.items():
        title = {"fitness": "Fitness over training", "hyperparameters": "Hyperparameters and genes",
                 "lineage": "Lineage", "mix": "Data mix", "pareto": "Pareto front"}[key]
        data = base64.b64encode(png).decode()
        out += [f"<h2 id={key}>{e(title)}</h2>", "<figure>",
                f'<img src="data:image/png;base64,{data}" alt="{e(alt)}" data-plot="{key}">',
                f"<figcaption>{e(caption)}</figcaption>", "</figure>"]
    out += ["<h2>Population</h2>", _population_table(run, best["member"] if best else None)]
    out += ["<h2>Lineage events</h2>", _events_table(run.lineage)]
    out += [f"<script>{_SCRIPT}</script>", "</body></html>", ""]
    return "\n".join(out)


def _population_table(run: RunView, best: int | None) -> str:
    if not run.members:
        return "<p>No round committed yet.</p>"
    e = html.escape
    rows = ["<table><tr><th>member</th><th>alive</th><th>step</th><th>val_bpb</th><th>params</th>"
            "<th>tokens/s</th><th>parent</th><th>age</th><th>genome</th></tr>"]
    for m in run.members:
        hist = m.get("history") or []
        obj = m.get("objectives") or {}
        cls = " class=best" if m["id"] == best else ""
        rows.append(
            f"<tr{cls}><td>m{e(str(m['id']))}</td><td>{'yes' if m.get('alive', True) else 'no'}</td>"
            f"<td class=num>{e(str(m.get('step', 0)))}</td><td class=num>{_num(hist[-1][1] if hist else None, 4)}</td>"
            f"<td class=num>{_int(obj.get('params'))}</td><td class=num>{_int(obj.get('tokens_per_s'))}</td>"
            f"<td>{'—' if m.get('parent') is None else 'm' + e(str(m['parent']))}</td>"
            f"<td class=num>{e(str(m.get('age', '')))}</td><td><code>{e(_genome_text(m.get('genome', {})))}</code></td></tr>")
    rows.append("</table>")
    return "\n".join(rows)


def _events_table(lineage: list[dict]) -> str:
    if not lineage:
        return "<p>No lineage records yet.</p>"
    e = html.escape
    shown = lineage[-MAX_EVENTS_SHOWN:]
    note = (f"<p class=sub>The latest {len(shown)} of {len(lineage)} records.</p>"
            if len(shown) < len(lineage) else "")
    rows = [note, "<table><tr><th>round</th><th>event</th><th>member</th><th>from</th><th>step</th>"
                  "<th>fitness before</th><th>what changed</th></tr>"]
    for r in shown:
        parents = ", ".join(f"m{p}" for p in r.get("parents") or [])
        what = str(r.get("changed") or (_genome_text(r["genome"]) if r.get("event") == "born" else ""))
        if r.get("how"):
            what = f"[{r['how']}] {what}"
        if r.get("error"):
            what = f"{what} {r['error']}".strip()
        rows.append(f"<tr><td class=num>{e(str(r.get('round', '')))}</td><td>{e(str(r.get('event', '')))}</td>"
                    f"<td>m{e(str(r.get('member', '')))}</td><td>{e(parents)}</td>"
                    f"<td class=num>{e(str(r.get('step', '')))}</td>"
                    f"<td class=num>{_num(r.get('fitness'), 4)}</td><td><code>{e(what)}</code></td></tr>")
    rows.append("</table>")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------
# small helpers


def _write_atomic(path: str, data: bytes) -> None:
    """Readers (a browser refreshing the page) see the old file or the new one, never half."""
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)   # mkstemp makes it private; a report is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _same(a: float, b: Any) -> bool:
    return _finite(b) and math.isclose(a, float(b), rel_tol=1e-12, abs_tol=0.0)


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.4g}"
    return str(v)


def _genome_text(genome: dict) -> str:
    return ", ".join(f"{k}={_value(v)}" for k, v in sorted(genome.items()))


def _num(v: Any, digits: int) -> str:
    return f"{v:.{digits}f}" if _finite(v) else "—"


def _int(v: Any) -> str:
    return f"{v:,.0f}" if _finite(v) else "—"


def _when(t: Any) -> str:
    if not _finite(t):
        return "—"
    return dt.datetime.fromtimestamp(float(t), dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")

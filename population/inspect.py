"""Read-only views of a run store: its status, and the export of a member as a Hugging Face model.

No Ray and no torch at import time: ``evo status`` must be quick and must work while the driver
runs (it only reads committed files) or after it died (the lock tells which).
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Mapping

from evo.strategy import SCORE
from population.store import RunStore


def run_status(storage: str, name: str) -> dict:
    """The run's status from its committed files.

    Each member says how often its process died and it was restored from its own state
    (``restores``; the run's total is ``restores``, its failures ``failures``).

    ``status`` is the committed one (running | finished | stopped | failed), except that a run
    committed as "running" whose driver is gone (no lock, or a lock whose process is dead or
    whose heartbeat is stale) is "interrupted": ``evo resume`` (or the same ``evo run``)
    continues it from its last committed round.
    """
    store = RunStore(storage, name)
    config = store.read_config()
    state = store.read_state()
    population = config.get("population") or {}
    status = state.get("status", "running") if state else "running"
    if status == "running" and not store.driver_alive():
        status = "interrupted"
    restores = _member_restores(store, state or {})
    members = []
    for m in (state or {}).get("members", []):
        history = m.get("history") or []
        members.append({
            "id": m["id"], "step": m.get("step", 0), "val_bpb": history[-1][1] if history else None,
            "genome": m.get("genome", {}), "parent": m.get("parent"), "alive": m.get("alive", True),
            "restores": restores.get(int(m["id"]), 0),
            # each held-out set's bits/byte and fitness.function's score, where the run has them
            **{k: v for k, v in sorted((m.get("objectives") or {}).items()) if k.startswith("val_bpb.") or k == SCORE},
            # with several data sources: each one's share of the batches (data.mix genes over data.mix)
            **({"mix": mix} if (mix := mix_shares(config.get("data"), m.get("genome", {}))) else {}),
        })
    best = _best(members)
    updated = (state or {}).get("updated")
    return {
        "name": name,
        "round": (state or {}).get("round", 0),
        "status": status,
        "mode": (state or {}).get("mode", population.get("mode")),
        "best": None if best is None else {"member": best["id"], "val_bpb": best["val_bpb"],
                                           "genome": best["genome"]},
        "members": members,
        "total_steps": (state or {}).get("total_steps", population.get("total_steps")),
        "exploits": len((state or {}).get("exploit_latencies", [])),
        "restores": int((state or {}).get("restores", 0)),
        "failures": int((state or {}).get("failures", 0)),
        "eval_failures": len((state or {}).get("eval_failures", [])),
        "updated": _iso(updated) if isinstance(updated, (int, float)) else None,
    }


def mix_shares(data: Mapping[str, Any] | None, genome: Mapping[str, Any]) -> dict[str, float]:
    """{source: share of the sequences drawn} for a resolved config's ``data`` section (sources
    in name order): the genome's data.mix.<source> genes over data.mix's fixed weights (1.0 where
    unset), normalised to sum to 1 as the trainer draws them; {} with fewer than two sources."""
    data = data or {}
    sources = sorted(data.get("sources") or {})
    if len(sources) < 2:
        return {}
    fixed = data.get("mix") or {}
    weights = {src: float(genome.get(f"data.mix.{src}", fixed.get(src, 1.0))) for src in sources}
    total = sum(weights.values())
    return {src: (w / total if total > 0 else float("nan")) for src, w in weights.items()}


def _member_restores(store: RunStore, state: dict) -> dict[int, int]:
    """{member: times its process died and it was restored from its own state}. A run committed
    before the state counted them per member: counted from the committed lineage."""
    if "member_restores" in state:
        return {int(m): int(n) for m, n in state["member_restores"].items()}
    if not state.get("restores"):
        return {}
    counts: dict[int, int] = {}
    for rec in store.read_lineage()[:int(state.get("lineage_count", 0))]:
        if rec.get("event") == "restored":
            counts[int(rec["member"])] = counts.get(int(rec["member"]), 0) + 1
    return counts


def _best(members: list[dict]) -> dict | None:
    """The alive member with the lowest last val_bpb (ties: lowest id)."""
    scored = [m for m in members if m["alive"] and m["val_bpb"] is not None]
    return min(scored, key=lambda m: (m["val_bpb"], m["id"])) if scored else None


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def export_run(storage: str, name: str, fmt: str, out_dir: str, member: int | None = None) -> str:
    """Write a member's committed weights (default: the best alive member, lowest last val_bpb)
    as a Hugging Face directory; ``fmt`` is "internlm2" or "llama". Returns the directory."""
    from trainers.export import export_internlm2, export_llama
    from trainers.model import InternLM2Config

    writers = {"internlm2": export_internlm2, "llama": export_llama}
    if fmt not in writers:
        raise ValueError(f"format: must be 'internlm2' or 'llama', got {fmt!r}")
    store = RunStore(storage, name)
    state = store.read_state()
    if state is None:
        raise ValueError(f"run {name!r} has no committed round yet: nothing to export")
    records = {m["id"]: m for m in state["members"]}
    if member is None:
        best = _best(run_status(storage, name)["members"])
        if best is None:
            raise ValueError(f"run {name!r} has no evaluated member yet: nothing to export")
        member = best["id"]
    if member not in records:
        raise KeyError(f"run {name!r} has no member {member} (members: {', '.join(map(str, sorted(records)))})")
    trainer = (store.read_config().get("population") or {}).get("trainer") or {}
    if trainer.get("kind", "internlm2") != "internlm2":
        raise ValueError(f"run {name!r} trained the sleep stub (population.trainer.kind): it has no model to export")
    checkpoint = records[member].get("checkpoint")
    if not checkpoint:
        raise ValueError(f"member {member} of run {name!r} has no committed checkpoint yet")
    trainer_state = store.load_checkpoint(checkpoint)
    config = InternLM2Config(**trainer_state["model_config"])
    return str(Path(writers[fmt](trainer_state["model"], config, out_dir, norm_eps=trainer_state.get("norm_eps"))))

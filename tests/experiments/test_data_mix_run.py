"""The data mix as a gene on real Ray (experiments/data_mix.yaml scaled down, sync, CPU): an
exploit gives the receiver the donor's mix (perturbed or resampled like any gene) and that mix is
the one in force in the member's checkpoint; a run stopped part-way and resumed equals an
uninterrupted one, lineage and fitness table, mix genes included."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from rich.console import Console

from experiments.config import build_setup, load_config
from population.driver import run_search
from population.store import RunStore
from tests.helpers import sigterm_at_round

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ROUNDS = 6
GENES = {"data.mix.code": (0.0, 1.0), "data.mix.docs": (0.05, 1.0)}   # data_mix.yaml's mix genes, bounds


def shares(genome: dict) -> dict[str, float]:
    """Each source's share of the batches for a genome of data_mix.yaml."""
    code, docs = genome["data.mix.code"], genome["data.mix.docs"]
    return {"code": code / (code + docs), "docs": docs / (code + docs)}


def overrides(storage: Path, cache: Path) -> list[str]:
    return [
        "population.size=4", f"population.total_steps={3 * ROUNDS}", "population.interval_steps=3",
        "population.resources.num_cpus=0.5", "data.seq_len=32", "data.max_bytes=100000",
        "data.eval_batches=2", "data.eval_batch_size=4", "train.batch_size=4", "train.warmup_steps=2",
        "model.hidden_size=32", "model.num_hidden_layers=1", "model.num_attention_heads=4",
        "model.num_key_value_heads=2", "model.intermediate_size=64",
        "logging.wandb.mode=disabled", "logging.optuna=false",
        f"storage={storage}", f"data.cache_dir={cache}",
    ]


def setup(tmp: Path, name: str):
    cfg = load_config(REPO / "experiments" / "data_mix.yaml", overrides(tmp / "runs", tmp / "cache") + [f"name={name}"])
    return build_setup(cfg)


def quiet() -> Console:
    return Console(file=open(os.devnull, "w"))


def lineage(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "lineage.jsonl").read_text().splitlines()]


def comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("time", "latency_s", "receiver_s")} for r in records]


def table(state: dict) -> list[tuple]:
    return [(m["id"], m["step"], m["history"], m["genome"], m["parent"], m["schedule"]) for m in state["members"]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ray_local):
    """The uninterrupted run, on the session's Ray (tests/conftest.py)."""
    tmp = tmp_path_factory.mktemp("mix")
    return tmp, run_search(setup(tmp, "ref"), console=quiet())


def test_an_exploit_takes_the_donors_mix_and_the_checkpoint_trains_on_it(reference):
    tmp, summary = reference
    run = tmp / "runs" / "ref"
    assert summary["status"] == "finished"
    records = lineage(run)
    exploits = [r for r in records if r["event"] == "exploit"]
    assert any(r["how"] == "perturb" for r in exploits), "the scaled-down data_mix search made no perturbing exploit"
    for r in exploits:
        donor = r["parents"][0]
        # the donor's mix gene in force at the exploit: its last genome record up to that step
        before = [x for x in records if x["member"] == donor and "genome" in x and x["step"] <= r["step"]
                  and x is not r]
        for gene, (low, high) in GENES.items():
            donor_mix, new = before[-1]["genome"][gene], r["genome"][gene]
            if r["how"] == "perturb":   # pbt's floats x 0.8 or x 1.2, kept inside the gene's bounds: exactly
                assert new in {min(max(donor_mix * f, low), high) for f in (0.8, 1.2)}, (gene, donor_mix, new)
            else:
                assert low <= new <= high
    # the mix in force in each member's last checkpoint is its final genome's
    state = RunStore(tmp / "runs", "ref").read_state()
    for m in state["members"]:
        ckpt = torch.load(run / m["checkpoint"], map_location="cpu", weights_only=False)
        assert ckpt["mix"] == {"code": m["genome"]["data.mix.code"], "docs": m["genome"]["data.mix.docs"]}
        assert ckpt["step"] == 3 * ROUNDS


def test_stopped_and_resumed_equals_uninterrupted_with_a_mix_gene(reference):
    tmp, summary = reference
    store = RunStore(tmp / "runs", "stopped")

    watcher = sigterm_at_round(store, 2, timeout=300)
    stopped = run_search(setup(tmp, "stopped"), console=quiet())
    watcher.join()
    assert stopped["status"] == "stopped", "the signal arrived after the run finished"
    assert 2 <= store.read_state()["round"] < ROUNDS

    resumed = run_search(setup(tmp, "stopped"), console=quiet())
    assert resumed["status"] == "finished" and resumed["round"] == ROUNDS
    ref_state = RunStore(tmp / "runs", "ref").read_state()
    assert table(store.read_state()) == table(ref_state)
    assert comparable(lineage(tmp / "runs" / "stopped")) == comparable(lineage(tmp / "runs" / "ref"))
    assert resumed["best"] == summary["best"]
    # the mix genes did change during the run, so the comparison covered them
    assert len({m["genome"]["data.mix.docs"] for m in ref_state["members"]}
               | {r["genome"]["data.mix.docs"] for r in lineage(tmp / "runs" / "ref") if r["event"] == "born"}) > 1


def test_report_plots_the_best_members_mix_schedule(reference):
    from population.report import load_run, mix_schedule, write_report

    tmp, summary = reference
    report = Path(write_report(str(tmp / "runs"), "ref"))
    png = report.parent / "mix.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000
    assert 'data-plot="mix"' in report.read_text()
    run = load_run(str(tmp / "runs"), "ref")
    mix = mix_schedule(run)
    best = next(m for m in run.members if m["id"] == summary["best"]["member"])
    # one point per schedule entry (plus the current step), each the genome's weights normalised,
    # and the schedule's genomes are ones the lineage recorded
    assert [s for s, _ in mix] == [e["step"] for e in best["schedule"]] + [best["step"]]
    for (step, got), entry in zip(mix, best["schedule"]):
        assert got == pytest.approx(shares(entry["genome"]))
        assert any(r.get("genome") == entry["genome"] and r["step"] == step for r in lineage(tmp / "runs" / "ref"))
    assert mix[-1][1] == mix[-2][1]


def test_status_shows_each_members_mix_as_shares(reference):
    from population.inspect import run_status

    tmp, _ = reference
    status = run_status(str(tmp / "runs"), "ref")
    state = RunStore(tmp / "runs", "ref").read_state()
    genomes = {m["id"]: m["genome"] for m in state["members"]}
    for m in status["members"]:
        assert m["mix"] == pytest.approx(shares(genomes[m["id"]]))

"""Every shipped config (experiments/*.yaml) loads as written and runs to the end on CPU when
scaled down with overrides: its strategy, genes, mode and storage kind, only smaller.

All searches share the session's one Ray (tests/conftest.py's ``ray_local``: starting Ray is the slow
part); each one is the real driver on real member actors.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from experiments.config import SEARCH_CONSTRAINTS, build_setup, config_to_dict, load_config
from population.driver import run_search
from population.inspect import run_status
from population.store import RunStore

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "experiments").glob("*.yaml"))

# every config: 2 members, 2 rounds of 2 steps, 32-token windows of 100 kB of text, on CPU
SMALL = [
    "population.size=2", "population.total_steps=4", "population.interval_steps=2",
    "population.resources.num_gpus=0", "population.resources.num_cpus=0.5",
    "data.seq_len=32", "data.max_bytes=100000", "data.eval_batches=2", "data.eval_batch_size=4",
    "train.batch_size=4", "train.device=cpu", "logging.wandb.mode=disabled",
]
TINY_MODEL = [
    "model.hidden_size=32", "model.num_hidden_layers=1", "model.num_attention_heads=4",
    "model.num_key_value_heads=2", "model.intermediate_size=64",
]
# what only some configs need on top: a BPE vocabulary a 100 kB corpus can fill, genes kept small,
# a third member so that the GA has two parents besides the child (and NSGA-II a worst quarter)
EXTRA = {
    "ga_crossover": ["population.size=3"],
    "pbt_gpu": ["data.vocab_size=300"],
    "cluster": ["data.vocab_size=300", "search.model.num_hidden_layers.low=1", "search.model.num_hidden_layers.high=2"],
    # the tiny base must be a shape of the search (population.start: base): 2 heads of 16, FFN on the grid
    "arch_search": ["search.max_params=60000", "population.size=3", "model.num_attention_heads=2",
                    "model.intermediate_size=72"],
}


def test_there_are_configs_to_smoke():
    assert {p.stem for p in CONFIGS} >= {"quickstart", "pbt_gpu", "ga_crossover", "multi_objective", "cluster", "arch_search"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_as_written(path: Path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert len(build_setup(cfg).space) >= 1


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_runs_scaled_down(path: Path, tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp(path.stem)
    # the cluster config's storage is a URI: keep it one (on a temporary directory)
    storage = f"file://{tmp / 'runs'}" if "://" in load_config(path).storage else str(tmp / "runs")
    overrides = [*SMALL, *TINY_MODEL, *EXTRA.get(path.stem, []),
                 f"storage={storage}", f"data.cache_dir={tmp / 'cache'}"]
    cfg = load_config(path, overrides)
    original = load_config(path)
    assert cfg.strategy == original.strategy and list(cfg.search) == list(original.search)
    assert cfg.population.mode == original.population.mode

    summary = run_search(build_setup(cfg))

    assert summary["status"] == "finished"
    status = run_status(storage, cfg.name)
    assert status["status"] == "finished"
    alive = [m for m in status["members"] if m["alive"]]
    assert len(alive) == cfg.population.size and all(m["step"] == 4 for m in alive)
    assert status["best"]["val_bpb"] == min(m["val_bpb"] for m in alive)
    assert set(status["best"]["genome"]) == {p for p in cfg.search if p not in SEARCH_CONSTRAINTS}
    run_dir = tmp / "runs" / cfg.name
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == config_to_dict(cfg)
    if cfg.fitness.eval:   # judged on the fitness section's held-out sets, each one's bits/byte recorded
        weights = {n: s.weight for n, s in cfg.fitness.eval.items()}
        assert all({f"val_bpb.{n}" for n in weights} <= set(m) for m in alive)   # evo status shows them
        for m in RunStore(storage, cfg.name).read_state()["members"]:
            got = m["objectives"]
            assert got["val_bpb"] == pytest.approx(sum(w * got[f"val_bpb.{n}"] for n, w in weights.items())
                                                   / sum(weights.values()))
    if cfg.fitness.function:   # the function's value beside val_bpb, a number for every member
        assert all(0 <= m["objectives"]["score"] <= 1 for m in alive_state(storage, cfg.name))
    events = [json.loads(line)["event"] for line in (run_dir / "lineage.jsonl").read_text().splitlines()]
    assert events.count("born") == cfg.population.size
    if cfg.population.mode == "sync":
        # the strategy evolved the population after the first round (the GA by crossover); in
        # async mode whether a lone ready member is replaced depends on who finished first
        assert ("crossover" in events) if cfg.strategy.name == "ga" else (set(events) - {"born", "died"})


def alive_state(storage: str, name: str) -> list[dict]:
    return [m for m in RunStore(storage, name).read_state()["members"] if m["alive"]]


def test_a_failing_fitness_function_marks_the_evaluation_not_the_run(tmp_path_factory, ray_local):
    """A fitness.function that raises on some members: each such evaluation's score is nan with
    one line naming the function (printed, kept in the state), the run finishes, nobody died."""
    import io

    from rich.console import Console

    tmp = tmp_path_factory.mktemp("failing_fitness")
    spec = "tests.experiments.fitness_functions:fails_on_negative_first_weight"
    cfg = load_config(REPO / "experiments" / "completions.yaml", [
        *SMALL, *TINY_MODEL, "population.size=3", f"storage={tmp / 'runs'}", f"data.cache_dir={tmp / 'cache'}",
        f"fitness.function={spec}", "fitness.sense=min", "population.max_failures=0"])
    out = io.StringIO()
    summary = run_search(build_setup(cfg), console=Console(file=out, width=400))
    assert summary["status"] == "finished"
    state = RunStore(str(tmp / "runs"), cfg.name).read_state()
    failures = state["eval_failures"]
    assert failures and all(f["error"].startswith(f"fitness.function {spec} failed: ValueError: first output "
                                                  f"weight") for f in failures)
    printed = [line for line in out.getvalue().splitlines() if f"fitness.function {spec}" in line]
    assert len(printed) == len(failures) and "\n" not in failures[0]["error"]
    members = state["members"]
    assert all(m["alive"] and m["step"] == 4 for m in members) and state["failures"] == 0
    scores = [m["objectives"]["score"] for m in members]
    assert any(s == s for s in scores), scores     # some member was scored (nan != nan)
    lineage = (tmp / "runs" / cfg.name / "lineage.jsonl").read_text()
    assert '"died"' not in lineage

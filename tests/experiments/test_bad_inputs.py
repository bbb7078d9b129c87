"""Bad input, as a user gives it to ``evo run``: one line, exit 2, nothing written, no Ray.

Every malformed config in tests/data/bad_configs/ (YAML errors, wrong types, values out of
range, unknown keys, impossible architectures, bad genes, huge numbers, a missing corpus, ...)
goes through the real command line, ``experiments.cli.main`` -- the function the ``evo``
console script calls -- in this process, so that the test can also see that Ray was never
started (starting it is the expensive part, and bad input must not pay for it).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch
import yaml

from experiments.cli import main
from experiments.config import load_config
from population.config import PopulationConfig
from population.slots import ResourceFitError, _largest_share, check_fit
from population.store import CorruptRunError, RunStore, StoreError

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "experiments" / "quickstart.yaml"
BAD_CONFIGS = REPO / "tests" / "data" / "bad_configs"
EXPECTED: dict[str, str] = yaml.safe_load((BAD_CONFIGS / "expected.yaml").read_text())


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch) -> Path:
    """An empty working directory and the environment of a user with no cluster."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for var in ("RAY_ADDRESS", "EVO_DEBUG", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("EVO_CACHE_DIR", str(work / "cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return work


def run_bad(capsys, *args: str) -> str:
    """``evo ARGS`` must exit 2 with exactly one line on stderr and no traceback; its message."""
    code = main(list(args))
    out, err = capsys.readouterr()
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("evo: error: "), err
    assert "Traceback" not in err + out
    return lines[0].removeprefix("evo: error: ")


def test_the_corpus_lists_every_file_once():
    files = {p.name for p in BAD_CONFIGS.iterdir()} - {"expected.yaml"}
    listed = set(EXPECTED) - {"does_not_exist.yaml", "."}
    assert files == listed
    assert len(EXPECTED) >= 30
    assert not (BAD_CONFIGS / "does_not_exist.yaml").exists()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_config_gives_one_line_exit_2_and_writes_nothing(name: str, cwd: Path, tmp_path: Path, capsys):
    storage = tmp_path / "store"
    assert not ray.is_initialized(), "an earlier test left Ray initialized in this process"
    message = run_bad(capsys, "run", str(BAD_CONFIGS / name), "--storage", str(storage))
    assert EXPECTED[name] in message
    assert not storage.exists()
    assert list(cwd.iterdir()) == []          # no cache, no wandb directory, nothing
    assert not ray.is_initialized()


REFUSE_ALL = """
import contextlib, io, json, sys
from experiments.cli import main
runs = {}
for name, path in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["run", path, "--storage", sys.argv[2]])
    runs[name] = [code, err.getvalue()]
print(json.dumps({"runs": runs, "torch": sorted(m for m in sys.modules if m.split(".")[0] == "torch")}))
"""


def test_every_bad_config_is_refused_without_importing_torch(cwd: Path, tmp_path: Path):
    # A fresh interpreter (this one has torch) refuses every bad config as above and says which
    # modules it imported: the schema (trainers/config.py), the corpus and the fit checks need no
    # torch, so a refusal costs no torch import. Left out: the one whose fitness.function names a
    # module that exists (experiments/examples/exact_match.py): checking it imports that module,
    # which imports torch itself.
    storage = tmp_path / "store"
    user_module = "fitness_function_missing_name.yaml"
    configs = {name: str(BAD_CONFIGS / name) for name in sorted(EXPECTED) if name != user_module}
    out = subprocess.run([sys.executable, "-c", REFUSE_ALL, json.dumps(configs), str(storage)],
                         env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=cwd, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for name, (code, err) in result["runs"].items():
        assert code == 2 and err.count("\n") == 1 and EXPECTED[name] in err, (name, err)
    assert sorted(result["runs"]) == sorted(set(EXPECTED) - {user_module})
    assert result["torch"] == []
    assert not storage.exists() and list(cwd.iterdir()) == []


def test_name_is_taken_as_a_string_not_yaml(cwd: Path, tmp_path: Path, capsys):
    # YAML would read 'a #b' as 'a' (a comment follows) and run under that name
    storage = tmp_path / "store"
    message = run_bad(capsys, "run", str(QUICKSTART), "--name", "a #b", "--storage", str(storage))
    assert message == "--name 'a #b': name: must match [A-Za-z0-9._-]+, got 'a #b'"
    assert not storage.exists() and not ray.is_initialized()


def test_name_and_storage_values_stay_the_strings_given(tmp_path: Path):
    store = str(tmp_path / "runs #1")
    for name in ("2024", "null", "true", "1e3"):
        cfg = load_config(QUICKSTART, strings={"name": name, "storage": store})
        assert (cfg.name, cfg.storage) == (name, store)
    # --set still parses YAML; a string key set so keeps the text (a name like 2024)
    assert load_config(QUICKSTART, ["name=2024"]).name == "2024"


def test_a_missing_corpus_given_by_set_is_refused_before_ray(cwd: Path, tmp_path: Path, capsys):
    storage = tmp_path / "store"
    message = run_bad(capsys, "run", str(QUICKSTART), "--storage", str(storage),
                      "--set", "data.corpus=/nonexistent/corpus-dir/")
    assert message == "data.corpus: path does not exist: /nonexistent/corpus-dir/"
    assert not storage.exists() and not ray.is_initialized()


def test_start_base_with_a_base_shape_outside_the_search_is_refused_before_ray(cwd: Path, tmp_path: Path, capsys):
    storage = tmp_path / "store"
    message = run_bad(capsys, "run", str(REPO / "experiments" / "arch_search.yaml"), "--storage", str(storage),
                      "--set", "population.start=base", "--set", "model.intermediate_size=176")
    assert message == ("--set population.start=base: population.start: base: search.model.intermediate_size: "
                       "the base value 176 is not one of the gene's values, so members cannot start at the base shape")
    assert not storage.exists() and not ray.is_initialized()


def test_an_unknown_start_and_a_largest_shape_too_many_to_enumerate_are_refused_before_ray(cwd: Path, tmp_path: Path,
                                                                                             capsys):
    storage = tmp_path / "store"
    arch = str(REPO / "experiments" / "arch_search.yaml")
    message = run_bad(capsys, "run", arch, "--storage", str(storage), "--set", "population.start=largest")
    assert message == ("--set population.start=largest: population.start: must be one of sample, base, "
                       "base_and_largest, got 'largest' (did you mean 'base_and_largest'?)")
    message = run_bad(capsys, "run", arch, "--storage", str(storage), "--set", "population.start=base_and_largest",
                      "--set", "search.model.intermediate_size={type: int, low: 52, high: 40052, step: 20}")
    assert message == ("--set population.start=base_and_largest: population.start: base_and_largest: search: the "
                       "model.* genes have 256,128 combinations, more than the 200,000 the largest shape is "
                       "searched among; coarsen their grids")
    assert not storage.exists() and not ray.is_initialized()


def test_the_setting_that_breaks_a_shape_rule_is_blamed(tmp_path: Path):
    # the default model has 4 heads; only the --set of the kv heads makes the pair invalid
    with pytest.raises(ValueError) as info:
        load_config(QUICKSTART, ["model.num_key_value_heads=3"])
    assert str(info.value).startswith("--set model.num_key_value_heads=3: model: num_attention_heads (4) must be "
                                      "divisible by num_key_value_heads (3)")
    with pytest.raises(ValueError) as info:
        load_config(QUICKSTART, ["model.num_attention_heads=4", "model.num_key_value_heads=3"])
    assert str(info.value).startswith("--set model.num_key_value_heads=3: ")
    with pytest.raises(ValueError) as info:
        load_config(QUICKSTART, ["model.num_key_value_heads=1", "model.hidden_size=66"])
    assert str(info.value).startswith("--set model.hidden_size=66: model: hidden_size (66) must be divisible")


def test_a_population_that_cannot_fit_answers_at_once():
    # the fit advice used to loop over the population's size: 10**12 members never answered
    assert _largest_share([2.0, 2.0], 10**12) == 0.0
    assert _largest_share([16.0, 16.0], 40) == 0.8
    pop = PopulationConfig(size=10_000, interval_steps=1, total_steps=1)
    node = {"Alive": True, "Resources": {"CPU": 2.0}}
    with pytest.raises(ResourceFitError, match=r"population of 10000 members × 0.5 CPU does not fit this cluster "
                                               r"\(2.0 CPUs\): use population.size: 4"):
        check_fit(pop, [node])


def test_a_checkpoint_holding_a_blocked_global_is_named_not_called_corrupt(tmp_path: Path):
    # torch refuses os.system as "a GLOBAL whose module is blocked", not "Unsupported global"
    store = RunStore(str(tmp_path), "r")
    store.create({})
    rel = store.checkpoint_path(0, 0)
    store.save_checkpoint(rel, {"w": torch.zeros(2), "call": os.system})
    with pytest.raises(StoreError, match=r"holds posix.system, which torch.load\(weights_only=True\) refuses") as info:
        store.load_checkpoint(rel)
    assert not isinstance(info.value, CorruptRunError)

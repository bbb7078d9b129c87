"""The ``evo`` command as a user runs it: real processes, real files, real Ray.

Bad input exits 2 with one ``evo: error:`` line and writes nothing (not even the storage
directory; an existing run's files stay byte-identical). A tiny real search runs to the end,
and ``status``, ``list``, ``export`` and ``replay`` read its store.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "experiments" / "quickstart.yaml"
EVO = REPO / ".venv" / "bin" / "evo"

# quickstart scaled down to seconds: 2 members, 2 rounds of 10 steps, a 32-wide model on 200 kB
TINY = [
    "population.size=2", "population.total_steps=20", "population.interval_steps=10",
    "data.seq_len=32", "data.max_bytes=200000", "data.eval_batches=2", "data.eval_batch_size=4",
    "model.hidden_size=32", "model.intermediate_size=64", "train.batch_size=4", "train.warmup_steps=2",
    "logging.wandb.mode=disabled",
]


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def evo(*args: str, cwd: Path, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    command = [str(EVO)] if EVO.exists() else [sys.executable, "-m", "experiments"]
    return subprocess.run(command + list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def env(workdir: Path) -> dict[str, str]:
    e = dict(os.environ)
    e.pop("EVO_DEBUG", None)
    e.update(EVO_CACHE_DIR=str(workdir / "cache"), WANDB_MODE="disabled", WANDB_DIR=str(workdir),
             RAY_USAGE_STATS_ENABLED="0", PYTHONWARNINGS="ignore")
    return e


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_bad_input(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("evo: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


# ------------------------------------------------------------------------------------------
# bad input: exit 2, one line, nothing written. All cases run concurrently (each is a process).

BAD_YAML = "name: broken\ndata: {corpus: stdlib\nmodel: {}\n"

BAD_RUNS = {
    "malformed-yaml": (None, [], ["broken.yaml:3: could not parse YAML"]),
    "unknown-top-key": (QUICKSTART, ["populaton.size=3"], ["unknown key 'populaton' (did you mean 'population'?)"]),
    "unknown-nested-key": (QUICKSTART, ["population.resources.num_cpu=1"],
                           ["unknown key 'population.resources.num_cpu' "
                            "(did you mean 'population.resources.num_cpus'?)"]),
    "population-size-1": (QUICKSTART, ["population.size=1"], ["population.size: must be at least 2, got 1"]),
    "interval-over-budget": (QUICKSTART, ["population.interval_steps=1000"],
                             ["population.interval_steps (1000) is longer than the budget"]),
    "unknown-strategy": (QUICKSTART, ["strategy.name=pbtt"], ["strategy.name: unknown", "'pbtt'"]),
    "bad-search-spec": (QUICKSTART, ["search.train.lr.low=1.0"], ["search.train.lr: low (1.0) must be below high"]),
    "impossible-architecture": (QUICKSTART, ["model.hidden_size=66"],
                                ["model: hidden_size (66) must be divisible by num_attention_heads (4)"]),
    "missing-config": (Path("no/such.yaml"), [], ["no such config file"]),
}


@pytest.fixture(scope="module")
def bad_results(workdir: Path, env: dict[str, str]) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    (workdir / "broken.yaml").write_text(BAD_YAML)

    def one(case: str):
        config, overrides, _ = BAD_RUNS[case]
        storage = workdir / f"store-{case}"
        args = ["run", str(config or workdir / "broken.yaml"), "--storage", str(storage), *sets(overrides)]
        return case, (evo(*args, cwd=workdir, env=env), storage)

    extra = {  # case -> (arguments, the storage it names)
        "usage": (["run"], workdir / "runs"),                 # argparse: missing CONFIG
        "status-unknown": (["status", "nope"], workdir / "store-status"),
        "resume-unknown": (["resume", "nope"], workdir / "store-resume"),
        "export-unknown": (["export", "nope", "--format", "llama", "--out", str(workdir / "out-nope")],
                           workdir / "store-export"),
        "bad-run-name": (["run", str(QUICKSTART), "--name", "a/b"], workdir / "store-name"),
        "resource-fit": (["run", str(QUICKSTART), *sets(TINY), "--set", "population.resources.num_gpus=0.5"],
                         workdir / "store-fit"),
    }

    def other(case: str):
        args, storage = extra[case]
        if case != "usage":
            args = [*args, "--storage", str(storage)]
        return case, (evo(*args, cwd=workdir, env=env), storage)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(pool.map(one, BAD_RUNS)) | dict(pool.map(other, extra))
    return results


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_bad_config_exits_2_and_writes_nothing(bad_results, case: str):
    result, storage = bad_results[case]
    assert_bad_input(result, *BAD_RUNS[case][2])
    assert not storage.exists()


def test_population_that_does_not_fit_exits_2(bad_results):
    # found by the driver once Ray is up (Ray may log its own start-up lines before), before any write
    result, storage = bad_results["resource-fit"]
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("evo: error: ")]
    assert len(errors) == 1 and result.stderr.splitlines()[-1] == errors[0]
    assert "does not fit this cluster" in errors[0] and "population.resources.num_gpus" in errors[0]
    assert not storage.exists()


def test_usage_error_is_one_line(bad_results):
    result, _ = bad_results["usage"]
    assert_bad_input(result, "the following arguments are required: config")


@pytest.mark.parametrize("case", ["status-unknown", "resume-unknown", "export-unknown"])
def test_unknown_run_exits_2(bad_results, workdir: Path, case: str):
    result, storage = bad_results[case]
    assert_bad_input(result, "no run named 'nope'")
    assert not storage.exists()
    assert not (workdir / "out-nope").exists()


def test_bad_run_name_exits_2(bad_results):
    result, storage = bad_results["bad-run-name"]
    assert_bad_input(result, "name: must match [A-Za-z0-9._-]+, got 'a/b'")
    assert not storage.exists()


def test_list_of_empty_storage(workdir: Path, env: dict[str, str]):
    result = evo("list", "--storage", str(workdir / "empty"), cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr
    assert "no runs in" in result.stdout
    assert not (workdir / "empty").exists()


# ------------------------------------------------------------------------------------------
# a real tiny search, then every reading command on its store


@pytest.fixture(scope="module")
def finished_run(workdir: Path, env: dict[str, str]) -> tuple[Path, subprocess.CompletedProcess]:
    storage = workdir / "runs"
    result = evo("run", str(QUICKSTART), "--storage", str(storage), *sets(TINY), cwd=workdir, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return storage, result


def test_run_finishes_and_reports_the_best(finished_run):
    storage, result = finished_run
    assert "best member" in result.stdout and "val_bpb" in result.stdout
    assert f"run store: {storage / 'quickstart'}" in result.stdout
    assert (storage / "quickstart" / "config.yaml").is_file()


def test_status_json(finished_run, workdir: Path, env: dict[str, str]):
    storage, _ = finished_run
    result = evo("status", "quickstart", "--storage", str(storage), "--json", cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["name"] == "quickstart" and status["status"] == "finished"
    assert status["round"] >= 1
    assert len([m for m in status["members"] if m["alive"]]) == 2
    assert all(m["step"] == 20 for m in status["members"] if m["alive"])
    best = status["best"]
    assert best["val_bpb"] == min(m["val_bpb"] for m in status["members"] if m["alive"])
    assert 0 < best["val_bpb"] < 10 and set(best["genome"]) == {"train.lr", "train.weight_decay",
                                                                  "model.num_hidden_layers"}


def test_status_table_and_list(finished_run, workdir: Path, env: dict[str, str]):
    storage, _ = finished_run
    result = evo("status", "quickstart", "--storage", str(storage), cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr
    assert "finished" in result.stdout and "lr=" in result.stdout and "val_bpb" in result.stdout
    result = evo("list", "--storage", str(storage), cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr
    line = next(l for l in result.stdout.splitlines() if l.strip().startswith("quickstart"))
    assert "finished" in line


def test_export_llama_and_internlm2(finished_run, workdir: Path, env: dict[str, str]):
    storage, _ = finished_run
    llama, internlm2 = workdir / "llama", workdir / "internlm2"
    for fmt, out in (("llama", llama), ("internlm2", internlm2)):
        result = evo("export", "quickstart", "--format", fmt, "--out", str(out), "--storage", str(storage),
                     cwd=workdir, env=env)
        assert result.returncode == 0, result.stderr
    assert json.loads((internlm2 / "config.json").read_text())["model_type"] == "internlm2"
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(llama)
    assert model.config.vocab_size == 256 and model.config.hidden_size == 32


def test_replay_prints_val_bpb(finished_run, workdir: Path, env: dict[str, str]):
    storage, _ = finished_run
    result = evo("replay", "quickstart", "--storage", str(storage), cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr
    assert "val_bpb" in result.stdout


def test_report_at_the_end_and_on_demand(finished_run, workdir: Path, env: dict[str, str]):
    storage, _ = finished_run
    assert (storage / "quickstart" / "report" / "report.html").is_file()  # written when the run ended
    out = workdir / "report-copy"
    result = evo("report", "quickstart", "--storage", str(storage), "--out", str(out), cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {out / 'report.html'}"
    html = (out / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') >= 3
    assert {p.name for p in out.glob("*.png")} >= {"fitness.png", "hyperparameters.png", "lineage.png"}


def test_reading_commands_take_the_run_directory(finished_run, workdir: Path, env: dict[str, str]):
    storage, _ = finished_run
    by_name = evo("status", "quickstart", "--storage", str(storage), "--json", cwd=workdir, env=env)
    for run in (str(storage / "quickstart"), str(storage / "quickstart") + "/"):
        result = evo("status", run, "--json", cwd=workdir, env=env)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == json.loads(by_name.stdout)
    relative = os.path.relpath(storage / "quickstart", workdir)           # as typed: runs/quickstart
    out = workdir / "report-by-dir"
    result = evo("report", relative, "--out", str(out), cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr
    assert (out / "report.html").is_file()
    # neither a run's directory nor a run's name: one line, exit 2
    result = evo("status", str(storage / "nope"), cwd=workdir, env=env)
    assert_bad_input(result, f"no run at {storage / 'nope'}: {storage} holds no run named 'nope'; runs there: "
                             "quickstart")
    result = evo("replay", "nope", "--storage", str(storage), cwd=workdir, env=env)
    assert_bad_input(result, f"no run named 'nope' in {storage}; runs there: quickstart")


def test_bad_input_leaves_an_existing_run_untouched(finished_run, workdir: Path, env: dict[str, str]):
    storage, _ = finished_run
    before = files_of(storage)
    cases = [
        (["run", str(QUICKSTART), "--storage", str(storage), *sets(TINY), "--set", "population.size=1"],
         "population.size: must be at least 2"),
        # the same run with a different model: a conflict with the stored config
        (["run", str(QUICKSTART), "--storage", str(storage), *sets(TINY), "--set", "model.hidden_size=64"],
         "config conflicts with stored run 'quickstart': model.hidden_size is 64 here but 32 in the run"),
        (["resume", "quickstart", "--storage", str(storage), "--set", "population.sise=3"],
         "unknown key 'population.sise' (did you mean 'population.size'?)"),
        # the corpus is checked before the store is touched or Ray starts, on resume too
        (["resume", "quickstart", "--storage", str(storage), "--set", "data.corpus=/nonexistent/corpus.txt"],
         "data.corpus: path does not exist: /nonexistent/corpus.txt"),
        (["export", "quickstart", "--format", "llama", "--out", str(workdir / "m9"), "--member", "99",
          "--storage", str(storage)], "has no member 99"),
    ]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda c: evo(*c[0], cwd=workdir, env=env), cases))
    for (_, fragment), result in zip(cases, results):
        assert_bad_input(result, fragment)
    assert files_of(storage) == before


def test_resume_extends_the_budget(finished_run, workdir: Path, env: dict[str, str]):
    # last: it changes the run the tests above read
    storage, _ = finished_run
    result = evo("resume", "quickstart", "--storage", str(storage), "--set", "population.total_steps=30",
                 cwd=workdir, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    status = json.loads(evo("status", "quickstart", "--storage", str(storage), "--json",
                            cwd=workdir, env=env).stdout)
    assert status["status"] == "finished" and status["round"] == 3
    assert all(m["step"] == 30 for m in status["members"] if m["alive"])


def test_run_help_shows_worked_set_examples(workdir: Path, env: dict[str, str]):
    result = evo("run", "--help", cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr
    for example in ("--set logging.wandb.mode=disabled", "--set logging.optuna=false", "--set search.train.lr=null",
                    "--set train.num_threads=1", "--set population.max_concurrent=2",
                    "--set population.resources.num_cpus=1", "evo config-keys"):
        assert example in result.stdout


def test_config_keys_prints_the_schema(workdir: Path, env: dict[str, str]):
    from experiments.config import config_keys, config_keys_markdown

    result = evo("config-keys", "--markdown", cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == config_keys_markdown()
    result = evo("config-keys", cwd=workdir, env=env)
    assert [line.split()[0] for line in result.stdout.splitlines()] == [key for key, _, _ in config_keys()]
    assert re.search(r"^logging\.optuna +true: mirror every evaluated segment", result.stdout, re.M)


def test_relative_storage_under_a_ray_job_outlives_the_job(monkeypatch, tmp_path: Path):
    from experiments.cli import _job_storage

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert _job_storage("runs") is None                      # a plain `evo run`: relative to the cwd
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray sets for a job's entrypoint
    monkeypatch.setenv("EVO_STORAGE_ROOT", str(tmp_path))
    assert _job_storage("runs") == str(tmp_path / "runs")
    assert _job_storage("/abs/runs") is None and _job_storage("s3://bucket/evo") is None

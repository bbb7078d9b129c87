"""Secrets never reach what evo writes: a real tiny ``evo run`` (its own local Ray, W&B offline,
the Optuna study on) with a planted WANDB_API_KEY and Ray token, then every file the run wrote —
the run store, W&B's offline files, the report, Ray's session logs, stdout and stderr — is
searched for them."""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "population.size=2", "population.total_steps=20", "population.interval_steps=10",
    "data.seq_len=32", "data.max_bytes=200000", "data.eval_batches=2", "data.eval_batch_size=4",
    "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1",
    "train.batch_size=4", "train.warmup_steps=2", "logging.wandb.mode=offline", "logging.optuna=true",
]


def _files(*roots: Path) -> list[Path]:
    return [p for root in roots if root.exists() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()]


@pytest.mark.slow
def test_planted_secrets_appear_nowhere_the_run_writes(tmp_path: Path):
    ray_dir = Path(f"/tmp/evo-secrets-{os.getpid()}-{secrets.token_hex(3)}")   # Ray's socket paths
    ray_dir.mkdir()                                                             # must stay short
    try:
        _run_and_search(tmp_path, ray_dir)
    finally:
        subprocess.run(["rm", "-rf", str(ray_dir)], check=False)


def _run_and_search(tmp_path: Path, ray_dir: Path) -> None:
    home = tmp_path / "home"          # ~/.ray/auth_token of this run lands here, not in the real home
    home.mkdir()
    wandb_key = secrets.token_hex(20)  # W&B keys are 40 hex characters
    ray_token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WANDB_", "EVO_"))}
    env.update(
        HOME=str(home), WANDB_API_KEY=wandb_key, RAY_AUTH_TOKEN=ray_token, RAY_AUTH_MODE="token",
        WANDB_DIR=str(tmp_path / "wandb"), RAY_TMPDIR=str(ray_dir),
        EVO_CACHE_DIR=str(tmp_path / "cache"), RAY_USAGE_STATS_ENABLED="0", PYTHONWARNINGS="ignore",
    )
    sets = [a for o in TINY for a in ("--set", o)]
    out = subprocess.run(
        [sys.executable, "-m", "experiments", "run", str(REPO / "experiments" / "quickstart.yaml"),
         "--name", "secrets", "--storage", str(tmp_path / "runs"), *sets],
        cwd=tmp_path, env=env, capture_output=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr.decode()[-2000:]

    written = _files(tmp_path / "runs", tmp_path / "wandb", ray_dir, home)
    names = {p.name for p in written}
    assert "report.html" in names and "state.json" in names and "optuna.db" in names
    assert any(p.suffix == ".wandb" for p in written), "W&B wrote no offline run"
    planted = {"WANDB_API_KEY": wandb_key.encode(), "the Ray token": ray_token.encode()}
    hits = [f"{what} in {p}" for p in written for what, value in planted.items() if value in p.read_bytes()]
    hits += [f"{what} in {stream}" for stream, data in (("stdout", out.stdout), ("stderr", out.stderr))
             for what, value in planted.items() if value in data]
    assert hits == []

"""Shared fixtures of the trainers tests: one token cache for the session, small configs."""
from __future__ import annotations

import os

import pytest
import torch

from trainers.data import DataConfig
from trainers.model import InternLM2Config


@pytest.fixture(scope="session", autouse=True)
def evo_cache_dir(tmp_path_factory):
    """A fresh token cache ($EVO_CACHE_DIR) shared by all trainers tests, so the stdlib corpus is
    tokenized once per session and nothing is written to ~/.cache."""
    path = tmp_path_factory.mktemp("evo-token-cache")
    old = os.environ.get("EVO_CACHE_DIR")
    os.environ["EVO_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("EVO_CACHE_DIR", None)
    else:
        os.environ["EVO_CACHE_DIR"] = old


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Trainers set torch's (process-wide) thread count; put it back after each test."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def small_data() -> DataConfig:
    """A slice of the standard library: quick to read, big enough for short windows."""
    return DataConfig(max_bytes=400_000, val_fraction=0.2, seq_len=32, eval_batches=2, eval_batch_size=8)


@pytest.fixture
def tiny_model() -> InternLM2Config:
    return InternLM2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)

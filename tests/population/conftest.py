"""Tiny search setups built without experiments/ (the session's real local Ray, ``ray_local``, and its
token cache, ``cache_dir``, are tests/conftest.py's)."""
from __future__ import annotations

import dataclasses

import torch

from evo.space import SearchSpace
from evo.strategies import StrategyConfig
from population.config import LoggingConfig, PopulationConfig, ResourcesConfig, TrainerConfig, WandbConfig
from population.config import SearchSetup
from trainers.data import DataConfig
from trainers.model import InternLM2Config
from trainers.trainer import TrainConfig

SEARCH = {
    "train.lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True},
    "train.weight_decay": {"type": "float", "low": 0.0, "high": 0.2},
    "model.num_hidden_layers": {"type": "int", "low": 1, "high": 2},
}


def tensors_by_path(obj, prefix: str = "") -> dict:
    """{path: tensor} of every tensor in a nested state (dicts, lists, tuples)."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(tensors_by_path(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(tensors_by_path(v, f"{prefix}/{i}"))
    return out


def assert_same_state(a: dict, b: dict) -> None:
    """The same weights, optimizer state, RNG, step and architecture, bit for bit."""
    ta, tb = tensors_by_path({"model": a["model"], "optimizer": a["optimizer"], "rng": a["rng"]}), \
        tensors_by_path({"model": b["model"], "optimizer": b["optimizer"], "rng": b["rng"]})
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    assert a["step"] == b["step"]
    assert a["model_config"] == b["model_config"]


def tiny_parts(cache_dir: str) -> tuple[InternLM2Config, TrainConfig, DataConfig]:
    model = InternLM2Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2)
    train = TrainConfig(batch_size=8, lr=3e-3, warmup_steps=2)
    data = DataConfig(corpus="stdlib", seq_len=32, max_bytes=300_000, eval_batches=2, eval_batch_size=8,
                      cache_dir=cache_dir)
    return model, train, data


def make_setup(storage, name: str, cache_dir: str, *, size: int = 2, interval: int = 5, total: int = 20,
               mode: str = "sync", strategy: str = "pbt", num_cpus: float = 0.5, seed: int = 0,
               max_failures: int = 3, train: dict | None = None,
               max_concurrent: int | None = None, trainer: dict | None = None) -> SearchSetup:
    """A search small enough to take seconds on 2 cores (hidden 32, 1-2 layers, seq_len 32)."""
    model, base_train, data = tiny_parts(cache_dir)
    if train:
        base_train = dataclasses.replace(base_train, **train)
    strategy_cfg = StrategyConfig(name=strategy, quantile=0.5)
    population = PopulationConfig(size=size, mode=mode, interval_steps=interval, total_steps=total,
                                  resources=ResourcesConfig(num_cpus=num_cpus), max_failures=max_failures,
                                  max_concurrent=max_concurrent, trainer=TrainerConfig(**(trainer or {})))
    logging = LoggingConfig(wandb=WandbConfig(mode="disabled"), optuna=False)
    base = {f"train.{k}": v for k, v in dataclasses.asdict(base_train).items()}
    base.update({f"model.{k}": v for k, v in dataclasses.asdict(model).items()})
    space = SearchSpace.from_dict(SEARCH, base=base)
    config = {
        "name": name, "seed": seed, "storage": str(storage),
        "data": dataclasses.asdict(data), "model": dataclasses.asdict(model),
        "train": dataclasses.asdict(base_train), "search": SEARCH,
        "strategy": {k: list(v) if isinstance(v, tuple) else v
                     for k, v in dataclasses.asdict(strategy_cfg).items()},
        "population": dataclasses.asdict(population), "logging": dataclasses.asdict(logging),
    }
    return SearchSetup(name=name, seed=seed, storage=str(storage), data=data, model=model, train=base_train,
                       space=space, strategy=strategy_cfg, population=population, logging=logging,
                       config=config)

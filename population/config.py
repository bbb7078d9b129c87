"""Config dataclasses owned by the population layer: resources, population, logging.

Each validates itself in ``__post_init__`` and raises :class:`ConfigError` with one line that
names the field (``population.size: must be at least 2, got 1``). ``from_dict`` builds one from
the YAML mapping and refuses unknown keys with a suggestion, so a typo never passes silently.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:   # annotations only: SearchSetup holds these, this module imports none of them
    from evo.space import SearchSpace
    from evo.strategies import StrategyConfig
    from trainers.data import DataConfig
    from trainers.model import InternLM2Config
    from trainers.trainer import TrainConfig


class ConfigError(ValueError):
    """A bad population/logging config value; the message is one line naming the field."""


def _check_keys(cls: type, d: Mapping[str, Any], prefix: str) -> None:
    """Refuse keys that are not fields of ``cls`` (one line, with a close match if any)."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{prefix}: expected a mapping, got {type(d).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in d:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"{prefix}.{key}: unknown key{hint}")


def _number(value: Any, name: str, kind: type) -> None:
    """Type check that treats bool as not-a-number (YAML ``yes`` would otherwise pass as 1)."""
    ok = isinstance(value, (int, float)) if kind is float else isinstance(value, int)
    if isinstance(value, bool) or not ok:
        raise ConfigError(f"{name}: expected {'a number' if kind is float else 'an integer'}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{name}: must be finite, got {value!r}")


@dataclass
class ResourcesConfig:
    """Share of a node each member actor reserves; fractional GPUs pack several tiny models on a card."""

    num_cpus: float = 0.5
    num_gpus: float = 0.0

    def __post_init__(self) -> None:
        _number(self.num_cpus, "population.resources.num_cpus", float)
        _number(self.num_gpus, "population.resources.num_gpus", float)
        if self.num_cpus <= 0:
            raise ConfigError(f"population.resources.num_cpus: must be positive, got {self.num_cpus}")
        if self.num_gpus < 0:
            raise ConfigError(f"population.resources.num_gpus: must be >= 0, got {self.num_gpus}")
        if self.num_gpus > 1 and self.num_gpus != int(self.num_gpus):
            # Ray only allows fractions below one GPU.
            raise ConfigError(
                f"population.resources.num_gpus: above 1 it must be a whole number, got {self.num_gpus}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], prefix: str = "population.resources") -> ResourcesConfig:
        _check_keys(cls, d, prefix)
        return cls(**dict(d))


@dataclass
class PopulationConfig:
    """How many members train, how long, how often they are judged, and on what resources.

    ``total_steps`` is the optimizer-step budget of every member; ``interval_steps`` the steps
    between two judgements (the last interval may be shorter). ``mode`` ``sync`` has a barrier per
    round; ``async`` judges each member alone as soon as it finishes its interval.
    ``max_concurrent`` is how many members train at the same moment (the driver's slots); null
    picks it from the cluster: every member when they use GPUs, else as many as the cluster's CPUs
    hold at one member's thread count, so that members never oversubscribe the cores. It changes
    when members train, never what they compute. ``transfer`` is how an exploit moves a donor's
    state to a receiver: ``auto`` through a shared-memory file when both are on one node (and
    /dev/shm has room), else the Ray object store; ``object_store`` always the latter. Both
    carry the same bytes.
    """

    size: int = 4
    mode: str = "sync"
    interval_steps: int = 50
    total_steps: int = 500
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    max_failures: int = 3
    max_concurrent: int | None = None
    transfer: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.resources, Mapping):
            self.resources = ResourcesConfig.from_dict(self.resources)
        if self.transfer not in ("auto", "object_store"):
            raise ConfigError(f"population.transfer: must be 'auto' or 'object_store', got {self.transfer!r}")
        _number(self.size, "population.size", int)
        if self.size < 2:
            raise ConfigError(f"population.size: must be at least 2, got {self.size}")
        if self.mode not in ("sync", "async"):
            raise ConfigError(f"population.mode: must be 'sync' or 'async', got {self.mode!r}")
        _number(self.interval_steps, "population.interval_steps", int)
        _number(self.total_steps, "population.total_steps", int)
        if self.interval_steps < 1:
            raise ConfigError(f"population.interval_steps: must be at least 1, got {self.interval_steps}")
        if self.total_steps < 1:
            raise ConfigError(f"population.total_steps: must be at least 1, got {self.total_steps}")
        if self.interval_steps > self.total_steps:
            raise ConfigError(
                f"population.interval_steps ({self.interval_steps}) is longer than the budget "
                f"population.total_steps ({self.total_steps})")
        _number(self.max_failures, "population.max_failures", int)
        if self.max_failures < 0:
            raise ConfigError(f"population.max_failures: must be >= 0, got {self.max_failures}")
        if self.max_concurrent is not None:
            _number(self.max_concurrent, "population.max_concurrent", int)
            if self.max_concurrent < 1:
                raise ConfigError(f"population.max_concurrent: must be at least 1 (or null), "
                                  f"got {self.max_concurrent}")

    @property
    def num_rounds(self) -> int:
        """Rounds (judgements) per member: ceil(total / interval); the last may be shorter."""
        return -(-self.total_steps // self.interval_steps)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], prefix: str = "population") -> PopulationConfig:
        _check_keys(cls, d, prefix)
        d = dict(d)
        if "resources" in d:
            d["resources"] = ResourcesConfig.from_dict(d["resources"] or {}, f"{prefix}.resources")
        return cls(**d)


@dataclass
class WandbConfig:
    """Weights & Biases sink; ``offline`` writes locally with no network (``wandb sync`` later)."""

    mode: str = "offline"
    project: str = "evo"
    entity: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("offline", "online", "disabled"):
            raise ConfigError(
                f"logging.wandb.mode: must be 'offline', 'online' or 'disabled', got {self.mode!r}")
        if not isinstance(self.project, str) or not self.project:
            raise ConfigError(f"logging.wandb.project: must be a non-empty string, got {self.project!r}")
        if self.entity is not None and not isinstance(self.entity, str):
            raise ConfigError(f"logging.wandb.entity: must be a string or null, got {self.entity!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], prefix: str = "logging.wandb") -> WandbConfig:
        _check_keys(cls, d, prefix)
        return cls(**dict(d))


@dataclass
class LoggingConfig:
    """Monitoring sinks: W&B and an Optuna study that mirrors every evaluated segment."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    optuna: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.wandb, Mapping):
            self.wandb = WandbConfig.from_dict(self.wandb)
        if not isinstance(self.optuna, bool):
            raise ConfigError(f"logging.optuna: must be true or false, got {self.optuna!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], prefix: str = "logging") -> LoggingConfig:
        _check_keys(cls, d, prefix)
        d = dict(d)
        if "wandb" in d:
            d["wandb"] = WandbConfig.from_dict(d["wandb"] or {}, f"{prefix}.wandb")
        return cls(**d)


@dataclass
class SearchSetup:
    """Everything the driver needs, built by experiments/ from the YAML (population never
    imports experiments). It lives here, beside the configs it holds, so that loading a config
    never imports the driver (or ray)."""

    name: str
    seed: int
    storage: str                 # directory or fsspec URI
    data: DataConfig
    model: InternLM2Config       # base model (vocab_size already set from the tokenizer)
    train: TrainConfig           # base hyperparameters
    space: SearchSpace
    strategy: StrategyConfig
    population: PopulationConfig
    logging: LoggingConfig
    config: dict                 # the resolved config (config.yaml); compared on resume

"""Config dataclasses owned by the population layer: resources, population, logging.

Each is a pydantic dataclass: a bad value raises pydantic's ValidationError (a ValueError) that
locates the field (unknown keys included), and a check across fields raises a ValueError that
names them; experiments/config.py turns either into one line. They stay plain dataclasses
(`dataclasses.replace`, `asdict`, pickling to Ray).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import ConfigDict, Field, StrictBool, StrictFloat, StrictInt
from pydantic.dataclasses import dataclass

if TYPE_CHECKING:   # annotations only: SearchSetup holds these, this module imports none of them
    from evo.space import SearchSpace
    from evo.strategies import StrategyConfig
    from trainers.config import DataConfig, InternLM2Config, TrainConfig
    from trainers.fitness import FitnessConfig

# Upper bounds far above any real search, so that a typo (an extra 000) is refused at once
# instead of planning, placing or allocating for hours; each is stated in its field's description.
MAX_SIZE = 10_000            # members in a population
MAX_STEPS = 1_000_000_000    # optimizer steps of one member
MAX_CPUS = 1024              # CPUs one member actor reserves (one node's worth, and more)
MAX_GPUS = 64                # GPUs one member actor reserves


@dataclass(config=ConfigDict(extra="forbid"))
class ResourcesConfig:
    """Share of a node each member actor reserves; fractional GPUs pack several tiny models on a card."""

    num_cpus: Annotated[StrictFloat, Field(gt=0, le=MAX_CPUS, allow_inf_nan=False, description=(
        f"CPUs each member actor reserves in Ray (at most {MAX_CPUS})"))] = 0.5
    num_gpus: Annotated[StrictFloat, Field(ge=0, le=MAX_GPUS, allow_inf_nan=False, description=(
        f"GPUs each member reserves; a fraction packs several members on one GPU (at most {MAX_GPUS})"))] = 0.0

    def __post_init__(self) -> None:
        if self.num_gpus > 1 and self.num_gpus != int(self.num_gpus):
            # Ray only allows fractions below one GPU.
            raise ValueError(
                f"population.resources.num_gpus: above 1 it must be a whole number, got {self.num_gpus}")


MAX_STEP_S = 3600.0         # seconds one sleep-trainer step sleeps
MAX_STATE_KB = 65_536        # KiB of a sleep trainer's state (64 MiB)


@dataclass(config=ConfigDict(extra="forbid"))
class TrainerConfig:
    """What each member trains: the InternLM2 Trainer (trainers/trainer.py), or a stub that only
    sleeps (trainers/stub.py), which measures the driver, the exploits and the cluster with
    everything else real (actors, object store, checkpoints, run store)."""

    kind: Annotated[Literal["internlm2", "sleep"], Field(description=(
        "'internlm2': the model trainer; 'sleep': a stub whose steps only sleep (benchmarks of "
        "the driver and the cluster; its val_bpb is a closed form of lr, weight decay and steps)"))] = "internlm2"
    step_s: Annotated[StrictFloat, Field(ge=0, le=MAX_STEP_S, allow_inf_nan=False, description=(
        f"kind sleep: seconds each step sleeps (at most {MAX_STEP_S:g})"))] = 0.01
    state_kb: Annotated[StrictInt, Field(ge=1, le=MAX_STATE_KB, description=(
        f"kind sleep: KiB of tensors in its state, moved by exploits and checkpoints (at most {MAX_STATE_KB})"))] = 256


@dataclass(config=ConfigDict(extra="forbid"))
class PopulationConfig:
    """How many members train, how long, how often they are judged, and on what resources.

    ``total_steps`` is the optimizer-step budget of every member; ``interval_steps`` the steps
    between two judgements (the last interval may be shorter). ``mode`` ``sync`` has a barrier per
    round; ``async`` judges each member alone as soon as it finishes its interval.
    ``max_concurrent`` is how many members train at the same moment (the driver's slots); null
    picks it from the cluster: every member when they use GPUs, else as many as the cluster's CPUs
    hold at one member's thread count, so that members never oversubscribe the cores. It changes
    when members train, never what they compute. ``trainer`` picks what a member trains (the
    InternLM2 Trainer, or the sleep stub that benchmarks the driver and the cluster). ``start``
    ``base`` draws the first members at the base shape (only the non-architecture genes sampled).
    """

    size: Annotated[StrictInt, Field(le=MAX_SIZE, description=(
        f"members in the population (2 to {MAX_SIZE})"))] = 4
    mode: Annotated[Literal["sync", "async"], Field(description=(
        "'sync': a barrier per round; 'async': each member is judged as soon as its interval ends"))] = "sync"
    interval_steps: Annotated[StrictInt, Field(le=MAX_STEPS, description=(
        "optimizer steps between two judgements (at most total_steps)"))] = 50
    total_steps: Annotated[StrictInt, Field(le=MAX_STEPS, description=(
        f"optimizer-step budget of every member (at most {MAX_STEPS})"))] = 500
    resources: ResourcesConfig = dataclasses.field(default_factory=ResourcesConfig)
    max_failures: Annotated[StrictInt, Field(ge=0, description=(
        "members that diverge (non-finite loss) or die again and again on one state, tolerated "
        "before the search stops; a killed process (preemption, OOM, lost node) does not count: "
        "the member is restored from its own state"))] = 3
    max_concurrent: Annotated[StrictInt | None, Field(ge=1, le=MAX_SIZE, description=(
        f"members training at the same moment (at most {MAX_SIZE}); null: as many as the cluster's CPUs hold at one "
        "member's thread count (every member on GPUs)"))] = None
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    start: Annotated[Literal["sample", "base", "base_and_largest"], Field(description=(
        "how the first members' genomes are drawn: 'sample' draws every gene from its prior; 'base' "
        "starts every member at the base shape (the model: section) and draws only the other genes, "
        "so the search changes the shape only by mutation; 'base_and_largest' starts the members in "
        "turn at the base shape and at the shape with the most parameters the search allows (the "
        "other genes drawn as 'base' draws them)"))] = "sample"

    def __post_init__(self) -> None:
        if self.size < 2:
            raise ValueError(f"population.size: must be at least 2, got {self.size}")
        if self.interval_steps < 1:
            raise ValueError(f"population.interval_steps: must be at least 1, got {self.interval_steps}")
        if self.total_steps < 1:
            raise ValueError(f"population.total_steps: must be at least 1, got {self.total_steps}")
        if self.interval_steps > self.total_steps:
            raise ValueError(
                f"population.interval_steps ({self.interval_steps}) is longer than the budget "
                f"population.total_steps ({self.total_steps})")

    @property
    def num_rounds(self) -> int:
        """Rounds (judgements) per member: ceil(total / interval); the last may be shorter."""
        return -(-self.total_steps // self.interval_steps)


@dataclass(config=ConfigDict(extra="forbid"))
class WandbConfig:
    """Weights & Biases sink; ``offline`` writes locally with no network (``wandb sync`` later)."""

    mode: Annotated[Literal["offline", "online", "disabled"], Field(description=(
        "'offline' writes under the run store (wandb sync later), 'online' uploads, 'disabled' turns W&B off"))
    ] = "offline"
    project: Annotated[str, Field(min_length=1, description="W&B project")] = "evo"
    entity: Annotated[str | None, Field(description="W&B entity (team or user); null: your default")] = None


@dataclass(config=ConfigDict(extra="forbid"))
class LoggingConfig:
    """Monitoring sinks: W&B and an Optuna study that mirrors every evaluated segment; whether
    evo's own local Ray runs its dashboard."""

    wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)
    optuna: Annotated[StrictBool, Field(description=(
        "mirror every evaluated segment into an Optuna study (optuna.db) for optuna-dashboard; false turns it off"))
    ] = True
    ray_dashboard: Annotated[StrictBool, Field(description=(
        "the local Ray that evo starts runs Ray's dashboard (its web UI, where runs are watched); false starts "
        "it without the dashboard's web server and module processes, for less CPU; a cluster evo joins keeps its own"))
    ] = True


@dataclasses.dataclass
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
    fitness: FitnessConfig | None = None   # the held-out sets members are judged on (None: the training text's)

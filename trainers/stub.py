"""SleepTrainer: a stand-in for the Trainer that only sleeps, to measure the driver and the cluster.

A member with ``population.trainer.kind: sleep`` builds this instead of the InternLM2 Trainer
(population/member.py). It has the Trainer's interface — ``train(n)``, ``evaluate()``,
``state_dict()`` / ``load_state_dict()``, ``set_hparams``, ``set_architecture``, ``set_mix``,
``merge_from``, ``inherit_layers``, ``num_parameters()`` — so the driver, the member actor, the exploits through the
object store, the checkpoints and the run store do all their work; only the training is replaced:

- ``train(n)`` sleeps ``n × step_s`` seconds and advances a scalar ``progress`` by a per-step gain
  that depends on the hyperparameters (largest at train.lr = LR_OPT, weight decay WD_OPT);
- ``evaluate()`` is a deterministic function of the state: ``val_bpb = FLOOR + SPAN ·
  exp(-progress / TAU) + LR_PENALTY · ln(lr / LR_OPT)²`` — it falls with the steps, faster and
  lower near LR_OPT, so an exploit (which copies ``progress``) matters as it does for a model;
- the state carries ``state_kb`` KiB of float32 ``weights`` (drawn from the seed, nudged every
  train call), so an exploit or a checkpoint moves real bytes.

No corpus is read and no model is built. Pure torch (no ray, no evo).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, replace
from typing import Any

import torch

from trainers.architecture import count_parameters
from trainers.data import DataConfig
from trainers.model import InternLM2Config
from trainers.trainer import HPARAMS, TrainConfig
from trainers.transfer import preserves_function

STATE_FORMAT = "sleep-1"
LR_OPT = 3e-3        # the learning rate with the largest gain per step
LR_WIDTH = 1.0       # the gain's width in ln(lr): exp(-ln(lr / LR_OPT)² / (2 LR_WIDTH²))
WD_OPT = 0.1         # the weight decay with the largest gain
FLOOR = 1.5          # val_bpb after infinitely many good steps
SPAN = 3.0           # val_bpb at step 0 is FLOOR + SPAN (+ the lr penalty)
TAU = 200.0          # progress over which the gap shrinks by e
LR_PENALTY = 0.02    # val_bpb added per ln(lr / LR_OPT)² (the live hyperparameter's own effect)
LOSSY_KEEP = 0.8     # share of progress a lossy architecture change keeps


def gain(lr: float, weight_decay: float) -> float:
    """Progress per step at these hyperparameters: 1 at (LR_OPT, WD_OPT), less away from them."""
    return math.exp(-math.log(lr / LR_OPT) ** 2 / (2 * LR_WIDTH ** 2)) / (1.0 + (weight_decay - WD_OPT) ** 2)


def val_bpb(progress: float, lr: float) -> float:
    """The validation bits per byte of a state with ``progress`` trained at peak learning rate ``lr``."""
    return FLOOR + SPAN * math.exp(-progress / TAU) + LR_PENALTY * math.log(lr / LR_OPT) ** 2


class SleepTrainer:
    """The Trainer's interface over a sleep; see the module docstring."""

    def __init__(self, model: InternLM2Config, train: TrainConfig, data: DataConfig, *,
                 step_s: float, state_kb: int) -> None:
        if step_s < 0 or not math.isfinite(step_s):
            raise ValueError(f"step_s: must be a finite number >= 0, got {step_s}")
        if state_kb < 1:
            raise ValueError(f"state_kb: must be at least 1, got {state_kb}")
        self.data_config = data
        self.step_s = float(step_s)
        self._model_cfg = replace(model)
        self._train = train
        self._step = 0
        self._progress = 0.0
        self._mix: dict[str, float] = {}
        generator = torch.Generator().manual_seed(train.seed)
        self._weights = torch.randn(state_kb * 256, generator=generator)   # state_kb KiB of float32

    # ------------------------------------------------------------------ properties
    @property
    def step(self) -> int:
        return self._step

    @property
    def model_config(self) -> InternLM2Config:
        return replace(self._model_cfg)

    @property
    def train_config(self) -> TrainConfig:
        return replace(self._train)

    @property
    def progress(self) -> float:
        return self._progress

    def num_parameters(self) -> int:
        """The parameter count of the InternLM2 model this stands for (trainers.architecture)."""
        return count_parameters(asdict(self._model_cfg))

    @property
    def mix(self) -> dict[str, float]:
        return self.data_config.mix_weights(self._mix)

    def set_mix(self, **weights: float) -> None:
        unknown = sorted(set(weights) - set(self.data_config.source_names()))
        if unknown:
            raise ValueError(f"data.mix.{unknown[0]}: no such source")
        new = {**self._mix, **{k: float(v) for k, v in weights.items()}}
        merged = self.data_config.mix_weights(new)
        if not all(math.isfinite(w) and w >= 0 for w in merged.values()) or not any(merged.values()):
            raise ValueError(f"data.mix: weights must be finite, >= 0 and not all zero, got {merged}")
        self._mix = new

    # ------------------------------------------------------------------ training
    def gain(self) -> float:
        """Progress per step under the current hyperparameters (at most 1)."""
        return gain(self._train.lr, self._train.weight_decay)

    def _val_bpb(self, progress: float) -> float:
        return val_bpb(progress, self._train.lr)

    def train(self, n_steps: int) -> dict:
        """Sleep ``n_steps × step_s`` seconds and take n_steps of progress; the Trainer's figures."""
        if n_steps < 0:
            raise ValueError(f"n_steps: must be >= 0, got {n_steps}")
        t0 = time.perf_counter()
        if n_steps:
            time.sleep(n_steps * self.step_s)
        g = self.gain()
        losses = [self._val_bpb(self._progress + g * (i + 1)) * math.log(2) for i in range(n_steps)]
        self._progress += g * n_steps
        self._step += n_steps
        if n_steps:
            self._weights.mul_(1.0 - 1e-4 * g).add_(1e-4 * g)   # the bytes change with training
        tokens = n_steps * self._train.batch_size * self.data_config.seq_len
        seconds = time.perf_counter() - t0
        return {"train_loss": sum(losses) / len(losses) if losses else math.nan,
                "last_loss": losses[-1] if losses else math.nan, "losses": losses, "grad_norm": g,
                "step": self._step, "tokens": tokens, "seconds": seconds,
                "tokens_per_s": tokens / seconds if seconds > 0 else 0.0, "distill_kl": []}

    def evaluate(self) -> dict:
        """{"val_loss", "val_bpb"} of the current state; with several data sources also
        "val_bpb.<source>" each (a source weighs less the less it is drawn) and val_bpb their mean."""
        val = self._val_bpb(self._progress)
        names = self.data_config.source_names() if self.data_config.sources else []
        if not names:
            return {"val_loss": val * math.log(2), "val_bpb": val}
        mix = self.mix
        total = sum(mix.values())
        per = {f"val_bpb.{n}": val + 0.5 * (1.0 - mix[n] / total) for n in names}
        mean = sum(per.values()) / len(per)
        return {"val_loss": mean * math.log(2), "val_bpb": mean, **per}

    def score(self, fn: Any, spec: str) -> tuple[float, str | None]:
        return math.nan, f"{spec}: the sleep trainer has no model to score"

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "model_config": asdict(self._model_cfg),
            "train_config": asdict(self._train),
            "step": self._step,
            "progress": self._progress,
            "weights": self._weights.clone(),
            **({"mix": dict(self._mix)} if self.data_config.sources else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        """Become ``state`` (this trainer's or another member's): the hyperparameters (HPARAMS)
        come from it; the seed stays this trainer's own, as the Trainer's does."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"state: format {state.get('format')!r} is not {STATE_FORMAT!r} "
                             "(a sleep trainer's state)")
        weights = state["weights"]
        if weights.shape != self._weights.shape:
            raise ValueError(f"state: {weights.numel() * 4 // 1024} KiB of weights, this trainer has "
                             f"{self._weights.numel() * 4 // 1024} KiB (population.trainer.state_kb)")
        self._model_cfg = InternLM2Config(**state["model_config"])
        self._train = replace(self._train, **{k: state["train_config"][k] for k in HPARAMS})
        self._step = int(state["step"])
        self._progress = float(state["progress"])
        self._weights.copy_(weights)
        self._mix = {k: float(v) for k, v in state.get("mix", {}).items()}

    def set_hparams(self, **hp: Any) -> None:
        for key in hp:
            if key not in HPARAMS:
                raise ValueError(f"train.{key}: not a hyperparameter that can change during training "
                                 f"(one of {', '.join(HPARAMS)})")
        self._train = replace(self._train, **hp)   # validates

    def set_architecture(self, model: InternLM2Config) -> None:
        """A new architecture; a lossy change (trainers.transfer) keeps LOSSY_KEEP of the progress."""
        if model == self._model_cfg:
            return
        if not preserves_function(self._model_cfg, model):
            self._progress *= LOSSY_KEEP
        self._model_cfg = replace(model)

    def merge_from(self, state: dict, alpha: float) -> None:
        """Weights and progress become ``alpha * own + (1 - alpha) * state's`` (same architecture)."""
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"merge: alpha ({alpha}) must be in [0, 1]")
        if InternLM2Config(**state["model_config"]) != self._model_cfg:
            raise ValueError("merge: the parents' architectures differ (merge needs the same shape)")
        self._weights.mul_(alpha).add_(state["weights"], alpha=1.0 - alpha)
        self._progress = alpha * self._progress + (1.0 - alpha) * float(state["progress"])

    def inherit_layers(self, state: dict, model: InternLM2Config, sources: dict[str, int | None],
                       shrink: float) -> list[str]:
        """Layer-wise merge of parents of two architectures: ``model``'s shape; progress is the
        mean of its units' parents' (a new layer counts as progress 0), times LOSSY_KEEP; no
        tensor is shrunk (the stub has no layers)."""
        if not 0.0 <= shrink <= 1.0:
            raise ValueError(f"merge: shrink ({shrink}) must be in [0, 1]")
        progress = [self._progress, float(state["progress"])]
        self._progress = LOSSY_KEEP * sum(0.0 if p is None else progress[p] for p in sources.values()) / len(sources)
        self._model_cfg = replace(model)
        return []

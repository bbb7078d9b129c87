"""Trainer: one InternLM2-style model, its AdamW optimizer and its corpus, trained in steps.

A population member owns one Trainer. The driver calls ``train(n)`` / ``evaluate()``, moves
``state_dict()`` between members (exploit), changes hyperparameters in place (``set_hparams``,
Adam moments kept) and changes the architecture with the weights carried over
(``set_architecture``). Nothing here is random except through ``self._generator`` (model init
and new weights on an architecture change) and the corpus's batch function of
(seed, step, batch_size), so a trainer restored from ``state_dict()`` continues bit for bit.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, replace
from typing import Any

import torch
import torch.nn.functional as F

from trainers import cpu_fused
from trainers.config import HPARAMS, TrainConfig   # the run's config (torch-free), re-exported here
from trainers.data import DataConfig, SourcesCorpus, load_corpus, load_held_out
from trainers.fitness import FitnessConfig, call_function
from trainers.model import InternLM2Config, InternLM2ForCausalLM
from trainers.transfer import (inherit_norm_eps, inherit_weights, preserves_function, transfer_moments,
                               transfer_norm_eps, transfer_weights, unit_of)

STATE_FORMAT = 1
# An exploit that changes the architecture would build a model and optimizer (milliseconds of
# Python, a large part of an exploit: BENCHMARKS.md): a CPU trainer keeps the last few it left,
# each at most SPARE_BYTES of weights + Adam moments, and copies the next state of that shape into one.
SPARE_MODELS = 2
SPARE_BYTES = 64 * 2**20


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup over warmup_steps, then
    constant (schedule "constant" or decay_steps None) or a cosine from lr at warmup_steps down
    to min_lr_ratio*lr at decay_steps, flat after."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or cfg.decay_steps is None:
        return cfg.lr
    span = cfg.decay_steps - cfg.warmup_steps
    progress = 1.0 if span <= 0 else min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


class FusedAdamW(torch.optim.AdamW):
    """torch's fused AdamW (``fused=True``: one kernel per parameter group) with a leaner step.

    ``torch.optim.AdamW.step`` walks every parameter in Python at each step (state checks, five
    lists, a grouping by device and dtype, the functional dispatch) before its one kernel: about
    half of the optimizer's time on the tiny default model (BENCHMARKS.md). This step builds the
    lists directly and calls the same two kernels torch's fused path calls (``_foreach_add_`` on
    the step counters, then ``_fused_adamw_``), with the state made lazily as torch makes it
    (step: a float32 0-dim tensor on the parameter's device), so the updates, the state and the
    state_dict are torch's, bit for bit (tested). AMSGrad, maximize, capturable and
    differentiable are not offered.
    """

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float = 0.0):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)

    # torch wraps these four Optimizer methods in ``torch._disable_dynamo``, whose first call
    # imports torch._dynamo: ~1.9 s of CPU in every fresh process (each member, at its first
    # optimizer), before a single step. The wrapper only matters inside code that torch.compile
    # traces; the optimizer never is (``train.compile`` compiles the model's forward alone), so
    # this class calls the methods themselves. Same code, same state_dict, no dynamo import.
    def add_param_group(self, param_group: dict) -> None:
        _undecorated(torch.optim.Optimizer.add_param_group)(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        _undecorated(torch.optim.Optimizer.zero_grad)(self, set_to_none)

    def state_dict(self) -> dict:
        return _undecorated(torch.optim.Optimizer.state_dict)(self)

    def load_state_dict(self, state_dict: dict) -> None:
        _undecorated(torch.optim.Optimizer.load_state_dict)(self, state_dict)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            avgs, sqs, steps = [], [], []
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                avgs.append(state["exp_avg"])
                sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            beta1, beta2 = group["betas"]
            torch._foreach_add_(steps, 1)
            torch._fused_adamw_(params, [p.grad for p in params], avgs, sqs, [], steps, amsgrad=False,
                                lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                                eps=group["eps"], maximize=False)
        return loss


def _undecorated(method):
    """``method`` without torch's ``_disable_dynamo`` wrapper (``functools.wraps`` keeps the
    function it wraps as ``__wrapped__``); the method itself where torch does not wrap it."""
    return getattr(method, "__wrapped__", method)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, lr: float) -> FusedAdamW:
    """The AdamW every member trains with (bench/trainer_speed.py times this same optimizer).

    Two parameter groups, in this order: decoupled weight decay on matrices (dim >= 2:
    projections, embeddings), none on norms and biases. Fused (FusedAdamW): the whole update of
    each group is one kernel (torch's CPU fused AdamW), where torch's default for-each path
    replays ~10 elementwise ops per parameter on CPU (BENCHMARKS.md). State per parameter
    (exp_avg, exp_avg_sq, step) and the state_dict layout are the same as the for-each optimizer's.
    """
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]   # optimizer_names follows this order
    return FusedAdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                       {"params": no_decay, "weight_decay": 0.0}],
                      lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def optimizer_names(config: InternLM2Config) -> list[str]:
    """The parameter names of a model of ``config`` in the order of `make_optimizer`'s groups:
    entry i of its state_dict's "state" belongs to parameter names[i]."""
    with torch.device("meta"):
        shapes = [(n, p.dim()) for n, p in InternLM2ForCausalLM(config, init=False).named_parameters()]
    return [n for n, d in shapes if d >= 2] + [n for n, d in shapes if d < 2]


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) of a step is inf/nan; raised before the optimizer step,
    so the weights and the optimizer state are those from before the step."""

    def __init__(self, step: int, loss: float, what: str = "loss"):
        super().__init__(f"non-finite {what} at step {step} (loss {loss})")
        self.step, self.loss, self.what = step, loss, what

    def __reduce__(self):        # picklable with its fields (Ray sends exceptions between processes)
        return (type(self), (self.step, self.loss, self.what))


class Trainer:
    """Trains one InternLM2ForCausalLM on one corpus.

    The model config is taken as given except ``vocab_size``, which is always the corpus's
    (the tokenizer decides it): a config with another vocab_size is replaced by a copy with
    the corpus's. Torch threads are limited to the trainer's CPU share (see TrainConfig).
    """

    def __init__(self, model: InternLM2Config, train: TrainConfig, data: DataConfig,
                 fitness: FitnessConfig | None = None):
        self.data_config = data
        self.corpus = load_corpus(data)
        # what evaluate() judges on: the fitness section's held-out sets (None: the training text's)
        self.eval_config = dict(fitness.eval) if fitness is not None and fitness.eval else None
        self._held_out = {n: load_held_out(data, s.corpus, self.corpus.tokenizer_path, f"fitness.eval.{n}.corpus")
                          for n, s in (self.eval_config or {}).items() if s.corpus is not None}
        self._train = train
        self.device = _device(train.device)
        threads = _num_threads(train.num_threads)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        self._generator = torch.Generator().manual_seed(train.seed)   # init + new weights; saved in state
        self._mix: dict[str, float] = {}   # data.mix.* genes over data.mix; saved in state
        self._step = 0
        self._spares: list[tuple] = []   # (config, model, forward, optimizer) of architectures left
        self._tensors: tuple = (None, {})   # (model, its state_dict(keep_vars=True)), for _in_place_pairs
        # (pre-change model, steps left) after a lossy architecture change with distill_steps > 0;
        # not part of state_dict: a trainer restored mid-distillation trains on without it
        self._distill: tuple[InternLM2ForCausalLM, int] | None = None
        self._build(self._with_corpus_vocab(model))

    # ------------------------------------------------------------------ properties
    @property
    def step(self) -> int:
        """Optimizer steps done."""
        return self._step

    @property
    def model_config(self) -> InternLM2Config:
        return replace(self._model_cfg)

    @property
    def train_config(self) -> TrainConfig:
        return replace(self._train)

    @property
    def model(self) -> InternLM2ForCausalLM:
        """The module being trained (for export / inspection)."""
        return self._model

    def num_parameters(self) -> int:
        return self._model.num_parameters()

    # ------------------------------------------------------------------ training
    def train(self, n_steps: int) -> dict:
        """Run n_steps optimizer steps. Returns {"train_loss" (mean), "last_loss", "losses"
        (per step), "grad_norm" (last, before clipping), "step", "tokens" (this call),
        "seconds", "tokens_per_s", "distill_kl" (the KL term of each distilled step: see
        TrainConfig.distill_steps; "losses" are the cross-entropy alone)}. Raises
        NonFiniteLossError before a step whose loss or gradient norm is not finite."""
        if n_steps < 0:
            raise ValueError(f"n_steps: must be >= 0, got {n_steps}")
        cfg, model, opt = self._train, self._model, self._optimizer
        params = [p for g in opt.param_groups for p in g["params"]]
        model.train()
        losses: list[float] = []
        distill_kl: list[float] = []
        grad_norm = math.nan
        tokens = 0
        t0 = time.perf_counter()
        for _ in range(n_steps):
            step = self._step
            x, y = self._batch(cfg.seed, step, cfg.batch_size)            # (B, T) each
            x, y = x.to(self.device), y.to(self.device)
            lr = lr_at(cfg, step)
            for g in opt.param_groups:
                g["lr"] = lr
            with self._autocast():
                logits = self._forward(x)                                  # (B, T, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            value = loss.item()
            if not math.isfinite(value):
                raise NonFiniteLossError(step, value)
            if self._distill is not None:
                kl = self._distill_kl(x, logits)
                distill_kl.append(kl.item())
                loss = loss + cfg.distill_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            # with clipping off the norm is still computed (max_norm=inf scales by exactly 1)
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            grad_norm = norm.item()
            if not math.isfinite(grad_norm):
                opt.zero_grad(set_to_none=True)
                raise NonFiniteLossError(step, value, what="gradient norm")
            opt.step()
            self._step += 1
            losses.append(value)
            tokens += x.numel()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        return {
            "train_loss": sum(losses) / len(losses) if losses else math.nan,
            "last_loss": losses[-1] if losses else math.nan,
            "losses": losses,
            "grad_norm": grad_norm,
            "step": self._step,
            "tokens": tokens,
            "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
            "distill_kl": distill_kl,
        }

    def _distill_kl(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """KL(teacher || student) per token, averaged over the batch's tokens, from the pre-change
        model kept by set_architecture; counts one distilled step down (drops the teacher at 0)."""
        teacher, left = self._distill
        with torch.no_grad(), self._autocast():
            target = teacher(x)                                            # (B, T, V)
        kl = F.kl_div(F.log_softmax(logits.float(), -1).flatten(0, 1), F.log_softmax(target.float(), -1).flatten(0, 1),
                      log_target=True, reduction="batchmean")
        self._distill = (teacher, left - 1) if left > 1 else None
        return kl

    def _batch(self, seed: int, step: int, batch_size: int):
        if self.data_config.sources:
            return self.corpus.batch(seed, step, batch_size, self.mix)
        return self.corpus.batch(seed, step, batch_size)

    @property
    def mix(self) -> dict[str, float]:
        """The live data mix {source: weight} ({} for a single corpus)."""
        return self.data_config.mix_weights(self._mix)

    def set_mix(self, **weights: float) -> None:
        """Change source weights in place: the next step draws its sources by them."""
        unknown = sorted(set(weights) - set(self.data_config.source_names()))
        if unknown:
            raise ValueError(f"data.mix.{unknown[0]}: no such source")
        new = {**self._mix, **{k: float(v) for k, v in weights.items()}}
        merged = self.data_config.mix_weights(new)
        if not all(math.isfinite(w) and w >= 0 for w in merged.values()) or not any(merged.values()):
            raise ValueError(f"data.mix: weights must be finite, >= 0 and not all zero, got {merged}")
        self._mix = new

    def eval_sets(self) -> dict[str, tuple[list[tuple[torch.Tensor, torch.Tensor]], float]]:
        """What evaluate() scores: {name: (fixed held-out batches, bytes per token)}: the fitness
        section's sets, else the corpus's ({"": ...} for one corpus, each source's otherwise)."""
        if self.eval_config is None:
            return self.corpus.eval_sets()
        out = {}
        for name, s in self.eval_config.items():
            if s.corpus is not None:
                held = self._held_out[name]
                out[name] = (held.eval_batches(), held.bytes_per_token)
            elif isinstance(self.corpus, SourcesCorpus):
                out[name] = (self.corpus.eval_batches(s.source), self.corpus.bytes_per_tokens[s.source])
            else:
                out[name] = (self.corpus.eval_batches(), self.corpus.bytes_per_token)
        return out

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss on the fixed held-out windows: {"val_loss": nats/token, "val_bpb": bits/byte}.
        With several sources also "val_bpb.<source>" each; val_bpb is then their mean and
        val_loss the loss over all their windows. With a fitness section: "val_bpb.<set>" of each
        held-out set, val_bpb and val_loss their weighted means (fitness.eval.<set>.weight)."""
        model = self._model
        model.eval()
        out: dict[str, float] = {}
        losses: dict[str, float] = {}
        total_all, count_all = 0.0, 0
        try:
            for name, (batches, bytes_per_token) in self.eval_sets().items():
                total, count = 0.0, 0
                for x, y in batches:
                    x, y = x.to(self.device), y.to(self.device)
                    with self._autocast():
                        logits = self._forward(x)                          # (B, T, V)
                    total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
                    count += y.numel()
                total_all, count_all = total_all + total, count_all + count
                losses[name] = total / count
                if name:
                    out[f"val_bpb.{name}"] = total / count / math.log(2) / bytes_per_token
        finally:
            model.train()
        if self.eval_config is not None:
            weights = {n: float(s.weight) for n, s in self.eval_config.items()}
            w = sum(weights.values())
            return {"val_loss": sum(weights[n] * losses[n] for n in weights) / w,
                    "val_bpb": sum(weights[n] * out[f"val_bpb.{n}"] for n in weights) / w, **out}
        val_loss = total_all / count_all
        if not out:
            return {"val_loss": val_loss, "val_bpb": val_loss / math.log(2) / self.corpus.bytes_per_token}
        return {"val_loss": val_loss, "val_bpb": sum(out.values()) / len(out), **out}

    def score(self, fn, spec: str) -> tuple[float, str | None]:
        """fitness.function ``fn`` (named ``spec``) on this model: ``fn(model, batches, device)``
        with the model in eval mode under no_grad and ``batches`` {held-out set: [(x, y), ...]}
        (what evaluate() measures; a single corpus's set is named by data.corpus). (score, None),
        or (nan, one line) when it raised or gave no finite number."""
        batches = {name or self.data_config.corpus: b for name, (b, _) in self.eval_sets().items()}
        model = self._model
        model.eval()
        try:
            with torch.no_grad():
                return call_function(fn, spec, model, batches, self.device)
        finally:
            model.train()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything needed to continue bit for bit, as CPU tensor copies and plain Python
        (loadable with ``torch.load(..., weights_only=True)``)."""
        return {
            "format": STATE_FORMAT,
            "model_config": asdict(self._model_cfg),
            "train_config": asdict(self._train),
            "model": {k: v.detach().to("cpu", copy=True) for k, v in self._model.state_dict().items()},
            "norm_eps": self._model.norm_eps(),
            "optimizer": _cpu_copy(self._optimizer.state_dict()),
            "step": self._step,
            "rng": {"torch": self._generator.get_state()},
            **({"mix": dict(self._mix)} if self.data_config.sources else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (this trainer's or another member's).

        When the state's architecture (this trainer's, or one it keeps a spare model of) and
        optimizer layout match, every tensor is copied into the existing parameters and Adam
        moments (the exploit fast path: nothing is built); otherwise the model and optimizer are
        rebuilt (the optimizer may keep the state's tensors). The hyperparameters (HPARAMS) come
        from the state; seed, device, threads and compile stay this trainer's own, so a member
        that copies a donor keeps its own batch order.
        """
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"state: format {state.get('format')!r} is not {STATE_FORMAT}")
        model_cfg = InternLM2Config(**state["model_config"])
        if model_cfg.vocab_size != self.corpus.vocab_size:
            raise ValueError(f"model.vocab_size: state has {model_cfg.vocab_size}, "
                              f"the corpus has {self.corpus.vocab_size}")
        self._train = replace(self._train, **{k: state["train_config"][k] for k in HPARAMS})
        if model_cfg != self._model_cfg:
            self._take_spare(model_cfg)
        pairs = self._in_place_pairs(state) if model_cfg == self._model_cfg else None
        if pairs is not None:
            theirs = state["rng"]["torch"]
            rng = torch.empty(theirs.shape, dtype=theirs.dtype)
            pairs.append((rng, theirs))
            with torch.no_grad():
                for dst, src in pairs:
                    dst.copy_(src)
        else:
            if model_cfg != self._model_cfg:
                self._build(model_cfg, state["model"])
            else:
                self._model.load_state_dict(state["model"])
                self._optimizer = self._make_optimizer()
            self._optimizer.load_state_dict(state["optimizer"])
            rng = state["rng"]["torch"]
            # set_state wants a tensor with its own storage at offset 0 (not a view into a buffer)
            rng = rng.clone() if rng.storage_offset() else rng
        self._model.set_norm_eps(state.get("norm_eps", {}))
        self._step = int(state["step"])
        self._distill = None    # another model now: the last change's teacher no longer applies
        self._generator.set_state(rng)
        self._mix = {k: float(v) for k, v in state.get("mix", {}).items()}
        self._apply_hparams()

    def _in_place_pairs(self, state: dict) -> list[tuple[torch.Tensor, Any]] | None:
        """(our tensor, the state's) for every weight and Adam moment, if each parameter has the
        same place, shape, dtype and optimizer entries here as in ``state``; else None. The
        architecture is checked by the caller."""
        opt = state["optimizer"]
        groups = self._optimizer.param_groups
        if len(opt["param_groups"]) != len(groups):
            return None
        weights = state["model"]
        if self._tensors[0] is not self._model:   # the model's own tensors by state-dict key
            self._tensors = (self._model, self._model.state_dict(keep_vars=True))
        model = self._tensors[1]
        if weights.keys() != model.keys() or any(weights[k].shape != v.shape or weights[k].dtype != v.dtype
                                                 for k, v in model.items()):
            return None
        pairs = [(v, weights[k]) for k, v in model.items()]
        for theirs, ours in zip(opt["param_groups"], groups):
            if len(theirs["params"]) != len(ours["params"]):
                return None
            for index, p in zip(theirs["params"], ours["params"]):
                src, dst = opt["state"].get(index), self._optimizer.state.get(p)
                if not src and not dst:
                    continue
                if (not src or not dst or src.keys() != dst.keys()
                        or any(src[k].shape != dst[k].shape or src[k].dtype != dst[k].dtype for k in src)):
                    return None
                pairs += [(v, src[k]) for k, v in dst.items()]
        return pairs

    def set_hparams(self, **hp: Any) -> None:
        """Change hyperparameters (keys of HPARAMS) from the next step on; Adam moments are kept."""
        for key in hp:
            if key not in HPARAMS:
                raise ValueError(f"train.{key}: not a hyperparameter that can change during training "
                                 f"(one of {', '.join(HPARAMS)})")
        self._train = replace(self._train, **hp)      # validates
        self._apply_hparams()

    def set_architecture(self, model: InternLM2Config) -> None:
        """Change the architecture, carrying the weights over (trainers.transfer). Adam moments
        are carried along the same map for every parameter that exists in both (zeros for its
        new coordinates, the old step count); parameters of new layers start with fresh moments.
        A lossy change (trainers.transfer.preserves_function False) with ``distill_steps`` > 0
        keeps a frozen copy of the old model as the teacher of the next distill_steps steps."""
        new_cfg = self._with_corpus_vocab(model)
        if new_cfg == self._model_cfg:
            return
        old_cfg, old_model, old_opt = self._model_cfg, self._model, self._optimizer
        old_state = {k: v.detach().cpu() for k, v in old_model.state_dict().items()}
        new_state = transfer_weights(old_state, old_cfg, new_cfg, self._generator)
        norm_eps = transfer_norm_eps(old_model.norm_eps(), old_cfg, new_cfg)
        if self._train.distill_steps and not preserves_function(old_cfg, new_cfg):
            teacher = InternLM2ForCausalLM(old_cfg, init=False)
            teacher.load_state_dict(old_state)
            teacher.set_norm_eps(old_model.norm_eps())
            teacher = teacher.to(self.device).eval().requires_grad_(False)
            self._distill = (teacher, self._train.distill_steps)
        self._build(new_cfg, new_state)
        self._model.set_norm_eps(norm_eps)
        old_moments = {name: old_opt.state[q] for name, q in old_model.named_parameters() if old_opt.state.get(q)}
        shapes = {name: p.shape for name, p in self._model.named_parameters()}
        moved = {key: transfer_moments({n: s[key].detach().cpu() for n, s in old_moments.items()},
                                       old_cfg, new_cfg, shapes, power)
                 for key, power in (("exp_avg", 1), ("exp_avg_sq", 2))}
        for name, p in self._model.named_parameters():
            if name in old_moments:
                self._optimizer.state[p] = {"step": old_moments[name]["step"].clone(),
                                            "exp_avg": moved["exp_avg"][name].to(p.device),
                                            "exp_avg_sq": moved["exp_avg_sq"][name].to(p.device)}

    def merge_from(self, state: dict, alpha: float) -> None:
        """Merge crossover: this trainer's weights, Adam moments and norm eps become
        ``alpha * own + (1 - alpha) * state's``, for a ``state`` of the same architecture (the
        other parent; the step, RNG and hyperparameters stay this trainer's). A parameter with
        Adam moments on one side only keeps this trainer's."""
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"merge: alpha ({alpha}) must be in [0, 1]")
        other_cfg = InternLM2Config(**state["model_config"])
        if self._with_corpus_vocab(other_cfg) != self._model_cfg:
            raise ValueError("merge: the parents' architectures differ (merge needs the same shape)")
        weights = state["model"]
        params = [p for g in self._optimizer.param_groups for p in g["params"]]
        theirs = state["optimizer"]["state"]
        with torch.no_grad():
            for name, p in self._model.named_parameters():
                p.mul_(alpha).add_(weights[name].to(p.device, p.dtype), alpha=1.0 - alpha)
            for i, p in enumerate(params):
                ours, other = self._optimizer.state.get(p), theirs.get(i)
                if ours and other:
                    for key in ("exp_avg", "exp_avg_sq"):
                        ours[key].mul_(alpha).add_(other[key].to(p.device), alpha=1.0 - alpha)
        eps, other_eps = self._model.norm_eps(), state.get("norm_eps", {})
        self._model.set_norm_eps({n: alpha * e + (1.0 - alpha) * other_eps.get(n, self._model_cfg.rms_norm_eps)
                                  for n, e in eps.items()})

    def inherit_layers(self, state: dict, model: InternLM2Config, sources: dict[str, int | None],
                       shrink: float) -> list[str]:
        """Merge crossover of parents of two architectures (layer-wise inheritance): become a model
        of architecture ``model`` whose units (trainers.transfer.unit_of: embeddings, each layer,
        final norm, output head) come whole from one parent — ``sources[unit]`` 0: this trainer,
        1: ``state`` (the other parent), None: a new layer — reconciled to ``model``'s shapes,
        tensors whose shape differs from the source's shrunk and perturbed by ``shrink``
        (trainers.transfer.inherit_weights, drawing from this trainer's generator). Adam moments
        follow the weights: carried from the unit's parent along the same map where the shape
        matches; reset (none: the optimizer starts them afresh, step 0) for a shrunk-and-perturbed
        tensor, whose weights moved away from where its moments were measured. The step, RNG
        and hyperparameters stay this trainer's. Returns the names of the shrunk tensors."""
        other_cfg = InternLM2Config(**state["model_config"])
        if other_cfg.vocab_size != self.corpus.vocab_size:
            raise ValueError(f"model.vocab_size: state has {other_cfg.vocab_size}, "
                             f"the corpus has {self.corpus.vocab_size}")
        new_cfg = self._with_corpus_vocab(model)
        own_cfg, own_model, own_opt = self._model_cfg, self._model, self._optimizer
        own = {k: v.detach().cpu() for k, v in own_model.state_dict().items()}
        configs = [own_cfg, other_cfg]
        weights, perturbed = inherit_weights([(own, own_cfg), (state["model"], other_cfg)], new_cfg,
                                             sources, shrink, self._generator)
        norm_eps = inherit_norm_eps([own_model.norm_eps(), state.get("norm_eps", {})], configs, new_cfg, sources)
        moments = [{n: {k: v.detach().cpu() for k, v in own_opt.state[q].items()}
                    for n, q in own_model.named_parameters() if own_opt.state.get(q)},
                   {n: st for i, n in enumerate(optimizer_names(other_cfg))
                    if (st := state["optimizer"]["state"].get(i))}]
        self._distill = None    # two parents: no single teacher
        self._build(new_cfg, weights)
        self._model.set_norm_eps(norm_eps)
        shapes = {name: p.shape for name, p in self._model.named_parameters()}
        moved = [{key: transfer_moments({n: s[key] for n, s in m.items()}, cfg, new_cfg, shapes, power)
                  for key, power in (("exp_avg", 1), ("exp_avg_sq", 2))} for m, cfg in zip(moments, configs)]
        for name, p in self._model.named_parameters():
            src = sources.get(unit_of(name))
            if src is None or name in perturbed or name not in moments[src]:
                continue
            self._optimizer.state[p] = {"step": moments[src][name]["step"].to(p.device, copy=True),
                                        "exp_avg": moved[src]["exp_avg"][name].to(p.device),
                                        "exp_avg_sq": moved[src]["exp_avg_sq"][name].to(p.device)}
        return sorted(perturbed)

    # ------------------------------------------------------------------ internals
    def _with_corpus_vocab(self, cfg: InternLM2Config) -> InternLM2Config:
        if cfg.vocab_size == self.corpus.vocab_size:
            return replace(cfg)
        return replace(cfg, vocab_size=self.corpus.vocab_size)

    def _take_spare(self, cfg: InternLM2Config) -> bool:
        """Swap in the spare model + optimizer of architecture ``cfg`` (keeping the current one as
        a spare); False when there is none. Its weights and moments are stale: the caller loads."""
        for i, (spare_cfg, *parts) in enumerate(self._spares):
            if spare_cfg == cfg:
                del self._spares[i]
                self._keep_spare()
                self._model, self._forward, self._optimizer = parts
                self._model_cfg = cfg
                return True
        return False

    def _keep_spare(self) -> None:
        """Keep the current model + optimizer as a spare, if on CPU and small (SPARE_BYTES)."""
        if self.device.type != "cpu" or not SPARE_MODELS:
            return
        if 3 * sum(p.numel() * p.element_size() for p in self._model.parameters()) > SPARE_BYTES:
            return
        self._spares = [s for s in self._spares if s[0] != self._model_cfg]
        self._spares.append((self._model_cfg, self._model, self._forward, self._optimizer))
        del self._spares[:-SPARE_MODELS]

    def _build(self, cfg: InternLM2Config, weights: dict | None = None) -> None:
        """Create the model (from the generator, or with ``weights``) and a fresh optimizer; the
        one it replaces may become a spare."""
        if hasattr(self, "_model"):
            self._keep_spare()
        # given weights: no init at all (a random draw per weight, wasted on an architecture-
        # changing exploit, and it must not advance our generator); load_state_dict checks every key
        model = InternLM2ForCausalLM(cfg, generator=self._generator, init=weights is None)
        if weights is not None:
            model.load_state_dict(weights)
        self._model = model.to(self.device) if self.device.type != "cpu" else model   # built on the CPU
        self._model_cfg = cfg
        if self._train.compile:
            # dynamic=False: one static graph per shape (the train batch, the eval batch), never a
            # symbolic batch dimension: shapes seldom change in a member's life
            self._forward = torch.compile(self._model, dynamic=False)
        elif self.device.type == "cpu":
            # the hand-written fp32 CPU path over the model's own parameters (trainers/cpu_fused.py)
            self._forward = cpu_fused.FusedForward(self._model)
        else:
            self._forward = self._model
        self._optimizer = self._make_optimizer()

    def _make_optimizer(self) -> torch.optim.AdamW:
        return make_optimizer(self._model, self._train, lr_at(self._train, self._step))

    def _apply_hparams(self) -> None:
        cfg = self._train
        decay_group, no_decay_group = self._optimizer.param_groups
        for g in (decay_group, no_decay_group):
            g["lr"] = lr_at(cfg, self._step)
            g["betas"] = (cfg.beta1, cfg.beta2)
            g["eps"] = cfg.eps
        decay_group["weight_decay"] = cfg.weight_decay
        no_decay_group["weight_decay"] = 0.0

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: cuda requested but torch.cuda.is_available() is False")
    return torch.device(name)


def _num_threads(requested: int | None) -> int:
    """Torch threads: the config's, else $EVO_NUM_THREADS (set by the member from its CPU share),
    else the CPUs this process may run on."""
    if requested is not None:
        return requested
    env = os.environ.get("EVO_NUM_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"EVO_NUM_THREADS: must be a positive integer, got {env!r}")
        return n
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _cpu_copy(obj: Any) -> Any:
    """Deep copy of a (nested) optimizer state with every tensor cloned onto the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu_copy(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_cpu_copy(v) for v in obj)
    return obj

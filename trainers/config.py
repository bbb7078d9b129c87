"""The trainers' config dataclasses: the data, the model's architecture, the training run.

``data:``, ``model:`` and ``train:`` of an experiment config (experiments/config.py composes
them), held by the driver's setup and by every member. They live here, apart from the modules
that use them (trainers/data.py, trainers/model.py, trainers/trainer.py re-export them), because
this module imports no torch: loading and validating a config, or refusing a bad one, costs no
torch import.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, StrictBool, StrictFloat, StrictInt
from pydantic.dataclasses import dataclass

from trainers import architecture


# A source's name: used in gene paths (data.mix.<name>) and metric names (val_bpb.<name>).
SourceName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")]


@dataclass(config=ConfigDict(extra="forbid"))
class DataConfig:
    """Where the text comes from, how it is tokenized and how it is split.

    A pydantic dataclass: a bad value raises pydantic's ValidationError (a ValueError) that
    locates the field; it stays a plain dataclass to `dataclasses.replace` / `asdict` / pickle."""

    corpus: Annotated[str, Field(min_length=1, description=(
        "'stdlib' (the Python standard library's source), 'stdlib-docs' (the English prose of the "
        "Python documentation, pydoc_data), a text file, a directory or a glob"))] = "stdlib"
    sources: Annotated[dict[SourceName, Annotated[str, Field(min_length=1)]] | None, Field(description=(
        "several named corpora {name: any data.corpus form}, one tokenizer over their union; "
        "replaces data.corpus when given"))] = None
    mix: Annotated[dict[SourceName, Annotated[StrictFloat | StrictInt, Field(ge=0)]] | None, Field(description=(
        "training weight of each source (a sequence's source is drawn by these weights; "
        "data.mix.<source> can be a gene); null: equal weights"))] = None
    tokenizer: Annotated[Literal["bytes", "bpe"], Field(description=(
        "'bytes' (256 symbols) or 'bpe' (trained on the corpus, vocab_size symbols)"))] = "bytes"
    vocab_size: Annotated[StrictInt, Field(gt=0, description="bpe vocabulary size (bytes is always 256)")] = 1024
    seq_len: Annotated[StrictInt, Field(gt=0, le=architecture.MAX_POSITIONS, description=(
        f"tokens per training window (at most model.max_position_embeddings, and {architecture.MAX_POSITIONS})"))] = 128
    val_fraction: Annotated[StrictFloat, Field(gt=0, lt=1, description=(
        "share of the documents held out for validation (split by a hash of the path)"))] = 0.05
    eval_batches: Annotated[StrictInt, Field(gt=0, le=100_000, description=(
        "batches in the fixed held-out set that fitness is measured on (at most 100000)"))] = 8
    eval_batch_size: Annotated[StrictInt, Field(gt=0, le=65_536, description=(
        "windows per held-out batch (at most 65536)"))] = 16
    max_bytes: Annotated[StrictInt | None, Field(gt=0, description=(
        "cap on the corpus bytes read (keeps the default fast); null reads everything"))] = 8_000_000
    cache_dir: Annotated[str | None, Field(description=(
        "token cache directory; null: $EVO_CACHE_DIR, else ~/.cache/evo/tokens"))] = None

    def __post_init__(self) -> None:
        if self.tokenizer == "bpe" and not 256 < self.vocab_size <= 2**32:
            raise ValueError(f"data.vocab_size: bpe needs 256 < vocab_size <= 2**32 (256 byte symbols + merges), "
                             f"got {self.vocab_size}")
        if self.sources is not None and not self.sources:
            raise ValueError("data.sources: names no source (leave it out to train on data.corpus)")
        if self.mix is not None:
            if self.sources is None:
                raise ValueError("data.mix: needs data.sources (a single data.corpus has nothing to mix)")
            unknown = sorted(set(self.mix) - set(self.sources))
            if unknown:
                raise ValueError(f"data.mix.{unknown[0]}: no such source (data.sources names "
                                 f"{', '.join(sorted(self.sources))})")
            if not any(float(self.mix.get(n, 0.0)) > 0 for n in self.sources):
                raise ValueError("data.mix: all weights are zero")

    def source_names(self) -> list[str]:
        """The sources, sorted by name (a single data.corpus has none)."""
        return sorted(self.sources) if self.sources else []

    def mix_weights(self, mix: dict | None = None) -> dict[str, float]:
        """Every source's weight: ``mix`` (e.g. live genes) over data.mix over 1.0."""
        out = {n: 1.0 for n in self.source_names()}
        out.update({n: float(w) for n, w in (self.mix or {}).items()})
        out.update({n: float(w) for n, w in (mix or {}).items()})
        return out


Count = Annotated[StrictInt, Field(gt=0)]


@dataclass(config=ConfigDict(extra="forbid"))
class InternLM2Config:
    """InternLM2 architecture; field names (and their meaning) as in HF `InternLM2Config`.

    A pydantic dataclass: a bad value raises pydantic's ValidationError (a ValueError) that
    locates the field; the shape rules (trainers/architecture.py) raise a ValueError naming the
    fields. It stays a plain dataclass to `dataclasses.replace` / `asdict` / pickle."""

    vocab_size: Annotated[Count, Field(description="vocabulary size")] = 256
    hidden_size: Annotated[Count, Field(le=architecture.MAX_WIDTH, description=(
        f"width of the residual stream (at most {architecture.MAX_WIDTH})"))] = 64
    intermediate_size: Annotated[Count, Field(le=architecture.MAX_FFN, description=(
        f"SwiGLU feed-forward width (at most {architecture.MAX_FFN})"))] = 172
    num_hidden_layers: Annotated[Count, Field(le=architecture.MAX_LAYERS, description=(
        f"decoder layers (at most {architecture.MAX_LAYERS})"))] = 2
    num_attention_heads: Annotated[Count, Field(le=architecture.MAX_HEADS, description=(
        f"query heads (hidden_size / heads is head_dim, even; at most {architecture.MAX_HEADS})"))] = 4
    num_key_value_heads: Annotated[Count, Field(le=architecture.MAX_HEADS, description=(
        "key/value heads (grouped-query attention; divides num_attention_heads; "
        f"at most {architecture.MAX_HEADS})"))] = 2
    rms_norm_eps: Annotated[StrictFloat, Field(gt=0, allow_inf_nan=False, description="RMSNorm epsilon")] = 1e-5
    rope_theta: Annotated[StrictFloat, Field(gt=1, allow_inf_nan=False, description="RoPE base")] = 10000.0
    rope_scaling: Annotated[dict | None, Field(description=(
        "null, or {type: linear or dynamic, factor: >= 1} (HF InternLM2's rope_scaling)"))] = None
    bias: Annotated[StrictBool, Field(description="biases on wqkv and wo (HF InternLM2's bias)")] = False
    max_position_embeddings: Annotated[Count, Field(le=architecture.MAX_POSITIONS, description=(
        f"longest sequence the model is built for (at most {architecture.MAX_POSITIONS})"))] = 2048
    initializer_range: Annotated[StrictFloat, Field(ge=0, allow_inf_nan=False, description=(
        "std of the normal initialisation"))] = 0.02

    def __post_init__(self) -> None:
        broken = architecture.shape_violations({f: getattr(self, f) for f in architecture.SHAPE_FIELDS})
        if broken:
            raise ValueError(f"model: {broken[0]}")
        self.rope_scaling = _check_rope_scaling(self.rope_scaling)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-friendly values; `InternLM2Config(**to_dict())` gives an equal config."""
        return dataclasses.asdict(self)


def _check_rope_scaling(rope_scaling: Any) -> dict | None:
    """Validate HF InternLM2's `rope_scaling` ({"type", "factor"}); returns a fresh dict."""
    if rope_scaling is None:
        return None
    extra = sorted(set(rope_scaling) - {"type", "factor"})
    if extra:
        raise ValueError(f"model: rope_scaling has unknown key {extra[0]!r} (expected type and factor)")
    kind, factor = rope_scaling.get("type"), rope_scaling.get("factor")
    if kind not in ("linear", "dynamic"):
        raise ValueError(f"model: rope_scaling.type ({kind!r}) must be 'linear' or 'dynamic'")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 1.0 or math.isinf(factor):
        raise ValueError(f"model: rope_scaling.factor ({factor!r}) must be a finite number >= 1")
    return {"type": kind, "factor": float(factor)}



# Fields of TrainConfig that may change during training (set_hparams); the others
# (compile, device, num_threads, seed, distill_*) belong to the member, not to the search.
HPARAMS = ("batch_size", "lr", "weight_decay", "beta1", "beta2", "eps", "grad_clip",
           "warmup_steps", "schedule", "decay_steps", "min_lr_ratio")


@dataclass(config=ConfigDict(extra="forbid"))
class TrainConfig:
    """Optimizer, schedule and run settings of one trainer.

    A pydantic dataclass: a bad value raises pydantic's ValidationError (a ValueError) that
    locates the field; it stays a plain dataclass to `dataclasses.replace` / `asdict` / pickle."""

    batch_size: Annotated[StrictInt, Field(ge=1, le=65_536, description=(
        "sequences per optimizer step (at most 65536)"))] = 16
    lr: Annotated[StrictFloat, Field(gt=0, allow_inf_nan=False, description="peak learning rate (AdamW)")] = 1e-3
    weight_decay: Annotated[StrictFloat, Field(ge=0, allow_inf_nan=False, description="AdamW weight decay")] = 0.1
    beta1: Annotated[StrictFloat, Field(ge=0, lt=1, description="AdamW beta1")] = 0.9
    beta2: Annotated[StrictFloat, Field(ge=0, lt=1, description="AdamW beta2")] = 0.95
    eps: Annotated[StrictFloat, Field(gt=0, allow_inf_nan=False, description="AdamW epsilon")] = 1e-8
    grad_clip: Annotated[StrictFloat, Field(ge=0, allow_inf_nan=False, description=(
        "max global gradient norm; 0 turns clipping off"))] = 1.0
    warmup_steps: Annotated[StrictInt, Field(ge=0, le=1_000_000_000, description=(
        "steps of linear warmup from lr / warmup_steps to lr (at most 1000000000)"))] = 20
    schedule: Annotated[Literal["cosine", "constant"], Field(description=(
        "after warmup: 'cosine' down to min_lr_ratio * lr at decay_steps, or 'constant'"))] = "cosine"
    decay_steps: Annotated[StrictInt | None, Field(ge=1, le=1_000_000_000, description=(
        "step where the cosine reaches min_lr_ratio * lr (at most 1000000000); null: constant after warmup"))] = None
    min_lr_ratio: Annotated[StrictFloat, Field(ge=0, le=1, description="the cosine's floor, as a share of lr")] = 0.1
    compile: Annotated[StrictBool, Field(description="torch.compile the model")] = False
    device: Annotated[Literal["auto", "cpu", "cuda"], Field(description=(
        "'auto' takes a GPU when the member has one, else the CPU"))] = "auto"
    num_threads: Annotated[StrictInt | None, Field(ge=1, le=1024, description=(
        "torch threads per member (at most 1024); null: $EVO_NUM_THREADS, else the member's CPU "
        "affinity count"))] = None
    seed: Annotated[StrictInt, Field(ge=0, description="model init and batch order (set per member by the driver)")] = 0
    distill_steps: Annotated[StrictInt, Field(ge=0, le=1_000_000_000, description=(
        "after a lossy architecture change, the first distill_steps steps add distill_weight x "
        "KL(pre-change model's next-token distribution || the new model's) to the loss (0: off)"))] = 0
    distill_weight: Annotated[StrictFloat, Field(ge=0, allow_inf_nan=False, description=(
        "weight of the distillation KL term (see distill_steps)"))] = 1.0

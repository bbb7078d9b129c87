"""What a member is judged on: the `fitness` section's held-out sets, their weights.

A held-out set is the validation split of a training source (``{source: docs}``; with a single
data.corpus its name is the corpus, e.g. ``{source: stdlib}``) or a text that is never trained on
(``{corpus: stdlib-docs}``, any data.corpus form, tokenized with the training tokenizer: all of
its documents are held out). A member's val_bpb is the weighted mean of the sets' bits/byte and
each set's own is ``val_bpb.<name>`` (usable as an nsga2 objective). Without the section a member
is judged as before: on the held-out split of its training text (each source's, averaged).
"""
from __future__ import annotations

from typing import Annotated

from pydantic import ConfigDict, Field, StrictFloat, StrictInt
from pydantic.dataclasses import dataclass

# A set's name: in metric names (val_bpb.<name>) and objectives.
SetName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")]


@dataclass(config=ConfigDict(extra="forbid"))
class EvalSet:
    """One held-out set: a training source's validation split, or a corpus never trained on."""

    source: Annotated[str | None, Field(min_length=1, description=(
        "a name in data.sources (or the data.corpus itself): its validation split"))] = None
    corpus: Annotated[str | None, Field(min_length=1, description=(
        "a text never trained on (any data.corpus form), all of it held out"))] = None
    weight: Annotated[StrictFloat | StrictInt, Field(gt=0, allow_inf_nan=False, description=(
        "the set's weight in val_bpb"))] = 1.0

    def __post_init__(self) -> None:
        if (self.source is None) == (self.corpus is None):
            raise ValueError("a held-out set names either source or corpus (one of them)")


@dataclass(config=ConfigDict(extra="forbid"))
class FitnessConfig:
    """The YAML `fitness:` mapping."""

    eval: Annotated[dict[SetName, EvalSet] | None, Field(description=(
        "held-out sets {name: {source: <training source> | corpus: <text never trained on>, weight: 1.0}}: "
        "val_bpb is their weighted mean, each one's bits/byte is val_bpb.<name>; null: the training "
        "text's held-out split"))] = None

    def __post_init__(self) -> None:
        if self.eval is not None and not self.eval:
            raise ValueError("fitness.eval: names no held-out set (leave it out to judge on the training text)")

    def held_out_corpora(self) -> dict[str, str]:
        """The sets never trained on: name -> corpus form."""
        return {n: s.corpus for n, s in (self.eval or {}).items() if s.corpus is not None}

    @property
    def active(self) -> bool:
        """Whether the section changes anything (else members are judged as without it)."""
        return bool(self.eval)

"""What a member is judged on: the `fitness` section's held-out sets, their weights, and a
user's function.

A held-out set is the validation split of a training source (``{source: docs}``; with a single
data.corpus its name is the corpus, e.g. ``{source: stdlib}``) or a text that is never trained on
(``{corpus: stdlib-docs}``, any data.corpus form, tokenized with the training tokenizer: all of
its documents are held out). A member's val_bpb is the weighted mean of the sets' bits/byte and
each set's own is ``val_bpb.<name>`` (usable as an nsga2 objective). Without the section a member
is judged as before: on the held-out split of its training text (each source's, averaged).

``fitness.function: package.module:name`` is a metric that is not a loss, called in the member
after each evaluation as ``name(model, batches, device)`` (the model in eval mode under
``torch.no_grad``; ``batches`` {held-out set: [(x, y), ...]}, the same fixed batches val_bpb is
measured on) and returning a number: the member's ``score``, recorded beside val_bpb, better
as ``fitness.sense`` declares, an objective for nsga2 (``strategy.objectives: [score, val_bpb]``).
An exception or a non-finite value marks that evaluation's score failed (nan, one line naming the
function); the run goes on.
"""
from __future__ import annotations

import importlib
import inspect
import math
import re
from typing import Annotated, Any, Callable, Literal

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

    function: Annotated[str | None, Field(description=(
        "package.module:name, called in the member after each evaluation as name(model, batches, device) "
        "-> a number: the member's score (an nsga2 objective); null: none"))] = None
    sense: Annotated[Literal["min", "max"] | None, Field(description=(
        "whether fitness.function's score is better low (min) or high (max); needed with it"))] = None

    def __post_init__(self) -> None:
        if self.eval is not None and not self.eval:
            raise ValueError("fitness.eval: names no held-out set (leave it out to judge on the training text)")
        if self.function is not None:
            if not FUNCTION_SPEC.fullmatch(self.function):
                raise ValueError(f"fitness.function: expected package.module:name, got {self.function!r}")
            if self.sense is None:
                raise ValueError("fitness.sense: declare whether fitness.function's score is better low (min) "
                                 "or high (max)")

    def held_out_corpora(self) -> dict[str, str]:
        """The sets never trained on: name -> corpus form."""
        return {n: s.corpus for n, s in (self.eval or {}).items() if s.corpus is not None}

    @property
    def active(self) -> bool:
        """Whether the section changes anything (else members are judged as without it)."""
        return bool(self.eval) or self.function is not None


FUNCTION_SPEC = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*")


class FitnessFunctionError(ValueError):
    """fitness.function cannot be used (not importable, not callable, wrong signature); one line."""


def load_function(spec: str) -> Callable[..., Any]:
    """The callable ``package.module:name``, checked to take (model, batches, device)."""
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:   # ImportError, or whatever the module raises while importing
        raise FitnessFunctionError(f"fitness.function: cannot import {module_name!r} ({type(e).__name__}: "
                                   f"{_first_line(e)})") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise FitnessFunctionError(f"fitness.function: module {module_name!r} has no {name!r}")
    if not callable(fn):
        raise FitnessFunctionError(f"fitness.function: {spec} is not callable (a {type(fn).__name__})")
    try:
        inspect.signature(fn).bind(None, None, None)
    except TypeError:
        raise FitnessFunctionError(f"fitness.function: {spec}{inspect.signature(fn)} cannot be called as "
                                   f"{name}(model, batches, device)") from None
    except ValueError:   # no signature to read (a builtin): let the call tell
        pass
    return fn


def call_function(fn: Callable[..., Any], spec: str, model: Any, batches: dict,
                  device: Any) -> tuple[float, str | None]:
    """(score, None), or (nan, one line naming ``spec`` and what went wrong) when it raised or
    returned something that is not a finite number."""
    try:
        value = fn(model, batches, device)
    except Exception as e:
        return math.nan, f"fitness.function {spec} failed: {type(e).__name__}: {_first_line(e)}"
    try:
        score = float(value)
    except (TypeError, ValueError):
        return math.nan, f"fitness.function {spec} returned {type(value).__name__} {_short(value)}, not a number"
    if not math.isfinite(score):
        return math.nan, f"fitness.function {spec} returned a non-finite value ({score})"
    return score, None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return _short(text.splitlines()[0]) if text else "(no message)"


def _short(value: Any, n: int = 160) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= n else text[: n - 3] + "..."

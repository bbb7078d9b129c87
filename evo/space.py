"""The search space: typed genes over config fields, and the model's rules between them.

A gene names the config field it sets by its dotted path (`train.lr`, `model.hidden_size`).
The space knows the whole base config (flattened to `{path: value}`): it is the list of valid
paths, and it supplies the model fields that are not genes when checking the model's rules.
Those rules -- which shapes the model can be built with, and its parameter count for an
optional `max_params` budget -- are the model's, handed to the space as `ArchitectureRules`
by whoever builds it (for InternLM2, experiments/ passes `trainers/architecture.py`'s), so that
no strategy ever hands a trainer a model it cannot build. Every genome the space returns
(`sample`, `clip`, `decode`) satisfies them; `clip` repairs a violating genome by moving the
architecture genes to the nearest valid combination in the normalised space.

Operators work in the normalised space `[0, 1]^n` (`encode` / `decode`): log genes are
uniform in log space there, int genes round to their step, choice genes map to their index.
"""

from __future__ import annotations

import difflib
import heapq
import itertools
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, Union

import numpy as np

from evo.genome import ARCHITECTURE_PREFIX, Genome, plain_value

if TYPE_CHECKING:  # optuna is imported lazily, only by `to_optuna`
    import optuna


class SpaceError(ValueError):
    """A bad search space or gene spec; the message is one line naming the gene."""


def _err(path: str, message: str) -> SpaceError:
    return SpaceError(f"search.{path}: {message}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _check_bool(path: str, name: str, v: Any) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise _err(path, f"{name} must be true or false, got {v!r}")
    return bool(v)


# ----------------------------------------------------------------------------------------------
# genes. Each gene maps one field's value to and from its coordinate in [0, 1] and knows its
# prior (`sample`); discrete genes (int, choice) also expose their domain by index for the
# constraint repair.


@dataclass(frozen=True)
class FloatGene:
    """A real-valued field in `[low, high]`, uniform or log-uniform."""

    path: str
    low: float
    high: float
    log: bool = False

    def __post_init__(self) -> None:
        for name in ("low", "high"):
            v = getattr(self, name)
            if not _is_number(v) or not math.isfinite(float(v)):
                raise _err(self.path, f"{name} must be a finite number, got {v!r}")
            object.__setattr__(self, name, float(v))
        object.__setattr__(self, "log", _check_bool(self.path, "log", self.log))
        if self.low >= self.high:
            raise _err(self.path, f"low ({self.low!r}) must be below high ({self.high!r})")
        if self.log and self.low <= 0:
            raise _err(self.path, f"log scale needs low > 0, got low ({self.low!r})")

    @property
    def is_architecture(self) -> bool:
        return self.path.startswith(ARCHITECTURE_PREFIX)

    def contains(self, v: Any) -> bool:
        return isinstance(v, float) and self.low <= v <= self.high

    def clip(self, v: Any) -> float:
        if not _is_number(v) or math.isnan(float(v)):
            raise _err(self.path, f"value {v!r} is not a number")
        return min(max(float(v), self.low), self.high)

    def encode(self, v: Any) -> float:
        if type(v) is not float or not self.low <= v <= self.high:   # (inside: clip is the identity)
            v = self.clip(v)
        if self.log:
            return (math.log(v) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        return (v - self.low) / (self.high - self.low)

    def decode(self, x: float) -> float:
        x = min(max(float(x), 0.0), 1.0)
        if x in (0.0, 1.0):  # the bounds exactly, not exp(log(bound)) give or take an ulp
            return self.high if x else self.low
        if self.log:
            v = math.exp(math.log(self.low) + x * (math.log(self.high) - math.log(self.low)))
        else:
            v = self.low + x * (self.high - self.low)
        return self.clip(v)

    def sample(self, rng: np.random.Generator) -> float:
        return self.decode(rng.random())

    def to_optuna(self) -> optuna.distributions.BaseDistribution:
        from optuna.distributions import FloatDistribution

        return FloatDistribution(self.low, self.high, log=self.log)


@dataclass(frozen=True)
class IntGene:
    """An integer field on the grid `low, low + step, ..., high`, uniform or log-uniform.

    As in Optuna, `log` needs `step == 1`; `high` must lie on the grid.
    """

    path: str
    low: int
    high: int
    log: bool = False
    step: int = 1

    def __post_init__(self) -> None:
        for name in ("low", "high", "step"):
            v = getattr(self, name)
            if not _is_int(v):
                raise _err(self.path, f"{name} must be an integer, got {v!r}")
            object.__setattr__(self, name, int(v))
        object.__setattr__(self, "log", _check_bool(self.path, "log", self.log))
        if self.step <= 0:
            raise _err(self.path, f"step ({self.step}) must be positive")
        if self.low >= self.high:
            raise _err(self.path, f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise _err(self.path, f"log scale needs low > 0, got low ({self.low})")
        if self.log and self.step != 1:
            raise _err(self.path, f"log scale needs step 1, got step ({self.step})")
        if (self.high - self.low) % self.step:
            top = self.low + (self.high - self.low) // self.step * self.step
            raise _err(
                self.path,
                f"high ({self.high}) must be low ({self.low}) plus a multiple of step "
                f"({self.step}), e.g. {top} or {top + self.step}",
            )

    @property
    def is_architecture(self) -> bool:
        return self.path.startswith(ARCHITECTURE_PREFIX)

    @property
    def size(self) -> int:
        return (self.high - self.low) // self.step + 1

    def value_at(self, i: int) -> int:
        return self.low + i * self.step

    def index(self, v: int) -> int:
        return (v - self.low) // self.step

    def encode_index(self, i: int) -> float:
        return self.encode(self.value_at(i))

    def contains(self, v: Any) -> bool:
        return (
            isinstance(v, int) and not isinstance(v, bool)
            and self.low <= v <= self.high and (v - self.low) % self.step == 0
        )

    def clip(self, v: Any) -> int:
        """The nearest grid value (halves round up), inside the bounds."""
        if _is_int(v):  # exact integer arithmetic: floor((v - low) / step + 1/2)
            i = (2 * (int(v) - self.low) + self.step) // (2 * self.step)
        elif _is_number(v) and not math.isnan(float(v)):
            f = float(v)
            if math.isinf(f):
                return self.low if f < 0 else self.high
            i = math.floor((f - self.low) / self.step + 0.5)
        else:
            raise _err(self.path, f"value {v!r} is not a number")
        return self.value_at(min(max(i, 0), self.size - 1))

    def encode(self, v: Any) -> float:
        if type(v) is not int or not self.low <= v <= self.high or (v - self.low) % self.step:   # (on the grid: clip is the identity)
            v = self.clip(v)
        if self.log:
            return (math.log(v) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        return (v - self.low) / (self.high - self.low)

    def decode(self, x: float) -> int:
        x = min(max(float(x), 0.0), 1.0)
        if self.log:
            return self.clip(math.exp(math.log(self.low) + x * (math.log(self.high) - math.log(self.low))))
        return self.clip(self.low + x * (self.high - self.low))

    def sample(self, rng: np.random.Generator) -> int:
        if self.log:  # log-uniform over [low - 1/2, high + 1/2] so the end points get a full share
            lo, hi = math.log(self.low - 0.5), math.log(self.high + 0.5)
            return self.clip(math.exp(rng.uniform(lo, hi)))
        return self.value_at(int(rng.integers(self.size)))

    def to_optuna(self) -> optuna.distributions.BaseDistribution:
        from optuna.distributions import IntDistribution

        return IntDistribution(self.low, self.high, log=self.log, step=self.step)


_CHOICE_TYPES = (type(None), bool, int, float, str)


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same type (so `1`, `1.0` and `True` are three different choices)."""
    return type(a) is type(b) and a == b


@dataclass(frozen=True)
class ChoiceGene:
    """A field taking one of a few plain values (None, bool, int, float, str); its
    coordinate is the index in `choices`, so their order defines the neighbours."""

    path: str
    choices: tuple

    def __post_init__(self) -> None:
        if isinstance(self.choices, (str, bytes, Mapping)) or not isinstance(self.choices, Sequence):
            raise _err(self.path, f"choices must be a list, got {self.choices!r}")
        if len(self.choices) == 0:
            raise _err(self.path, "choices must not be empty")
        choices = []
        for c in self.choices:
            c = plain_value(c) if isinstance(c, np.generic) else c
            if not isinstance(c, _CHOICE_TYPES):
                raise _err(self.path, f"choice {c!r} must be a number, string, bool or null")
            if any(_same(c, d) for d in choices):
                raise _err(self.path, f"choice {c!r} appears twice")
            choices.append(c)
        object.__setattr__(self, "choices", tuple(choices))

    @property
    def is_architecture(self) -> bool:
        return self.path.startswith(ARCHITECTURE_PREFIX)

    @property
    def size(self) -> int:
        return len(self.choices)

    def value_at(self, i: int) -> Any:
        return self.choices[i]

    def index(self, v: Any) -> int:
        for i, c in enumerate(self.choices):
            if _same(c, v):
                return i
        raise _err(self.path, f"{v!r} is not one of {list(self.choices)}")

    def encode_index(self, i: int) -> float:
        return i / (self.size - 1) if self.size > 1 else 0.0

    def contains(self, v: Any) -> bool:
        return any(_same(c, v) for c in self.choices)

    def clip(self, v: Any) -> Any:
        """The choice itself; else an equal number (`64.0` -> `64`); else the numerically
        nearest choice; else the first choice."""
        for c in self.choices:
            if _same(c, v):
                return c
        numeric = [c for c in self.choices if _is_number(c)]
        if _is_number(v) and not math.isnan(float(v)) and numeric:
            return min(numeric, key=lambda c: abs(c - v))  # first of equally near ones
        return self.choices[0]

    def encode(self, v: Any) -> float:
        return self.encode_index(self.index(self.clip(v)))

    def decode(self, x: float) -> Any:
        x = min(max(float(x), 0.0), 1.0)
        return self.choices[min(math.floor(x * (self.size - 1) + 0.5), self.size - 1)]

    def sample(self, rng: np.random.Generator) -> Any:
        return self.choices[int(rng.integers(self.size))]

    def to_optuna(self) -> optuna.distributions.BaseDistribution:
        from optuna.distributions import CategoricalDistribution

        return CategoricalDistribution(self.choices)


Gene = Union[FloatGene, IntGene, ChoiceGene]


# ----------------------------------------------------------------------------------------------
# the model's rules, given by whoever builds the space (evo knows no model)


@dataclass(frozen=True)
class ArchitectureRules:
    """What the space must know of the model whose fields its `model.*` genes set: the shape
    rules and the parameter count (for InternLM2, `trainers/architecture.py`'s; experiments/
    builds this from that module). Fields are named without the `model.` prefix.

    `shape_fields` are those `violations` reads, the first being a width the parameter count
    grows with; `size_fields` (integers) and `switch_fields` (booleans) those
    `count_parameters` reads. `violations(fields)` lists the rules broken by the fields given
    (absent ones are not checked)."""

    shape_fields: tuple[str, ...]
    size_fields: tuple[str, ...]
    switch_fields: tuple[str, ...]
    violations: Callable[[Mapping[str, Any]], list[str]]
    count_parameters: Callable[[Mapping[str, Any]], int]


# ----------------------------------------------------------------------------------------------
# the space


_GENE_KEYS = {"float": ("low", "high", "log"), "int": ("low", "high", "log", "step"), "choice": ("choices",)}
_REQUIRED_KEYS = {"float": ("low", "high"), "int": ("low", "high"), "choice": ("choices",)}
_SAMPLE_TRIES = 10_000  # rejection sampling gives up after this many genomes
_REPAIR_STEPS = 1_000   # a nearest-valid search gives up after this many candidates
_LARGEST_COMBINATIONS = 200_000   # largest_shape enumerates at most this many model.* combinations


def _suggest(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


class SearchSpace:
    """Genes (sorted by path) over a base config, with the model's architecture rules.

    `base` is the flattened full config `{"train.lr": 1e-3, "model.hidden_size": 64, ...}`:
    gene paths must be among its keys, and its `model.*` values stand in for the model
    fields that are not genes. `architecture` holds the model's shape rules and parameter
    count; without it the `model.*` genes are only kept inside their bounds, and a
    `max_params` budget cannot be kept. Raises `SpaceError` when no genome can satisfy the rules.
    """

    def __init__(self, genes: Sequence[Gene], base: Mapping[str, Any], max_params: int | None = None,
                 architecture: ArchitectureRules | None = None, head_dim: int | None = None):
        self.genes: tuple[Gene, ...] = tuple(sorted(genes, key=lambda g: g.path))
        self.paths: tuple[str, ...] = tuple(g.path for g in self.genes)
        self.base: dict[str, Any] = dict(base)
        self.max_params = max_params
        self.head_dim = head_dim
        self.architecture = architecture
        for g in self.genes:
            if not isinstance(g, (FloatGene, IntGene, ChoiceGene)):
                raise SpaceError(f"search: {g!r} is not a FloatGene, IntGene or ChoiceGene")
        for p1, p2 in zip(self.paths, self.paths[1:]):
            if p1 == p2:
                raise _err(p1, "appears twice")
        for g in self.genes:
            if g.path not in self.base:
                raise _err(g.path, "unknown field" + _suggest(g.path, sorted(self.base)))
        if max_params is not None and (not _is_int(max_params) or max_params <= 0):
            raise SpaceError(f"search: max_params must be a positive integer, got {max_params!r}")
        if max_params is not None and architecture is None:
            raise SpaceError("search: max_params needs the model's parameter count (SearchSpace(architecture=...))")
        if head_dim is not None and (not _is_int(head_dim) or head_dim <= 0 or head_dim % 2):
            raise SpaceError(f"search: head_dim must be a positive even integer, got {head_dim!r}")
        if head_dim is not None and architecture is None:
            raise SpaceError("search: head_dim needs the model's shape rules (SearchSpace(architecture=...))")
        self._by_path = {g.path: g for g in self.genes}
        n = len(ARCHITECTURE_PREFIX)
        self._base_fields = {p[n:]: v for p, v in self.base.items() if p.startswith(ARCHITECTURE_PREFIX)}
        self._constrained = self._constrained_genes()
        self._smallest = self._smallest_valid()
        self._largest: dict[str, Any] | None = None   # largest_shape(), found on first use

    # -- construction helpers --------------------------------------------------------------

    def _known(self, field: str) -> bool:
        path = ARCHITECTURE_PREFIX + field
        return path in self._by_path or self.base.get(path) is not None

    def _constrained_genes(self) -> tuple[IntGene | ChoiceGene, ...]:
        """The model genes some active rule reads (integers >= 1, or booleans for a switch)."""
        rules = self.architecture
        if rules is None:
            return ()
        fields: set[str] = set()
        if all(self._known(f) for f in rules.shape_fields):
            fields |= set(rules.shape_fields)
        elif self.head_dim is not None:
            raise SpaceError("search: head_dim needs model.hidden_size and model.num_attention_heads in the base config")
        if self.max_params is not None:
            for f in rules.size_fields:
                if not self._known(f):
                    raise SpaceError(f"search: max_params needs model.{f} in the base config")
            fields |= set(rules.size_fields) | set(rules.switch_fields)
        out = []
        for f in sorted(fields):
            path = ARCHITECTURE_PREFIX + f
            g = self._by_path.get(path)
            if f in rules.switch_fields:
                if g is None:
                    values = [self.base.get(path, False)]
                elif isinstance(g, ChoiceGene):
                    values = list(g.choices)
                else:
                    values = ["not a choice gene"]
                if any(not isinstance(v, (bool, type(None))) for v in values):
                    raise _err(path, "must be true or false (a choice gene of booleans)")
            elif g is None:
                if not _is_int(self.base[path]) or self.base[path] < 1:
                    raise SpaceError(f"search: base {path} must be a positive integer, got {self.base[path]!r}")
            elif isinstance(g, IntGene):
                if g.low < 1:
                    raise _err(path, f"must be at least 1, got low ({g.low})")
            elif isinstance(g, ChoiceGene):
                if any(not _is_int(c) or c < 1 for c in g.choices):
                    raise _err(path, f"choices must be positive integers, got {list(g.choices)}")
            else:
                raise _err(path, "must be an int or choice gene (it is an integer field)")
            if g is not None:
                out.append(g)
        return tuple(out)

    def _domain(self, field: str) -> list:
        """Sorted possible values of a model field (a gene's domain, or the base value)."""
        path = ARCHITECTURE_PREFIX + field
        g = self._by_path.get(path)
        if g is None:
            v = self.base.get(path)
            return [False if v is None and field in self.architecture.switch_fields else v]
        return sorted(g.value_at(i) for i in range(g.size))

    def _smallest_valid(self) -> dict[str, Any]:
        """The valid values of the constrained genes with the fewest parameters (the target
        of last resort for `clip`); raises SpaceError if there is none."""
        rules = self.architecture
        if rules is None:
            return {}
        if not self._constrained and not self._shape_violations(self._fields({})):
            if self.max_params is None or rules.count_parameters(self._fields({})) <= self.max_params:
                return {}
        width, *others = rules.shape_fields
        widths = self._domain(width)
        smallest = {f: self._domain(f)[0] for f in (*rules.size_fields, *rules.switch_fields)
                    if f not in rules.shape_fields}
        best, best_count = None, None
        broken: list[str] = []   # the rules the first combination broke: the example in the error
        for combo in itertools.product(*(self._domain(f) for f in others)):
            shape = dict(zip(others, combo))
            if self._shape_violations(shape):
                broken = broken or self._shape_violations(shape)
                continue
            # parameters grow with the width, so the smallest valid one is best for this combination
            w = next((w for w in widths if not self._shape_violations({**shape, width: w})), None)
            if w is None:
                broken = broken or self._shape_violations({**shape, width: widths[0]})
                continue
            f = {**smallest, **shape, width: w}
            n = rules.count_parameters(f) if self.max_params is not None else 0
            if best_count is None or n < best_count:
                best, best_count = f, n
        names = ", ".join(g.path for g in self._constrained) or "the base model fields"
        if best is None:
            example = broken or self._shape_violations(self._fields({}))
            raise SpaceError(f"search: no combination of {names} satisfies the model's shape rules"
                             + (f" (e.g. {example[0]})" if example else ""))
        if self.max_params is not None and best_count > self.max_params:
            at = ", ".join(f"{g.path}={best[g.path[len(ARCHITECTURE_PREFIX):]]}" for g in self._constrained)
            raise SpaceError(
                f"search: max_params ({self.max_params}) is below the smallest architecture in the space "
                f"({best_count} parameters" + (f" at {at})" if at else ")")
            )
        return {g.path: best[g.path[len(ARCHITECTURE_PREFIX):]] for g in self._constrained}

    # -- constraints -------------------------------------------------------------------------

    def _shape_violations(self, fields: Mapping[str, Any]) -> list[str]:
        """The model's shape rules `fields` break, and the fixed `head_dim` if one is set."""
        broken = self.architecture.violations(fields)
        hidden, heads = fields.get("hidden_size"), fields.get("num_attention_heads")
        if self.head_dim is not None and hidden is not None and heads is not None and hidden != heads * self.head_dim:
            broken.append(f"hidden_size ({hidden}) must be num_attention_heads ({heads}) x head_dim ({self.head_dim})")
        return broken

    def _fields(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Model fields (no prefix): the base's, overridden by `values`' model genes."""
        n = len(ARCHITECTURE_PREFIX)
        f = dict(self._base_fields)
        f.update({p[n:]: v for p, v in values.items() if p.startswith(ARCHITECTURE_PREFIX)})
        return f

    def _violations(self, values: Mapping[str, Any]) -> list[str]:
        """The constraints `values` (path -> value of every gene) break; [] when valid."""
        if not self._constrained and self._smallest == {}:
            return []  # nothing can vary: the base was checked at construction
        f = self._fields(values)
        broken = self._shape_violations(f)
        if self.max_params is not None:
            n = self.architecture.count_parameters(f)
            if n > self.max_params:
                broken.append(f"parameters ({n}) must not exceed max_params ({self.max_params})")
        return broken

    def _violation(self, values: Mapping[str, Any]) -> str | None:
        broken = self._violations(values)
        return broken[0] if broken else None

    def _repair(self, values: dict[str, Any]) -> dict[str, Any]:
        """`values` with the constrained genes moved to a valid combination nearby.

        First the nearest valid combination in the normalised space, when a short search
        finds it (always, for spaces of choices and coarse steps). Otherwise -- fine-grained
        genes far from a budget -- the shape genes alone are repaired at points on the line
        from `values` toward the smallest architecture, and bisection finds the point nearest
        `values` that also fits the budget (the end of the line always does).
        """
        if self._violation(values) is None:
            return values
        found = self._nearest(values, self._constrained, lambda v: self._violation(v) is None)
        if found is not None:
            return found
        rules = self.architecture
        shape_genes = [g for g in self._constrained if g.path[len(ARCHITECTURE_PREFIX):] in rules.shape_fields]
        genes = self._constrained
        x = np.array([g.encode(values[g.path]) for g in genes])  # (c,)
        target = np.array([g.encode(self._smallest[g.path]) for g in genes])  # (c,)
        best = {**values, **self._smallest}
        lo, hi = 0.0, 1.0  # invariant: the point at `hi` repairs to `best`, which is valid
        for _ in range(24):
            mid = 0.5 * (lo + hi)
            point = dict(values)
            for g, xi in zip(genes, x + mid * (target - x)):
                point[g.path] = g.decode(xi)
            fixed = self._nearest(point, shape_genes, lambda v: not self._shape_violations(self._fields(v)))
            if fixed is not None and self._violation(fixed) is None:
                hi, best = mid, fixed
            else:
                lo = mid
        return best

    def _nearest(
        self, values: dict[str, Any], genes: Sequence[IntGene | ChoiceGene], ok: Callable[[dict[str, Any]], bool]
    ) -> dict[str, Any] | None:
        """The nearest `ok` assignment of `genes` (squared distance in the normalised space),
        or None if none is among the first `_REPAIR_STEPS` candidates.

        Best-first walk over the genes' domains (the k-smallest-sums walk: a candidate's
        successors step one gene one value further out from `values`); ties go to the
        lower index."""
        rings = [_Outward(g, values[g.path]) for g in genes]
        start = (0,) * len(genes)
        heap, seen = [(0.0, start)], {start}
        for _ in range(_REPAIR_STEPS):
            if not heap:
                return None
            _, idx = heapq.heappop(heap)
            cand = dict(values)
            for g, ring, j in zip(genes, rings, idx):
                cand[g.path] = ring.value(j)
            if ok(cand):
                return cand
            for i, ring in enumerate(rings):
                nxt = idx[:i] + (idx[i] + 1,) + idx[i + 1:]
                if nxt not in seen and ring.has(idx[i] + 1):
                    seen.add(nxt)
                    heapq.heappush(heap, (sum(r.cost(j) for r, j in zip(rings, nxt)), nxt))
        return None

    # -- public API --------------------------------------------------------------------------

    @classmethod
    def from_dict(
        cls, spec: Mapping[str, Mapping], base: Mapping[str, Any], max_params: int | None = None,
        architecture: ArchitectureRules | None = None, head_dim: int | None = None,
    ) -> SearchSpace:
        """Parse the YAML `search:` mapping, e.g.
        `{"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
          "model.num_hidden_layers": {"type": "int", "low": 1, "high": 4},
          "train.schedule": {"type": "choice", "choices": ["cosine", "constant"]}}`."""
        if not isinstance(spec, Mapping):
            raise SpaceError(f"search: expected a mapping of field path to gene, got {spec!r}")
        genes: list[Gene] = []
        for path, gspec in spec.items():
            if not isinstance(path, str):
                raise SpaceError(f"search: gene names must be dotted field paths, got {path!r}")
            if path not in base:
                raise _err(path, "unknown field" + _suggest(path, sorted(base)))
            if not isinstance(gspec, Mapping):
                raise _err(path, f"expected a mapping with a 'type' (float, int or choice), got {gspec!r}")
            kind = gspec.get("type")
            if kind is None:
                raise _err(path, "missing 'type' (float, int or choice)")
            if not isinstance(kind, str) or kind not in _GENE_KEYS:
                raise _err(
                    path, f"unknown type {kind!r} (expected float, int or choice)" + _suggest(str(kind), list(_GENE_KEYS))
                )
            for key in gspec:
                if key != "type" and key not in _GENE_KEYS[kind]:
                    raise _err(path, f"unknown key {key!r} for a {kind} gene" + _suggest(str(key), _GENE_KEYS[kind]))
            for key in _REQUIRED_KEYS[kind]:
                if key not in gspec:
                    raise _err(path, f"missing {key!r}")
            args = {k: v for k, v in gspec.items() if k != "type"}
            genes.append({"float": FloatGene, "int": IntGene, "choice": ChoiceGene}[kind](path, **args))
        return cls(genes, base, max_params, architecture, head_dim)

    def gene(self, path: str) -> Gene:
        return self._by_path[path]

    def __len__(self) -> int:
        return len(self.genes)

    def __repr__(self) -> str:
        budget = f", max_params={self.max_params}" if self.max_params is not None else ""
        budget += f", head_dim={self.head_dim}" if self.head_dim is not None else ""
        return f"SearchSpace({list(self.genes)!r}{budget})"

    def _values(self, genome: Genome) -> dict[str, Any]:
        d = genome.as_dict()
        for path in self.paths:
            if path not in d:
                raise _err(path, f"genome {genome.id} has no value for this gene")
        return d

    def sample(self, rng: np.random.Generator) -> Genome:
        """A genome drawn from the genes' priors, conditioned on the constraints (rejection)."""
        failures: Counter[str] = Counter()
        for _ in range(_SAMPLE_TRIES):
            values = {g.path: g.sample(rng) for g in self.genes}
            broken = self._violations(values)
            if not broken:
                return Genome.from_dict(values)
            failures.update(re.sub(r" \([^()]*\)", "", b) for b in broken)  # the rules, no numbers
        worst = failures.most_common(1)[0][0]
        raise SpaceError(
            f"search: none of {_SAMPLE_TRIES} sampled genomes satisfied the constraints "
            f"(most often broken: {worst}); widen the ranges of {', '.join(g.path for g in self._constrained)}"
            + (" or raise max_params" if self.max_params is not None else "")
        )

    def sample_at_base(self, rng: np.random.Generator) -> Genome:
        """A genome at the base shape: every architecture gene at the base config's value, the
        other genes drawn from their priors (with no architecture genes, the same draws as
        `sample`). Raises `SpaceError` when the base shape is outside the space."""
        values = {g.path: self.base[g.path] for g in self.genes if g.is_architecture}
        for path, v in values.items():
            if not self._by_path[path].contains(v):
                raise _err(path, f"the base value {v!r} is not one of the gene's values, so members cannot start at the base shape")
        broken = self._violations(values)   # the constraints are on the model fields alone
        if broken:
            raise SpaceError(f"search: the base shape breaks the constraints ({broken[0]}), so members cannot start at it")
        return self._at_shape(rng, values)

    def sample_at_largest(self, rng: np.random.Generator) -> Genome:
        """A genome at `largest_shape()`, the other genes drawn from their priors with the same
        draws `sample_at_base` makes (so a member started at either shape gets the same train.lr
        from the same rng state). Raises `SpaceError` as `largest_shape` does."""
        return self._at_shape(rng, self.largest_shape())

    def _at_shape(self, rng: np.random.Generator, shape: Mapping[str, Any]) -> Genome:
        return Genome.from_dict({**{g.path: g.sample(rng) for g in self.genes if not g.is_architecture}, **shape})

    def largest_shape(self) -> dict[str, Any]:
        """The architecture genes' values with the most parameters that the constraints allow
        (the first such in the genes' order when several tie); a float architecture gene stays
        at its base value, and a space without architecture genes has only the base shape.
        Enumerates the int and choice architecture genes' domains once (later calls return a copy
        of the first answer), so it refuses (`SpaceError`) more than `_LARGEST_COMBINATIONS` of
        them, a space without model rules to count parameters by, and one where no combination
        meets the constraints."""
        if self._largest is None:
            self._largest = self._find_largest()
        return dict(self._largest)

    def _find_largest(self) -> dict[str, Any]:
        genes = [g for g in self.genes if g.is_architecture and not isinstance(g, FloatGene)]
        if genes and self.architecture is None:
            raise SpaceError("search: finding the largest shape needs the model's rules (SearchSpace(architecture=...))")
        fixed = {g.path: self.base[g.path] for g in self.genes if g.is_architecture and isinstance(g, FloatGene)}
        for path, v in fixed.items():
            if not self._by_path[path].contains(v):
                raise _err(path, f"the base value {v!r} is outside the gene, so the largest shape cannot keep it")
        n = math.prod(g.size for g in genes)
        if n > _LARGEST_COMBINATIONS:
            raise SpaceError(f"search: the model.* genes have {n:,} combinations, more than the "
                             f"{_LARGEST_COMBINATIONS:,} the largest shape is searched among; coarsen their grids")
        best, best_n = None, -1
        for combo in itertools.product(*(range(g.size) for g in genes)):
            values = {**fixed, **{g.path: g.value_at(i) for g, i in zip(genes, combo)}}
            if self._violations(values):
                continue
            count = self.architecture.count_parameters(self._fields(values)) if genes else 0
            if count > best_n:
                best, best_n = values, count
        if best is None:
            raise SpaceError("search: no combination of the model.* genes meets the constraints, so there is no largest shape")
        return best

    def contains(self, genome: Genome) -> bool:
        """Exactly the gene paths, each value inside its gene (type included), constraints met."""
        d = genome.as_dict()
        if set(d) != set(self.paths):
            return False
        return all(g.contains(d[g.path]) for g in self.genes) and self._violation(d) is None

    def clip(self, genome: Genome) -> Genome:
        """The genome moved into the space: each gene into its bounds / grid / choices, then the
        architecture genes repaired to the nearest valid combination. Paths that are not genes
        are dropped; a missing gene is an error. Idempotent; the identity inside the space."""
        d = self._values(genome)
        values = {g.path: g.clip(d[g.path]) for g in self.genes}
        return Genome.from_dict(self._repair(values))

    def encode(self, genome: Genome) -> np.ndarray:
        """Coordinates in `[0, 1]^n`, one per gene in `paths` order."""
        return np.array(self.encode_list(genome), dtype=np.float64)  # (n,)

    def encode_list(self, genome: Genome) -> list[float]:
        """`encode` as a list of Python floats (the same numbers, without the array: a GA
        round compares and stacks thousands of them)."""
        d = self._values(genome)
        return [g.encode(d[g.path]) for g in self.genes]

    def decode(self, x: np.ndarray) -> Genome:
        """The genome at coordinates `x` (clamped to `[0, 1]`, rounded, repaired into the space)."""
        x = np.asarray(x, dtype=np.float64)
        if x.shape != (len(self.genes),):
            raise ValueError(f"search: decode needs a vector of {len(self.genes)} coordinates, got shape {x.shape}")
        if np.isnan(x).any():
            raise ValueError(f"search: decode got NaN for {self.paths[int(np.flatnonzero(np.isnan(x))[0])]}")
        values = {g.path: g.decode(xi) for g, xi in zip(self.genes, x)}
        return Genome.from_dict(self._repair(values))

    def decode_rows(self, x: np.ndarray) -> list[Genome]:
        """`decode` of each row of `x` [k, G], checked once for the whole matrix and decoded a
        column (gene) at a time on Python floats: the same genomes as `decode` row by row."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.genes):
            raise ValueError(f"search: decode needs rows of {len(self.genes)} coordinates, got shape {x.shape}")
        nan = np.isnan(x)
        if nan.any():
            raise ValueError(f"search: decode got NaN for {self.paths[int(np.flatnonzero(nan.any(axis=0))[0])]}")
        columns = [_decode_column(g, col) for g, col in zip(self.genes, x.T)]   # G lists of k values
        paths = self.paths
        return [Genome.from_dict(self._repair(dict(zip(paths, row)))) for row in zip(*columns)]

    def model_fields(self, genome: Genome) -> dict[str, Any]:
        """The base `model.*` fields merged with the genome's model genes, without the prefix
        (ready for `InternLM2Config(**fields)`)."""
        return self._fields(genome.as_dict())

    def count_parameters(self, genome: Genome) -> int:
        """Parameter count of the genome's model (needs the space's `architecture`)."""
        if self.architecture is None:
            raise SpaceError("search: counting parameters needs the model's rules (SearchSpace(architecture=...))")
        return self.architecture.count_parameters(self.model_fields(genome))

    def to_optuna(self) -> dict[str, optuna.distributions.BaseDistribution]:
        """`{path: distribution}` for Optuna (samplers, and the dashboard mirror study)."""
        return {g.path: g.to_optuna() for g in self.genes}


def _decode_column(gene: Any, x: np.ndarray) -> list[Any]:
    """`[gene.decode(v) for v in x]`, as array operations for a linear float gene and a choice
    gene (the same IEEE operations, so the same values) and one value at a time otherwise."""
    if isinstance(gene, FloatGene) and not gene.log:
        x = np.clip(x, 0.0, 1.0)
        v = np.minimum(np.maximum(gene.low + x * (gene.high - gene.low), gene.low), gene.high)
        return np.where(x == 1.0, gene.high, np.where(x == 0.0, gene.low, v)).tolist()
    if isinstance(gene, ChoiceGene):
        x = np.clip(x, 0.0, 1.0)
        index = np.minimum(np.floor(x * (gene.size - 1) + 0.5), gene.size - 1).astype(np.int64)
        return [gene.choices[i] for i in index.tolist()]
    return list(map(gene.decode, x.tolist()))


class _Outward:
    """The domain of a discrete gene walked outward from a centre value, nearest first
    (distance in the normalised space; ties go to the lower index)."""

    def __init__(self, gene: IntGene | ChoiceGene, value: Any):
        self.gene = gene
        centre = gene.index(value)
        self.origin = gene.encode_index(centre)
        self.order, self.costs = [centre], [0.0]
        self.left, self.right = centre - 1, centre + 1

    def has(self, j: int) -> bool:
        while len(self.order) <= j:
            dl = (self.origin - self.gene.encode_index(self.left)) ** 2 if self.left >= 0 else math.inf
            dr = (self.gene.encode_index(self.right) - self.origin) ** 2 if self.right < self.gene.size else math.inf
            if dl == math.inf and dr == math.inf:
                return False
            if dl <= dr:
                self.order.append(self.left)
                self.costs.append(dl)
                self.left -= 1
            else:
                self.order.append(self.right)
                self.costs.append(dr)
                self.right += 1
        return True

    def value(self, j: int) -> Any:
        return self.gene.value_at(self.order[j])

    def cost(self, j: int) -> float:
        return self.costs[j]

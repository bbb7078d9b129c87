"""The genome: one member's gene values, an immutable mapping from config path to value.

A genome is what strategies produce and what the driver applies to a member: `train.*`
paths are hyperparameters (set in place on the running trainer), `model.*` paths are
architecture genes (need a weight transfer). It is a frozen dataclass of plain, JSON-friendly
Python values so that it pickles to Ray workers (no DEAP `creator` classes) and its `id` --
a hash of its canonical JSON -- is the same in every process.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

ARCHITECTURE_PREFIX = "model."


def plain_value(value: Any, path: str = "value") -> Any:
    """`value` as a plain, JSON-friendly Python value (numpy scalars and arrays converted,
    lists turned into tuples so the genome stays immutable)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (int, float)):
        # bool is handled above; int/float subclasses (e.g. IntEnum) become the base type
        return float(value) if isinstance(value, float) else int(value)
    if isinstance(value, np.ndarray):
        return tuple(plain_value(v, path) for v in value.tolist())
    if isinstance(value, (list, tuple)):
        return tuple(plain_value(v, path) for v in value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{path}: mapping keys must be strings, got {k!r}")
            out[k] = plain_value(v, f"{path}.{k}")
        return out
    raise TypeError(f"{path}: {type(value).__name__} value {value!r} is not a plain JSON value")


_PLAIN = frozenset({str, int, float, bool, type(None)})


def _path(item: tuple[str, Any]) -> str:
    return item[0]


@dataclass(frozen=True, eq=False)
class Genome:
    """Gene values as `((path, value), ...)` sorted by path.

    Two genomes are equal when their canonical JSON is equal (so `1` and `1.0` differ, as
    they do in a config file); the hash follows the same rule.
    """

    values: tuple[tuple[str, Any], ...]

    def __post_init__(self) -> None:
        # values that are plain already (nearly all: genomes are built from genomes) skip plain_value
        items = [(p, v) if type(p) is str and type(v) in _PLAIN else (str(p), plain_value(v, str(p)))
                 for p, v in self.values]
        items.sort(key=_path)
        for (p1, _), (p2, _) in zip(items, items[1:]):
            if p1 == p2:
                raise ValueError(f"genome: path {p1!r} appears twice")
        object.__setattr__(self, "values", tuple(items))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Genome:
        return cls(tuple(d.items()))

    def as_dict(self) -> dict[str, Any]:
        return dict(self.values)

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(p for p, _ in self.values)

    def __getitem__(self, path: str) -> Any:
        for p, v in self.values:
            if p == path:
                return v
        raise KeyError(path)

    def __contains__(self, path: object) -> bool:
        return any(p == path for p, _ in self.values)

    def __len__(self) -> int:
        return len(self.values)

    def replace(self, updates: Mapping[str, Any]) -> Genome:
        """A new genome with `updates` applied (new paths are added)."""
        d = self.as_dict()
        d.update(updates)
        return Genome.from_dict(d)

    def hyperparameters(self) -> dict[str, Any]:
        """The genes that can change in place (every path not under `model.`), full paths."""
        return dict(self._hyperparameter_items)   # a new dict each call

    @functools.cached_property
    def _hyperparameter_items(self) -> tuple[tuple[str, Any], ...]:
        # found once per genome: PB2 asks every member's, every round, of genomes that persist
        return tuple((p, v) for p, v in self.values if not p.startswith(ARCHITECTURE_PREFIX))

    def architecture(self) -> dict[str, Any]:
        """The `model.*` genes (changing them changes the model's shape), full paths."""
        return {p: v for p, v in self.values if p.startswith(ARCHITECTURE_PREFIX)}

    @functools.cached_property
    def canonical(self) -> str:
        """Canonical JSON of the values: sorted keys, no spaces, floats as `repr`."""
        return _canonical_json(self.as_dict())

    @property
    def id(self) -> str:
        """12 hex chars of the SHA-256 of the canonical JSON: stable across processes and runs."""
        return hashlib.sha256(self.canonical.encode("utf-8")).hexdigest()[:12]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Genome):
            return NotImplemented
        return self.canonical == other.canonical

    def __hash__(self) -> int:
        return hash(self.canonical)

    def __repr__(self) -> str:
        inner = ", ".join(f"{p}={_format_value(v)}" for p, v in self.values)
        return f"Genome({inner})"


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


_MISSING = object()


def diff(a: Genome, b: Genome) -> dict[str, tuple[Any, Any]]:
    """`{path: (value in a, value in b)}` for every path whose value differs, sorted by path.
    A path present in only one genome shows `None` on the other side."""
    da, db = a.as_dict(), b.as_dict()
    out: dict[str, tuple[Any, Any]] = {}
    for path in sorted(set(da) | set(db)):
        va, vb = da.get(path, _MISSING), db.get(path, _MISSING)
        if va is _MISSING or vb is _MISSING or not _same_json(va, vb):
            out[path] = (None if va is _MISSING else va, None if vb is _MISSING else vb)
    return out


def _same_json(va: Any, vb: Any) -> bool:
    """Whether two values have the same canonical JSON (scalars compared without encoding)."""
    t = type(va)
    if t is type(vb):
        if t is float:
            return repr(va) == repr(vb)   # JSON writes a float as its repr: 0.0 and -0.0 differ, nan equals nan
        if t in (int, str, bool, type(None)):
            return va == vb
    return _canonical_json(va) == _canonical_json(vb)


def format_diff(a: Genome, b: Genome, changes: dict[str, tuple[Any, Any]] | None = None) -> str:
    """One readable line of what changed from `a` to `b`, for lineage records, e.g.
    `"model.num_hidden_layers 2→3, train.lr 1e-03→1.2e-03"`; floats with 3 significant
    digits; `""` when nothing changed. `changes`: `diff(a, b)` if the caller has it already."""
    changes = diff(a, b) if changes is None else changes
    return ", ".join(f"{path} {_format_change(va, vb)}" for path, (va, vb) in changes.items())


def _format_change(va: Any, vb: Any) -> str:
    """`old→new`, with as many significant digits as it takes for a real change to show."""
    if isinstance(va, float) and isinstance(vb, float):
        for digits in range(3, 18):
            fa, fb = format_float(va, digits), format_float(vb, digits)
            if fa != fb:
                return f"{fa}→{fb}"
    return f"{_format_value(va)}→{_format_value(vb)}"


def _format_value(v: Any) -> str:
    if isinstance(v, float):
        return format_float(v)
    if isinstance(v, tuple):
        return "(" + ", ".join(_format_value(x) for x in v) + ")"
    return str(v)


def format_float(x: float, digits: int = 3) -> str:
    """`digits` significant digits: plain notation between 0.01 and 10^4, scientific outside
    (`1e-03`, `1.2e-03`, `0.95`, `3.14`, `1.23e+04`)."""
    if x == 0 or not math.isfinite(x):
        return str(x) if not math.isfinite(x) else "0"
    if 1e-2 <= abs(x) < 1e4:
        return f"{x:.{digits}g}"
    mantissa, exponent = f"{x:.{digits - 1}e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{exponent}"

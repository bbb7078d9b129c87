"""The experiment config: one YAML file composed of each package's own sub-config.

A YAML file (``experiments/*.yaml``) has the sections below; every section is optional and
falls back to its dataclass defaults::

    name: quickstart          # run name (default: the file's stem); [A-Za-z0-9._-]+
    seed: 0                   # run seed: every random choice derives from it
    storage: runs             # run store root: a directory or an fsspec URI (s3://..., file://...)
    data:       trainers.data.DataConfig
    model:      trainers.model.InternLM2Config   (vocab_size derived from the tokenizer)
    train:      trainers.trainer.TrainConfig     (base hyperparameters)
    search:     {"train.lr": {type: float, low: .., high: .., log: true}, ...}  -> evo.space.SearchSpace
    strategy:   evo.strategy.StrategyConfig
    population: population.config.PopulationConfig
    logging:    population.config.LoggingConfig

Loading is strict because a typo that passes silently costs a whole search: unknown keys are
refused with the nearest valid key, values are type-checked against the dataclass fields, and
every problem is reported as :class:`ConfigError` with a one-line message that says where it
came from (``file:line`` or ``--set key=value``) and names the field.

``--set a.b.c=value`` overrides are applied to the parsed mapping before validation; the value
is parsed as YAML (``1e-3``-style numbers, ``true``, ``[a, b]`` work). In ``search`` the gene
path is the two components after ``search`` (``search.train.lr.high=0.1``); setting a gene to
``null`` removes it.

Besides genes, ``search`` may hold ``max_params: N``, a parameter budget for the architecture
genes (``SearchSpace(max_params=N)``): no genome above it is ever proposed.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from evo.space import ArchitectureRules, FloatGene, IntGene, SearchSpace
from evo.strategies import StrategyConfig
from population.config import LoggingConfig, PopulationConfig
from population.config import SearchSetup
from trainers import architecture
from trainers.data import DataConfig
from trainers.model import InternLM2Config
from trainers.trainer import TrainConfig

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]+")
# The space keeps its model genes to shapes InternLM2Config accepts, by the same rules.
INTERNLM2_RULES = ArchitectureRules(architecture.SHAPE_FIELDS, architecture.SIZE_FIELDS, architecture.SWITCH_FIELDS,
                                    architecture.shape_violations, architecture.count_parameters)
BYTES_VOCAB = 256


class ConfigError(ValueError):
    """Anything wrong with an experiment config; the message is one line (no newline)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclass
class ExperimentConfig:
    """A fully validated experiment: each part's own config, plus the search spec as a mapping
    (validated by building the space; every gene's defaults written out, so it round-trips)."""

    name: str
    seed: int = 0
    storage: str = "runs"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: InternLM2Config = dataclasses.field(default_factory=InternLM2Config)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    search: dict[str, dict] = dataclasses.field(default_factory=dict)
    strategy: StrategyConfig = dataclasses.field(default_factory=StrategyConfig)
    population: PopulationConfig = dataclasses.field(default_factory=PopulationConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)


# ------------------------------------------------------------------------------------------
# public API


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Parse, override and validate the YAML file at ``path`` (name defaults to its stem)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    try:
        raw = yaml.safe_load(text)
        lines = _key_lines(yaml.compose(text)) if raw is not None else {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}: could not parse YAML: {problem}") from None
    if raw is None:
        raise ConfigError(f"{path}: the config is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {_kind(raw)}")
    return _resolve(raw, list(overrides), _Origin(str(path), lines), default_name=path.stem)


def config_from_dict(d: Mapping[str, Any], overrides: Iterable[str] = (),
                     source: str = "config") -> ExperimentConfig:
    """Validate a mapping (e.g. a stored ``config.yaml``) exactly as :func:`load_config` does."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {_kind(d)}")
    return _resolve(copy.deepcopy(dict(d)), list(overrides), _Origin(source, {}), default_name=None)


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The fully resolved config (every default filled in) as plain YAML-able data.

    ``config_from_dict(config_to_dict(cfg)) == cfg``; this is what the run store keeps.
    """
    out: dict[str, Any] = {}
    for f in dataclasses.fields(ExperimentConfig):
        value = getattr(cfg, f.name)
        out[f.name] = _plain(dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value)
    return out


def build_space(cfg: ExperimentConfig) -> SearchSpace:
    """The search space of ``cfg``: its genes over the resolved train/model configs."""
    genes = {k: v for k, v in cfg.search.items() if k != "max_params"}
    try:
        return SearchSpace.from_dict(genes, base=_space_base(cfg), max_params=cfg.search.get("max_params"),
                                     architecture=INTERNLM2_RULES)
    except (ValueError, TypeError) as e:
        raise ConfigError(_prefixed("search", e)) from None


def build_setup(cfg: ExperimentConfig) -> SearchSetup:
    """What the driver needs to run (or resume) ``cfg``."""
    return SearchSetup(
        name=cfg.name, seed=cfg.seed, storage=cfg.storage,
        data=cfg.data, model=cfg.model, train=cfg.train, space=build_space(cfg),
        strategy=cfg.strategy, population=cfg.population, logging=cfg.logging,
        config=config_to_dict(cfg),
    )


# ------------------------------------------------------------------------------------------
# resolution: overrides -> keys -> values -> cross-section checks -> search space


@dataclass
class _Origin:
    """Where keys came from, to say ``file:line`` or ``--set k=v`` in a message."""

    source: str
    lines: dict[tuple[str, ...], int]
    overrides: list[tuple[tuple[str, ...], str]] = dataclasses.field(default_factory=list)

    def where(self, path: tuple[str, ...]) -> str:
        """The source that shares the longest key prefix with ``path``: an override (which
        wins ties, as it was applied last), else the file line of ``path`` or its nearest parent."""
        best, best_len = self.source, 0
        for n in range(len(path), 0, -1):
            if path[:n] in self.lines:
                best, best_len = f"{self.source}:{self.lines[path[:n]]}", n
                break
        for opath, text in reversed(self.overrides):
            common = next((i for i, (a, b) in enumerate(zip(opath, path)) if a != b), min(len(opath), len(path)))
            if common >= max(best_len, 1):
                best, best_len = f"--set {text}", common
                break
        return best

    def where_message(self, section: tuple[str, ...], message: str) -> str:
        """Location of a sub-config's error: the field it names if found, else the section."""
        # "population.size: ..." names population.size; "model: hidden_size (66) ..." model.hidden_size
        m = re.match(r"([A-Za-z_][\w.]*)(?::\s+([A-Za-z_][\w.]*)\s+\()?", message)
        named = tuple(m.group(1).strip(".").split(".")) if m else ()
        if m and m.group(2) and len(named) == 1:
            named += tuple(m.group(2).split("."))
        if named[:1] == ("search",) and len(named) >= 3:  # gene paths contain a dot: search.train.lr
            named = ("search", f"{named[1]}.{named[2]}", *named[3:])
        path = named if named[: len(section)] == section else section
        return self.where(path)


def _resolve(raw: dict, overrides: list[str], origin: _Origin,
             default_name: str | None) -> ExperimentConfig:
    for text in overrides:
        origin.overrides.append((_apply_override(raw, text), text))

    hints = _hints(ExperimentConfig)
    for key in raw:
        if key not in hints:
            raise _unknown((str(key),), list(hints), origin.where((str(key),)))

    name = raw.get("name", default_name)
    if name is None:
        raise ConfigError(f"{origin.source}: name: missing (give the run a name)")
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise ConfigError(f"{origin.where(('name',))}: name: must match [A-Za-z0-9._-]+, got {name!r}")
    seed = _coerce(raw.get("seed", 0), int, ("seed",), origin)
    storage = raw.get("storage", "runs")
    if not isinstance(storage, str) or not storage.strip():
        raise ConfigError(f"{origin.where(('storage',))}: storage: must be a non-empty path or URI, got {storage!r}")

    data = _section(DataConfig, raw, "data", origin)
    model_raw = _mapping(raw.get("model"), ("model",), origin)
    vocab = BYTES_VOCAB if data.tokenizer == "bytes" else data.vocab_size
    if "vocab_size" in model_raw and model_raw["vocab_size"] != vocab:
        raise ConfigError(
            f"{origin.where(('model', 'vocab_size'))}: model.vocab_size ({model_raw['vocab_size']!r}) does not "
            f"match the {data.tokenizer} tokenizer's vocabulary ({vocab}); leave it out to derive it")
    model_raw["vocab_size"] = vocab
    model = _build(InternLM2Config, model_raw, ("model",), origin)
    train = _section(TrainConfig, raw, "train", origin)
    strategy = _section(StrategyConfig, raw, "strategy", origin)
    population = _section(PopulationConfig, raw, "population", origin)
    logging = _section(LoggingConfig, raw, "logging", origin)
    search = _search(raw.get("search"), train, model, origin)

    cfg = ExperimentConfig(name=name, seed=seed, storage=storage, data=data, model=model, train=train,
                           search=search, strategy=strategy, population=population, logging=logging)
    _check_cross(cfg, origin)
    try:
        space = build_space(cfg)  # validates genes, bounds and architecture constraints
    except ConfigError as e:
        raise ConfigError(f"{origin.where_message(('search',), str(e))}: {e}") from None
    cfg.search = _normalised_search(space, cfg.search)
    return cfg


def _normalised_search(space: SearchSpace, spec: dict[str, Any]) -> dict[str, Any]:
    """The search spec with every gene's defaults written out (what config.yaml stores)."""
    out: dict[str, Any] = {}
    for path in spec:
        if path == "max_params":
            continue
        gene = space.gene(path)
        if isinstance(gene, FloatGene):
            out[gene.path] = {"type": "float", "low": gene.low, "high": gene.high, "log": gene.log}
        elif isinstance(gene, IntGene):
            out[gene.path] = {"type": "int", "low": gene.low, "high": gene.high, "log": gene.log, "step": gene.step}
        else:
            out[gene.path] = {"type": "choice", "choices": _plain(gene.choices)}
    if spec.get("max_params") is not None:
        out["max_params"] = spec["max_params"]
    return out


def _check_cross(cfg: ExperimentConfig, origin: _Origin) -> None:
    """Constraints between sections, which no single sub-config can see."""
    if cfg.data.seq_len > cfg.model.max_position_embeddings:
        raise ConfigError(
            f"{origin.where(('data', 'seq_len'))}: data.seq_len ({cfg.data.seq_len}) exceeds "
            f"model.max_position_embeddings ({cfg.model.max_position_embeddings})")
    size = cfg.population.size
    if cfg.strategy.name == "ga" and cfg.strategy.elitism >= size:
        raise ConfigError(
            f"{origin.where(('strategy', 'elitism'))}: strategy.elitism ({cfg.strategy.elitism}) must be "
            f"below population.size ({size})")
    if cfg.strategy.selection == "tournament" and cfg.strategy.tournament_size > size:
        raise ConfigError(
            f"{origin.where(('strategy', 'tournament_size'))}: strategy.tournament_size "
            f"({cfg.strategy.tournament_size}) exceeds population.size ({size})")


def _space_base(cfg: ExperimentConfig) -> dict[str, Any]:
    """The flattened ``{"train.lr": .., "model.hidden_size": ..}`` view the space is built on."""
    base = {f"train.{k}": v for k, v in dataclasses.asdict(cfg.train).items()}
    base.update({f"model.{k}": v for k, v in dataclasses.asdict(cfg.model).items()})
    return base


def _search(raw: Any, train: TrainConfig, model: InternLM2Config, origin: _Origin) -> dict[str, dict]:
    """The raw search spec, its gene paths checked against the train/model fields."""
    spec = _mapping(raw, ("search",), origin)
    valid = [f"train.{f.name}" for f in dataclasses.fields(train)]
    valid += [f"model.{f.name}" for f in dataclasses.fields(model)]
    out: dict[str, dict] = {}
    for path, gene in spec.items():
        if path == "max_params":
            out[path] = _coerce(gene, int | None, ("search", path), origin)
            continue
        if path not in valid:
            raise _unknown(("search", str(path)), valid, origin.where(("search", str(path))))
        gene = _mapping(gene, ("search", path), origin)
        # YAML reads 1e-3 (no dot) as a string; bounds are numbers.
        for bound in ("low", "high"):
            if isinstance(gene.get(bound), str):
                gene[bound] = _coerce(gene[bound], float, ("search", path, bound), origin)
        out[path] = gene
    return out


def _section(cls: type, raw: dict, key: str, origin: _Origin) -> Any:
    return _build(cls, _mapping(raw.get(key), (key,), origin), (key,), origin)


def _build(cls: type, d: dict, path: tuple[str, ...], origin: _Origin) -> Any:
    """``cls(**d)`` after refusing unknown keys and coercing each value to its field type."""
    hints = _hints(cls)
    kwargs = {}
    for key, value in d.items():
        if key not in hints:
            raise _unknown(path + (str(key),), list(hints), origin.where(path + (str(key),)))
        kwargs[key] = _coerce(value, hints[key], path + (key,), origin)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        msg = _prefixed(".".join(path), e)
        raise ConfigError(f"{origin.where_message(path, msg)}: {msg}") from None


def _coerce(value: Any, hint: Any, path: tuple[str, ...], origin: _Origin) -> Any:
    """``value`` checked against the type hint ``hint`` (YAML gives lists for tuples, ints for floats)."""
    name = ".".join(path)

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{origin.where(path)}: {name}: expected {expected}, got {value!r}")

    if value is None:
        if _optional(hint) or hint is Any:
            return None
        if dataclasses.is_dataclass(hint):
            value = {}
        else:
            raise bad(_describe(hint))
    hint = _unwrap_optional(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, _mapping(value, path, origin), path, origin)
    if hint is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    origin_type = typing.get_origin(hint)
    if origin_type is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:   # tuple[str, ...]
            kinds = [args[0]] * len(value)
        elif args:                                   # tuple[float, float]
            if len(args) != len(value):
                raise bad(f"a list of {len(args)} values")
            kinds = list(args)
        else:
            kinds = [Any] * len(value)
        return tuple(_coerce(v, kind, path, origin) for v, kind in zip(value, kinds))
    if hint is dict or origin_type in (dict, Mapping) or hint is Mapping:
        if not isinstance(value, Mapping):
            raise bad("a mapping")
        return dict(value)
    if hint is list or origin_type is list:
        if not isinstance(value, list):
            raise bad("a list")
        return list(value)
    return value


# ------------------------------------------------------------------------------------------
# --set overrides


def _apply_override(raw: dict, text: str) -> tuple[str, ...]:
    """Apply one ``a.b.c=value`` to ``raw`` in place, walking the schema; returns the path set."""
    key, sep, value_text = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not key or any(not p for p in parts):
        raise ConfigError(f"--set {text}: expected KEY=VALUE with a dotted KEY (e.g. population.size=8)")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"--set {text}: could not parse the value as YAML: {problem}") from None

    node: dict = raw
    hint: Any = ExperimentConfig
    done: list[str] = []
    i = 0
    while i < len(parts):
        if dataclasses.is_dataclass(hint):
            fields = _hints(hint)
            k = parts[i]
            if k not in fields:
                raise _unknown(tuple(done) + (k,), list(fields), f"--set {text}")
            child_hint = _SEARCH if (hint is ExperimentConfig and k == "search") else _unwrap_optional(fields[k])
            i += 1
        elif hint is _SEARCH and parts[i] == "max_params":
            k = parts[i]
            child_hint = int
            i += 1
        elif hint is _SEARCH:
            if len(parts) - i < 2:
                raise ConfigError(f"--set {text}: a search gene is named like search.train.lr "
                                  "(or search.max_params for the parameter budget)")
            k = f"{parts[i]}.{parts[i + 1]}"
            child_hint = dict
            i += 2
        elif hint is dict or typing.get_origin(hint) in (dict, Mapping) or hint is Any:
            k = parts[i]
            child_hint = Any
            i += 1
        else:
            raise ConfigError(f"--set {text}: '{'.'.join(done)}' is a single value, not a mapping")
        done.append(k)
        if i == len(parts):
            if hint is _SEARCH and value is None:
                node.pop(k, None)
            elif child_hint is str and not isinstance(value, str) and value is not None:
                node[k] = value_text.strip()  # a name like 2024 stays a string
            else:
                node[k] = value
            break
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"--set {text}: '{'.'.join(done)}' is a single value, not a mapping")
        node, hint = child, child_hint
    return tuple(done)


_SEARCH = object()  # marker: the schema position of the search spec (gene paths contain a dot)


# ------------------------------------------------------------------------------------------
# helpers


def _unknown(path: tuple[str, ...], valid: list[str], where: str) -> ConfigError:
    """``unknown key 'population.sise' (did you mean 'population.size'?)``."""
    key = path[-1]
    prefix = ".".join(path[:-1])
    full = f"{prefix}.{key}" if prefix else key
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        suggestion = f"{prefix}.{close[0]}" if prefix else close[0]
        hint = f"did you mean '{suggestion}'?"
    else:
        hint = "valid keys: " + ", ".join(valid)
    return ConfigError(f"{where}: unknown key '{full}' ({hint})")


def _mapping(value: Any, path: tuple[str, ...], origin: _Origin) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{origin.where(path)}: {'.'.join(path)}: expected a mapping, got {_kind(value)}")
    return dict(value)


def _prefixed(section: str, e: Exception) -> str:
    """A sub-config's message, prefixed by its section unless it already names it."""
    msg = " ".join(str(e).split())
    head = section.split(".")[0]
    if msg.startswith((head + ".", head + ":", head + " ")):
        return msg
    return f"{section}: {msg}"


def _hints(cls: type) -> dict[str, Any]:
    """Field name -> resolved type hint of a dataclass (``from __future__`` strings evaluated)."""
    try:
        resolved = typing.get_type_hints(cls)
    except Exception:  # an unresolvable annotation: fall back to no coercion for that class
        resolved = {}
    return {f.name: resolved.get(f.name, Any) for f in dataclasses.fields(cls)}


def _optional(hint: Any) -> bool:
    return _is_union(hint) and type(None) in typing.get_args(hint)


def _unwrap_optional(hint: Any) -> Any:
    if _is_union(hint):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else Any
    return hint


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _describe(hint: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(hint, "a value")


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(value), type(value).__name__)


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively, so ``yaml.safe_dump`` writes it and a reload compares equal."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _key_lines(node: yaml.Node | None, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    """Map every key path of a composed YAML document to its 1-based line number."""
    out: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = (*path, str(key_node.value))
            out[key] = key_node.start_mark.line + 1
            out.update(_key_lines(value_node, key))
    return out

"""The experiment config: one YAML file composed of each package's own sub-config.

A YAML file (``experiments/*.yaml``) has the sections below; every section is optional and
falls back to its dataclass defaults (``evo config-keys`` lists every key with its default and
meaning; the README's table is generated from the same schema)::

    name: quickstart          # run name (default: the file's stem); [A-Za-z0-9._-]+
    seed: 0                   # run seed: every random choice derives from it
    storage: runs             # run store root: a directory or an fsspec URI (s3://..., file://...)
    data:       trainers.config.DataConfig
    model:      trainers.config.InternLM2Config  (vocab_size derived from the tokenizer)
    train:      trainers.config.TrainConfig      (base hyperparameters)
    search:     {"train.lr": {type: float, low: .., high: .., log: true}, ...}  -> evo.space.SearchSpace
    strategy:   evo.strategies.StrategyConfig
    population: population.config.PopulationConfig
    logging:    population.config.LoggingConfig

Each sub-config is a pydantic dataclass that validates itself (types, bounds, unknown keys,
checks across its fields); this module composes them and turns the first problem into
:class:`ConfigError`, one line that says where it came from (``file:line`` or
``--set key=value``), names the full key and the value (``train.lr: must be > 0, got -1``), and
suggests the nearest key for an unknown one. Loading is strict because a typo that passes
silently costs a whole search.

YAML 1.1 reads ``1e-3`` (no dot) as a string: the loader reads it as a number, as YAML 1.2
does. ``yes``/``true`` are booleans and never pass as numbers.

``--set a.b.c=value`` overrides are applied to the parsed mapping before validation; the value
is parsed as YAML (``3e-4``, ``true``, ``[a, b]`` work). In ``search`` the gene path is the two
components after ``search`` (``search.train.lr.high=0.1``); setting a gene to ``null``
(``--set search.train.lr=null``) removes it from the search.

Besides genes, ``search`` may hold ``max_params: N``, a parameter budget for the architecture
genes (``SearchSpace(max_params=N)``): no genome above it is ever proposed; and ``head_dim: D``,
which keeps ``model.hidden_size == model.num_attention_heads * D`` (width grows with the heads at
a fixed head_dim, the growth that preserves the function).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import re
import shlex
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, Mapping

import numpy as np
import yaml
from pydantic import ConfigDict, Field, StrictInt, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from evo.space import ArchitectureRules, FloatGene, IntGene, SearchSpace, SpaceError
from evo.strategies import StrategyConfig
from evo.strategy import SCORE
from population.config import LoggingConfig, PopulationConfig, SearchSetup
from trainers import architecture
from trainers.config import DataConfig, InternLM2Config, TrainConfig
from trainers.fitness import FitnessConfig, FitnessFunctionError, load_function

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]+")
BYTES_VOCAB = 256
# The space keeps its model genes to shapes InternLM2Config accepts, by the same rules.
INTERNLM2_RULES = ArchitectureRules(architecture.SHAPE_FIELDS, architecture.SIZE_FIELDS, architecture.SWITCH_FIELDS,
                                    architecture.shape_violations, architecture.count_parameters)
SEARCH_HELP = ("genes: {'train.<field>' or 'model.<field>': {type: float|int|choice, low, high, log, step, "
               "choices}}, max_params (a parameter budget) and head_dim (width = heads x head_dim); "
               "a gene set to null is dropped")
# keys of `search` that are constraints on the genes, not genes
SEARCH_CONSTRAINTS = ("max_params", "head_dim")


class ConfigError(ValueError):
    """Anything wrong with an experiment config; the message is one line (no newline)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclass(config=ConfigDict(extra="forbid"))
class ExperimentConfig:
    """A fully validated experiment: each part's own config, plus the search spec as a mapping
    (validated by building the space; every gene's defaults written out, so it round-trips)."""

    name: Annotated[str, Field(description="run name (default: the config file's stem); [A-Za-z0-9._-]+")]
    seed: Annotated[StrictInt, Field(ge=0, le=2**32 - 1, description=(
        "run seed (0 to 2**32-1): every random choice derives from it"))] = 0
    storage: Annotated[str, Field(description=(
        "run store root: a directory or an fsspec URI (s3://..., file://...)"))] = "runs"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: InternLM2Config = dataclasses.field(default_factory=InternLM2Config)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    search: Annotated[dict[str, Any], Field(description=SEARCH_HELP)] = dataclasses.field(default_factory=dict)
    strategy: StrategyConfig = dataclasses.field(default_factory=StrategyConfig)
    fitness: FitnessConfig = dataclasses.field(default_factory=FitnessConfig)
    population: PopulationConfig = dataclasses.field(default_factory=PopulationConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if not NAME_PATTERN.fullmatch(self.name) or self.name in (".", ".."):
            raise ValueError(f"name: must match [A-Za-z0-9._-]+, got {self.name!r}")
        if not self.storage.strip():
            raise ValueError(f"storage: must be a non-empty path or URI, got {self.storage!r}")
        # constraints between sections, which no single sub-config can see
        if self.data.seq_len > self.model.max_position_embeddings:
            raise ValueError(f"data.seq_len ({self.data.seq_len}) exceeds "
                             f"model.max_position_embeddings ({self.model.max_position_embeddings})")
        if self.population.trainer.kind == "sleep" and self.fitness.active:
            raise ValueError("population.trainer.kind: 'sleep' trains no model, so the fitness section "
                             "(fitness.eval, fitness.function) cannot judge it; leave fitness out")
        size = self.population.size
        if self.strategy.name == "ga" and self.strategy.elitism >= size:
            raise ValueError(f"strategy.elitism ({self.strategy.elitism}) must be below population.size ({size})")
        if self.strategy.selection == "tournament" and self.strategy.tournament_size > size:
            raise ValueError(f"strategy.tournament_size ({self.strategy.tournament_size}) exceeds "
                             f"population.size ({size})")


# ------------------------------------------------------------------------------------------
# public API


def load_config(path: str | Path, overrides: Iterable[str] = (),
                strings: Mapping[str, str] | None = None) -> ExperimentConfig:
    """Parse, override and validate the YAML file at ``path`` (name defaults to its stem).

    ``overrides`` are ``--set key=value`` texts (the value parsed as YAML); ``strings`` are
    top-level keys given as they are (``--name``, ``--storage``: ``a #b`` stays ``a #b``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    try:
        raw = yaml.load(text, Loader=_Loader)
        lines = _key_lines(yaml.compose(text, Loader=_Loader)) if raw is not None else {}
    except ConfigError as e:   # a duplicate key: its message starts with the line
        raise ConfigError(f"{path}:{e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}: could not parse YAML: {problem}") from None
    if raw is None:
        raise ConfigError(f"{path}: the config is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {_kind(raw)}")
    return _resolve(raw, list(overrides), dict(strings or {}), _Origin(str(path), lines), default_name=path.stem)


def config_from_dict(d: Mapping[str, Any], overrides: Iterable[str] = (),
                     source: str = "config", strings: Mapping[str, str] | None = None) -> ExperimentConfig:
    """Validate a mapping (e.g. a stored ``config.yaml``) exactly as :func:`load_config` does."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {_kind(d)}")
    return _resolve(copy.deepcopy(dict(d)), list(overrides), dict(strings or {}), _Origin(source, {}),
                    default_name=None)


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The fully resolved config (every default filled in) as plain YAML-able data.

    ``config_from_dict(config_to_dict(cfg)) == cfg``; this is what the run store keeps.
    """
    return _plain(dataclasses.asdict(cfg))


def build_space(cfg: ExperimentConfig) -> SearchSpace:
    """The search space of ``cfg``: its genes over the resolved train/model configs."""
    genes = {k: v for k, v in cfg.search.items() if k not in SEARCH_CONSTRAINTS}
    try:
        return SearchSpace.from_dict(genes, base=_space_base(cfg), max_params=cfg.search.get("max_params"),
                                     architecture=INTERNLM2_RULES, head_dim=cfg.search.get("head_dim"))
    except (ValueError, TypeError) as e:
        raise ConfigError(_prefixed("search", e)) from None


def build_setup(cfg: ExperimentConfig) -> SearchSetup:
    """What the driver needs to run (or resume) ``cfg``."""
    return SearchSetup(
        name=cfg.name, seed=cfg.seed, storage=cfg.storage,
        data=cfg.data, model=cfg.model, train=cfg.train, space=build_space(cfg),
        strategy=cfg.strategy, population=cfg.population, logging=cfg.logging,
        config=config_to_dict(cfg), fitness=cfg.fitness if cfg.fitness.active else None,
    )


def config_keys() -> list[tuple[str, str, str]]:
    """Every key of the schema as ``(dotted key, default as YAML, meaning)``, in the YAML's order
    (what ``--set`` takes and ``evo config-keys`` prints)."""
    return _keys(ExperimentConfig, ())


def config_keys_markdown() -> str:
    """The README's config table: one row per key of :func:`config_keys`."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, meaning in config_keys():
        rows.append(f"| `{key}` | {default} | {meaning.replace('|', '&#124;')} |")
    return "\n".join(rows) + "\n"


# ------------------------------------------------------------------------------------------
# resolution: overrides -> name -> vocabulary -> every section (pydantic) -> search space


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, with YAML 1.2's floats: ``1e-3`` is a number, not a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


@dataclasses.dataclass
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
                best, best_len = text, common
                break
        return best

    def where_message(self, section: tuple[str, ...], message: str) -> str:
        """Location of a check's message. A check across fields names several ("model:
        num_attention_heads (4) must be divisible by num_key_value_heads (3)"): the last override
        that set any of them is the cause; else the file line of the first one named."""
        named = [p for p in _named_paths(message) if p[: len(section)] == section] or [section]
        for opath, text in reversed(self.overrides):
            if any(p and opath[: len(p)] == p[: len(opath)] for p in named):
                return text
        return self.where(named[0])


def _resolve(raw: dict, overrides: list[str], strings: dict[str, str], origin: _Origin,
             default_name: str | None) -> ExperimentConfig:
    for text in overrides:
        origin.overrides.append((_apply_override(raw, text), f"--set {text}"))
    for key, value in strings.items():
        if key not in ("name", "storage"):
            raise ConfigError(f"--{key}: not a top-level string key")
        raw[key] = value
        origin.overrides.append(((key,), f"--{key} {shlex.quote(value)}"))
    if raw.get("name") is None:
        if default_name is None:
            raise ConfigError(f"{origin.source}: name: missing (give the run a name)")
        raw["name"] = default_name
    _empty_sections(raw, ExperimentConfig)
    raw["search"] = _search(raw.get("search"), origin)

    # model.vocab_size is the tokenizer's: validate data first to know it
    data = _validate(DataConfig, raw.get("data", {}), ("data",), origin)
    for path in raw["search"]:
        source = str(path)[len(MIX_PREFIX):] if str(path).startswith(MIX_PREFIX) else None
        if source is not None and source not in data.source_names():
            names = ", ".join(data.source_names()) or "none: data.sources is not set"
            raise ConfigError(f"{origin.where(('search', str(path)))}: search.{path}: no such source "
                              f"(data.sources names {names})")
    _check_mix_floor(raw["search"], data, origin)
    vocab = BYTES_VOCAB if data.tokenizer == "bytes" else data.vocab_size
    model_raw = raw.setdefault("model", {})
    if isinstance(model_raw, dict):
        if "vocab_size" in model_raw and model_raw["vocab_size"] != vocab:
            raise ConfigError(
                f"{origin.where(('model', 'vocab_size'))}: model.vocab_size ({model_raw['vocab_size']!r}) does not "
                f"match the {data.tokenizer} tokenizer's vocabulary ({vocab}); leave it out to derive it")
        model_raw["vocab_size"] = vocab

    cfg = _validate(ExperimentConfig, raw, (), origin)
    _check_held_out(cfg, origin)
    try:
        _check_gene_values(cfg.search)   # first: a range up to 10**12 would take the space forever
        space = build_space(cfg)  # validates genes, bounds and architecture constraints
    except ConfigError as e:
        raise ConfigError(f"{origin.where_message(('search',), str(e))}: {e}") from None
    if cfg.population.start in ("base", "base_and_largest"):
        start = cfg.population.start
        try:
            space.sample_at_base(np.random.default_rng(0))   # the base shape must be inside the space
            if start == "base_and_largest":
                space.largest_shape()   # and some shape must meet the constraints, few enough to enumerate
        except SpaceError as e:
            raise ConfigError(f"{origin.where(('population', 'start'))}: population.start: {start}: {e}") from None
    cfg.search = _normalised_search(space, cfg.search)
    return cfg


def _check_mix_floor(search: Mapping[str, Any], data: DataConfig, origin: _Origin) -> None:
    """Refuse data.mix genes that can make every source's weight 0 at once: a perturbation that
    reaches 0 stays there (0 x 1.2 = 0), and a member would fail hours in with nothing to draw."""
    genes = {str(p)[len(MIX_PREFIX):]: g for p, g in search.items()
             if str(p).startswith(MIX_PREFIX) and isinstance(g, Mapping)}
    if not genes or not data.source_names():
        return
    fixed = data.mix_weights()
    floors = {}
    for source in data.source_names():
        gene = genes.get(source)
        low = gene.get("low", 0.0) if gene is not None else fixed[source]
        floors[source] = low if isinstance(low, (int, float)) and not isinstance(low, bool) else 1.0
    if all(v <= 0 for v in floors.values()):
        first = next(iter(genes))
        parts = ", ".join(f"data.mix.{s} {'low' if s in genes else 'weight'} {floors[s]:g}" for s in floors)
        raise ConfigError(f"{origin.where(('search', MIX_PREFIX + first))}: search.{MIX_PREFIX}{first}: the mix "
                          f"genes can make every source's weight 0 at once ({parts}); give one source a gene "
                          "with low > 0 or a fixed data.mix weight > 0")


def _check_held_out(cfg: ExperimentConfig, origin: _Origin) -> None:
    """fitness.eval's sources are training sources, its corpora are not, fitness.function can be
    imported and called as (model, batches, device), and every val_bpb.<set> objective names a
    held-out set (fitness.eval's, else data.sources'), a score objective a fitness.function."""
    trained = dict(cfg.data.sources) if cfg.data.sources else {cfg.data.corpus: cfg.data.corpus}
    what = (f"data.sources names {', '.join(cfg.data.source_names())}" if cfg.data.sources
            else f"a single data.corpus: its name is {cfg.data.corpus!r}")
    for name, s in (cfg.fitness.eval or {}).items():
        where = origin.where(("fitness", "eval", name))
        if s.source is not None and s.source not in trained:
            raise ConfigError(f"{where}: fitness.eval.{name}.source: no such training source {s.source!r} ({what})")
        same = [n for n, form in trained.items() if form == s.corpus]
        if same:
            raise ConfigError(f"{where}: fitness.eval.{name}.corpus: {s.corpus!r} is trained on (source "
                              f"{same[0]!r}); judge on its held-out split with {{source: {same[0]}}}")
    if cfg.fitness.function is not None:
        try:
            load_function(cfg.fitness.function)
        except FitnessFunctionError as e:
            raise ConfigError(f"{origin.where(('fitness', 'function'))}: {e}") from None
    sets = list(cfg.fitness.eval or ()) or cfg.data.source_names()
    for objective in cfg.strategy.objectives:
        if objective == SCORE and cfg.fitness.function is None:
            raise ConfigError(f"{origin.where(('strategy', 'objectives'))}: strategy.objectives: {SCORE}: "
                              f"needs fitness.function (the function whose value it is)")
        if objective.startswith("val_bpb.") and objective[len("val_bpb."):] not in sets:
            have = (f"fitness.eval names {', '.join(sets)}" if cfg.fitness.eval else
                    f"data.sources names {', '.join(sets)}" if sets else "no fitness.eval, no data.sources")
            raise ConfigError(f"{origin.where(('strategy', 'objectives'))}: strategy.objectives: {objective}: "
                              f"no such held-out set ({have})")


def _empty_sections(raw: dict, cls: type) -> None:
    """An empty YAML section (``data:`` or ``resources: null``) means all its defaults."""
    for name, hint in _hints(cls).items():
        hint = _unwrap(hint)
        if dataclasses.is_dataclass(hint) and name in raw:
            if raw[name] is None:
                raw[name] = {}
            if isinstance(raw[name], dict):
                _empty_sections(raw[name], hint)


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def _validate(cls: type, data: Any, path: tuple[str, ...], origin: _Origin) -> Any:
    """``data`` validated into ``cls`` (a pydantic dataclass), or ConfigError on its first problem."""
    try:
        return _adapter(cls).validate_python(data)
    except ValidationError as e:
        raise ConfigError(_describe(e.errors(include_url=False)[0], path, origin)) from None


def _describe(error: dict, section: tuple[str, ...], origin: _Origin) -> str:
    """One line for one pydantic error: where, the full key, what was expected, the value."""
    loc = section + tuple(error["loc"])
    kind = error["type"]
    if kind == "value_error":  # a check across fields (__post_init__): its message names them
        message = str(error["ctx"]["error"])
        return f"{origin.where_message(tuple(str(p) for p in loc), message)}: {message}"
    if kind in ("unexpected_keyword_argument", "invalid_key"):
        path = tuple(str(p) for p in loc)
        return f"{origin.where(path)}: {_unknown(path, [f.name for f in dataclasses.fields(_hint_at(path[:-1]))])}"
    path = tuple(str(p) for p in loc if not isinstance(p, int))  # a list item is named by its list
    hint = _hint_at(path)
    value = error["input"]
    ctx = error.get("ctx", {})
    got = f", got {value!r}"
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        bound = next(iter(ctx.values()))
        expected = f"must be {bounds[kind]} {int(bound) if float(bound).is_integer() else bound}"
    elif kind in ("float_type", "float_parsing"):
        expected = "expected a number"
    elif kind == "finite_number":
        expected = "must be finite"
    elif kind in ("int_type", "int_parsing", "int_from_float"):
        expected = "expected an integer"
    elif kind in ("bool_type", "bool_parsing"):
        expected = "expected true or false"
    elif kind == "string_type":
        expected = "expected a string"
    elif kind in ("string_too_short", "too_short") and not _fixed_length(hint):
        expected = "must not be empty"
    elif kind in ("too_short", "too_long", "missing") and _fixed_length(hint):
        expected, value = f"expected a list of {_fixed_length(hint)} values", _list_input(value)
        got = f", got {value!r}"
    elif kind in ("tuple_type", "list_type"):
        expected = "expected a list"
    elif kind in ("dataclass_type", "dataclass_args_type", "dict_type"):
        expected, got = "expected a mapping", f", got {_kind(value)}"
    elif kind == "literal_error":
        choices = [str(c) for c in _literal_choices(hint)]
        close = difflib.get_close_matches(str(value), choices, n=1) if isinstance(value, str) else []
        expected = f"must be one of {', '.join(choices)}"
        got += f" (did you mean {close[0]!r}?)" if close else ""
    else:
        expected = error["msg"][:1].lower() + error["msg"][1:]
    return f"{origin.where(path)}: {'.'.join(path)}: {expected}{got}"


def _check_gene_values(spec: Mapping[str, Any]) -> None:
    """Refuse a gene that can propose a value its field refuses (``train.lr`` from -0.1,
    ``model.hidden_size`` up to 10**9, a float gene on an integer field): a member would only
    fail on it hours into the search. A range's ends are its extremes; each choice is checked.
    Values that are not even numbers are left to the space, which names the gene's own problem."""
    for path, gene in spec.items():
        if path in SEARCH_CONSTRAINTS or not isinstance(gene, Mapping):
            continue
        section, _, name = path.partition(".")
        kind = gene.get("type")
        if path.startswith(MIX_PREFIX):     # a source's weight: a float >= 0
            if kind != "float":
                raise ConfigError(f"search.{path}: a source weight is a float gene (use type: float)")
            for end in ("low", "high"):
                v = gene.get(end)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and not 0 <= v < math.inf:
                    raise ConfigError(f"search.{path}: {end} ({v!r}) is not a valid weight: must be >= 0 and finite")
            continue
        hint = _hints({"train": TrainConfig, "model": InternLM2Config}[section])[name]
        if kind in ("float", "int"):
            ends = [(end, gene.get(end)) for end in ("low", "high")]
            ends = [(end, v) for end, v in ends if isinstance(v, (int, float)) and not isinstance(v, bool)]
            # a float gene proposes floats (FloatGene makes low: 0 a 0.0), an int gene integers
            values = [(end, float(v) if kind == "float" else v) for end, v in ends
                      if kind == "float" or isinstance(v, int)]
        elif kind == "choice" and isinstance(gene.get("choices"), (list, tuple)):
            values = [("choice", v) for v in gene["choices"]]
        else:
            continue
        for what, value in values:
            try:
                _adapter(hint).validate_python(value)
            except ValidationError as e:
                error = e.errors(include_url=False)[0]
                if kind == "float" and error["type"] in ("int_type", "int_from_float"):
                    raise ConfigError(f"search.{path}: a float gene proposes floats, but {path} is an "
                                      "integer (use type: int)") from None
                problem = _describe(error, (section, name), _Origin("", {}))
                raise ConfigError(f"search.{path}: {what} ({value!r}) is not a valid "
                                  f"{problem.split(': ', 1)[1]}") from None


def _normalised_search(space: SearchSpace, spec: dict[str, Any]) -> dict[str, Any]:
    """The search spec with every gene's defaults written out (what config.yaml stores)."""
    out: dict[str, Any] = {}
    for path in spec:
        if path in SEARCH_CONSTRAINTS:
            continue
        gene = space.gene(path)
        if isinstance(gene, FloatGene):
            out[gene.path] = {"type": "float", "low": gene.low, "high": gene.high, "log": gene.log}
        elif isinstance(gene, IntGene):
            out[gene.path] = {"type": "int", "low": gene.low, "high": gene.high, "log": gene.log, "step": gene.step}
        else:
            out[gene.path] = {"type": "choice", "choices": _plain(gene.choices)}
    for key in SEARCH_CONSTRAINTS:
        if spec.get(key) is not None:
            out[key] = spec[key]
    return out


def _space_base(cfg: ExperimentConfig) -> dict[str, Any]:
    """The flattened ``{"train.lr": .., "model.hidden_size": ..}`` view the space is built on."""
    base = {f"train.{k}": v for k, v in dataclasses.asdict(cfg.train).items()}
    base.update({f"model.{k}": v for k, v in dataclasses.asdict(cfg.model).items()})
    base.update({f"{MIX_PREFIX}{k}": v for k, v in cfg.data.mix_weights().items()})
    return base


MIX_PREFIX = "data.mix."   # a gene data.mix.<source> is that source's training weight


def _search(raw: Any, origin: _Origin) -> dict[str, Any]:
    """The raw search spec, its gene paths checked against the train/model fields (the genes
    themselves are checked by building the space)."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{origin.where(('search',))}: search: expected a mapping, got {_kind(raw)}")
    valid = [f"train.{f.name}" for f in dataclasses.fields(TrainConfig)]
    valid += [f"model.{f.name}" for f in dataclasses.fields(InternLM2Config)]
    out: dict[str, Any] = {}
    for path, gene in raw.items():
        where = origin.where(("search", str(path)))
        if path in SEARCH_CONSTRAINTS:
            if gene is not None and (isinstance(gene, bool) or not isinstance(gene, int)):
                raise ConfigError(f"{where}: search.{path}: expected an integer, got {gene!r}")
        elif str(path).startswith(MIX_PREFIX):
            if not isinstance(gene, Mapping):
                raise ConfigError(f"{where}: search.{path}: expected a mapping, got {_kind(gene)}")
            out[path] = dict(gene)    # the source is checked against data.sources once data is read
        elif path not in valid:
            section = str(path).partition(".")[0]
            if section not in ("train", "model"):
                raise ConfigError(f"{where}: unknown key 'search.{path}' (a gene is named train.<field>, "
                                  "model.<field> or data.mix.<source>, e.g. train.lr; max_params is the parameter budget, "
                                  "head_dim the fixed head_dim)")
            fields = [v.partition(".")[2] for v in valid if v.startswith(section + ".")]
            raise ConfigError(f"{where}: {_unknown(('search', section, str(path).partition('.')[2]), fields)}")
        elif not isinstance(gene, Mapping):
            raise ConfigError(f"{where}: search.{path}: expected a mapping, got {_kind(gene)}")
        out[path] = dict(gene) if isinstance(gene, Mapping) else gene
    return out


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
        value = yaml.load(value_text, Loader=_Loader) if value_text.strip() else None
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
                raise ConfigError(f"--set {text}: {_unknown(tuple(done) + (k,), list(fields))}")
            child_hint = _SEARCH if (hint is ExperimentConfig and k == "search") else _unwrap(fields[k])
            i += 1
        elif hint is _SEARCH and parts[i] in SEARCH_CONSTRAINTS:
            k, child_hint = parts[i], int
            i += 1
        elif hint is _SEARCH:
            if len(parts) - i < 2:
                raise ConfigError(f"--set {text}: a search gene is named like search.train.lr "
                                  "(or search.max_params / search.head_dim)")
            # data.mix.<source> spans three parts, every other gene two (train.lr)
            n = 3 if ".".join(parts[i:i + 2]) + "." == MIX_PREFIX and len(parts) - i >= 3 else 2
            k, child_hint = ".".join(parts[i:i + n]), dict
            i += n
        elif hint is dict or typing.get_origin(hint) in (dict, Mapping) or hint is Any:
            k, child_hint = parts[i], Any
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
# the schema, read from the dataclasses


def _hints(cls: type) -> dict[str, Any]:
    """Field name -> resolved type hint of a dataclass (``Annotated`` kept)."""
    resolved = typing.get_type_hints(cls, include_extras=True)
    return {f.name: resolved[f.name] for f in dataclasses.fields(cls)}


def _unwrap(hint: Any) -> Any:
    """``hint`` without ``Annotated[...]`` and ``| None``."""
    while True:
        if typing.get_origin(hint) is Annotated:
            hint = typing.get_args(hint)[0]
        elif typing.get_origin(hint) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            if len(args) != 1:
                return hint
            hint = args[0]
        else:
            return hint


def _hint_at(path: tuple[str, ...]) -> Any:
    """The type hint of the key at ``path`` (Any where the schema does not say)."""
    hint: Any = ExperimentConfig
    for name in path:
        hint = _unwrap(hint)
        if not dataclasses.is_dataclass(hint):
            return Any
        hint = _hints(hint).get(name, Any)
    return _unwrap(hint)


def _fixed_length(hint: Any) -> int:
    """N for ``tuple[X1, ..., XN]``; 0 for anything else."""
    args = typing.get_args(hint) if typing.get_origin(hint) is tuple else ()
    return 0 if not args or args[-1] is Ellipsis else len(args)


def _literal_choices(hint: Any) -> tuple:
    """The values of the ``Literal`` in ``hint`` (also inside ``tuple[Literal[...], ...]``)."""
    hint = _unwrap(hint)
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    for arg in typing.get_args(hint):
        found = _literal_choices(arg)
        if found:
            return found
    return ()


def _keys(cls: type, prefix: tuple[str, ...]) -> list[tuple[str, str, str]]:
    out = []
    described = getattr(cls, "__pydantic_fields__", {})
    for f in dataclasses.fields(cls):
        key = (*prefix, f.name)
        hint = _unwrap(_hints(cls)[f.name])
        if dataclasses.is_dataclass(hint):
            out += _keys(hint, key)
            continue
        info = described.get(f.name)
        meaning = info.description if info is not None and info.description else ""
        if f.default_factory is not dataclasses.MISSING:
            default = f"`{_yaml_scalar(f.default_factory())}`"
        elif f.default is not dataclasses.MISSING:
            default = f"`{_yaml_scalar(f.default)}`"
        else:
            default = "the file's stem"
        if key == ("model", "vocab_size"):
            default, meaning = "from the tokenizer", "256 for bytes, data.vocab_size for bpe (leave it out)"
        out.append((".".join(key), default, meaning))
    return out


# ------------------------------------------------------------------------------------------
# helpers


def _unknown(path: tuple[str, ...], valid: list[str]) -> str:
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
    return f"unknown key '{full}' ({hint})"


def _prefixed(section: str, e: Exception) -> str:
    """A sub-config's message, prefixed by its section unless it already names it."""
    msg = " ".join(str(e).split())
    head = section.split(".")[0]
    if msg.startswith((head + ".", head + ":", head + " ")):
        return msg
    return f"{section}: {msg}"


def _key_path(dotted: str) -> tuple[str, ...]:
    """``search.train.lr.low`` -> ("search", "train.lr", "low"): gene paths contain a dot."""
    parts = tuple(dotted.strip(".").split("."))
    if parts[:1] == ("search",) and len(parts) >= 3:
        return ("search", f"{parts[1]}.{parts[2]}", *parts[3:])
    return parts


def _named_paths(message: str) -> list[tuple[str, ...]]:
    """The keys a check's message names, in order: full dotted keys ("data.seq_len (4096)
    exceeds model.max_position_embeddings"), and the fields of a leading section ("model:
    hidden_size (66) must be divisible by num_attention_heads (4)"); a leading key first
    ("population.size: must be at least 2"), unless it is a section that names its fields."""
    sections = {f.name for f in dataclasses.fields(ExperimentConfig)}
    m = re.match(r"([A-Za-z_][\w.]*):", message)
    head = _key_path(m.group(1)) if m else ()
    head_hint = _hint_at(head) if head and head[0] != "search" else Any
    fields = {f.name for f in dataclasses.fields(head_hint)} if dataclasses.is_dataclass(head_hint) else set()
    named: list[tuple[str, ...]] = []
    for word in re.findall(r"(?<![\w.])[A-Za-z_][\w.]*[\w]", message[m.end() if m else 0:]):
        if head == ("search",) and (word.split(".")[0] in ("train", "model") or word in SEARCH_CONSTRAINTS):
            path = ("search", word)   # "search: no combination of model.num_key_value_heads ..."
        elif word.split(".")[0] in sections and "." in word:
            path = _key_path(word)
        else:
            path = (*head, word) if word in fields else None
        if path and path not in named:
            named.append(path)
    section = dataclasses.is_dataclass(head_hint) or head == ("search",)
    if head and head not in named and (len(head) > 1 or not named or not section):
        named.insert(0, head)   # a section ("model: ...") only when it names none of its keys
    return named


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean",
            type(None): "null"}.get(
        type(value), type(value).__name__)


def _list_input(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _yaml_scalar(value: Any) -> str:
    """A default as it is written in YAML (``null``, ``true``, ``[0.8, 1.2]``, ``1.0e-08``)."""
    return yaml.safe_dump(_plain(value), default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively, so ``yaml.safe_dump`` writes it and a reload compares equal."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _key_lines(node: yaml.Node | None, path: tuple[str, ...] = (),
               seen: set[int] | None = None) -> dict[tuple[str, ...], int]:
    """Map every key path of a composed YAML document to its 1-based line number.

    A key given twice in one mapping raises ConfigError (message without the file): YAML keeps
    the last silently, and a value that is ignored without a word costs a search."""
    out: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = (*path, str(key_node.value))
            if key in out:
                raise ConfigError(f"{key_node.start_mark.line + 1}: duplicate key '{'.'.join(key)}' "
                                  f"(first on line {out[key]})")
            out[key] = key_node.start_mark.line + 1
            seen = set() if seen is None else seen
            if id(value_node) not in seen:   # an alias repeats a node: walk it once (no alias bomb)
                seen.add(id(value_node))
                out.update(_key_lines(value_node, key, seen))
    return out

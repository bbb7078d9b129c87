"""The experiment config loader: every bad input is one line that names the problem and where
it came from; good input resolves to the sub-configs, round-trips through config_to_dict."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import yaml

from evo.genome import Genome
from evo.space import SearchSpace
from evo.strategies import StrategyConfig
from experiments.config import (
    ConfigError,
    ExperimentConfig,
    build_setup,
    build_space,
    config_from_dict,
    config_keys,
    config_keys_markdown,
    config_to_dict,
    load_config,
)
from population.config import LoggingConfig, PopulationConfig, ResourcesConfig
from trainers.data import DataConfig
from trainers.model import InternLM2Config
from trainers.trainer import TrainConfig

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "experiments" / "quickstart.yaml"
CONFIGS = sorted((REPO / "experiments").glob("*.yaml"))

MINIMAL = """\
name: tiny
data: {corpus: stdlib, tokenizer: bytes, seq_len: 64}
model: {hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2}
train: {lr: 1.0e-3}
population: {size: 4, interval_steps: 10, total_steps: 100}
search:
  train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
"""


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path, overrides: list[str] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------
# good input


def test_quickstart_resolves_into_each_part_config():
    cfg = load_config(QUICKSTART)
    assert isinstance(cfg, ExperimentConfig)
    assert (cfg.name, cfg.seed, cfg.storage) == ("quickstart", 0, "runs")
    assert cfg.data == DataConfig(corpus="stdlib", tokenizer="bytes", seq_len=128)
    assert cfg.model == InternLM2Config(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=172, rope_theta=10000.0)
    assert cfg.train == TrainConfig(batch_size=16, lr=1e-3, weight_decay=0.1, warmup_steps=20, grad_clip=1.0)
    assert cfg.strategy == StrategyConfig(name="pbt", quantile=0.25, resample_probability=0.25)
    assert cfg.population.size == 4 and cfg.population.mode == "sync"
    assert (cfg.population.interval_steps, cfg.population.total_steps) == (50, 500)
    assert (cfg.population.resources.num_cpus, cfg.population.resources.num_gpus) == (0.5, 0)
    assert cfg.logging.wandb.mode == "offline" and cfg.logging.optuna is True
    assert list(cfg.search) == ["train.lr", "train.weight_decay", "model.num_hidden_layers"]
    assert cfg.search["train.lr"] == {"type": "float", "low": 1e-4, "high": 3e-2, "log": True}


def test_quickstart_has_the_documented_shape():
    raw = yaml.safe_load(QUICKSTART.read_text())
    assert list(raw) == ["name", "seed", "storage", "data", "model", "train", "search", "strategy",
                         "population", "logging"]
    assert raw["population"] == {"size": 4, "mode": "sync", "interval_steps": 50, "total_steps": 500,
                                 "resources": {"num_cpus": 0.5, "num_gpus": 0}}
    assert raw["logging"] == {"wandb": {"mode": "offline", "project": "evo"}, "optuna": True}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_round_trips(path: Path):
    cfg = load_config(path)
    d = config_to_dict(cfg)
    assert yaml.safe_load(yaml.safe_dump(d, sort_keys=False)) == d   # plain YAML data
    assert config_from_dict(d) == cfg
    assert config_to_dict(config_from_dict(d)) == d
    assert cfg.name == path.stem


def test_config_to_dict_fills_every_default(tmp_path: Path):
    d = config_to_dict(load_config(write(tmp_path, MINIMAL)))
    assert d["data"]["val_fraction"] == DataConfig().val_fraction
    assert d["train"]["beta2"] == TrainConfig().beta2
    assert d["population"]["resources"] == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert d["strategy"]["perturb_factors"] == [0.8, 1.2]
    assert d["logging"] == {"wandb": {"mode": "offline", "project": "evo", "entity": None}, "optuna": True,
                            "ray_dashboard": True}
    assert d["search"] == {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}
    assert d["model"]["vocab_size"] == 256 and d["storage"] == "runs" and d["seed"] == 0


def test_name_defaults_to_the_file_stem(tmp_path: Path):
    path = write(tmp_path, MINIMAL.replace("name: tiny\n", ""), name="my-exp.v2.yaml")
    assert load_config(path).name == "my-exp.v2"
    assert load_config(path, ["name=other"]).name == "other"


def test_bad_names_are_refused(tmp_path: Path):
    assert "name: must match [A-Za-z0-9._-]+, got 'a b'" in error_of(write(tmp_path, MINIMAL), ["name=a b"])
    path = write(tmp_path, MINIMAL.replace("name: tiny\n", ""), name="has space.yaml")
    assert "got 'has space'" in error_of(path)


def test_vocab_size_is_derived_from_the_tokenizer(tmp_path: Path):
    path = write(tmp_path, MINIMAL)
    assert load_config(path).model.vocab_size == 256
    assert load_config(path, ["data.tokenizer=bpe", "data.vocab_size=512"]).model.vocab_size == 512
    assert load_config(path, ["model.vocab_size=256"]).model.vocab_size == 256   # given and equal: fine
    msg = error_of(path, ["data.tokenizer=bpe", "data.vocab_size=512", "model.vocab_size=256"])
    assert msg == ("--set model.vocab_size=256: model.vocab_size (256) does not match the bpe tokenizer's "
                   "vocabulary (512); leave it out to derive it")


def test_set_parses_values_as_yaml(tmp_path: Path):
    cfg = load_config(write(tmp_path, MINIMAL), [
        "population.size=8",                       # int
        "train.lr=3e-4",                           # YAML reads 3e-4 as a string: coerced for a float field
        "train.weight_decay=0",                    # int for a float field
        "logging.optuna=false",                    # bool
        "strategy.perturb_factors=[0.5, 2]",       # list -> tuple of floats
        "population.resources.num_cpus=1.5",       # nested
        "search.train.lr.high=0.05",               # inside a gene (gene paths contain a dot)
        "search.model.num_hidden_layers={type: int, low: 1, high: 3}",   # a new gene
        "name=2024",                               # stays a string
        "data.max_bytes=null",
    ])
    assert cfg.population.size == 8
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.weight_decay == 0.0
    assert cfg.logging.optuna is False
    assert cfg.strategy.perturb_factors == (0.5, 2.0)
    assert cfg.population.resources.num_cpus == 1.5
    assert cfg.search["train.lr"]["high"] == 0.05
    assert cfg.search["model.num_hidden_layers"] == {"type": "int", "low": 1, "high": 3, "log": False, "step": 1}
    assert cfg.name == "2024"
    assert cfg.data.max_bytes is None
    # the later override wins; a gene set to null is removed
    cfg = load_config(write(tmp_path, MINIMAL), ["train.lr=1e-3", "train.lr=2e-3", "search.train.lr=null",
                                                 "search.train.beta2={type: float, low: 0.9, high: 0.99}"])
    assert cfg.train.lr == 2e-3 and list(cfg.search) == ["train.beta2"]


def test_set_adds_and_drops_a_data_mix_gene():
    """A data.mix.<source> gene is three dotted parts: --set can drop it and add it back."""
    shipped = REPO / "experiments" / "data_mix.yaml"
    cfg = load_config(shipped, ["search.data.mix.code=null", "search.data.mix.docs=null",
                                "data.mix={code: 0.25, docs: 0.75}"])
    assert list(cfg.search) == ["train.lr"]
    assert dict(cfg.data.mix) == {"code": 0.25, "docs": 0.75}
    cfg = load_config(shipped, ["search.data.mix.code=null", "search.data.mix.code={type: float, low: 0.5, high: 2.0}"])
    assert cfg.search["data.mix.code"]["high"] == 2.0 and "data.mix.docs" in cfg.search


def test_build_setup_carries_the_resolved_config(tmp_path: Path):
    cfg = load_config(write(tmp_path, MINIMAL))
    setup = build_setup(cfg)
    assert setup.name == "tiny" and setup.storage == "runs"
    assert setup.model == cfg.model and setup.train == cfg.train and setup.population == cfg.population
    assert isinstance(setup.space, SearchSpace) and setup.space.paths == ("train.lr",)
    assert setup.config == config_to_dict(cfg)
    space = build_space(cfg)
    assert space.gene("train.lr").log is True


def test_search_max_params_is_a_budget(tmp_path: Path):
    text = MINIMAL + "  model.hidden_size: {type: choice, choices: [32, 64, 128]}\n  max_params: 200000\n"
    cfg = load_config(write(tmp_path, text))
    assert build_space(cfg).max_params == 200_000
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert "max_params (1000) is below the smallest architecture" in error_of(write(tmp_path, text),
                                                                               ["search.max_params=1000"])


def test_search_head_dim_ties_the_width_to_the_heads(tmp_path: Path):
    text = MINIMAL + ("  model.hidden_size: {type: choice, choices: [32, 64, 96, 128]}\n"
                      "  model.num_attention_heads: {type: choice, choices: [2, 4, 6, 8]}\n  head_dim: 16\n")
    cfg = load_config(write(tmp_path, text))
    space = build_space(cfg)
    assert space.head_dim == 16 and config_from_dict(config_to_dict(cfg)) == cfg
    rng = np.random.default_rng(0)
    genomes = [space.sample(rng) for _ in range(50)]
    genomes += [space.clip(Genome.from_dict({**g.as_dict(), "model.hidden_size": 128})) for g in genomes[:10]]
    for g in genomes:
        d = g.as_dict()
        assert d["model.hidden_size"] == 16 * d["model.num_attention_heads"]
    assert {g.as_dict()["model.hidden_size"] for g in genomes} == {32, 64, 96, 128}
    assert error_of(write(tmp_path, text), ["search.head_dim=15"]) == (
        "--set search.head_dim=15: search: head_dim must be a positive even integer, got 15")
    assert "no combination of" in error_of(write(tmp_path, text), ["search.head_dim=6"])


# ------------------------------------------------------------------------------------------
# bad input: one line naming the problem (and where it is)


def test_malformed_yaml_gives_file_and_line(tmp_path: Path):
    path = write(tmp_path, "name: x\ndata: {corpus: stdlib\nmodel: {}\n")
    msg = error_of(path)
    assert msg.startswith(f"{path}:3: could not parse YAML: ")
    path = write(tmp_path, "name: x\nseed: 0\n  storage: runs\n")
    assert error_of(path).startswith(f"{path}:3: could not parse YAML: mapping values are not allowed")


def test_empty_and_non_mapping_files(tmp_path: Path):
    assert error_of(write(tmp_path, "")).endswith("the config is empty")
    assert error_of(write(tmp_path, "- 1\n")).endswith("expected a mapping at the top level, got a list")
    assert error_of(tmp_path / "missing.yaml").endswith("missing.yaml: no such config file")


@pytest.mark.parametrize("old, new, expected", [
    ("population:", "populaton:", ":5: unknown key 'populaton' (did you mean 'population'?)"),
    ("seq_len", "seqlen", ":2: unknown key 'data.seqlen' (did you mean 'data.seq_len'?)"),
    ("interval_steps", "interval_step", ":5: unknown key 'population.interval_step' "
                                        "(did you mean 'population.interval_steps'?)"),
    ("train.lr:", "train.lrr:", ":7: unknown key 'search.train.lrr' (did you mean 'search.train.lr'?)"),
    ("log: true", "logg: true", ":7: search.train.lr: unknown key 'logg' for a float gene; did you mean 'log'?"),
])
def test_unknown_keys_suggest_the_nearest(tmp_path: Path, old: str, new: str, expected: str):
    path = write(tmp_path, MINIMAL.replace(old, new))
    assert error_of(path) == f"{path}{expected}"


def test_unknown_deeply_nested_key(tmp_path: Path):
    text = MINIMAL.replace("total_steps: 100}", "total_steps: 100, resources: {num_cpu: 1}}")
    path = write(tmp_path, text)
    assert error_of(path) == (f"{path}:5: unknown key 'population.resources.num_cpu' "
                              f"(did you mean 'population.resources.num_cpus'?)")
    text = MINIMAL + "logging:\n  wandb:\n    projet: x\n"
    path = write(tmp_path, text)
    assert error_of(path) == f"{path}:10: unknown key 'logging.wandb.projet' (did you mean 'logging.wandb.project'?)"


def test_unknown_key_without_a_close_match_lists_the_valid_ones(tmp_path: Path):
    msg = error_of(write(tmp_path, MINIMAL + "zzz: 1\n"))
    assert "unknown key 'zzz' (valid keys: name, seed, storage, data, model, train, search" in msg


@pytest.mark.parametrize("override, expected", [
    ("population.size=1", "--set population.size=1: population.size: must be at least 2, got 1"),
    ("population.interval_steps=500", "--set population.interval_steps=500: population.interval_steps (500) "
                                      "is longer than the budget population.total_steps (100)"),
    ("strategy.name=pbtt", "--set strategy.name=pbtt: strategy.name: unknown"),
    ("search.train.lr.low=0.1", "--set search.train.lr.low=0.1: search.train.lr: low (0.1) must be below high"),
    ("search.train.lr.type=flot", "search.train.lr: unknown type 'flot'"),
    ("model.hidden_size=66", "--set model.hidden_size=66: model: hidden_size (66) must be divisible by "
                             "num_attention_heads (4)"),
    ("populaton.size=3", "--set populaton.size=3: unknown key 'populaton' (did you mean 'population'?)"),
    ("population.sise=3", "--set population.sise=3: unknown key 'population.sise' (did you mean 'population.size'?)"),
    ("search.train.lrr.low=1", "--set search.train.lrr.low=1: unknown key 'search.train.lrr' "
                               "(did you mean 'search.train.lr'?)"),
    ("population.size", "--set population.size: expected KEY=VALUE"),
    ("population.size=[1,", "--set population.size=[1,: could not parse the value as YAML"),
    ("seed.x=1", "--set seed.x=1: 'seed' is a single value, not a mapping"),
    ("train.lr=abc", "--set train.lr=abc: train.lr: expected a number, got 'abc'"),
    ("population.size=2.5", "--set population.size=2.5: population.size: expected an integer, got 2.5"),
    ("strategy.perturb_factors=[x, 1]", "strategy.perturb_factors: expected a number, got 'x'"),
    ("strategy.perturb_factors=[1, 2, 3]", "strategy.perturb_factors: expected a list of 2 values"),
    ("logging.optuna=maybe", "--set logging.optuna=maybe: logging.optuna: expected true or false, got 'maybe'"),
    ("data.tokenizer=words", "--set data.tokenizer=words: data.tokenizer: must be one of bytes, bpe"),
    ("data.seq_len=4096", "data.seq_len (4096) exceeds model.max_position_embeddings (2048)"),
    ("population.resources.num_gpus=-1", "population.resources.num_gpus: must be >= 0"),
])
def test_bad_values_name_the_field(tmp_path: Path, override: str, expected: str):
    assert expected in error_of(write(tmp_path, MINIMAL), [override])


def test_bad_values_in_the_file_give_the_line(tmp_path: Path):
    path = write(tmp_path, MINIMAL.replace("size: 4", "size: 1"))
    assert error_of(path) == f"{path}:5: population.size: must be at least 2, got 1"
    path = write(tmp_path, MINIMAL.replace("hidden_size: 64", "hidden_size: 66"))
    assert error_of(path) == f"{path}:3: model: hidden_size (66) must be divisible by num_attention_heads (4)"
    path = write(tmp_path, MINIMAL + "strategy:\n  name: evolution\n")
    assert error_of(path).startswith(f"{path}:9: strategy.name: unknown") and "'evolution'" in error_of(path)


def test_impossible_architecture_genes(tmp_path: Path):
    # no hidden size in the gene is divisible by the 4 heads into an even head_dim
    text = MINIMAL + "  model.hidden_size: {type: choice, choices: [66, 70]}\n"
    assert "search: no combination of model.hidden_size satisfies" in error_of(write(tmp_path, text))


def test_config_from_dict_validates_like_load(tmp_path: Path):
    d = config_to_dict(load_config(write(tmp_path, MINIMAL)))
    d["population"]["size"] = 1
    with pytest.raises(ConfigError, match=r"^run/config.yaml: population.size: must be at least 2, got 1$"):
        config_from_dict(d, source="run/config.yaml")
    d["population"]["size"] = 4
    cfg = config_from_dict(d, ["population.total_steps=200"])
    assert cfg.population == PopulationConfig(size=4, interval_steps=10, total_steps=200)
    with pytest.raises(ConfigError, match="name: missing"):
        config_from_dict({k: v for k, v in d.items() if k != "name"})


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
    assert str(ConfigError("two\nlines")) == "two lines"


# ------------------------------------------------------------------------------------------
# one schema: pydantic's errors as one line, YAML's gotchas, the README's table


@pytest.mark.parametrize("override, expected", [
    ("train.lr=-1", "--set train.lr=-1: train.lr: must be > 0, got -1"),
    ("train.beta2=1", "--set train.beta2=1: train.beta2: must be < 1, got 1"),
    ("train.eps=.inf", "--set train.eps=.inf: train.eps: must be finite, got inf"),
    ("population.size=yes", "--set population.size=yes: population.size: expected an integer, got True"),
    ("train.lr=true", "--set train.lr=true: train.lr: expected a number, got True"),
    ("data.tokenizer=byte", "--set data.tokenizer=byte: data.tokenizer: must be one of bytes, bpe, got 'byte' "
                            "(did you mean 'bytes'?)"),
    ("strategy.objectives=[val_bpb, latency]", "strategy.objectives: must be one of val_bpb, val_loss, params, "
                                               "tokens_per_s, score (fitness.function's) or val_bpb.<held-out set>, got 'latency'"),
    ("strategy.objectives=[]", "--set strategy.objectives=[]: strategy.objectives: must not be empty, got []"),
    ("strategy.grace=hurdle", "--set strategy.grace=hurdle: strategy.grace: must be one of intervals, hurdles, "
                              "got 'hurdle' (did you mean 'hurdles'?)"),
    ("data=3", "--set data=3: data: expected a mapping, got a number"),
    ("model.hidden_size=yes", "--set model.hidden_size=yes: model.hidden_size: expected an integer, got True"),
    ("search.max_params=2e5", "--set search.max_params=2e5: search.max_params: expected an integer, got 200000.0"),
    ("train.lrr=1", "--set train.lrr=1: unknown key 'train.lrr' (did you mean 'train.lr'?)"),
])
def test_schema_errors_are_one_line_with_key_and_value(tmp_path: Path, override: str, expected: str):
    assert expected in error_of(write(tmp_path, MINIMAL), [override])


def test_grace_hurdles_is_an_option_of_the_grace_period(tmp_path: Path):
    path = write(tmp_path, MINIMAL)
    assert load_config(path).strategy.grace == "intervals"
    cfg = load_config(path, ["strategy.grace=hurdles", "strategy.grace_intervals=2"])
    assert (cfg.strategy.grace, cfg.strategy.grace_intervals) == ("hurdles", 2)
    assert error_of(path, ["strategy.grace=hurdles", "strategy.grace_intervals=0"]) == (
        "--set strategy.grace_intervals=0: strategy.grace: 'hurdles' judges members during their grace "
        "period, which strategy.grace_intervals 0 turns off; set it to 1 or more")


def test_yaml_gotchas(tmp_path: Path):
    # YAML 1.1 reads 1e-3 (no dot) as a string: the loader reads a number
    cfg = load_config(write(tmp_path, MINIMAL.replace("lr: 1.0e-3", "lr: 3e-4").replace("low: 1.0e-4", "low: 1e-4")))
    assert cfg.train.lr == 3e-4 and cfg.search["train.lr"]["low"] == 1e-4
    # `yes` is a boolean, never a number; an int for a float field is fine
    path = write(tmp_path, MINIMAL.replace("size: 4", "size: yes"))
    assert error_of(path) == f"{path}:5: population.size: expected an integer, got True"
    assert load_config(write(tmp_path, MINIMAL), ["train.weight_decay=0"]).train.weight_decay == 0.0
    # an empty section is all its defaults
    cfg = load_config(write(tmp_path, MINIMAL + "logging:\n  wandb:\n"), ["population.resources=null"])
    assert cfg.logging == LoggingConfig() and cfg.population.resources == ResourcesConfig()


def test_every_default_of_the_schema_is_the_dataclass_default(tmp_path: Path):
    d = config_to_dict(load_config(write(tmp_path, "name: bare\n")))
    assert d["train"] == dataclasses.asdict(TrainConfig()) and d["data"] == dataclasses.asdict(DataConfig())
    assert d["strategy"] == config_to_dict(ExperimentConfig(name="x"))["strategy"]
    assert d["model"] == dataclasses.asdict(InternLM2Config()) and d["search"] == {}


def test_readme_config_table_is_the_schema():
    readme = (REPO / "README.md").read_text()
    begin = readme.index("<!-- config-keys:")
    begin = readme.index("\n", begin) + 1
    table = readme[begin:readme.index("<!-- /config-keys -->")]
    assert table == config_keys_markdown(), "regenerate it: evo config-keys --markdown"
    listed = [row.split("`")[1] for row in table.splitlines()[2:]]
    assert listed == [key for key, _, _ in config_keys()]
    assert all(meaning for _, _, meaning in config_keys())        # every key says what it means


def test_every_listed_key_exists_and_takes_its_default(tmp_path: Path):
    # each key of the table set to the default it lists: the loader accepts it and reads it back
    path = write(tmp_path, "name: keys\n")
    base = config_to_dict(load_config(path))
    for key, default, _ in config_keys():
        if key in ("name", "model.vocab_size"):
            continue
        value = default.strip("`")
        cfg = config_to_dict(load_config(path, [f"{key}={value}"]))
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert node == yaml.safe_load(value) and cfg == base, key
    flat = {f"{section}.{k}" for section, v in base.items() if isinstance(v, dict) and section != "search"
            for k in v}
    flat |= {f"population.resources.{k}" for k in base["population"]["resources"]}
    flat |= {f"population.trainer.{k}" for k in base["population"]["trainer"]}
    flat |= {f"logging.wandb.{k}" for k in base["logging"]["wandb"]}
    flat -= {"population.resources", "population.trainer", "logging.wandb"}
    assert flat | {"name", "seed", "storage", "search"} == {key for key, _, _ in config_keys()}


def test_a_duplicate_key_is_refused_with_both_lines(tmp_path: Path):
    # YAML keeps the last value silently; a size given twice is a typo that would cost a search
    path = tmp_path / "dup.yaml"
    path.write_text("name: dup\npopulation:\n  size: 2\n  total_steps: 10\n  size: 3\n")
    with pytest.raises(ConfigError, match=r"dup.yaml:5: duplicate key 'population.size' \(first on line 3\)$"):
        load_config(path)


@pytest.mark.parametrize("override, expected", [
    ("search.train.lr={type: float, low: -0.1, high: 0.1}",
     "search.train.lr: low (-0.1) is not a valid train.lr: must be > 0, got -0.1"),
    # checked before the space is built, which would enumerate 10**12 values
    ("search.model.num_hidden_layers={type: int, low: 1, high: 1000000000000}",
     "search.model.num_hidden_layers: high (1000000000000) is not a valid model.num_hidden_layers: must be <= 1024, "
     "got 1000000000000"),
    ("search.train.warmup_steps={type: float, low: 1, high: 10}",
     "search.train.warmup_steps: a float gene proposes floats, but train.warmup_steps is an integer (use type: int)"),
])
def test_genes_are_checked_against_their_field(override: str, expected: str):
    with pytest.raises(ConfigError) as info:
        load_config(QUICKSTART, [override])
    assert str(info.value) == f"--set {override}: {expected}"


def test_a_float_gene_may_start_at_an_integer():
    cfg = load_config(QUICKSTART, ["search.train.weight_decay={type: float, low: 0, high: 1}"])
    assert cfg.search["train.weight_decay"]["low"] == 0.0


def test_mix_genes_are_genes_over_the_sources(tmp_path: Path):
    from population.member import mix_genes, split_genome
    path = tmp_path / "mix.yaml"
    path.write_text(MINIMAL.replace("{corpus: stdlib,", "{sources: {code: stdlib, docs: stdlib-docs}, mix: {docs: 2},")
                    + "  data.mix.docs: {type: float, low: 0.0, high: 4.0}\n")
    cfg = load_config(path)
    assert cfg.data.mix_weights() == {"code": 1.0, "docs": 2.0}
    space = build_space(cfg)
    assert space.paths == ("data.mix.docs", "train.lr")
    assert all(0.0 <= g["data.mix.docs"] <= 4.0 for g in (space.sample(__import__("numpy").random.default_rng(s))
                                                         for s in range(5)))
    genome = {"train.lr": 1e-3, "data.mix.docs": 0.5}
    assert split_genome(genome) == ({"lr": 1e-3}, {}) and mix_genes(genome) == {"docs": 0.5}
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_fitness_sets_are_objectives_and_old_runs_resume(tmp_path: Path):
    """fitness.eval's sets are val_bpb.<set> objectives (minimised); a run stored before the
    section existed resumes (its config.yaml has no fitness key)."""
    from evo.strategy import objective_sense
    from population.driver import config_conflict

    text = MINIMAL.replace("corpus: stdlib,", "sources: {code: stdlib, docs: stdlib-docs},") + (
                      "fitness: {eval: {docs: {source: docs, weight: 3}, code: {source: code}}}\n"
                      "strategy: {name: nsga2, objectives: [val_bpb.docs, val_bpb.code]}\n")
    cfg = load_config(write(tmp_path, text))
    setup = build_setup(cfg)
    assert setup.fitness.eval["docs"].weight == 3 and setup.fitness.held_out_corpora() == {}
    assert [objective_sense(o) for o in cfg.strategy.objectives] == ["min", "min"]
    assert config_from_dict(config_to_dict(cfg)) == cfg
    plain = load_config(write(tmp_path, MINIMAL))
    assert build_setup(plain).fitness is None
    old = {k: v for k, v in config_to_dict(plain).items() if k != "fitness"}
    assert config_conflict(config_to_dict(plain), old) is None
    assert config_conflict(config_to_dict(cfg), old) is not None

"""Genome: plain values, pickling, a process-independent id, diffs for lineage records."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evo.genome import Genome, diff, format_diff, format_float

REPO = Path(__file__).resolve().parents[2]

G = Genome.from_dict({
    "train.lr": 1e-3,
    "train.schedule": "cosine",
    "model.num_hidden_layers": 2,
    "model.bias": False,
    "train.decay_steps": None,
})


def test_values_are_sorted_plain_python():
    g = Genome.from_dict({"train.lr": np.float32(0.5), "model.hidden_size": np.int64(64), "train.x": [1, 2]})
    assert g.paths == ("model.hidden_size", "train.lr", "train.x")
    assert type(g["model.hidden_size"]) is int and type(g["train.lr"]) is float
    assert g["train.x"] == (1, 2)
    assert json.loads(json.dumps(g.as_dict())) == {"model.hidden_size": 64, "train.lr": 0.5, "train.x": [1, 2]}
    # constructing directly sorts and converts too
    assert Genome((("b", np.int32(1)), ("a", 2.0))) == Genome.from_dict({"a": 2.0, "b": 1})


def test_mapping_access():
    assert G["train.lr"] == 1e-3 and "train.lr" in G and "train.beta1" not in G and len(G) == 5
    with pytest.raises(KeyError):
        G["train.beta1"]
    assert G.hyperparameters() == {"train.lr": 1e-3, "train.schedule": "cosine", "train.decay_steps": None}
    assert G.architecture() == {"model.num_hidden_layers": 2, "model.bias": False}


def test_replace_returns_a_new_genome():
    h = G.replace({"train.lr": 2e-3, "train.beta1": 0.9})
    assert h["train.lr"] == 2e-3 and h["train.beta1"] == 0.9
    assert G["train.lr"] == 1e-3 and "train.beta1" not in G
    with pytest.raises(AttributeError):
        G.values = ()  # frozen


def test_duplicate_path_is_refused():
    with pytest.raises(ValueError, match="train.lr"):
        Genome((("train.lr", 1.0), ("train.lr", 2.0)))


def test_unplain_value_is_refused_naming_the_path():
    with pytest.raises(TypeError, match="train.lr"):
        Genome.from_dict({"train.lr": object()})


def test_equality_and_hash_follow_the_canonical_json():
    same = Genome.from_dict(dict(reversed(list(G.as_dict().items()))))
    assert same == G and hash(same) == hash(G) and same.id == G.id
    assert len({G, same, G.replace({"train.lr": 2e-3})}) == 2
    # 2 and 2.0 differ in a config file, so they differ here
    assert G.replace({"model.num_hidden_layers": 2.0}) != G


def test_pickle_round_trip():
    again = pickle.loads(pickle.dumps(G))
    assert again == G and again.id == G.id and again.values == G.values
    _ = G.id  # after the id has been computed (and cached) too
    assert pickle.loads(pickle.dumps(G)) == G


def test_id_is_12_hex_and_differs_between_genomes():
    assert len(G.id) == 12 and int(G.id, 16) >= 0
    assert G.replace({"train.lr": 1.2e-3}).id != G.id


def test_id_is_the_same_in_another_process_with_another_hash_seed():
    code = (
        "from evo.genome import Genome; "
        "print(Genome.from_dict({'train.lr': 1e-3, 'train.schedule': 'cosine', 'model.num_hidden_layers': 2, "
        "'model.bias': False, 'train.decay_steps': None}).id)"
    )
    ids = set()
    for seed in ("1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(REPO))
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        ids.add(out.stdout.strip())
    assert ids == {G.id}


def test_diff_lists_changed_added_and_removed_paths():
    h = G.replace({"train.lr": 1.2e-3, "model.num_hidden_layers": 3, "train.beta1": 0.9})
    assert diff(G, h) == {
        "model.num_hidden_layers": (2, 3),
        "train.beta1": (None, 0.9),
        "train.lr": (1e-3, 1.2e-3),
    }
    assert diff(G, G) == {}


def test_format_diff_is_one_readable_line():
    h = G.replace({"train.lr": 1.2e-3, "model.num_hidden_layers": 3, "train.schedule": "constant"})
    assert format_diff(G, h) == "model.num_hidden_layers 2→3, train.lr 1e-03→1.2e-03, train.schedule cosine→constant"
    assert format_diff(G, G) == ""


def test_format_diff_shows_a_change_below_three_digits():
    a = Genome.from_dict({"train.lr": 3.18e-3})
    assert format_diff(a, a.replace({"train.lr": 3.1812e-3})) == "train.lr 3.18e-03→3.181e-03"
    assert format_diff(a, a.replace({"train.lr": 3.2e-3})) == "train.lr 3.18e-03→3.2e-03"


@pytest.mark.parametrize(
    "x, text",
    [(1e-3, "1e-03"), (1.2e-3, "1.2e-03"), (0.00123456, "1.23e-03"), (0.95, "0.95"), (0.9, "0.9"),
     (3.14159, "3.14"), (123.456, "123"), (12345.0, "1.23e+04"), (0.0, "0"), (-2.5e-5, "-2.5e-05"),
     (float("inf"), "inf")],
)
def test_floats_are_formatted_with_three_significant_digits(x, text):
    assert format_float(x) == text

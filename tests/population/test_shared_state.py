"""Shared-memory state files (population/shared_state.py): what a donor publishes is what a
receiver reads, bit for bit, straight into its own tensors; bad files are one clear error."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from population import shared_state
from population.shared_state import Publisher, SharedFile, SharedStateError, new_session_dir, read_shared
from tests.population.conftest import tensors_by_path, tiny_parts
from trainers.trainer import Trainer


def _plain(obj):
    """The state with every tensor replaced by its dtype and shape."""
    if isinstance(obj, torch.Tensor):
        return (str(obj.dtype), tuple(obj.shape))
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def _assert_equal(a, b):
    assert _plain(a) == _plain(b)
    ta, tb = tensors_by_path(a), tensors_by_path(b)
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), key


@pytest.fixture
def trainers(cache_dir):
    model, train, data = tiny_parts(cache_dir)
    return lambda seed, **kw: Trainer(model if not kw else model.__class__(**{**model.__dict__, **kw}),
                                      train.__class__(**{**train.__dict__, "seed": seed}), data)


def test_a_published_state_reads_back_bit_for_bit(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {
        "format": 1, "step": 7, "name": "x", "nested": [1, (2.5, None)],
        "fp32": torch.randn(5, 3, generator=g),
        "bf16": torch.randn(4, 9, generator=g).to(torch.bfloat16),
        "int64": torch.arange(11),
        "scalar": torch.tensor(3.0),
        "empty": torch.zeros(0, 4),
        "odd": torch.randint(0, 255, (37,), dtype=torch.uint8, generator=g),   # next offset unaligned
        "after": torch.randn(2, 2, dtype=torch.float64, generator=g),
        "rng": {"torch": g.get_state()},
    }
    path = Publisher(tmp_path, "m0").publish(state)
    assert path is not None and os.path.dirname(path) == str(tmp_path)
    back = read_shared(path)
    _assert_equal(back, state)
    back["fp32"].add_(1)   # the reader's own memory: the file is untouched
    _assert_equal(read_shared(path), state)


def test_a_publisher_keeps_its_last_two_files_and_removes_them_on_close(tmp_path):
    pub = Publisher(tmp_path, "m3")
    paths = [pub.publish({"step": i, "w": torch.full((3,), float(i))}) for i in range(3)]
    assert [os.path.exists(p) for p in paths] == [False, True, True]
    assert read_shared(paths[2])["step"] == 2
    with pytest.raises(SharedStateError, match="is gone"):
        SharedFile(paths[0])
    pub.close()
    assert os.listdir(tmp_path) == []


def test_no_room_in_shared_memory_means_no_file(tmp_path, monkeypatch):
    """The caller then publishes through the object store (tested through the driver)."""
    monkeypatch.setattr(shared_state, "HEADROOM", 2**62)
    assert Publisher(tmp_path, "m0").publish({"w": torch.ones(4)}) is None
    assert os.listdir(tmp_path) == []


def test_bad_files_are_one_clear_error(tmp_path):
    path = Publisher(tmp_path, "m0").publish({"w": torch.ones(1000)})
    junk = tmp_path / "junk.state"
    junk.write_bytes(b"\0" * 100)
    with pytest.raises(SharedStateError, match="not an evo state file"):
        SharedFile(junk)
    cut = tmp_path / "cut.state"
    cut.write_bytes(open(path, "rb").read()[:1000])
    with pytest.raises(SharedStateError, match="truncated"):
        SharedFile(cut)
    (tmp_path / "tiny.state").write_bytes(b"EVO")
    with pytest.raises(SharedStateError, match="truncated"):
        SharedFile(tmp_path / "tiny.state")


def test_reading_into_a_trainer_in_place_equals_loading_the_state(trainers, tmp_path):
    """A receiver of the same architecture reads the donor's file straight into its own
    parameters and Adam moments (no new tensors, no new optimizer): it then trains exactly as a
    fresh trainer that loaded the donor's state dict."""
    donor, receiver, fresh = trainers(1), trainers(2), trainers(2)   # fresh: the same seed (batch order)
    donor.train(4)
    receiver.train(2)
    weights = {k: v.data_ptr() for k, v in receiver.model.state_dict().items()}
    optimizer = receiver._optimizer
    path = Publisher(tmp_path, "m0").publish(donor.state_dict())

    with SharedFile(path) as f:
        receiver.load_state_dict(f.state, read_into=f.read_into)
    fresh.load_state_dict(donor.state_dict())

    assert {k: v.data_ptr() for k, v in receiver.model.state_dict().items()} == weights
    assert receiver._optimizer is optimizer
    _assert_equal({k: v for k, v in receiver.state_dict().items() if k != "train_config"},
                  {k: v for k, v in donor.state_dict().items() if k != "train_config"})
    assert receiver.train(3)["losses"] == fresh.train(3)["losses"]


def test_another_architecture_is_read_whole_and_a_spare_model_is_reused(trainers, tmp_path):
    """An exploit across depths rebuilds the model once; the next one back to a depth the
    receiver had reuses that model (a spare), and both train exactly as fresh loads do."""
    deep, receiver = trainers(1, num_hidden_layers=2), trainers(2)
    deep.train(3)
    receiver.train(2)
    shallow_model = receiver.model
    back = trainers(4)
    back.train(5)
    pub = Publisher(tmp_path, "m0")

    for donor in (deep, back):
        with SharedFile(pub.publish(donor.state_dict())) as f:
            receiver.load_state_dict(f.state, read_into=f.read_into)
        assert receiver.model_config.num_hidden_layers == donor.model_config.num_hidden_layers
        twin = trainers(2)
        twin.load_state_dict(donor.state_dict())
        assert receiver.train(2)["losses"] == twin.train(2)["losses"]
    assert receiver.model is shallow_model   # the spare, not a new model


def test_a_new_session_removes_directories_of_drivers_that_died(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / f"{dead}-abc").mkdir()
    (tmp_path / f"{dead}-abc" / "m0-1.state").write_bytes(b"x")
    (tmp_path / f"{os.getppid()}-live").mkdir()   # a live process's directory stays
    mine = new_session_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, f"{os.getppid()}-live"])
    assert mine.name.startswith(f"{os.getpid()}-")

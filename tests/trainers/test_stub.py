"""trainers/stub.py's SleepTrainer: the Trainer's interface over a sleep, its state real tensors."""
from __future__ import annotations

import dataclasses
import io
import math

import pytest
import torch

from trainers import stub
from trainers.data import DataConfig
from trainers.model import InternLM2Config
from trainers.trainer import TrainConfig

MODEL = InternLM2Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
DATA = DataConfig(corpus="stdlib", seq_len=32)


def sleeper(seed: int = 0, state_kb: int = 8, **train) -> stub.SleepTrainer:
    return stub.SleepTrainer(MODEL, TrainConfig(seed=seed, **train), DATA, step_s=0.0, state_kb=state_kb)


def test_train_and_evaluate_follow_the_closed_form():
    t = sleeper(lr=1e-3, weight_decay=0.05, batch_size=4)
    before = t.evaluate()["val_bpb"]
    out = t.train(7)
    g = stub.gain(1e-3, 0.05)
    assert t.step == out["step"] == 7 and t.progress == pytest.approx(7 * g)
    assert out["tokens"] == 7 * 4 * 32 and len(out["losses"]) == 7
    after = t.evaluate()
    assert after["val_bpb"] == pytest.approx(stub.val_bpb(7 * g, 1e-3)) and after["val_bpb"] < before
    assert after["val_loss"] == pytest.approx(after["val_bpb"] * math.log(2))
    # the gain is largest at LR_OPT and WD_OPT, inside the quickstart's bounds
    assert stub.gain(stub.LR_OPT, stub.WD_OPT) == 1.0
    assert stub.gain(stub.LR_OPT * 3, stub.WD_OPT) < 1.0 and stub.gain(stub.LR_OPT / 3, stub.WD_OPT) < 1.0
    assert t.num_parameters() == 2 * 256 * 32 + 2 * (32 * 8 * 8 + 32 * 32 + 3 * 32 * 64 + 64) + 32


def test_a_copy_continues_exactly_and_its_state_is_state_kb_of_tensors():
    donor, receiver = sleeper(seed=1, lr=2e-3), sleeper(seed=2, lr=5e-4)
    donor.train(5)
    state = donor.state_dict()
    assert state["weights"].numel() * 4 == 8 * 1024 and state["weights"].dtype == torch.float32
    buf = io.BytesIO()
    torch.save(state, buf)                                        # what a checkpoint is
    buf.seek(0)
    receiver.load_state_dict(torch.load(buf, weights_only=True))
    assert receiver.train_config.seed == 2 and receiver.train_config.lr == 2e-3   # its seed, the donor's lr
    donor.train(3)
    receiver.train(3)
    assert receiver.evaluate() == donor.evaluate() and receiver.step == donor.step == 8
    assert torch.equal(receiver.state_dict()["weights"], donor.state_dict()["weights"])


def test_architecture_changes_hparams_merge_and_refusals():
    t = sleeper()
    t.train(10)
    p = t.progress
    t.set_architecture(dataclasses.replace(MODEL, num_hidden_layers=3))   # growing keeps the function
    assert t.progress == p and t.model_config.num_hidden_layers == 3
    t.set_architecture(MODEL)                                             # shrinking is lossy
    assert t.progress == pytest.approx(p * stub.LOSSY_KEEP)
    t.set_hparams(lr=4e-3)
    assert t.train_config.lr == 4e-3
    with pytest.raises(ValueError, match="train.seed: not a hyperparameter"):
        t.set_hparams(seed=3)
    other = sleeper(seed=5)
    other.train(20)
    t.merge_from(other.state_dict(), 0.25)
    assert t.progress == pytest.approx(0.25 * p * stub.LOSSY_KEEP + 0.75 * other.progress)
    q = t.progress
    deeper = dataclasses.replace(MODEL, num_hidden_layers=MODEL.num_hidden_layers + 1)
    sources = {"tok_embeddings": 0, **{f"layers.{i}": 1 for i in range(MODEL.num_hidden_layers)},
               f"layers.{MODEL.num_hidden_layers}": None, "norm": 0, "output": 1}
    assert t.inherit_layers(other.state_dict(), deeper, sources, 0.9) == []   # layer-wise: mean progress, lossy
    n = len(sources)
    assert t.progress == pytest.approx(stub.LOSSY_KEEP * (2 * q + (n - 3) * other.progress) / n)
    assert t.model_config == deeper
    with pytest.raises(ValueError, match="KiB of weights"):
        sleeper(state_kb=16).load_state_dict(t.state_dict())
    with pytest.raises(ValueError, match="a sleep trainer's state"):
        t.load_state_dict({"format": 1, "model": {}})

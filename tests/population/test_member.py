"""The Member actor on a real local Ray: exploit through the object store, genomes, checkpoints."""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import signal

import pytest
import ray
import torch

from population.member import Member
from population.store import RunStore
from tests.population.conftest import assert_same_state, tiny_parts
from trainers.data import DataConfig
from trainers.trainer import TrainConfig, lr_at

GENOME = {"train.lr": 3e-3, "model.num_hidden_layers": 1}


@pytest.fixture(scope="module")
def actors(ray_local, cache_dir):
    """Two resident members for the module (starting a process costs seconds on 2 cores)."""
    model, train, data = tiny_parts(cache_dir)
    train = dataclasses.replace(train, decay_steps=40)
    pair = [Member.options(num_cpus=0.5, max_concurrency=2).remote(i, model, train, data, GENOME, 1 + i, 1)
            for i in range(2)]
    yield pair
    for actor in pair:
        ray.kill(actor)


@pytest.fixture
def pair(actors):
    """The two members with fresh trainers (seeds 1 and 2), in the same processes."""
    ray.get([a.restart.remote(GENOME, 1 + i) for i, a in enumerate(actors)])
    return actors


def test_exploit_copies_weights_and_optimizer_bit_for_bit_without_restart(pair):
    donor, receiver = pair
    ray.get(donor.restart.remote({"train.lr": 2e-3, "model.num_hidden_layers": 2}, 1))
    ray.get([donor.train_and_evaluate.remote(4)[0], receiver.train_and_evaluate.remote(2)[0]])
    pid = ray.get(receiver.pid.remote())

    loaded = ray.get(receiver.load_state.remote(donor.get_state.remote()))

    assert loaded["step"] == 4
    assert ray.get(receiver.pid.remote()) == pid   # same process: no actor restart
    donor_state, receiver_state = ray.get([donor.get_state.remote(), receiver.get_state.remote()])
    assert_same_state(donor_state, receiver_state)
    assert len(receiver_state["optimizer"]["state"]) > 0   # Adam moments came along
    assert receiver_state["train_config"]["lr"] == donor_state["train_config"]["lr"] == 2e-3
    # the receiver keeps its own batch order
    assert receiver_state["train_config"]["seed"] == 2


def test_the_evaluated_state_is_published_with_the_result_and_loads_bit_for_bit(pair):
    """train_and_evaluate returns the evaluated state as a second return value (in the object
    store, owned by the caller): an exploit is then one call on the receiver."""
    donor, receiver = pair
    figures, ref = donor.train_and_evaluate.remote(3)
    result = ray.get(figures)
    published, snapshot = ray.get([ref, donor.get_state.remote()])
    assert_same_state(published, snapshot)
    assert published["step"] == result["step"] == 3

    assert ray.get(receiver.load_state.remote(ref))["step"] == 3
    assert_same_state(ray.get(receiver.get_state.remote()), snapshot)
    ray.get(receiver.restart.remote(GENOME, 2))
    assert ray.get(receiver.load_state.remote([ref]))["step"] == 3     # the driver's form: read inside
    assert_same_state(ray.get(receiver.get_state.remote()), snapshot)


def test_the_published_state_outlives_the_member_process(ray_local, cache_dir):
    """The driver owns the evaluated state (a return value, not the member's own ray.put), so it
    survives a SIGKILL of the member's process and restores a new one bit for bit."""
    model, train, data = tiny_parts(cache_dir)
    doomed, heir = [Member.options(num_cpus=0.5, max_concurrency=2).remote(0, model, train, data, GENOME, 1, 1)
                    for _ in range(2)]
    try:
        figures, ref = doomed.train_and_evaluate.remote(3)
        ray.get(figures)
        snapshot = ray.get(doomed.get_state.remote())
        info, changed = doomed.publish.remote()
        assert ray.get(info) == {"step": 3}
        os.kill(ray.get(doomed.pid.remote()), signal.SIGKILL)
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(doomed.pid.remote())
        assert ray.get(heir.load_state.remote([ref]))["step"] == 3
        assert_same_state(ray.get(heir.get_state.remote()), snapshot)
        assert_same_state(ray.get(changed), snapshot)
    finally:
        ray.kill(heir)


def test_an_interval_in_parts_trains_exactly_like_one_call(pair):
    """The driver's slots cut an interval into train_part calls: the same steps, losses and state,
    and train_and_evaluate's figures cover every part."""
    a, b = pair
    ray.get(b.restart.remote(GENOME, 1))                      # b is a twin of a (seed 1)
    whole = ray.get(a.train_and_evaluate.remote(6)[0])
    parts = [ray.get(b.train_part.remote(2)), ray.get(b.train_part.remote(1))]
    last = ray.get(b.train_and_evaluate.remote(3)[0])
    assert [p["step"] for p in parts] == [2, 3] and last["step"] == whole["step"] == 6
    assert last["val_bpb"] == whole["val_bpb"] and last["train_loss"] == whole["train_loss"]
    assert last["seconds"] >= sum(p["seconds"] for p in parts) + last["part_seconds"]
    assert_same_state(ray.get(a.get_state.remote()), ray.get(b.get_state.remote()))


def test_get_state_is_the_evaluated_snapshot_while_training(pair):
    member = pair[0]
    ray.get(member.train_and_evaluate.remote(3)[0])
    training, _ = member.train_and_evaluate.remote(200)
    during = ray.get(member.get_state.remote())   # max_concurrency=2: answered while it trains
    result = ray.get(training)
    assert during["step"] == 3
    assert result["step"] == 203 and ray.get(member.get_state.remote())["step"] == 203
    assert set(result) >= {"step", "train_loss", "val_bpb", "val_loss", "tokens_per_s", "seconds", "params"}


def test_apply_genome_sets_hyperparameters_and_architecture(pair):
    member = pair[0]
    ray.get(member.train_and_evaluate.remote(3)[0])
    before = ray.get(member.get_state.remote())

    out = ray.get(member.apply_genome.remote({"train.lr": 1e-3, "model.num_hidden_layers": 2}))

    after = ray.get(member.get_state.remote())
    assert after["model_config"]["num_hidden_layers"] == 2
    assert out["params"] > 0 and after["step"] == 3
    cfg = after["train_config"]
    assert cfg["lr"] == 1e-3
    expected_lr = lr_at(TrainConfig(**cfg), 3)
    assert all(g["lr"] == pytest.approx(expected_lr) for g in after["optimizer"]["param_groups"])
    # the existing layer's weights are carried over; the new one starts as an identity (wo = 0)
    for key, value in before["model"].items():
        assert torch.equal(after["model"][key], value), key
    assert torch.count_nonzero(after["model"]["model.layers.1.attention.wo.weight"]) == 0
    assert "val_loss_jump" not in out                       # growth keeps the function: nothing to measure
    # a lossy change (shrinking back) measures the validation loss's jump at the change
    res = ray.get(member.train_and_evaluate.remote(2)[0])
    out = ray.get(member.apply_genome.remote({"train.lr": 1e-3, "model.num_hidden_layers": 1}))
    res0 = ray.get(member.train_and_evaluate.remote(0)[0])
    assert out["val_loss_jump"] == pytest.approx(res0["val_loss"] - res["val_loss"], abs=1e-6)
    assert out["val_loss_jump"] != 0


def test_checkpoint_save_wait_load_round_trip(pair, tmp_path):
    store = RunStore(tmp_path, "ckpt")
    member, other = pair
    ray.get(member.train_and_evaluate.remote(3)[0])
    path = store.checkpoint_path(0, 1)

    saved = ray.get(member.save_checkpoint.remote(store.storage, store.name, path))
    training, _ = member.train_and_evaluate.remote(5)     # the write goes on beside training
    written = ray.get(member.wait_saved.remote())
    ray.get(training)

    assert saved["step"] == 3 and written["bytes"] > 0 and written["path"] == path
    assert (tmp_path / "ckpt" / path).stat().st_size == written["bytes"]
    assert written["sha256"] == store.checkpoint_sha256(path) == hashlib.sha256((tmp_path / "ckpt" / path).read_bytes()).hexdigest()
    assert ray.get(other.load_checkpoint.remote(store.storage, store.name, path))["step"] == 3
    assert_same_state(store.load_checkpoint(path), ray.get(other.get_state.remote()))


def test_divergence_is_a_result_not_a_crash(pair):
    member = pair[0]
    pid = ray.get(member.pid.remote())
    ray.get(member.apply_genome.remote({"train.lr": 1e6, "model.num_hidden_layers": 1}))
    ray.get(member.load_state.remote(_with_hparams(ray.get(member.get_state.remote()), grad_clip=0.0,
                                                   warmup_steps=0)))
    result, state = ray.get(member.train_and_evaluate.remote(30))
    assert result["failed"] is True and state is None and "non-finite" in result["error"]
    assert ray.get(member.pid.remote()) == pid


def _with_hparams(state: dict, **hp) -> dict:
    return dict(state, train_config=dict(state["train_config"], **hp))


def test_an_all_zero_mix_keeps_the_mix_in_force_and_the_member_trains_on(ray_local, cache_dir):
    """A genome whose data.mix genes make every source's weight 0 (the config refuses search
    spaces that can reach one; a genome from elsewhere still might) neither fails the member nor
    changes what it trains on: it keeps the mix in force, exactly as if the genome had not come."""
    model, train, _ = tiny_parts(cache_dir)
    data = DataConfig(sources={"code": "stdlib", "docs": "stdlib-docs"}, seq_len=32, max_bytes=200_000,
                      eval_batches=1, eval_batch_size=4, cache_dir=cache_dir)
    genome = {"train.lr": 3e-3, "data.mix.code": 0.25, "data.mix.docs": 1.0}
    zero = {**genome, "data.mix.code": 0.0, "data.mix.docs": 0.0}
    member = Member.options(num_cpus=0.5).remote(0, model, train, data, genome, 1, 1)
    try:
        ray.get(member.train_and_evaluate.remote(2)[0])
        ray.get(member.apply_genome.remote(zero))
        assert ray.get(member.get_state.remote())["mix"] == {"code": 0.25, "docs": 1.0}
        res = ray.get(member.train_and_evaluate.remote(2)[0])
        assert res["step"] == 4 and math.isfinite(res["val_bpb"])
        kept = ray.get(member.get_state.remote())

        ray.get(member.restart.remote(genome, 1))
        ray.get(member.train_and_evaluate.remote(2)[0])
        ray.get(member.train_and_evaluate.remote(2)[0])
        assert_same_state(kept, ray.get(member.get_state.remote()))

        # a fresh member (restart) on an all-zero genome trains on data.mix's weights (1 each)
        ray.get(member.restart.remote(zero, 1))
        assert ray.get(member.get_state.remote())["mix"] == {}
        assert math.isfinite(ray.get(member.train_and_evaluate.remote(1)[0])["val_bpb"])
    finally:
        ray.kill(member)

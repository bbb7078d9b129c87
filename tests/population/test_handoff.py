"""The exploit hand-off (population/handoff.py) on a real local Ray: states move through the
object store, packed as one buffer, and a swap takes both states before either member loads."""
from __future__ import annotations

import dataclasses
import os
import pickle
import signal

import pytest
import ray
import torch

from population.driver import _StopFlag
from population.handoff import Handoff, WireState
from population.member import Member
from population.members import Members
from population.store import RunStore
from tests.population.conftest import assert_same_state, make_setup, tensors_by_path, tiny_parts

GENOME = {"train.lr": 3e-3, "model.num_hidden_layers": 1}


def test_wire_state_round_trips_every_dtype_and_shape():
    state = {"model": {"w": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16)},
             "optimizer": {"state": {0: {"step": torch.tensor(3.0), "mask": torch.tensor([True, False])}},
                           "param_groups": [{"lr": 1e-3, "params": [0]}]},
             "rng": {"torch": torch.Generator().manual_seed(5).get_state()},
             "ids": torch.arange(4), "empty": torch.zeros(0, 2), "step": 9, "name": ("a", 1)}
    back = pickle.loads(pickle.dumps(WireState(state), protocol=5))
    flat_in, flat_out = tensors_by_path(state), tensors_by_path(back)
    assert flat_in.keys() == flat_out.keys()
    for key, t in flat_in.items():
        assert flat_out[key].dtype == t.dtype and flat_out[key].shape == t.shape, key
        assert torch.equal(flat_out[key], t), key
    assert back["step"] == 9 and back["name"] == ("a", 1) and back["optimizer"]["param_groups"][0]["lr"] == 1e-3
    torch.Generator().set_state(back["rng"]["torch"])   # a tensor of its own, usable as RNG state
    back["optimizer"]["state"][0]["step"] += 1           # writable: not a view of the sender's buffer


@pytest.fixture
def handoff(ray_local, cache_dir, tmp_path):
    """A Handoff over two fresh members (seeds 1 and 2) of a Members as the driver has it."""
    model, train, data = tiny_parts(cache_dir)
    train = dataclasses.replace(train, decay_steps=40)
    members = Members(make_setup(tmp_path, "handoff", cache_dir), RunStore(tmp_path, "handoff"), 1, _StopFlag())
    members.actors = {i: Member.options(num_cpus=0.5, max_concurrency=2).remote(i, model, train, data, GENOME,
                                                                                1 + i, 1) for i in range(2)}
    try:
        yield Handoff(members)
    finally:
        members.close()


def test_two_members_swap_states_in_one_plan(handoff):
    """Each is the other's donor: the receivers get the evaluated states kept from the results
    (through the object store, bit for bit); after both publish their new states, a second
    swap gives each its own state back."""
    members = handoff.members
    a, b = members[0], members[1]
    results = dict(enumerate(ray.get([members.train_and_evaluate(0, 3), members.train_and_evaluate(1, 5)])))
    handoff.keep_evaluated(results)
    assert set(handoff.current) == {0, 1} and members.published == {}
    state_a, state_b = ray.get([a.get_state.remote(), b.get_state.remote()])

    loaded, latency = handoff.move({0: 1, 1: 0})

    assert loaded[0]["step"] == 5 and loaded[1]["step"] == 3 and set(latency) == {0, 1}
    assert_same_state(ray.get(a.get_state.remote()), state_b)
    assert_same_state(ray.get(b.get_state.remote()), state_a)
    assert_same_state(ray.get(handoff.current[0]), state_a)   # until the receivers publish
    handoff.refresh([0, 1])
    assert_same_state(ray.get(handoff.current[0]), state_b)

    loaded, _ = handoff.move({0: 1, 1: 0})

    assert loaded[0]["step"] == 3 and loaded[1]["step"] == 5
    assert_same_state(ray.get(a.get_state.remote()), state_a)
    assert_same_state(ray.get(b.get_state.remote()), state_b)


def test_a_receiver_that_died_is_noted_not_raised(handoff):
    """A receiver killed before its load: the move leaves it out and notes it dead; the donor's
    state is the driver's, so the other receiver still loads it."""
    members = handoff.members
    handoff.refresh([0, 1])
    os.kill(ray.get(members[1].pid.remote()), signal.SIGKILL)
    loaded, _ = handoff.move({1: 0})
    assert loaded == {} and set(members.dead) == {1} and "process died" in members.dead[1]
    handoff.refresh([0, 1])                      # publishing on a dead member is noted too
    assert set(members.dead) == {1}
    members.revive(1, GENOME, 2)
    assert members.dead == {} and members.generation[1] >= 1
    loaded, _ = handoff.move({1: 0})
    assert loaded[1]["step"] == 0

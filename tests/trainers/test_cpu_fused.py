"""trainers/cpu_fused.py: the hand-written CPU path equals the plain modules of trainers/model.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.trainers.tiny_models import batch, spread_model, tiny
from trainers import cpu_fused
from trainers.cpu_fused import FusedForward, qkv_compute_order
from trainers.model import InternLM2ForCausalLM
from trainers.trainer import Trainer, TrainConfig


@pytest.mark.parametrize("overrides", [
    dict(num_attention_heads=4, num_key_value_heads=2),
    dict(num_attention_heads=4, num_key_value_heads=4),
    dict(num_attention_heads=8, num_key_value_heads=2),
    dict(num_attention_heads=4, num_key_value_heads=1),
    dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=3),
    dict(rope_scaling={"type": "linear", "factor": 2.0}),
    dict(max_position_embeddings=16, rope_scaling={"type": "dynamic", "factor": 2.0}),  # T=20 > 16: NTK on
])
def test_fused_equals_the_plain_modules(overrides):
    """Logits within 1e-5 and every parameter's gradient within 1e-5 of its scale, also on a
    second step that runs in the reused buffers, and the same logits without a graph."""
    model = spread_model(tiny(**overrides))
    fused = FusedForward(model)
    ids = batch(model.config, T=20, B=3)
    targets = batch(model.config, T=20, B=3, seed=2)

    def two_steps(forward):
        model.zero_grad()
        for _ in range(2):  # gradients accumulate over both: the second runs in reused buffers
            logits = forward(ids)
            F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        with torch.no_grad():
            eval_logits = forward(ids)
        return logits.detach(), eval_logits, {n: p.grad.clone() for n, p in model.named_parameters()}

    fused_logits, fused_eval, fused_grads = two_steps(fused)
    plain_logits, plain_eval, plain_grads = two_steps(model)
    assert plain_logits.abs().max() > 1.0  # logits far from zero: the comparison means something
    assert (fused_logits - plain_logits).abs().max().item() < 1e-5
    assert torch.equal(fused_eval, fused_logits)
    assert torch.equal(plain_eval, plain_logits)
    assert fused_grads.keys() == plain_grads.keys() == {n for n, _ in model.named_parameters()}
    for name, g in plain_grads.items():
        scale = g.abs().max().item()
        assert scale > 0, name
        assert (fused_grads[name] - g).abs().max().item() <= 1e-5 * scale, name


def test_fused_path_runs_one_function_per_layer(monkeypatch):
    """What the speed comes from: a decoder layer is one node in autograd's graph."""
    model = spread_model(tiny(num_hidden_layers=3))
    logits = FusedForward(model)(batch(model.config, T=8))
    nodes, seen, stack = [], set(), [logits.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    assert nodes.count("_DecoderLayerFnBackward") == 3
    assert nodes.count("_NormLinearFnBackward") == 1


@pytest.mark.parametrize("case", ["bias", "autocast", "float64"])
def test_falls_back_to_the_plain_modules(case):
    """Where the hand-written path does not apply (biases, autocast, another dtype) the call is
    the model's own forward: the same logits bit for bit."""
    model = spread_model(tiny(bias=case == "bias"))
    if case == "float64":
        model = model.double()
    ids = batch(model.config, T=12)
    fused = FusedForward(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        ours, plain = fused(ids), model(ids)
    assert ours.dtype == plain.dtype
    assert torch.equal(ours, plain)


def test_a_second_backward_through_the_buffers_is_refused():
    model = spread_model(tiny())
    loss = FusedForward(model)(batch(model.config, T=8)).square().mean()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="ran twice"):
        loss.backward()


def test_compute_order_groups_heads_and_pairs_rope_dims():
    # H=4, KV=2, D=4: HF rows per group [q q k v] x 4 dims; compute order [q0..q3 | k0 k1 | v0 v1],
    # q/k dims as RoPE pairs (0, 2), (1, 3)
    order = qkv_compute_order(4, 2, 4).tolist()
    pair = lambda start: [start, start + 2, start + 1, start + 3]  # noqa: E731
    assert order == (pair(0) + pair(4) + pair(16) + pair(20)  # q0 q1 (group 0), q2 q3 (group 1)
                     + pair(8) + pair(24)  # k0, k1
                     + [12, 13, 14, 15, 28, 29, 30, 31])  # v0, v1
    assert sorted(order) == list(range(32))


def test_the_trainer_trains_through_the_fused_path_on_cpu(monkeypatch, tiny_model, small_data):
    """On CPU without compile every training step and evaluation batch goes through the
    decoder-layer Function; the model the Trainer exposes stays the plain one."""
    calls = []
    apply = cpu_fused._DecoderLayerFn.apply
    monkeypatch.setattr(cpu_fused._DecoderLayerFn, "apply", lambda *a: (calls.append(1), apply(*a))[1])
    tr = Trainer(tiny_model, TrainConfig(batch_size=4, num_threads=1), small_data)
    layers = tiny_model.num_hidden_layers
    tr.train(3)
    assert len(calls) == 3 * layers
    tr.evaluate()
    assert len(calls) == (3 + small_data.eval_batches) * layers
    assert type(tr.model) is InternLM2ForCausalLM

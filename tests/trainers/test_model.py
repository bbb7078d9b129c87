"""trainers/model.py: InternLM2 equals transformers' Llama on the same weights; config checks; init."""

from __future__ import annotations

import dataclasses
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from tests.trainers.tiny_models import batch, spread_model, tiny
from trainers.export import export_llama
from trainers.model import InternLM2Config, InternLM2ForCausalLM, RotaryEmbedding

transformers = pytest.importorskip("transformers")


def llama_twin(model: InternLM2ForCausalLM, tmp_path) -> torch.nn.Module:
    export_llama(model, model.config, tmp_path / "llama")
    return transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()


# ------------------------------------------------------------------------------------------------
# same weights, same logits


@pytest.mark.parametrize("heads,kv", [(4, 4), (4, 2), (4, 1), (8, 2)])
def test_logits_match_transformers_llama(tmp_path, heads, kv):
    config = tiny(num_attention_heads=heads, num_key_value_heads=kv)
    model = spread_model(config).eval()
    ref = llama_twin(model, tmp_path)
    ids = batch(config, T=24)
    with torch.no_grad():
        ours, theirs = model(ids), ref(ids).logits
    assert ours.shape == (2, 24, config.vocab_size)
    assert theirs.abs().max() > 1.0  # logits far from zero: the comparison means something
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("bias", [True, False])
def test_gradients_match_transformers_llama(tmp_path, bias):
    """Every parameter's gradient, through the packed wqkv's split and GQA, against Llama's."""
    config = tiny(num_attention_heads=8, num_key_value_heads=2, bias=bias)
    model = spread_model(config)
    ref = llama_twin(model, tmp_path).train()
    ids = batch(config, T=20)
    targets = batch(config, T=20, seed=2)
    for m, logits in ((model, model(ids)), (ref, ref(ids).logits)):
        F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    from trainers.export import internlm2_to_llama_state

    ours = internlm2_to_llama_state({k: p.grad for k, p in model.named_parameters()}, config)
    theirs = {k: p.grad for k, p in ref.named_parameters()}
    assert ours.keys() == theirs.keys()
    for key in ours:
        scale = theirs[key].abs().max().item()
        assert scale > 0, key
        assert (ours[key] - theirs[key]).abs().max().item() <= 1e-5 + 1e-4 * scale, key


def test_biases_match_transformers_llama(tmp_path):
    config = tiny(bias=True)
    model = spread_model(config).eval()
    ref = llama_twin(model, tmp_path)
    ids = batch(config, T=16)
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max().item() <= 1e-4


def test_linear_rope_scaling_matches_transformers_llama(tmp_path):
    config = tiny(rope_scaling={"type": "linear", "factor": 4.0})
    model = spread_model(config).eval()
    ref = llama_twin(model, tmp_path)
    ids = batch(config, T=24)
    with torch.no_grad():
        ours = model(ids)
        assert (ours - ref(ids).logits).abs().max().item() <= 1e-4
        unscaled = InternLM2ForCausalLM(tiny())
        unscaled.load_state_dict(model.state_dict())
        assert (ours - unscaled.eval()(ids)).abs().max().item() > 1e-2  # the scaling did something


@pytest.mark.parametrize("T", [12, 40])
def test_dynamic_ntk_rope_matches_transformers_llama(tmp_path, T):
    """InternLM2's DynamicNTKScalingRotaryEmbedding and Llama's "dynamic" rope use the same formula,
    base * (f * T / max_pos - (f - 1)) ** (D / (D - 2)) when T > max_pos, plain RoPE otherwise.
    Compared on a fresh model per length (HF InternLM2 keeps a grown table across calls; ours
    and Llama's are functions of the current length)."""
    config = tiny(max_position_embeddings=16, rope_scaling={"type": "dynamic", "factor": 2.0})
    model = spread_model(config).eval()
    ref = llama_twin(model, tmp_path)
    ids = batch(config, T=T)
    with torch.no_grad():
        ours = model(ids)
        assert (ours - ref(ids).logits).abs().max().item() <= 1e-4
        unscaled = InternLM2ForCausalLM(tiny(max_position_embeddings=16))
        unscaled.load_state_dict(model.state_dict())
        gap = (ours - unscaled.eval()(ids)).abs().max().item()
    if T <= 16:
        assert gap == 0.0
    else:
        assert gap > 1e-3


def test_dynamic_ntk_angles_follow_the_internlm2_formula():
    config = tiny(hidden_size=64, num_attention_heads=4, max_position_embeddings=16,
                  rope_theta=10000.0, rope_scaling={"type": "dynamic", "factor": 3.0})
    rope = RotaryEmbedding(config)
    D, T = config.head_dim, 50
    base = 10000.0 * (3.0 * T / 16 - 2.0) ** (D / (D - 2))
    inv_freq = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    expected = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)
    assert torch.allclose(rope.angles(T).double(), expected, rtol=1e-5, atol=1e-4)
    short = torch.outer(torch.arange(16, dtype=torch.float64), 1.0 / 10000.0 ** (torch.arange(0, D, 2) / D))
    assert torch.allclose(rope.angles(16).double(), short, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# layout, state dict, init


def test_wqkv_row_blocks_are_q0_q1_k0_v0_q2_q3_k1_v1():
    """H=4, KV=2: blocks of head_dim rows; the Llama split must find q/k/v where InternLM2 puts them."""
    from trainers.export import internlm2_to_llama_state

    config = tiny(hidden_size=16, num_attention_heads=4, num_key_value_heads=2)
    D = config.head_dim  # 4
    state = InternLM2ForCausalLM(config).state_dict()
    block = torch.arange(8).repeat_interleave(D)  # row r belongs to block r // D
    state["model.layers.0.attention.wqkv.weight"] = block[:, None].float().expand(8 * D, 16).clone()
    llama = internlm2_to_llama_state(state, config)
    blocks = lambda t: t[::D, 0].long().tolist()  # noqa: E731
    assert blocks(llama["model.layers.0.self_attn.q_proj.weight"]) == [0, 1, 4, 5]  # q0 q1 | q2 q3
    assert blocks(llama["model.layers.0.self_attn.k_proj.weight"]) == [2, 6]  # k0 | k1
    assert blocks(llama["model.layers.0.self_attn.v_proj.weight"]) == [3, 7]  # v0 | v1


def test_state_dict_keys_are_hf_internlm2():
    config = tiny(num_hidden_layers=2)
    keys = set(InternLM2ForCausalLM(config).state_dict())
    expected = {"model.tok_embeddings.weight", "model.norm.weight", "output.weight"}
    for i in range(2):
        expected |= {f"model.layers.{i}.{k}" for k in (
            "attention.wqkv.weight", "attention.wo.weight", "feed_forward.w1.weight", "feed_forward.w3.weight",
            "feed_forward.w2.weight", "attention_norm.weight", "ffn_norm.weight")}
    assert keys == expected
    with_bias = set(InternLM2ForCausalLM(tiny(bias=True)).state_dict())
    assert with_bias - keys == {f"model.layers.{i}.attention.{m}.bias" for i in range(2) for m in ("wqkv", "wo")}


def test_shapes_and_parameter_count():
    config = tiny(num_attention_heads=8, num_key_value_heads=2)
    model = InternLM2ForCausalLM(config)
    state = model.state_dict()
    C, D = 32, 4
    assert state["model.layers.0.attention.wqkv.weight"].shape == ((8 + 2 * 2) * D, C)
    assert state["model.layers.0.attention.wo.weight"].shape == (C, C)
    assert state["model.layers.0.feed_forward.w2.weight"].shape == (C, 44)
    per_layer = (8 + 4) * D * C + C * C + 3 * C * 44 + 2 * C
    assert model.num_parameters() == 2 * 61 * C + C + 2 * per_layer


def test_inv_freq_is_a_buffer_outside_the_state_dict():
    model = InternLM2ForCausalLM(tiny())
    buffers = dict(model.named_buffers())
    assert "model.rotary_emb.inv_freq" in buffers
    assert not any("inv_freq" in k or "qkv_order" in k for k in model.state_dict())


def test_init_is_reproducible_and_leaves_the_global_rng_alone():
    config = tiny()
    before = torch.get_rng_state()
    a = InternLM2ForCausalLM(config, torch.Generator().manual_seed(7)).state_dict()
    b = InternLM2ForCausalLM(config, torch.Generator().manual_seed(7)).state_dict()
    c = InternLM2ForCausalLM(config, torch.Generator().manual_seed(8)).state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["output.weight"], c["output.weight"])


def test_init_statistics():
    config = InternLM2Config(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4)
    state = InternLM2ForCausalLM(config, torch.Generator().manual_seed(0)).state_dict()
    residual = 0.02 / math.sqrt(2 * 4)
    assert state["model.layers.1.attention.wo.weight"].std().item() == pytest.approx(residual, rel=0.05)
    assert state["model.layers.2.feed_forward.w2.weight"].std().item() == pytest.approx(residual, rel=0.05)
    assert state["model.layers.0.attention.wqkv.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert state["output.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(state["model.norm.weight"], torch.ones(128))
    assert state["model.layers.0.attention.wqkv.weight"].mean().abs().item() < 1e-3


def test_overfits_one_batch():
    config = InternLM2Config()
    model = InternLM2ForCausalLM(config, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = batch(config, T=17, B=2)
    x, y = ids[:, :-1], ids[:, 1:]
    losses = []
    for _ in range(25):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(256), rel=0.02)  # uniform at init
    assert losses[-1] < 0.5 * losses[0]


def test_bf16_autocast_stays_close_to_fp32():
    config = tiny()
    model = spread_model(config).eval()
    ids = batch(config, T=16)
    with torch.no_grad():
        full = model(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(ids)
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().max().item() < 0.05 * full.abs().max().item()


# ------------------------------------------------------------------------------------------------
# config validation


@pytest.mark.parametrize(
    "fields,names",
    [   # the shape rules (trainers/architecture.py) and rope_scaling: a message naming the fields
        ({"hidden_size": 66, "num_attention_heads": 4}, ["hidden_size (66)", "num_attention_heads (4)"]),
        ({"num_attention_heads": 4, "num_key_value_heads": 3}, ["num_attention_heads (4)", "num_key_value_heads (3)"]),
        ({"hidden_size": 12, "num_attention_heads": 4, "num_key_value_heads": 1}, ["head_dim", "hidden_size", "3"]),
        ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, ["rope_scaling.type", "yarn"]),
        ({"rope_scaling": {"type": "linear", "factor": 0.5}}, ["rope_scaling.factor (0.5)"]),
        ({"rope_scaling": {"type": "linear", "factor": 2.0, "beta": 1}}, ["rope_scaling", "beta"]),
    ],
)
def test_impossible_shapes_are_refused_naming_the_fields(fields, names):
    with pytest.raises(ValidationError) as info:              # a ValueError
        InternLM2Config(**fields)
    message = str(info.value.errors()[0]["ctx"]["error"])
    assert "\n" not in message and message.startswith("model: ")
    for name in names:
        assert name in message


@pytest.mark.parametrize(
    "fields,error",
    [   # one field's type or bound: pydantic locates it
        ({"vocab_size": 0}, "greater_than"),
        ({"num_hidden_layers": -1}, "greater_than"),
        ({"intermediate_size": 17.5}, "int_type"),
        ({"hidden_size": "64"}, "int_type"),
        ({"hidden_size": True}, "int_type"),                   # YAML's `yes` is no number
        ({"rms_norm_eps": 0.0}, "greater_than"),
        ({"rope_theta": float("nan")}, "finite_number"),
        ({"bias": "yes"}, "bool_type"),
        ({"rope_scaling": "linear"}, "dict_type"),
        ({"hidden": 64}, "unexpected_keyword_argument"),
    ],
)
def test_bad_fields_are_located(fields, error):
    with pytest.raises(ValidationError) as info:
        InternLM2Config(**fields)
    first = info.value.errors()[0]
    assert (first["loc"][0], first["type"]) == (next(iter(fields)), error)


def test_config_round_trips_and_stays_a_dataclass():
    config = InternLM2Config(hidden_size=128, num_attention_heads=8, rope_theta=1000000,
                             rope_scaling={"type": "dynamic", "factor": 2})
    assert config.rope_theta == 1e6 and isinstance(config.rope_theta, float)
    assert config.rope_scaling == {"type": "dynamic", "factor": 2.0}
    assert config.head_dim == 16
    assert InternLM2Config(**config.to_dict()) == config
    assert dataclasses.replace(config, num_hidden_layers=3).num_hidden_layers == 3
    assert pickle.loads(pickle.dumps(config)) == config


def test_the_model_file_holds_only_the_model():
    """The CPU speed path lives in trainers/cpu_fused.py; model.py is what a reader checks against
    the official InternLM2 code."""
    import ast

    import trainers.model

    source = open(trainers.model.__file__).read()
    tree = ast.parse(source)
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {name.split(".")[0] for name in modules} == {"__future__", "math", "torch", "trainers"}
    # its config only (the shape rules live with it in trainers/config.py and trainers/architecture.py)
    assert {name for name in modules if name.startswith("trainers")} == {"trainers.config"}
    assert "autograd.Function" not in source


def test_rms_norm_fused_formula_is_the_plain_one():
    """On CUDA RMSNorm runs torch's fused F.rms_norm (one kernel); the formula must be InternLM2's
    x * rsqrt(mean(x^2) + eps) * weight. Checked here on CPU tensors, where both can run."""
    from trainers.model import RMSNorm
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(24, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(24, generator=g) + 0.5)
    x = torch.randn(3, 5, 24, generator=g) * 3
    fused = norm.weight * torch.nn.functional.rms_norm(x, (24,), eps=1e-6)
    torch.testing.assert_close(fused, norm(x), rtol=1e-6, atol=1e-6)

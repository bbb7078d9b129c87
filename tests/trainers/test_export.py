"""trainers/export.py: HF InternLM2 / Llama directories, the loader, and its one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from trainers.export import ExportError, export_internlm2, export_llama, load_internlm2
from trainers.model import InternLM2Config, InternLM2ForCausalLM


def small(**overrides) -> InternLM2Config:
    fields = dict(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6)
    fields.update(overrides)
    return InternLM2Config(**fields)


def test_internlm2_round_trip(tmp_path):
    config = small(rope_scaling={"type": "dynamic", "factor": 2.0}, bias=True)
    model = InternLM2ForCausalLM(config, torch.Generator().manual_seed(3))
    out = export_internlm2(model, config, tmp_path / "ckpt", bos_token_id=1, eos_token_id=2)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]

    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == "internlm2"
    assert raw["architectures"] == ["InternLM2ForCausalLM"]
    assert raw["torch_dtype"] == "float32"
    assert (raw["bos_token_id"], raw["eos_token_id"]) == (1, 2)
    assert raw["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
    assert isinstance(raw["rope_scaling"]["factor"], float)  # HF InternLM2Config insists on a float
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "rms_norm_eps", "rope_theta", "bias", "max_position_embeddings"):
        assert raw[field] == getattr(config, field), field
    assert raw["tie_word_embeddings"] is False and raw["hidden_act"] == "silu"

    loaded_config, state = load_internlm2(out)
    assert loaded_config == config
    original = model.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], original[k]) for k in state)
    twin = InternLM2ForCausalLM(loaded_config)
    twin.load_state_dict(state)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(twin(ids), model(ids))


def test_export_takes_a_state_dict_and_keeps_its_dtype(tmp_path):
    config = small()
    state = {k: v.to(torch.bfloat16) for k, v in InternLM2ForCausalLM(config).state_dict().items()}
    out = export_internlm2(state, config, tmp_path / "bf16")
    raw = json.loads((out / "config.json").read_text())
    assert raw["torch_dtype"] == "bfloat16" and raw["bos_token_id"] is None
    _, loaded = load_internlm2(out)
    assert loaded["output.weight"].dtype == torch.bfloat16
    assert torch.equal(loaded["output.weight"], state["output.weight"])


def test_llama_export_config_and_names(tmp_path):
    config = small(rope_scaling={"type": "linear", "factor": 2.0}, bias=True)
    out = export_llama(InternLM2ForCausalLM(config), config, tmp_path / "llama")
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == "llama" and raw["architectures"] == ["LlamaForCausalLM"]
    assert raw["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert raw["rope_theta"] == 1e6 and raw["head_dim"] == 8
    assert raw["attention_bias"] is True and raw["tie_word_embeddings"] is False
    from safetensors.torch import load_file

    keys = set(load_file(str(out / "model.safetensors")))
    layer = {f"self_attn.{p}_proj.{s}" for p in "qkvo" for s in ("weight", "bias")}
    layer |= {f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    layer |= {"input_layernorm.weight", "post_attention_layernorm.weight"}
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    expected |= {f"model.layers.{i}.{k}" for i in range(2) for k in layer}
    assert keys == expected


def test_export_refuses_a_state_that_does_not_fit_the_config(tmp_path):
    state = InternLM2ForCausalLM(small()).state_dict()
    with pytest.raises(ExportError, match="model.layers.2"):
        export_internlm2(state, small(num_hidden_layers=3), tmp_path / "x")
    with pytest.raises(ExportError, match="shape"):
        export_llama(state, small(intermediate_size=48), tmp_path / "y")


def _one_line(info) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


def test_load_errors_are_one_line_export_errors(tmp_path):
    config = small()
    good = export_internlm2(InternLM2ForCausalLM(config), config, tmp_path / "good")

    with pytest.raises(ExportError) as info:
        load_internlm2(tmp_path / "nowhere")
    assert "nowhere" in _one_line(info) and "not a directory" in str(info.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExportError) as info:
        load_internlm2(empty)
    assert "config.json" in _one_line(info) and "missing" in str(info.value)

    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(ExportError) as info:
        load_internlm2(bad_json)
    assert "not valid JSON" in _one_line(info)

    llama = export_llama(InternLM2ForCausalLM(config), config, tmp_path / "llama")
    with pytest.raises(ExportError) as info:
        load_internlm2(llama)
    assert "'llama'" in _one_line(info)

    (good / "model.safetensors").write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(ExportError) as info:
        load_internlm2(good)
    assert "model.safetensors" in _one_line(info)

    (good / "model.safetensors").unlink()
    with pytest.raises(ExportError) as info:
        load_internlm2(good)
    assert "missing" in _one_line(info)


def test_load_refuses_weights_that_do_not_match_config_json(tmp_path):
    config = small()
    out = export_internlm2(InternLM2ForCausalLM(config), config, tmp_path / "ckpt")
    raw = json.loads((out / "config.json").read_text())
    raw["hidden_size"] = 64
    (out / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ExportError) as info:
        load_internlm2(out)
    assert "shape" in _one_line(info)
    raw["hidden_size"] = 66
    (out / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ExportError) as info:
        load_internlm2(out)
    assert "hidden_size (66)" in _one_line(info)


def test_export_writes_the_grown_norms_eps_or_refuses_mixed_eps(tmp_path):
    """A model whose width grew (trainers.transfer: each norm's eps scaled with the width) exports
    its norms' common eps, and the checkpoint computes the grown model's function; after a width
    growth plus new layers (whose norms take the config's eps) the eps differ: one-line refusal."""
    from dataclasses import replace

    from trainers.transfer import transfer_norm_eps, transfer_weights

    config = small()
    model = InternLM2ForCausalLM(config, torch.Generator().manual_seed(3))
    wide = replace(config, hidden_size=48, num_attention_heads=6)
    grown = InternLM2ForCausalLM(wide, init=False)
    grown.load_state_dict(transfer_weights(model.state_dict(), config, wide, torch.Generator().manual_seed(4)))
    grown.set_norm_eps(transfer_norm_eps(model.norm_eps(), config, wide))
    eps = set(grown.norm_eps().values())
    assert len(eps) == 1 and eps != {config.rms_norm_eps}
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    for export in (export_internlm2, export_llama):
        out = export(grown.state_dict(), wide, tmp_path / export.__name__, norm_eps=grown.norm_eps())
        assert json.loads((out / "config.json").read_text())["rms_norm_eps"] == next(iter(eps))
    loaded_config, state = load_internlm2(tmp_path / "export_internlm2")
    twin = InternLM2ForCausalLM(loaded_config)
    twin.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(twin(ids), model(ids), atol=1e-5)     # the original function, exactly kept

    deeper = replace(wide, num_hidden_layers=3)
    mixed = InternLM2ForCausalLM(deeper, init=False)
    mixed.load_state_dict(transfer_weights(grown.state_dict(), wide, deeper, torch.Generator().manual_seed(5)))
    mixed.set_norm_eps(transfer_norm_eps(grown.norm_eps(), wide, deeper))
    with pytest.raises(ExportError) as info:
        export_llama(mixed, deeper, tmp_path / "mixed", norm_eps=mixed.norm_eps())
    assert "different eps" in _one_line(info) and not (tmp_path / "mixed").exists()

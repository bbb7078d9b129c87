"""Hugging Face checkpoints of our InternLM2 models: InternLM2 format, Llama format, and back.

Both writers produce a directory with `config.json` and `model.safetensors`. The InternLM2 one is a
plain dump (our state-dict keys are HF InternLM2's); the Llama one splits `wqkv` into
q_proj / k_proj / v_proj the way InternLM's `tools/convert2llama.py` does, so the result loads
with `transformers.LlamaForCausalLM.from_pretrained` and gives the same logits.
transformers is not needed to write or read these files.

Both formats hold one `rms_norm_eps` for every RMSNorm. A model whose width grew during a search
has per-norm eps (trainers/transfer.py keeps the function by scaling them with the width): pass
them as `norm_eps`. When all are equal (the width grew, and no layer was added after it) that one
value is written and the export is exact; when they differ no single eps reproduces the model,
and the export is refused (ExportError, one line).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from trainers.model import InternLM2Config

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# InternLM2 checkpoints load their model code from the Hub (trust_remote_code); point at the
# public InternLM2 repository that carries configuration_internlm2.py / modeling_internlm2.py.
_INTERNLM2_CODE = "internlm/internlm2-1_8b"

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class ExportError(ValueError):
    """A checkpoint directory that cannot be written or read; one line naming the path."""


def _cpu_state(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    # safetensors wants contiguous tensors that share no storage
    return {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in state.items()}


def _check_keys(state: Mapping[str, torch.Tensor], config: InternLM2Config, where: str) -> None:
    """The state must hold exactly our InternLM2 tensors, with the config's shapes."""
    expected = internlm2_shapes(config)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ExportError(f"{where}: missing tensor {missing[0]!r} ({len(missing)} missing)")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise ExportError(f"{where}: unexpected tensor {extra[0]!r} for this config")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ExportError(f"{where}: {key} has shape {tuple(state[key].shape)}, config implies {shape}")


def internlm2_shapes(config: InternLM2Config) -> dict[str, tuple[int, ...]]:
    """State-dict key -> shape of an InternLM2ForCausalLM with this config (HF InternLM2 names)."""
    C, V, Fd, D = config.hidden_size, config.vocab_size, config.intermediate_size, config.head_dim
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * D
    shapes: dict[str, tuple[int, ...]] = {"model.tok_embeddings.weight": (V, C)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "attention.wqkv.weight"] = (qkv, C)
        if config.bias:
            shapes[p + "attention.wqkv.bias"] = (qkv,)
        shapes[p + "attention.wo.weight"] = (C, config.num_attention_heads * D)
        if config.bias:
            shapes[p + "attention.wo.bias"] = (C,)
        shapes[p + "feed_forward.w1.weight"] = (Fd, C)
        shapes[p + "feed_forward.w3.weight"] = (Fd, C)
        shapes[p + "feed_forward.w2.weight"] = (C, Fd)
        shapes[p + "attention_norm.weight"] = (C,)
        shapes[p + "ffn_norm.weight"] = (C,)
    shapes["model.norm.weight"] = (C,)
    shapes["output.weight"] = (V, C)
    return shapes


def _write(out_dir: str | os.PathLike, config_json: dict[str, Any], state: dict[str, torch.Tensor]) -> Path:
    """Write config.json + model.safetensors, each via a temporary file and a rename."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=out, suffix=".tmp", delete=False) as f:
            json.dump(config_json, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(f.name, out / CONFIG_FILE)
        tmp = out / (WEIGHTS_FILE + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / WEIGHTS_FILE)
    except OSError as e:
        raise ExportError(f"export: cannot write to {str(out)!r}: {e.strerror or e}") from None
    return out


def _config_eps(config: InternLM2Config, norm_eps: Mapping[str, float] | None) -> float:
    """The one rms_norm_eps to write: the config's, or the norms' common eps (see the module doc)."""
    values = sorted(set((norm_eps or {}).values()))
    if not values:
        return config.rms_norm_eps
    if values[-1] - values[0] > 1e-12 * values[-1]:
        raise ExportError(
            f"export: the model's RMSNorms have different eps ({values[0]:.4g} to {values[-1]:.4g}: its width grew "
            "and layers were added after), and the Hugging Face config holds one rms_norm_eps: no exact export")
    return values[0]


def _dtype_name(state: Mapping[str, torch.Tensor]) -> str:
    dtype = next(iter(state.values())).dtype
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def export_internlm2(
    model_or_state: nn.Module | Mapping[str, torch.Tensor],
    config: InternLM2Config,
    out_dir: str | os.PathLike,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    norm_eps: Mapping[str, float] | None = None,
) -> Path:
    """Write an HF InternLM2 checkpoint (model_type "internlm2") of our model to `out_dir`.

    Token ids default to None (the byte tokenizer has no BOS/EOS); pass the tokenizer's if it has them.
    `norm_eps` (module name -> eps, the trainer state's "norm_eps"): see the module docstring.
    """
    state = _cpu_state(model_or_state)
    _check_keys(state, config, "export")
    eps = _config_eps(config, norm_eps)
    config_json = {
        "architectures": ["InternLM2ForCausalLM"],
        "auto_map": {
            "AutoConfig": f"{_INTERNLM2_CODE}--configuration_internlm2.InternLM2Config",
            "AutoModel": f"{_INTERNLM2_CODE}--modeling_internlm2.InternLM2ForCausalLM",
            "AutoModelForCausalLM": f"{_INTERNLM2_CODE}--modeling_internlm2.InternLM2ForCausalLM",
        },
        "model_type": "internlm2",
        **config.to_dict(),
        "rms_norm_eps": eps,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "use_cache": True,
        "attn_implementation": "eager",
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "torch_dtype": _dtype_name(state),
    }
    return _write(out_dir, config_json, state)


def _llama_rope_scaling(config: InternLM2Config) -> dict | None:
    if config.rope_scaling is None:
        return None
    return {"rope_type": config.rope_scaling["type"], "factor": config.rope_scaling["factor"]}


def internlm2_to_llama_state(state: Mapping[str, torch.Tensor], config: InternLM2Config) -> dict[str, torch.Tensor]:
    """Rename and split an InternLM2 state dict into Llama's names (convert2llama.py's mapping)."""
    H, KV, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    G = H // KV
    out = {
        "model.embed_tokens.weight": state["model.tok_embeddings.weight"],
        "model.norm.weight": state["model.norm.weight"],
        "lm_head.weight": state["output.weight"],
    }
    for i in range(config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        for suffix in ("weight", "bias") if config.bias else ("weight",):
            packed = state[src + f"attention.wqkv.{suffix}"]
            # '(h gs d) dim -> h gs d dim', gs = G + 2, then split the gs axis [G, 1, 1]
            grouped = packed.reshape(KV, G + 2, D, *packed.shape[1:])
            q, k, v = grouped.split([G, 1, 1], dim=1)
            out[dst + f"self_attn.q_proj.{suffix}"] = q.reshape(H * D, *packed.shape[1:]).contiguous()
            out[dst + f"self_attn.k_proj.{suffix}"] = k.reshape(KV * D, *packed.shape[1:]).contiguous()
            out[dst + f"self_attn.v_proj.{suffix}"] = v.reshape(KV * D, *packed.shape[1:]).contiguous()
            out[dst + f"self_attn.o_proj.{suffix}"] = state[src + f"attention.wo.{suffix}"]
        out[dst + "mlp.gate_proj.weight"] = state[src + "feed_forward.w1.weight"]
        out[dst + "mlp.up_proj.weight"] = state[src + "feed_forward.w3.weight"]
        out[dst + "mlp.down_proj.weight"] = state[src + "feed_forward.w2.weight"]
        out[dst + "input_layernorm.weight"] = state[src + "attention_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = state[src + "ffn_norm.weight"]
    return out


def export_llama(
    model_or_state: nn.Module | Mapping[str, torch.Tensor],
    config: InternLM2Config,
    out_dir: str | os.PathLike,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    norm_eps: Mapping[str, float] | None = None,
) -> Path:
    """Write an HF Llama checkpoint of our model (loadable by `LlamaForCausalLM.from_pretrained`);
    `norm_eps` as for `export_internlm2`."""
    state = _cpu_state(model_or_state)
    _check_keys(state, config, "export")
    eps = _config_eps(config, norm_eps)
    config_json = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.initializer_range,
        "rms_norm_eps": eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": _llama_rope_scaling(config),
        "attention_bias": config.bias,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "torch_dtype": _dtype_name(state),
    }
    return _write(out_dir, config_json, internlm2_to_llama_state(state, config))


def load_internlm2(path: str | os.PathLike) -> tuple[InternLM2Config, dict[str, torch.Tensor]]:
    """Read an InternLM2 checkpoint written by `export_internlm2` back: (config, CPU state dict)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    root = Path(path)
    if not root.is_dir():
        raise ExportError(f"load: {str(root)!r} is not a directory")
    config_path, weights_path = root / CONFIG_FILE, root / WEIGHTS_FILE
    try:
        raw = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise ExportError(f"load: {str(config_path)!r} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"load: {str(config_path)!r} is not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("model_type") != "internlm2":
        found = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise ExportError(f"load: {str(config_path)!r} has model_type {found!r}, expected 'internlm2'")
    if raw.get("tie_word_embeddings", False) or raw.get("hidden_act", "silu") != "silu":
        raise ExportError(f"load: {str(config_path)!r} needs untied embeddings and silu, which this model assumes")
    fields = {k: raw[k] for k in InternLM2Config.__dataclass_fields__ if k in raw}
    try:
        config = InternLM2Config(**fields)
    except ValueError as e:   # pydantic's ValidationError: one line here
        raise ExportError(f"load: {str(config_path)!r}: {' '.join(str(e).split())}") from None
    if not weights_path.is_file():
        raise ExportError(f"load: {str(weights_path)!r} is missing")
    try:
        state = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise ExportError(f"load: {str(weights_path)!r} is not a readable safetensors file ({e})") from None
    _check_keys(state, config, f"load: {str(weights_path)!r}")
    return config, state

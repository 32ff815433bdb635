"""Hugging Face Llama interop: config and weight layout conversion, and ``export_hf``.

Our layers store q/k/v as one ``qkv_proj`` matrix and gate/up as one ``gate_up_proj`` matrix;
Hugging Face's ``LlamaForCausalLM`` keeps them apart. These functions map between the two.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .config import DIYConfig
from .model import DIYForCausalLM


def hf_llama_config(config: DIYConfig, *, bos_token_id: int | None = None,
                    eos_token_id: int | None = None, pad_token_id: int | None = None) -> dict[str, Any]:
    """The ``config.json`` dict of a ``LlamaForCausalLM`` with our shape."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": config.initializer_range,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def to_hf_state_dict(model: DIYForCausalLM) -> dict[str, Tensor]:
    """Our weights under Hugging Face Llama names (fused matrices split; a tied head left out)."""
    config = model.config
    q_rows = config.num_heads * config.head_dim
    kv_rows = config.num_kv_heads * config.head_dim
    out: dict[str, Tensor] = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        if name.endswith("self_attn.qkv_proj.weight"):
            prefix = name[: -len("qkv_proj.weight")]
            q, k, v = tensor.split((q_rows, kv_rows, kv_rows), dim=0)
            out[prefix + "q_proj.weight"], out[prefix + "k_proj.weight"], out[prefix + "v_proj.weight"] = q, k, v
        elif name.endswith("mlp.gate_up_proj.weight"):
            prefix = name[: -len("gate_up_proj.weight")]
            out[prefix + "gate_proj.weight"], out[prefix + "up_proj.weight"] = tensor.chunk(2, dim=0)
        elif name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        else:
            out[name] = tensor
    return {name: t.contiguous() for name, t in out.items()}


def from_hf_state_dict(state: dict[str, Tensor], config: DIYConfig) -> dict[str, Tensor]:
    """Hugging Face Llama weights renamed and fused into our layout (inverse of ``to_hf_state_dict``)."""
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if name.endswith(("k_proj.weight", "v_proj.weight", "up_proj.weight")):
            continue
        if name.endswith("q_proj.weight"):
            prefix = name[: -len("q_proj.weight")]
            out[prefix + "qkv_proj.weight"] = torch.cat(
                [tensor, state[prefix + "k_proj.weight"], state[prefix + "v_proj.weight"]], dim=0)
        elif name.endswith("gate_proj.weight"):
            prefix = name[: -len("gate_proj.weight")]
            out[prefix + "gate_up_proj.weight"] = torch.cat([tensor, state[prefix + "up_proj.weight"]], dim=0)
        else:
            out[name] = tensor
    if config.tie_word_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out

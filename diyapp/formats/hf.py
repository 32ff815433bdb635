"""The Hugging Face folder: ``export_hf``, ``load_model_hf``, its header reader, and the
config and weight layout conversion to and from ``LlamaForCausalLM``.

Our layers store q/k/v as one ``qkv_proj`` matrix and gate/up as one ``gate_up_proj`` matrix;
Hugging Face's ``LlamaForCausalLM`` keeps them apart. These functions map between the two.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import (
    CheckpointError,
    build_loaded,
    check_config_sizes,
    check_finite,
    dir_size,
    fill_metadata,
    replace_folder,
    tokenizer_string,
    unfused_state,
    unwrap_model,
)

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

    from ..config import DIYConfig
    from ..model import DIYForCausalLM

HF_FORMAT = "diyapp-hf"
HF_VERSION = 1
#: The files an export folder holds; a folder with anything else is not replaced.
HF_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
#: config.json fields that must agree with the model config carried in model.safetensors.
_SHAPE_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_hidden_layers": "num_layers",
                 "num_attention_heads": "num_heads", "num_key_value_heads": "num_kv_heads",
                 "intermediate_size": "intermediate_size", "max_position_embeddings": "max_seq_len",
                 "tie_word_embeddings": "tie_word_embeddings"}


def is_hf_dir(path: Path) -> bool:
    """Whether ``path`` is a model folder (``config.json`` and ``model.safetensors``)."""
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a ``.safetensors`` file (tensor index and ``__metadata__``)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(path, "文件不完整 is truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise CheckpointError(path, "不是 safetensors 文件 is not a safetensors file (implausible header size)")
            head = f.read(n)
            size = os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise CheckpointError(path, f"无法读取 cannot be read: {exc.strerror or exc}") from None
    if len(head) < n:
        raise CheckpointError(path, "文件不完整 is truncated (incomplete safetensors header)")
    try:
        header = json.loads(head)
    except ValueError:
        raise CheckpointError(path, "不是 safetensors 文件 is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "不是 safetensors 文件 is not a safetensors file (unreadable header)")
    end = max((v["data_offsets"][1] for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
    if 8 + n + end > size:
        raise CheckpointError(path, f"文件不完整 is truncated ({size} bytes, the header promises {8 + n + end})")
    return header


def describe_hf(directory: Any) -> dict[str, Any]:
    """Format, config and metadata of an ``export_hf`` folder from its small JSON headers."""
    directory = Path(directory)
    weights = directory / "model.safetensors"
    if not is_hf_dir(directory):
        raise CheckpointError(directory, "不是 Hugging Face 导出 is not a Hugging Face export (needs config.json and model.safetensors)")
    meta = read_safetensors_header(weights).get("__metadata__") or {}
    if meta.get("diyapp_format") != HF_FORMAT:
        raise CheckpointError(directory, "这个 Hugging Face 模型文件夹不是 diyapp 写的 is a Hugging Face model folder not written by diyapp")
    try:
        version = int(meta.get("diyapp_format_version", "0"))
        config = json.loads(meta["diyapp_config"])
        metadata = json.loads(meta.get("diyapp_metadata", "{}"))
    except (ValueError, KeyError):
        raise CheckpointError(directory, "文件已损坏 is damaged: its diyapp header cannot be read") from None
    if version > HF_VERSION:
        raise CheckpointError(directory, f"由更新版本的 diyapp 写出，请升级 was written by a newer diyapp (format version {version}; this "
                                         f"version reads up to {HF_VERSION}); upgrade diyapp to load it")
    if not isinstance(config, dict):
        raise CheckpointError(directory, "文件已损坏 is damaged: its diyapp header holds no model config")
    check_config_sizes(directory, config)
    _check_agreement(directory, config, meta, read_safetensors_header(weights))
    size = dir_size(directory)
    return {"path": directory, "format": "hf", "format_version": version, "config": config,
            "metadata": metadata, "has_train_state": False, "size_bytes": size,
            "modified": weights.stat().st_mtime}


def _check_agreement(directory: Path, config: dict[str, Any], meta: dict[str, Any], header: dict[str, Any]) -> None:
    """Refuse a folder whose files come from different exports: config.json's shapes, the
    embedding's shape and tokenizer.json must match the model config in model.safetensors."""
    def mixed(what: str) -> CheckpointError:
        return CheckpointError(directory, f"文件夹里的文件来自不同的导出，请重新导出 is inconsistent: {what}; its files come from different exports "
                                          "(export it again)")

    try:
        hf_config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(directory, f"config.json 读不出来 config.json cannot be read ({exc})") from None
    if not isinstance(hf_config, dict):
        raise CheckpointError(directory, "config.json 不是 JSON 对象 config.json is not a JSON object")
    for hf_key, key in _SHAPE_FIELDS.items():
        if hf_key in hf_config and key in config and hf_config[hf_key] != config[key]:
            raise mixed(f"config.json says {hf_key} {hf_config[hf_key]!r}, model.safetensors holds a model with "
                        f"{config[key]!r}")
    embed = (header.get("model.embed_tokens.weight") or {}).get("shape")
    want = [config.get("vocab_size"), config.get("hidden_size")]
    if embed is not None and embed != want:
        raise mixed(f"model.safetensors' embedding is {embed}, its config says {want}")
    digest = meta.get("diyapp_tokenizer_sha256")
    tok_path = directory / "tokenizer.json"
    if digest and not tok_path.is_file():
        raise CheckpointError(directory, "缺少 tokenizer.json，请重新导出 is incomplete: tokenizer.json is missing (export it again)")
    if digest and _sha256(tok_path) != digest:
        raise mixed("tokenizer.json is not the tokenizer model.safetensors was exported with")


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise CheckpointError(path, f"无法读取 cannot be read: {exc.strerror or exc}") from None


# --- layout conversion ---------------------------------------------------------------------------

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
    return unfused_state(model)


def from_hf_state_dict(state: dict[str, Tensor], config: DIYConfig) -> dict[str, Tensor]:
    """Hugging Face Llama weights renamed and fused into our layout (inverse of ``to_hf_state_dict``)."""
    import torch

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


# --- export_hf / load_model_hf -------------------------------------------------------------------

def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, ensure_ascii=False, indent=2) + "\n").encode("utf-8")


def _check_replaceable(directory: Path) -> None:
    """An export replaces its folder whole, so the folder must be new, empty or an export."""
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(directory, "已经存在且不是文件夹 exists and is not a folder; choose another export folder")
    if directory.is_dir():
        foreign = sorted(p.name for p in directory.iterdir() if p.name not in HF_FILES)
        if foreign:
            raise CheckpointError(directory, f"文件夹里有不属于导出的文件，请换一个新的或空的文件夹 holds files that are not part of an export ({', '.join(foreign[:3])}"
                                             f"{', ...' if len(foreign) > 3 else ''}); the export replaces the "
                                             "whole folder, so choose a new or empty one")


def _special_ids(tokenizer: Any) -> dict[str, int | None]:
    get = lambda name: getattr(tokenizer, name, None) if tokenizer is not None else None  # noqa: E731
    return {"eos": get("eos_token_id"), "pad": get("pad_token_id"), "bos": get("bos_token_id"),
            "im_end": get("im_end_id")}


def export_hf(directory: str | Any, model: DIYForCausalLM, tokenizer: Any, *,
              metadata: dict[str, Any] | None = None) -> Any:
    """Write a Hugging Face model folder: ``config.json`` (LlamaForCausalLM), ``model.safetensors``,
    ``generation_config.json``, ``tokenizer.json`` and ``tokenizer_config.json`` (with the chat
    template). ``transformers.AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(directory)``
    load it offline and compute the same logits. Returns the folder path.

    The folder is replaced as a whole (:func:`~diyapp.formats.common.replace_folder`): a kill at
    any moment leaves the old export or the new one. An existing folder holding anything but an
    export's files is refused rather than replaced.

    Our config and metadata also ride in the safetensors header (``__metadata__``), so
    :func:`load_model_hf` and ``list_checkpoints`` read them back exactly.
    """
    import torch
    from safetensors.torch import save as safetensors_save

    directory = Path(directory)
    model = unwrap_model(model)
    config = model.config
    _check_replaceable(directory)
    meta = fill_metadata(directory, model, metadata)
    tok_text = tokenizer_string(directory, tokenizer, config.vocab_size)
    ids = _special_ids(tokenizer)
    state = {}
    for name, t in to_hf_state_dict(model).items():
        t = t.detach().to("cpu", torch.float32)
        check_finite(directory, name, t)
        state[name] = t.clone().contiguous()  # fused q/k/v views must not share memory in safetensors
    tok_bytes = tok_text.encode("utf-8") if tok_text is not None else None
    header_meta = {"format": "pt", "diyapp_format": HF_FORMAT, "diyapp_format_version": str(HF_VERSION),
                   "diyapp_config": json.dumps(config.to_dict()), "diyapp_metadata": json.dumps(meta)}
    if tok_bytes is not None:
        header_meta["diyapp_tokenizer_sha256"] = hashlib.sha256(tok_bytes).hexdigest()
    stop = [i for i in (ids["eos"], ids["im_end"]) if i is not None]
    files = {
        "model.safetensors": safetensors_save(state, metadata=header_meta),
        "config.json": _json_bytes(hf_llama_config(config, bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                                                   pad_token_id=ids["pad"])),
        "generation_config.json": _json_bytes({
            "bos_token_id": ids["bos"], "eos_token_id": stop[0] if len(stop) == 1 else (stop or None),
            "pad_token_id": ids["pad"], **_sampling_defaults()}),
    }
    if tok_bytes is not None:
        files["tokenizer.json"] = tok_bytes
        files["tokenizer_config.json"] = _json_bytes(_tokenizer_config(tokenizer, config))
    with replace_folder(directory) as stage:  # the old export or the new one, never a mix
        for name, data in files.items():
            with open(stage / name, "wb") as f:
                f.write(data)
    return directory


def _sampling_defaults() -> dict[str, Any]:
    """The app's own chat sampling defaults, so the export generates like ``diyapp chat``."""
    try:
        from ..generation import GenerationConfig

        g = GenerationConfig()
        out: dict[str, Any] = {"do_sample": True, "temperature": g.temperature,
                               "max_new_tokens": g.max_new_tokens}
        if g.top_k:
            out["top_k"] = g.top_k
        if g.top_p:
            out["top_p"] = g.top_p
        if g.repetition_penalty != 1.0:
            out["repetition_penalty"] = g.repetition_penalty
        return out
    except Exception:  # noqa: BLE001 - sampling hints are optional
        return {}


def _tokenizer_config(tokenizer: Any, config: DIYConfig) -> dict[str, Any]:
    def text(i: int | None) -> str | None:
        if i is None:
            return None
        try:
            return tokenizer.token_text(i)
        except Exception:  # noqa: BLE001 - an unusual tokenizer just leaves the field empty
            return None

    ids = _special_ids(tokenizer)
    out = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": config.max_seq_len,
        "bos_token": text(ids["bos"]),
        "eos_token": text(ids["eos"]),
        "pad_token": text(ids["pad"]),
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    template = getattr(tokenizer, "chat_template", None)
    if template:
        out["chat_template"] = template
    return out


def load_model_hf(directory: Any, *, device: Any = None, strict: bool = True) -> Any:
    """Load an :func:`export_hf` folder back into our model (a :class:`LoadedModel`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..config import DIYConfig

    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(directory, "找不到这个文件夹 not found: no such folder")
    info = describe_hf(directory)
    try:
        config = DIYConfig.from_dict(info["config"])
    except ValueError as exc:
        raise CheckpointError(directory, f"保存的模型配置无效 its stored model config is invalid: {exc}") from None
    try:
        state = load_file(directory / "model.safetensors")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(directory, f"model.safetensors 读不出来 model.safetensors cannot be read ({exc})") from None
    tok_path = directory / "tokenizer.json"
    tok_text = tok_path.read_text(encoding="utf-8") if tok_path.is_file() else None
    return build_loaded(directory, "hf", info["config"], info["metadata"], tok_text,
                        from_hf_state_dict(state, config), None, device=device, strict=strict)

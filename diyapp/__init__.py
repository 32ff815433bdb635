"""diyapp: train a small Chinese GPT from scratch, chat with it, save, resume and export it.

Public names are loaded on first use, so ``import diyapp`` stays fast and the command line
can answer ``--help`` before PyTorch is imported.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "DIYConfig": "config",
    "ConfigError": "config",
    "PRESETS": "config",
    "DIYModel": "model",
    "DIYForCausalLM": "model",
    "causal_lm_loss": "model",
    "generate": "generation",
    "GenerationConfig": "generation",
    "pick_device": "device",
    "DIYTokenizer": "tokenizer",
    "Corpus": "data",
    "DataError": "data",
    "load_corpus": "data",
    "bundled_corpus": "data",
    "TrainConfig": "train",
    "Trainer": "train",
    "TrainEvent": "train",
    "TrainResult": "train",
    "save_model_binary": "formats.pt",
    "load_model_binary": "formats.pt",
    "describe_checkpoint": "formats.catalog",
    "list_checkpoints": "formats.catalog",
    "LoadedModel": "formats.common",
    "CheckpointError": "formats.common",
    "CheckpointInfo": "formats.catalog",
    "load_checkpoint": "formats.catalog",
    "build_metadata": "formats.common",
    "load_model_hf": "formats.hf",
    "save_model_json": "formats.json",
    "load_model_json": "formats.json",
    "export_hf": "formats.hf",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'diyapp' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__

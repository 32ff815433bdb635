"""Old import path: the Hugging Face export lives in :mod:`diyapp.formats.hf`; this re-exports its names."""

from __future__ import annotations

from .formats.hf import (  # noqa: F401
    HF_FORMAT,
    HF_VERSION,
    describe_hf,
    export_hf,
    from_hf_state_dict,
    hf_llama_config,
    load_model_hf,
    to_hf_state_dict,
)

"""Old import path: the ``.pt`` format, the shared core and discovery now live in
:mod:`diyapp.formats` (``common``, ``pt``, ``catalog``). This module only re-exports their names."""

from __future__ import annotations

from .formats.catalog import (  # noqa: F401
    DEFAULT_BINARY_PATH,
    PRETRAINED_BINARY_PATH,
    CheckpointInfo,
    describe_checkpoint,
    list_checkpoints,
    load_checkpoint,
)
from .formats.common import (  # noqa: F401
    AUTOMATIC_KEYS,
    MAX_LOSS_HISTORY,
    CheckpointError,
    LoadedModel,
    atomic_write,
    build_loaded,
    build_metadata,
    check_format_header,
    count_parameters,
    dir_size,
    downsample_history,
    fill_metadata,
    load_tokenizer,
    model_state,
    plain_metadata,
    plain_state,
    tokenizer_string,
    unwrap_model,
)
from .formats.hf import HF_FORMAT, HF_VERSION, describe_hf, read_safetensors_header  # noqa: F401
from .formats.pt import PT_FORMAT, PT_VERSION, load_model_binary, save_model_binary  # noqa: F401

"""The ``.pt`` binary: everything needed to resume training exactly.

A ``.pt`` file is a PyTorch zip archive holding one dict of plain data only::

    {"format": "diyapp-checkpoint", "format_version": 1,
     "config": DIYConfig.to_dict(), "metadata": {...}, "has_train_state": bool,
     "tokenizer": "<tokenizers JSON string>" or None,
     "model": {state-dict name: tensor},      # a tied lm_head shares the embedding's storage
     "train_state": None or Trainer.state_dict()}

It is read with ``torch.load(weights_only=True)``, so a file crafted to run code when unpickled is
refused. :func:`describe_pt` reads only the pickled structure (no tensor data, no torch import).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

from .common import (
    CheckpointError,
    LoadedModel,
    atomic_write,
    build_loaded,
    check_format_header,
    fill_metadata,
    first_line,
    model_state,
    plain_state,
    read_head,
    stat_file,
    tokenizer_string,
    unwrap_model,
)

PT_FORMAT = "diyapp-checkpoint"
PT_VERSION = 1
#: The first bytes of every zip archive (and so of every ``.pt`` file).
PT_MAGIC = b"PK\x03\x04"


def save_model_binary(path: str | os.PathLike, model: Any, tokenizer: Any, *, train_state: Any = None,
                      metadata: dict[str, Any] | None = None) -> Path:
    """Save model, tokenizer, metadata and (optionally) the training state for an exact resume.

    ``train_state`` is any plain data, e.g. ``Trainer.state_dict()``. Returns the path written.
    """
    import torch

    path = Path(path)
    model = unwrap_model(model)
    config = model.config
    payload = {
        "format": PT_FORMAT,
        "format_version": PT_VERSION,
        "config": config.to_dict(),
        "metadata": fill_metadata(path, model, metadata, train_state),
        "has_train_state": train_state is not None,
        "tokenizer": tokenizer_string(path, tokenizer, config.vocab_size),
        "model": model_state(model),
        "train_state": plain_state(path, train_state) if train_state is not None else None,
    }
    with atomic_write(path) as f:
        torch.save(payload, f)
    return path



def _probe_pt(path: Path) -> str:
    """Check that ``path`` is a complete PyTorch zip archive; return its ``data.pkl`` member name."""
    stat_file(path)
    head = read_head(path)
    if not head.startswith(PT_MAGIC):
        if head.lstrip()[:1] == b"{":
            raise CheckpointError(path, "这是 JSON 文件，不是 .pt 检查点 is a JSON file, not a .pt checkpoint; load it with load_model_json")
        if head[:1] == b"\x80":
            raise CheckpointError(path, "不是 diyapp 的模型文件 is not a diyapp checkpoint (an old-style pickle file, not a "
                                        "PyTorch zip archive)")
        raise CheckpointError(path, "不是 diyapp 的模型文件 is not a diyapp checkpoint (not a PyTorch zip archive)")
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except zipfile.BadZipFile:
        raise CheckpointError(path, "文件不完整或已损坏，请用更早的检查点 is truncated or corrupted (the zip archive is incomplete; was the save "
                                    "interrupted?); use an earlier checkpoint") from None
    except OSError as exc:
        raise CheckpointError(path, f"无法读取 cannot be read: {exc.strerror or exc}") from None
    pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if not pkl:
        raise CheckpointError(path, "不是 diyapp 的模型文件 is not a diyapp checkpoint (a zip archive, but not a PyTorch file)")
    return pkl[0]


class _Stub:
    """Stands in for every tensor/storage while reading only a checkpoint's header."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> "_Stub":
        return _Stub()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


_TORCH_DTYPES = {"float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
                 "bool", "complex64", "complex128", "float", "double", "half", "long", "int", "short"}


class _HeaderUnpickler(pickle.Unpickler):
    """Unpickles a checkpoint's structure without touching torch: tensors become stubs, and any
    global outside what ``torch.save`` of plain data uses is refused (nothing is ever imported)."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if (module == "torch._utils" and name.startswith("_rebuild_")) or (
                module == "torch" and (name.endswith("Storage") or name in ("Size", "device")
                                       or name in _TORCH_DTYPES)):
            return _Stub
        raise pickle.UnpicklingError(f"it refers to {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        return None


_CODE_REFUSED = ("拒绝加载：文件里有加载时会执行代码的对象 refused: it holds objects that would run code when loaded ({why}); diyapp checkpoints "
                 "hold only plain data, so this file was not written by diyapp or was tampered with; "
                 "do not load it")


def _read_pt_header(path: Path) -> dict[str, Any]:
    member = _probe_pt(path)
    try:
        with zipfile.ZipFile(path) as z:
            data = z.read(member)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(path, f"文件不完整或已损坏 is truncated or corrupted ({first_line(exc)})") from None
    try:
        obj = _HeaderUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        if str(exc).startswith("it refers to"):
            # Something this reader does not know: let PyTorch's own safe loader judge (it maps the
            # tensor data without reading it), and refuse only if it refuses too.
            obj = _torch_load(path, mmap=True)
        else:
            raise CheckpointError(path, f"文件已损坏 is corrupted (its structure cannot be read: {first_line(exc)})") from None
    except Exception as exc:
        raise CheckpointError(path, f"文件已损坏 is corrupted (its structure cannot be read: {first_line(exc)})") from None
    _check_pt_header(path, obj)
    return obj


def _check_pt_header(path: Path, obj: Any) -> None:
    check_format_header(path, obj, PT_FORMAT, PT_VERSION, "checkpoint")


def _torch_load(path: Path, mmap: bool = False) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        return _raise_refused(path, exc)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(path, f"文件不完整或已损坏，请用更早的检查点 is truncated or corrupted ({first_line(exc)}); use an earlier "
                                    "checkpoint") from None


def _raise_refused(path: Path, exc: BaseException) -> Any:
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    why = f"it refers to {found.group(1)}" if found else "it refers to an object outside plain data"
    raise CheckpointError(path, _CODE_REFUSED.format(why=why)) from None


def load_model_binary(path: str | os.PathLike, *, device: Any = None, strict: bool = True) -> LoadedModel:
    """Load a ``.pt`` checkpoint written by :func:`save_model_binary`.

    The weights must fit the stored config exactly unless ``strict=False``, which loads the weights
    whose names and shapes match and lists the rest on the returned :class:`LoadedModel`.
    Every problem raises :class:`CheckpointError`.
    """
    path = Path(path)
    _probe_pt(path)
    obj = _torch_load(path)
    _check_pt_header(path, obj)
    state = obj.get("model")
    if not isinstance(state, dict):
        raise CheckpointError(path, "文件已损坏，没有模型权重 is damaged: it holds no model weights")
    return build_loaded(path, "pt", obj["config"], obj["metadata"], obj.get("tokenizer"), state,
                        obj.get("train_state"), device=device, strict=strict)




def describe_pt(path: str | os.PathLike) -> dict[str, Any]:
    """Format, config and metadata of a ``.pt`` checkpoint from its header only."""
    path = Path(path)
    st = stat_file(path)
    header = _read_pt_header(path)
    return {"path": path, "format": "pt", "format_version": header["format_version"],
            "config": header["config"], "metadata": header["metadata"],
            "has_train_state": bool(header.get("has_train_state", header.get("train_state") is not None)),
            "size_bytes": st.st_size, "modified": st.st_mtime}

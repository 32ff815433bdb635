"""Open whatever a path is, describe it, and find checkpoints: the only module that knows every format.

:func:`describe_checkpoint` and :func:`list_checkpoints` read only the small header of each file
(the pickled structure of a ``.pt`` without its tensor data, the first line of a JSON export, the
JSON header of a ``model.safetensors``, the key-value header of a ``.gguf``) and do not import torch.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .common import CheckpointError, LoadedModel, Leftover, dir_size, find_leftovers, first_line, read_head
from .gguf import GGUF_MAGIC, describe_gguf
from .hf import describe_hf, is_hf_dir, load_model_hf
from .json import describe_json, load_model_json
from .pt import PT_MAGIC, describe_pt, load_model_binary

DEFAULT_BINARY_PATH = Path("checkpoints/model_final.pt")
PRETRAINED_BINARY_PATH = Path("checkpoints/model_pretrained.pt")


@dataclass
class CheckpointInfo:
    """One entry of :func:`list_checkpoints`. ``error`` is None or why the file is unreadable."""

    path: Path
    name: str
    format: str                  # "pt" | "json" | "hf" | "gguf" | "unknown"
    size_bytes: int
    modified: float              # seconds since the epoch (os.stat st_mtime)
    parameters: int | None = None
    stage: str | None = None
    steps: int | None = None
    last_loss: float | None = None
    val_loss: float | None = None
    has_train_state: bool = False
    error: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def modified_iso(self) -> str:
        return _dt.datetime.fromtimestamp(self.modified, _dt.timezone.utc).isoformat(timespec="seconds")


def _sniff_format(path: Path) -> str:
    if path.is_dir():
        return "hf"
    head = read_head(path, 64).lstrip()
    if head.startswith(PT_MAGIC):
        return "pt"
    if head.startswith(b"{"):
        return "json"
    if head.startswith(GGUF_MAGIC):
        return "gguf"
    return _SUFFIXES.get(path.suffix.lower(), "unknown")


_SUFFIXES = {".pt": "pt", ".pth": "pt", ".json": "json", ".gguf": "gguf"}


def describe_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Header of a checkpoint or export without loading its weights (and without importing torch).

    Returns ``{"path", "format" ("pt" | "json" | "hf" | "gguf"), "format_version", "config", "metadata",
    "has_train_state", "size_bytes", "modified"}``; raises :class:`CheckpointError` for a file
    that is missing, empty, truncated, foreign or from a newer version.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "找不到这个文件 not found: no such file")
    fmt = _sniff_format(path)
    if fmt == "hf":
        return describe_hf(path)
    if fmt == "json":
        return describe_json(path)
    if fmt == "gguf":
        return describe_gguf(path)
    return describe_pt(path)  # (an unknown file gets describe_pt's "not a checkpoint" message)


def load_checkpoint(path: str | os.PathLike, *, device: Any = None, strict: bool = True) -> LoadedModel:
    """Load a ``.pt`` checkpoint, a JSON export or a Hugging Face export folder, by its content."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "找不到这个文件 not found: no such file")
    fmt = _sniff_format(path)
    if fmt == "hf":
        return load_model_hf(path, device=device, strict=strict)
    if fmt == "json":
        return load_model_json(path, device=device, strict=strict)
    if fmt == "gguf":
        describe_gguf(path)  # (a damaged file or a mismatched pair is said first)
        raise CheckpointError(path, "GGUF 只给 llama.cpp / Ollama 用，diyapp 不能读回，请用 .pt 或 JSON is an export for "
                                    "llama.cpp / Ollama; diyapp does not load GGUF files back (use the .pt or JSON)")
    return load_model_binary(path, device=device, strict=strict)


def _candidates(folder: Path) -> list[Path]:
    if folder.is_file():
        return [folder]
    if is_hf_dir(folder):
        return [folder]
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    out = []
    for entry in entries:
        if entry.name.startswith(".") or entry.name.endswith(".tmp"):
            continue  # temporary files of a save in progress (or one that was killed)
        p = Path(entry.path)
        if entry.is_dir():
            if is_hf_dir(p):
                out.append(p)
        elif p.suffix.lower() in _SUFFIXES:
            out.append(p)
    return out


def _info(path: Path) -> CheckpointInfo:
    guess = "hf" if path.is_dir() else _SUFFIXES.get(path.suffix.lower(), "unknown")
    try:
        st = path.stat()
        size = dir_size(path) if path.is_dir() else st.st_size
        modified = st.st_mtime
    except OSError:
        size, modified = 0, 0.0
    if path.is_dir():
        with contextlib.suppress(OSError):
            modified = (path / "model.safetensors").stat().st_mtime
    info = CheckpointInfo(path=path, name=path.name, format=guess, size_bytes=size, modified=modified)
    try:
        d = describe_checkpoint(path)
    except CheckpointError as exc:
        info.error = exc.reason
        return info
    except Exception as exc:  # never let one odd file stop the listing
        info.error = f"cannot be read: {first_line(exc)}"
        return info
    meta = d.get("metadata") or {}
    info.format = d["format"]
    info.metadata = meta
    info.config = d.get("config")
    info.has_train_state = bool(d.get("has_train_state"))
    info.parameters = _as_int(meta.get("parameters"))
    info.stage = meta.get("stage") if isinstance(meta.get("stage"), str) else None
    info.steps = _as_int(meta.get("steps"))
    info.val_loss = _as_float(meta.get("val_loss"))
    info.last_loss = _as_float(meta.get("train_loss"))
    if info.last_loss is None:
        info.last_loss = info.val_loss
    return info


def _as_int(v: Any) -> int | None:
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _as_float(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def list_checkpoints(folders: str | os.PathLike | Iterable[str | os.PathLike] = ("checkpoints", "exports")
                     ) -> list[CheckpointInfo]:
    """Checkpoints (``.pt``), JSON exports, Hugging Face export folders and GGUF exports found directly in
    ``folders``, newest first. A broken or foreign file is listed with ``error`` set to the
    reason; missing folders are skipped. Only headers are read, so this stays fast."""
    if isinstance(folders, (str, os.PathLike)):
        folders = [folders]
    seen: set[Path] = set()
    infos = []
    for folder in folders:
        folder = Path(folder)
        if not folder.exists():
            continue
        for p in _candidates(folder):
            key = p.resolve()
            if key in seen:
                continue
            seen.add(key)
            infos.append(_info(p))
    infos.sort(key=lambda i: (-i.modified, str(i.path)))
    return infos


def leftovers(folders: str | os.PathLike | Iterable[str | os.PathLike] = ("checkpoints", "exports")
              ) -> list[Leftover]:
    """Temporary files and folders of interrupted saves directly in ``folders`` (the listing
    skips them; the next save in a folder removes those no live writer holds)."""
    if isinstance(folders, (str, os.PathLike)):
        folders = [folders]
    found: list[Leftover] = []
    for folder in folders:
        if Path(folder).is_dir():
            found += find_leftovers(folder)
    return found

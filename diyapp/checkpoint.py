"""Model checkpoints: the exact-resume ``.pt`` binary, metadata, loading checks and discovery.

A ``.pt`` file is a PyTorch zip archive holding one dict of plain data only::

    {"format": "diyapp-checkpoint", "format_version": 1,
     "config": DIYConfig.to_dict(), "metadata": {...}, "has_train_state": bool,
     "tokenizer": "<tokenizers JSON string>" or None,
     "model": {state-dict name: tensor},      # a tied lm_head shares the embedding's storage
     "train_state": None or Trainer.state_dict()}

It is read with ``torch.load(weights_only=True)``, so a file crafted to run code when unpickled is
refused. Writes go to a temporary file in the same folder, are flushed and fsynced, then moved over
the target with ``os.replace``: an interrupted save leaves the old file or the complete new one.

:func:`describe_checkpoint` and :func:`list_checkpoints` read only the small header of each file
(the pickled structure of a ``.pt`` without its tensor data, the first line of a JSON export, the
JSON header of a ``model.safetensors``) and do not import torch.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as _dt
import io
import math
import os
import pickle
import re
import struct
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Iterable, Iterator

if TYPE_CHECKING:  # pragma: no cover
    from .config import DIYConfig
    from .model import DIYForCausalLM

PT_FORMAT = "diyapp-checkpoint"
PT_VERSION = 1
HF_FORMAT = "diyapp-hf"
HF_VERSION = 1
#: Longest loss history kept in metadata; longer ones are downsampled evenly (last point kept).
MAX_LOSS_HISTORY = 200
DEFAULT_BINARY_PATH = Path("checkpoints/model_final.pt")
PRETRAINED_BINARY_PATH = Path("checkpoints/model_pretrained.pt")


class CheckpointError(ValueError):
    """A checkpoint or export that cannot be read or written; the message starts with the path."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keep it picklable despite the two-argument constructor
        return (type(self), (self.path, self.reason))


@dataclass
class LoadedModel:
    """What a loader returns. ``model`` is in eval mode (on CPU unless ``device`` was given).

    ``missing_keys`` / ``unexpected_keys`` / ``mismatched_keys`` are only ever non-empty after a
    ``strict=False`` load: they list the weights the model kept from its fresh initialisation,
    the file's weights the model has no place for, and ``(name, shape in file, shape in model)``.
    """

    model: "DIYForCausalLM"
    tokenizer: Any
    config: "DIYConfig"
    metadata: dict[str, Any]
    train_state: Any = None
    path: Path | None = None
    format: str = "pt"
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched_keys: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)


@dataclass
class CheckpointInfo:
    """One entry of :func:`list_checkpoints`. ``error`` is None or why the file is unreadable."""

    path: Path
    name: str
    format: str                  # "pt" | "json" | "hf" | "unknown"
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


# --- metadata ------------------------------------------------------------------------------------

def _app_version() -> str:
    from . import __version__

    return __version__


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def count_parameters(model: Any) -> int:
    """Distinct trainable parameters (a tied head counts once)."""
    model = unwrap_model(model)
    if hasattr(model, "num_parameters"):
        return int(model.num_parameters())
    return sum(p.numel() for p in model.parameters())


def downsample_history(history: Iterable[Any] | None, limit: int = MAX_LOSS_HISTORY) -> list[Any]:
    """At most ``limit`` evenly spaced points of a loss history; the first and last are kept."""
    points = list(history or [])
    if len(points) <= limit:
        return points
    if limit <= 1:
        return points[-1:]
    last = len(points) - 1
    picks = sorted({round(i * last / (limit - 1)) for i in range(limit)})
    return [points[i] for i in picks]


#: The metadata fields every save fills in (the caller's values win where given).
AUTOMATIC_KEYS = ("created_at", "parameters", "app_version", "stage", "steps", "train_loss", "val_loss",
                  "loss_history")


def _with_automatic(model: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` with the automatic fields first, computed only where missing, and the loss history
    downsampled to at most 200 points."""
    out = {"created_at": meta["created_at"] if "created_at" in meta else _now_iso(),
           "parameters": meta["parameters"] if "parameters" in meta else count_parameters(model),
           "app_version": meta["app_version"] if "app_version" in meta else _app_version(),
           "stage": None, "steps": None, "train_loss": None, "val_loss": None, **meta}
    out["loss_history"] = downsample_history(meta.get("loss_history"))
    return out


def build_metadata(model: Any, *, stage: str | None = None, steps: int | None = None,
                   train_loss: float | None = None, val_loss: float | None = None,
                   loss_history: Iterable[Any] | None = None, **extra: Any) -> dict[str, Any]:
    """The metadata dict stored in every checkpoint and export.

    ``created_at`` (ISO 8601 UTC), ``parameters``, ``app_version`` are filled in; ``loss_history``
    (floats or ``[step, loss]`` pairs) is downsampled to at most 200 points. Extra keyword values
    must be plain JSON data; non-finite floats become None.
    """
    meta = {"stage": stage, "steps": steps, "train_loss": train_loss, "val_loss": val_loss,
            "loss_history": loss_history, **extra}
    return plain_metadata(_with_automatic(model, meta))


def plain_metadata(value: Any, where: str = "metadata") -> Any:
    """``value`` as plain JSON data: tuples become lists, numpy/torch scalars Python numbers and
    non-finite floats None. Anything else raises TypeError naming where it sits."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} keys must be strings, got {k!r}")
            out[str(k)] = plain_metadata(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [plain_metadata(v, f"{where}[{i}]") for i, v in enumerate(value)]
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        return plain_metadata(item(), where)
    raise TypeError(f"{where} is a {type(value).__name__}; metadata must be plain JSON data")


def fill_metadata(path: str | os.PathLike, model: Any, metadata: dict[str, Any] | None,
                  train_state: Any = None) -> dict[str, Any]:
    """The caller's metadata with the automatic fields added where missing."""
    meta = dict(metadata or {})
    if isinstance(train_state, dict):  # what a Trainer state knows, unless the caller said otherwise
        for meta_key, state_key in (("stage", "stage"), ("steps", "step"), ("train_loss", "last_loss"),
                                    ("val_loss", "last_val_loss"), ("loss_history", "loss_history")):
            if meta.get(meta_key) is None and train_state.get(state_key) is not None:
                meta[meta_key] = train_state[state_key]
    try:
        return plain_metadata(_with_automatic(model, meta))
    except TypeError as exc:
        raise CheckpointError(path, f"cannot save: {exc}") from None


# --- plain data ----------------------------------------------------------------------------------

def unwrap_model(model: Any) -> Any:
    """The DIY model inside a ``torch.compile`` or DistributedDataParallel wrapper."""
    for _ in range(4):
        inner = getattr(model, "_orig_mod", None) or (
            getattr(model, "module", None) if type(model).__name__ in ("DistributedDataParallel", "DataParallel")
            else None)
        if inner is None:
            return model
        model = inner
    return model


def _own_tensor(t: Any) -> Any:
    """A detached CPU tensor that does not drag a larger storage along."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or not t.is_contiguous():
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def model_state(model: Any) -> dict[str, Any]:
    """``model.state_dict()`` as detached CPU tensors; tied weights stay one shared tensor."""
    seen: dict[tuple, Any] = {}
    out: dict[str, Any] = {}
    for name, t in unwrap_model(model).state_dict().items():
        key = (t.device, t.data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key not in seen:
            seen[key] = _own_tensor(t)
        out[name] = seen[key]
    return out


def plain_state(path: str | os.PathLike, value: Any, where: str = "train_state") -> Any:
    """A copy of ``value`` made only of dict, list, tuple, None, bool, int, float, str and CPU
    tensors (what ``torch.load(weights_only=True)`` reads back). Anything else raises
    CheckpointError naming where it sits."""
    import torch

    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, torch.Tensor):
        return _own_tensor(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, dict):
        return {plain_state(path, k, f"{where} key"): plain_state(path, v, f"{where}[{k!r}]")
                for k, v in value.items()}
    if isinstance(value, list):
        return [plain_state(path, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return tuple(plain_state(path, v, f"{where}[{i}]") for i, v in enumerate(value))
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return plain_state(path, value.item(), where)
    raise CheckpointError(path, f"cannot save: {where} is a {type(value).__module__}.{type(value).__name__}; "
                                "training state must be plain data (dict, list, tuple, number, string, "
                                "None, tensor)")


def tokenizer_string(path: str | os.PathLike, tokenizer: Any, vocab_size: int) -> str | None:
    """The tokenizer as its JSON string (None for no tokenizer), checked against the model."""
    if tokenizer is None:
        return None
    text = tokenizer if isinstance(tokenizer, str) else tokenizer.to_str()
    size = getattr(tokenizer, "vocab_size", None)
    if isinstance(size, int) and size > vocab_size:
        raise CheckpointError(path, f"cannot save: the tokenizer has {size} tokens but the model only "
                                    f"{vocab_size} embeddings; they do not belong together")
    return text


def load_tokenizer(path: str | os.PathLike, text: str | None) -> Any:
    if text is None:
        return None
    from .tokenizer import DIYTokenizer

    try:
        return DIYTokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises its own exception types
        raise CheckpointError(path, f"the stored tokenizer cannot be read: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


# --- atomic writes -------------------------------------------------------------------------------

def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Write ``path`` all or nothing: a temporary file in the same folder (named
    ``.<name>.<random>.tmp``), flushed and fsynced, then ``os.replace``-d over the target.
    OS errors become CheckpointError; on any error the temporary file is removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise CheckpointError(path, f"cannot write here: {exc.strerror or exc}") from None
    try:
        try:
            mode = path.stat().st_mode & 0o777
        except OSError:
            mode = 0o644
        os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise CheckpointError(path, f"could not write: {exc.strerror or exc}") from None
        raise
    _fsync_dir(path.parent)


# --- the .pt binary ------------------------------------------------------------------------------

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


_PK = b"PK\x03\x04"


def _stat_file(path: Path) -> os.stat_result:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CheckpointError(path, "not found: no such file") from None
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read: {exc.strerror or exc}") from None
    if path.is_dir():
        hint = " (a Hugging Face export folder; use load_model_hf)" if (path / "config.json").exists() else ""
        raise CheckpointError(path, f"is a folder, not a checkpoint file{hint}")
    if st.st_size == 0:
        raise CheckpointError(path, "is empty (0 bytes): the save never completed; use another checkpoint")
    return st


def _read_head(path: Path, n: int = 8) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read: {exc.strerror or exc}") from None


def _probe_pt(path: Path) -> str:
    """Check that ``path`` is a complete PyTorch zip archive; return its ``data.pkl`` member name."""
    _stat_file(path)
    head = _read_head(path)
    if not head.startswith(_PK):
        if head.lstrip()[:1] == b"{":
            raise CheckpointError(path, "is a JSON file, not a .pt checkpoint; load it with load_model_json")
        if head[:1] == b"\x80":
            raise CheckpointError(path, "is not a diyapp checkpoint (an old-style pickle file, not a "
                                        "PyTorch zip archive)")
        raise CheckpointError(path, "is not a diyapp checkpoint (not a PyTorch zip archive)")
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except zipfile.BadZipFile:
        raise CheckpointError(path, "is truncated or corrupted (the zip archive is incomplete; was the save "
                                    "interrupted?); use an earlier checkpoint") from None
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read: {exc.strerror or exc}") from None
    pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if not pkl:
        raise CheckpointError(path, "is not a diyapp checkpoint (a zip archive, but not a PyTorch file)")
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


_CODE_REFUSED = ("refused: it holds objects that would run code when loaded ({why}); diyapp checkpoints "
                 "hold only plain data, so this file was not written by diyapp or was tampered with; "
                 "do not load it")


def _read_pt_header(path: Path) -> dict[str, Any]:
    member = _probe_pt(path)
    try:
        with zipfile.ZipFile(path) as z:
            data = z.read(member)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(path, f"is truncated or corrupted ({_first_line(exc)})") from None
    try:
        obj = _HeaderUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        if str(exc).startswith("it refers to"):
            # Something this reader does not know: let PyTorch's own safe loader judge (it maps the
            # tensor data without reading it), and refuse only if it refuses too.
            obj = _torch_load(path, mmap=True)
        else:
            raise CheckpointError(path, f"is corrupted (its structure cannot be read: {_first_line(exc)})") from None
    except Exception as exc:
        raise CheckpointError(path, f"is corrupted (its structure cannot be read: {_first_line(exc)})") from None
    _check_pt_header(path, obj)
    return obj


def check_format_header(path: Path, obj: Any, fmt: str, max_version: int, kind: str) -> dict[str, Any]:
    """Check a file's format marker, version and its config/metadata entries; returns ``obj``.

    Shared by the ``.pt`` and JSON readers so both refuse foreign, newer and damaged files alike.
    """
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        if kind == "JSON export":
            raise CheckpointError(path, f"is not a diyapp JSON export (no \"format\": \"{fmt}\" marker)")
        what = "a bare state dict" if isinstance(obj, dict) and obj and all(
            isinstance(k, str) and "." in k for k in obj) else f"a {type(obj).__name__}"
        raise CheckpointError(path, f"is not a diyapp checkpoint (a PyTorch file holding {what}, without "
                                    f"diyapp's format marker)")
    version = obj.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(path, f"has an invalid format version {version!r}")
    if version > max_version:
        raise CheckpointError(path, f"was written by a newer diyapp ({kind} format version {version}; this "
                                    f"version reads up to {max_version}); upgrade diyapp to load it")
    for key in ("config", "metadata"):
        if not isinstance(obj.get(key), dict):
            raise CheckpointError(path, f"is damaged: its {key!r} entry is missing or not a mapping")
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
        raise CheckpointError(path, f"is truncated or corrupted ({_first_line(exc)}); use an earlier "
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
        raise CheckpointError(path, "is damaged: it holds no model weights")
    return build_loaded(path, "pt", obj["config"], obj["metadata"], obj.get("tokenizer"), state,
                        obj.get("train_state"), device=device, strict=strict)


def build_loaded(path: Path, fmt: str, config_dict: Any, metadata: dict[str, Any], tokenizer_text: str | None,
                 state: dict[str, Any], train_state: Any, *, device: Any = None, strict: bool = True,
                 tokenizer: Any = None) -> LoadedModel:
    """Rebuild the model from a stored config and weights (shared by every loader)."""
    import torch

    from .config import ConfigError, DIYConfig
    from .model import DIYForCausalLM

    try:
        config = DIYConfig.from_dict(config_dict)
    except ConfigError as exc:
        raise CheckpointError(path, f"its stored model config is invalid: {exc}") from None
    if tokenizer is None:
        tokenizer = load_tokenizer(path, tokenizer_text)
    size = getattr(tokenizer, "vocab_size", None)
    if isinstance(size, int) and size > config.vocab_size:
        raise CheckpointError(path, f"is inconsistent: its tokenizer has {size} tokens but the model "
                                    f"{config.vocab_size} embeddings")
    model = DIYForCausalLM(config)
    expected = model.state_dict()
    if config.tie_word_embeddings and "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state = {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = []
    for name, t in state.items():
        if name in expected:
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(path, f"is damaged: weight {name} is a {type(t).__name__}, not a tensor")
            if tuple(t.shape) != tuple(expected[name].shape):
                mismatched.append((name, tuple(t.shape), tuple(expected[name].shape)))
    if strict and (missing or unexpected or mismatched):
        parts = []
        if mismatched:
            name, got, want = mismatched[0]
            more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
            parts.append(f"shape mismatch: {name} is {list(got)} in the file but the stored config needs "
                         f"{list(want)}{more}")
        if missing:
            parts.append(f"{len(missing)} weight(s) missing, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected weight(s), e.g. {unexpected[0]}")
        raise CheckpointError(path, "weights do not fit the stored config: " + "; ".join(parts)
                              + " (strict=False loads what matches)")
    bad = {m[0] for m in mismatched}
    usable = {k: v for k, v in state.items() if k in expected and k not in bad}
    with torch.no_grad():
        model.load_state_dict(usable, strict=False)
    model.eval()
    if device is not None:
        model.to(device)
    return LoadedModel(model=model, tokenizer=tokenizer, config=config, metadata=dict(metadata),
                       train_state=train_state, path=path, format=fmt, missing_keys=missing,
                       unexpected_keys=unexpected, mismatched_keys=mismatched)


# --- describe, load anything, discovery ----------------------------------------------------------

def _sniff_format(path: Path) -> str:
    if path.is_dir():
        return "hf"
    head = _read_head(path, 64).lstrip()
    if head.startswith(_PK):
        return "pt"
    if head.startswith(b"{"):
        return "json"
    return {".pt": "pt", ".pth": "pt", ".json": "json"}.get(path.suffix.lower(), "unknown")


def describe_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Header of a checkpoint or export without loading its weights (and without importing torch).

    Returns ``{"path", "format" ("pt" | "json" | "hf"), "format_version", "config", "metadata",
    "has_train_state", "size_bytes", "modified"}``; raises :class:`CheckpointError` for a file
    that is missing, empty, truncated, foreign or from a newer version.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "not found: no such file")
    fmt = _sniff_format(path)
    if fmt == "hf":
        return describe_hf(path)
    st = _stat_file(path)
    if fmt == "json":
        from .json_export import describe_json

        return describe_json(path)
    if fmt != "pt":
        _probe_pt(path)  # raises the right "not a checkpoint" message
    header = _read_pt_header(path)
    return {"path": path, "format": "pt", "format_version": header["format_version"],
            "config": header["config"], "metadata": header["metadata"],
            "has_train_state": bool(header.get("has_train_state", header.get("train_state") is not None)),
            "size_bytes": st.st_size, "modified": st.st_mtime}


def load_checkpoint(path: str | os.PathLike, *, device: Any = None, strict: bool = True) -> LoadedModel:
    """Load a ``.pt`` checkpoint, a JSON export or a Hugging Face export folder, by its content."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "not found: no such file")
    fmt = _sniff_format(path)
    if fmt == "hf":
        from .hf_export import load_model_hf

        return load_model_hf(path, device=device, strict=strict)
    if fmt == "json":
        from .json_export import load_model_json

        return load_model_json(path, device=device, strict=strict)
    return load_model_binary(path, device=device, strict=strict)


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def _candidates(folder: Path) -> list[Path]:
    if folder.is_file():
        return [folder]
    if _is_hf_dir(folder):
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
            if _is_hf_dir(p):
                out.append(p)
        elif p.suffix.lower() in (".pt", ".pth", ".json"):
            out.append(p)
    return out


def dir_size(path: Path) -> int:
    """Bytes in the files directly inside ``path`` (a model folder is flat)."""
    total = 0
    for entry in os.scandir(path):
        with contextlib.suppress(OSError):
            if entry.is_file():
                total += entry.stat().st_size
    return total


def _info(path: Path) -> CheckpointInfo:
    guess = "hf" if path.is_dir() else {".pt": "pt", ".pth": "pt", ".json": "json"}.get(path.suffix.lower(),
                                                                                         "unknown")
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
        info.error = f"cannot be read: {_first_line(exc)}"
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
    """Checkpoints (``.pt``), JSON exports and Hugging Face export folders found directly in
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


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a ``.safetensors`` file (tensor index and ``__metadata__``)."""
    import json

    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(path, "is truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise CheckpointError(path, "is not a safetensors file (implausible header size)")
            head = f.read(n)
            size = os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read: {exc.strerror or exc}") from None
    if len(head) < n:
        raise CheckpointError(path, "is truncated (incomplete safetensors header)")
    try:
        header = json.loads(head)
    except ValueError:
        raise CheckpointError(path, "is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "is not a safetensors file (unreadable header)")
    end = max((v["data_offsets"][1] for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
    if 8 + n + end > size:
        raise CheckpointError(path, f"is truncated ({size} bytes, the header promises {8 + n + end})")
    return header


def describe_hf(directory: Any) -> dict[str, Any]:
    """Format, config and metadata of an ``export_hf`` folder from its small JSON headers."""
    import json

    directory = Path(directory)
    weights = directory / "model.safetensors"
    if not (directory / "config.json").is_file() or not weights.is_file():
        raise CheckpointError(directory, "is not a Hugging Face export (needs config.json and model.safetensors)")
    meta = read_safetensors_header(weights).get("__metadata__") or {}
    if meta.get("diyapp_format") != HF_FORMAT:
        raise CheckpointError(directory, "is a Hugging Face model folder not written by diyapp")
    try:
        version = int(meta.get("diyapp_format_version", "0"))
        config = json.loads(meta["diyapp_config"])
        metadata = json.loads(meta.get("diyapp_metadata", "{}"))
    except (ValueError, KeyError):
        raise CheckpointError(directory, "is damaged: its diyapp header cannot be read") from None
    if version > HF_VERSION:
        raise CheckpointError(directory, f"was written by a newer diyapp (format version {version}; this "
                                         f"version reads up to {HF_VERSION}); upgrade diyapp to load it")
    size = dir_size(directory)
    return {"path": directory, "format": "hf", "format_version": version, "config": config,
            "metadata": metadata, "has_train_state": False, "size_bytes": size,
            "modified": weights.stat().st_mtime}

"""The core every file format shares: the error type, the loaded-model record, metadata, plain
data, the tokenizer string, atomic writes and header checks.

Each format (``pt``, ``json``, ``hf``, ``gguf``) imports only this module (and the model and
tokenizer); none imports another. ``catalog`` is the one module that knows them all.
This module does not import torch at import time.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Iterable, Iterator

if TYPE_CHECKING:  # pragma: no cover
    from ..config import DIYConfig
    from ..model import DIYForCausalLM

#: Longest loss history kept in metadata; longer ones are downsampled evenly (last point kept).
MAX_LOSS_HISTORY = 200


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


# --- metadata ------------------------------------------------------------------------------------

def _app_version() -> str:
    from .. import __version__

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
        raise CheckpointError(path, f"无法保存 cannot save: {exc}") from None


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


def unfused_state(model: Any) -> dict[str, Any]:
    """The weights under Hugging Face Llama names, the layout every foreign format starts from:
    our fused ``qkv_proj`` split into q/k/v, ``gate_up_proj`` into gate/up, a tied head left out."""
    model = unwrap_model(model)
    config = model.config
    q_rows = config.num_heads * config.head_dim
    kv_rows = config.num_kv_heads * config.head_dim
    out: dict[str, Any] = {}
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


def check_finite(path: str | os.PathLike, name: str, t: Any) -> None:
    """Raise CheckpointError if a float tensor holds NaN or infinity (no export writes those)."""
    import torch

    if not t.is_floating_point() or t.numel() == 0:
        return
    if math.isfinite(float(t.sum(dtype=torch.float64))):  # fast path: one reduction, no mask
        return
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise CheckpointError(path, f"权重含 NaN 或无穷大，未写出任何文件 cannot export: weight {name} holds {bad} non-finite "
                                    "value(s) (NaN or infinity; the training diverged?), so nothing was written")


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
    raise CheckpointError(path, f"无法保存：训练状态只能是普通数据 cannot save: {where} is a {type(value).__module__}.{type(value).__name__}; "
                                "training state must be plain data (dict, list, tuple, number, string, "
                                "None, tensor)")


def tokenizer_string(path: str | os.PathLike, tokenizer: Any, vocab_size: int) -> str | None:
    """The tokenizer as its JSON string (None for no tokenizer), checked against the model."""
    if tokenizer is None:
        return None
    text = tokenizer if isinstance(tokenizer, str) else tokenizer.to_str()
    size = getattr(tokenizer, "vocab_size", None)
    if isinstance(size, int) and size > vocab_size:
        raise CheckpointError(path, f"无法保存：词表和模型不配套 cannot save: the tokenizer has {size} tokens but the model only "
                                    f"{vocab_size} embeddings; they do not belong together")
    return text


def load_tokenizer(path: str | os.PathLike, text: str | None) -> Any:
    if text is None:
        return None
    from ..tokenizer import DIYTokenizer

    try:
        return DIYTokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises its own exception types
        raise CheckpointError(path, f"保存的词表读不出来 the stored tokenizer cannot be read: {first_line(exc)}") from None


def first_line(exc: BaseException) -> str:
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


def write_error(path: str | os.PathLike, exc: OSError) -> CheckpointError:
    """The one message every format gives when writing fails: the path and the system's reason
    (``No space left on device``, ``File too large``, ``Permission denied``, ...)."""
    return CheckpointError(path, f"写入失败 could not write: {exc.strerror or first_line(exc)}")


class _RecordingFile:
    """A file that remembers the first OS error of a write: some writers (``torch.save``'s zip
    writer) report a failed write only as their own RuntimeError, without the system's reason."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


#: What our temporary files and folders are named: ``.<target name>.<8 random characters>.tmp``
#: (``tempfile.mkstemp``/``mkdtemp``); nothing else is ever removed as a leftover.
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")

try:
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - no flock (Windows): leftovers are listed, never removed
    _fcntl = None


def _lock(fd: int) -> bool:
    """Take an exclusive lock on ``fd`` without waiting; False when another holds one. A writer
    holds the lock on its temporary file or folder until it is in place; locks die with their
    process, so a killed writer's leftover is free at once."""
    if _fcntl is None:  # pragma: no cover
        return True
    try:
        _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _new_temp(target: Path, folder: bool = False) -> tuple[int, Path]:
    """A fresh temporary file (or folder) beside ``target`` and a locked descriptor of it. If a
    cleaner took the lock first (between creation and locking), it removes that one: try again."""
    for _ in range(100):
        if folder:
            path = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
            fd = os.open(path, os.O_RDONLY)
        else:
            fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            path = Path(name)
        if _lock(fd):
            return fd, path
        os.close(fd)
    raise OSError(errno.EAGAIN, "临时文件一直被别的进程占用 temporary files keep being taken by another process", str(target.parent))


@dataclass
class Leftover:
    """A temporary file or folder of an interrupted save (``in_use``: a live writer holds it)."""

    path: Path
    size_bytes: int
    in_use: bool


def find_leftovers(folder: str | os.PathLike) -> list[Leftover]:
    """Our temporary files and folders in ``folder`` (see ``_TEMP_NAME``), and whether a live
    writer still holds each (its lock)."""
    out: list[Leftover] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return out
    for entry in entries:
        if not _TEMP_NAME.match(entry.name):
            continue
        path = Path(entry.path)
        with contextlib.suppress(OSError):
            size = dir_size(path) if entry.is_dir(follow_symlinks=False) else entry.stat(follow_symlinks=False).st_size
            out.append(Leftover(path, size, _in_use(path)))
    return sorted(out, key=lambda item: item.path.name)


def _in_use(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True  # gone or unreadable: not ours to judge
    try:
        return not _lock(fd)
    finally:
        os.close(fd)


def remove_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders that killed or crashed saves left in ``folder``:
    only names of our own pattern, only those whose lock no live writer holds (the lock is held
    while removing, so a writer never loses a file it is writing). Returns what was removed;
    never raises."""
    removed: list[Path] = []
    if _fcntl is None:  # pragma: no cover
        return removed
    for item in find_leftovers(folder):
        if item.in_use:
            continue
        try:
            fd = os.open(item.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if not _lock(fd):
                continue
            if item.path.is_dir():
                shutil.rmtree(item.path)
            else:
                item.path.unlink()
            removed.append(item.path)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Write ``path`` all or nothing through a file name: yields an empty temporary file in the
    same folder (``.<name>.<random>.tmp``, locked by this process until it is in place) for the
    caller to write and close; then it is fsynced and ``os.replace``-d over the target. For writers
    that want a path (the ``gguf`` package); :func:`atomic_write` is the same for a file object.
    Leftovers of earlier killed saves in that folder are removed first (:func:`remove_leftovers`).
    An OS error becomes :func:`write_error`'s CheckpointError; on any error the temporary file is
    removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(path.parent)
        fd, tmp = _new_temp(path)
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        try:
            mode = path.stat().st_mode & 0o777
        except OSError:
            mode = 0o644
        os.chmod(tmp, mode)
        yield tmp
        os.fsync(fd)
        os.replace(tmp, path)  # while still locked: never taken for a leftover
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from None
        raise
    finally:
        os.close(fd)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """:func:`atomic_path` for a writer that wants a file object. A failed write is reported with
    the system's reason even when the writer (``torch.save``) turns it into its own error."""
    stream: _RecordingFile | None = None
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            stream = _RecordingFile(f)
            yield stream  # type: ignore[misc]
    except CheckpointError:
        raise
    except BaseException:
        if stream is not None and stream.error is not None:
            raise write_error(path, stream.error) from None
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system
    or the file system cannot."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(b))


@contextlib.contextmanager
def replace_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Build a folder beside ``target`` and put it in ``target``'s place as a whole: the caller
    writes the files into the yielded folder (``.<name>.<random>.tmp``, locked while it is being
    written); then it is fsynced and swapped with the old folder in one step (``RENAME_EXCHANGE``;
    a plain rename when there was none), and the old folder is removed. A kill at any moment leaves
    the old folder or the new one, and a leftover that the next save removes. OS errors become
    :func:`write_error`'s CheckpointError naming ``target``."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(target.parent)
        fd, stage = _new_temp(target, folder=True)
    except OSError as exc:
        raise write_error(target, exc) from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        try:
            os.chmod(stage, target.stat().st_mode & 0o777 if target.is_dir() else 0o777 & ~umask)
            yield stage
            for entry in os.scandir(stage):
                _fsync_path(Path(entry.path))
            _fsync_dir(stage)
            if target.is_dir() and not _exchange(stage, target):
                _swap_in_two_steps(stage, target)
            elif not target.is_dir():
                os.rename(stage, target)
            _fsync_dir(target.parent)
        except BaseException as exc:
            if isinstance(exc, OSError):
                raise write_error(target, exc) from None
            if isinstance(exc, CheckpointError) and exc.path.startswith(str(stage)):
                raise CheckpointError(target, exc.reason) from None
            raise
    finally:
        os.close(fd)
        shutil.rmtree(stage, ignore_errors=True)  # unfinished, or the old folder after the swap


def _swap_in_two_steps(stage: Path, target: Path) -> None:
    """Where no atomic swap exists: the old folder is moved aside (and back if the new one
    cannot take its place); a kill between the two renames leaves both as leftovers."""
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.rename(target, aside / target.name)
    try:
        os.rename(stage, target)
    except OSError:
        os.rename(aside / target.name, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- reading helpers ----------------------------------------------------------------------------

#: The largest size a loader believes a file's config: far beyond any model this app trains, small
#: enough that nothing impossible reaches the allocator.
SIZE_LIMITS = {"vocab_size": 1 << 21, "hidden_size": 1 << 16, "num_layers": 1 << 10, "num_heads": 1 << 10,
               "num_kv_heads": 1 << 10, "intermediate_size": 1 << 18, "max_seq_len": 1 << 20}


def check_config_sizes(path: str | os.PathLike, config: Any) -> None:
    """Refuse a stored config whose sizes are beyond :data:`SIZE_LIMITS`, naming the field."""
    if not isinstance(config, dict):
        return
    for key, limit in SIZE_LIMITS.items():
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > limit:
            raise CheckpointError(path, f"文件已损坏，配置里的 {key} 大得不可能 is broken: its config claims {key} = {value}, beyond any real model "
                                        f"(at most {limit}); it cannot be loaded")


def model_bytes(config: "DIYConfig") -> int:
    """Memory that building ``config``'s model and loading weights into it takes: every
    parameter twice in float32 (the model and the weights read from the file) and the rotary tables."""
    hidden, vocab, layers = config.hidden_size, config.vocab_size, config.num_layers
    kv = config.num_kv_heads * config.head_dim
    per_layer = hidden * (hidden + 2 * kv) + hidden * hidden + 3 * hidden * config.intermediate_size + 2 * hidden
    params = vocab * hidden * (1 if config.tie_word_embeddings else 2) + layers * per_layer + hidden
    return 4 * (2 * params + 2 * config.max_seq_len * config.head_dim)


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(path: str | os.PathLike, config: "DIYConfig") -> None:
    """Refuse, before allocating anything, a model that needs more memory than is available."""
    need, have = model_bytes(config), available_memory()
    if have is not None and need > have:
        raise CheckpointError(path, f"模型太大，这台机器的内存装不下 describes a model too large for this machine: it needs about "
                                    f"{need / 2**30:.1f} GiB of memory (hidden_size {config.hidden_size}, "
                                    f"num_layers {config.num_layers}, vocab_size {config.vocab_size}) and "
                                    f"{have / 2**30:.1f} GiB are available")

def stat_file(path: Path) -> os.stat_result:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CheckpointError(path, "找不到这个文件 not found: no such file") from None
    except OSError as exc:
        raise CheckpointError(path, f"无法读取 cannot be read: {exc.strerror or exc}") from None
    if path.is_dir():
        hint = " (a Hugging Face export folder; use load_model_hf)" if (path / "config.json").exists() else ""
        raise CheckpointError(path, f"这是文件夹，不是模型文件 is a folder, not a checkpoint file{hint}")
    if st.st_size == 0:
        raise CheckpointError(path, "文件是空的，保存没有完成，请换一个 is empty (0 bytes): the save never completed; use another checkpoint")
    return st


def read_head(path: Path, n: int = 8) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as exc:
        raise CheckpointError(path, f"无法读取 cannot be read: {exc.strerror or exc}") from None



def check_format_header(path: Path, obj: Any, fmt: str, max_version: int, kind: str) -> dict[str, Any]:
    """Check a file's format marker, version and its config/metadata entries; returns ``obj``.

    Shared by the ``.pt`` and JSON readers so both refuse foreign, newer and damaged files alike.
    """
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        if kind == "JSON export":
            raise CheckpointError(path, f"不是 diyapp 的 JSON 导出 is not a diyapp JSON export (no \"format\": \"{fmt}\" marker)")
        what = "a bare state dict" if isinstance(obj, dict) and obj and all(
            isinstance(k, str) and "." in k for k in obj) else f"a {type(obj).__name__}"
        raise CheckpointError(path, f"不是 diyapp 的模型文件 is not a diyapp checkpoint (a PyTorch file holding {what}, without "
                                    f"diyapp's format marker)")
    version = obj.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(path, f"格式版本无效 has an invalid format version {version!r}")
    if version > max_version:
        raise CheckpointError(path, f"由更新版本的 diyapp 写出，请升级 was written by a newer diyapp ({kind} format version {version}; this "
                                    f"version reads up to {max_version}); upgrade diyapp to load it")
    for key in ("config", "metadata"):
        if not isinstance(obj.get(key), dict):
            raise CheckpointError(path, f"文件已损坏 is damaged: its {key!r} entry is missing or not a mapping")
    check_config_sizes(path, obj["config"])
    return obj



def build_loaded(path: Path, fmt: str, config_dict: Any, metadata: dict[str, Any], tokenizer_text: str | None,
                 state: dict[str, Any], train_state: Any, *, device: Any = None, strict: bool = True,
                 tokenizer: Any = None) -> LoadedModel:
    """Rebuild the model from a stored config and weights (shared by every loader)."""
    import torch

    from ..config import ConfigError, DIYConfig
    from ..model import DIYForCausalLM

    check_config_sizes(path, config_dict)
    try:
        config = DIYConfig.from_dict(config_dict)
    except ConfigError as exc:
        raise CheckpointError(path, f"保存的模型配置无效 its stored model config is invalid: {exc}") from None
    check_memory(path, config)
    if tokenizer is None:
        tokenizer = load_tokenizer(path, tokenizer_text)
    size = getattr(tokenizer, "vocab_size", None)
    if isinstance(size, int) and size > config.vocab_size:
        raise CheckpointError(path, f"文件前后不一致，词表和模型不配套 is inconsistent: its tokenizer has {size} tokens but the model "
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
                raise CheckpointError(path, f"文件已损坏 is damaged: weight {name} is a {type(t).__name__}, not a tensor")
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
        raise CheckpointError(path, "权重和保存的配置对不上 weights do not fit the stored config: " + "; ".join(parts)
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


def dir_size(path: Path) -> int:
    """Bytes in the files directly inside ``path`` (a model folder is flat)."""
    total = 0
    for entry in os.scandir(path):
        with contextlib.suppress(OSError):
            if entry.is_file():
                total += entry.stat().st_size
    return total


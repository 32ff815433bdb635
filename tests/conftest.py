"""Shared fixtures: tiny model configs keep the suite fast on two cores."""

from __future__ import annotations

import os
from pathlib import Path

# One thread, here and in every process a test starts (they inherit the environment). The tiny
# models of the tests run no faster on two, and on a machine where other processes keep the cores
# busy, the threads of each parallel kernel wait for one another: whole tests ran 10-40x slower.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _same_random_numbers_in_any_order():
    """Every test starts from the same torch random state, whichever tests ran before it
    (pytest-randomly reseeds ``random`` and NumPy, not torch)."""
    torch.manual_seed(0)


@pytest.fixture
def tiny_config():
    from diyapp import DIYConfig

    return DIYConfig(vocab_size=97, num_layers=2, hidden_size=32, num_heads=4, max_seq_len=48, dropout=0.0)


@pytest.fixture
def tiny_model(tiny_config):
    from diyapp import DIYForCausalLM

    torch.manual_seed(0)
    return DIYForCausalLM(tiny_config).eval()


@pytest.fixture
def fresh_detection():
    """The CPU's bf16 detection asked again inside the test and after it (it is cached)."""
    from diyapp.device import cpu_supports_bf16

    cpu_supports_bf16.cache_clear()
    yield
    cpu_supports_bf16.cache_clear()


@pytest.fixture
def without_native(monkeypatch):
    """No compiled kernel (as where there is no C compiler): fp16 products by FBGEMM."""
    from diyapp import decoder, native

    monkeypatch.setattr(native, "_load", lambda: (None, "turned off by the test"))
    decoder.fp16_products_available.cache_clear()
    yield
    decoder.fp16_products_available.cache_clear()


@pytest.fixture
def pack_every_matrix(monkeypatch):
    """A bf16 decoder packs every matrix of a tiny model, as it does a model larger than the CPU's
    cache (a tiny model's matrices are all below the size packed otherwise)."""
    from diyapp import decoder

    monkeypatch.setattr(decoder, "last_level_cache_bytes", lambda: 0)


#: A few sentences to train small tokenizers on (Chinese, and ASCII for the byte paths).
SMALL_TEXTS = ["春天来了，花儿开了，小草也绿了。", "夏天很热，我们常去河边游泳。", "秋天的树叶变黄，慢慢落下来。",
               "冬天下雪，孩子们在外面堆雪人。", "Hello world, it's a small test: 123 + 456 = 579."] * 3


@pytest.fixture(scope="module")
def tokenizer():
    from diyapp.tokenizer import DIYTokenizer

    return DIYTokenizer.train(SMALL_TEXTS, vocab_size=300)


def make_model(tokenizer, seed=0, **overrides):
    """A tiny eval-mode model sized to ``tokenizer``; ``overrides`` change config fields."""
    from diyapp import DIYConfig, DIYForCausalLM

    torch.manual_seed(seed)
    fields = dict(vocab_size=tokenizer.vocab_size, num_layers=2, hidden_size=32, num_heads=4, max_seq_len=48,
                  dropout=0.0)
    return DIYForCausalLM(DIYConfig(**{**fields, **overrides})).eval()


def assert_one_line_error(load, path, pattern, describe_pattern=None):
    """``load(path)`` raises CheckpointError matching ``pattern``, one line that starts with the
    path; with ``describe_pattern``, ``describe_checkpoint(path)`` fails with that too."""
    from diyapp.checkpoint import CheckpointError, describe_checkpoint

    with pytest.raises(CheckpointError, match=pattern) as err:
        load(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    if describe_pattern is not None:
        with pytest.raises(CheckpointError, match=describe_pattern):
            describe_checkpoint(path)


def write_unreadable(kind, path):
    """The broken files every format shares: ``missing`` (nothing written), ``empty`` and ``random``
    (bytes that are neither a zip nor JSON). Returns False for any other ``kind``."""
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(bytes(range(256)) * 16)
    return kind in ("missing", "empty", "random")


class _FailingFile:
    """A file opened for writing that takes ``limit`` bytes, then fails like a full disk."""

    def __init__(self, f, limit: int) -> None:
        self._f, self._left = f, limit

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self._left:
            self._f.write(memoryview(data).cast("B")[: self._left])
            self._f.flush()
            self._left = 0
            raise OSError(28, "No space left on device (injected by the test)")
        self._left -= size
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


def fail_writes(monkeypatch, name_part: str, after_bytes: int) -> None:
    """Every file whose path contains ``name_part`` that is opened for writing from now on (by
    ``open``, ``io.open`` or ``os.fdopen``, so a write in place or to a temporary file alike) takes
    ``after_bytes`` bytes and then raises ``OSError(ENOSPC)``: a failure in the middle of a write."""
    import builtins
    import io
    import os

    real_open, real_fdopen = builtins.open, os.fdopen

    def writing(mode) -> bool:
        return any(c in str(mode) for c in "wax+")

    def wrapped_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        hit = not isinstance(file, int) and name_part in os.fspath(file)
        return _FailingFile(f, after_bytes) if writing(mode) and hit else f

    def wrapped_fdopen(fd, mode="r", *args, **kwargs):
        f = real_fdopen(fd, mode, *args, **kwargs)
        try:
            hit = name_part in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            hit = False
        return _FailingFile(f, after_bytes) if writing(mode) and hit else f

    monkeypatch.setattr(builtins, "open", wrapped_open)
    monkeypatch.setattr(io, "open", wrapped_open)
    monkeypatch.setattr(os, "fdopen", wrapped_fdopen)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden and temporary ones included) by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_write_failing_midway_changes_nothing(monkeypatch, folder: Path, name: str, write) -> None:
    """``write()`` over the existing file ``folder/name`` fails when the disk fills up halfway
    through it (one clear CheckpointError), and leaves every file in ``folder`` byte for byte as
    it was, with no partial or temporary file beside them."""
    from diyapp.checkpoint import CheckpointError

    before = folder_bytes(folder)
    with monkeypatch.context() as patch:
        fail_writes(patch, name, after_bytes=len(before[name]) // 2)
        with pytest.raises(CheckpointError, match="No space left"):
            write()
    assert folder_bytes(folder) == before

"""The one compiled kernel: fp16 matrix-vector products for one-token decoding on an x86 CPU.

PyTorch's 16-bit products (FBGEMM's packed fp16, oneDNN's packed bf16) read a one-row product's
weights at about 17 GB/s on the 2-core Xeon this was measured on, where its fp32 ``mm`` reads
25 GB/s: half the bytes then saves only a third of the time. ``fp16_gemv.c`` (beside this file)
streams fp16 weights at the memory's rate, laid out (:meth:`Fp16Gemv.pack`) in blocks that a product
reads as one sequential stream. It is compiled once with the system's C compiler into
the user's cache folder (about half a second) and loaded with ``ctypes``; where there is no compiler,
no AVX2, no Linux on x86-64, or ``DIYAPP_NATIVE=0``, :func:`fp16_gemv` returns ``None`` and the
decoder uses PyTorch's products as before. ``DIYAPP_NATIVE=avx2`` keeps it to its 256-bit path, as
on a CPU without AVX-512 (with ``ATEN_CPU_CAPABILITY=avx2`` and ``DIYAPP_CPU_BF16=0``, the app runs
as on an AVX2 CPU).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

SOURCE = Path(__file__).with_name("fp16_gemv.c")
FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")
BUILD_TIMEOUT_S = 120


def cache_dir() -> Path:
    """Where the built library is kept: ``$XDG_CACHE_HOME/diyapp`` or ``~/.cache/diyapp``."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "diyapp"


def compiler() -> str | None:
    """The C compiler to build with: ``$CC``, else ``cc``, ``gcc`` or ``clang`` on the PATH."""
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    return next((path for name in ("cc", "gcc", "clang") if (path := shutil.which(name))), None)


class Fp16Gemv:
    """The loaded kernel: ``y = (y if accumulate else 0) + normed(a) @ weight.T`` for an ``(out, in)``
    weight laid out by :meth:`pack` and float32 ``a`` ``(rows, in)`` and ``y`` ``(rows, out)``, all
    contiguous on the CPU; ``normed(a)`` is ``a`` itself, or with ``eps`` each row times
    ``1 / sqrt(sum(row^2) + eps)`` (RMSNorm whose scale is folded into the weight)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._call = lib.diy_fp16_gemv
        self._call.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3 + [ctypes.c_int] * 2 + [ctypes.c_float]
        self._call.restype = ctypes.c_int
        for name in ("diy_fp16_gemv_width", "diy_max_threads", "diy_fp16_block_rows", "diy_fp16_block_cols"):
            getattr(lib, name).restype = ctypes.c_int
        #: the blocks the kernel reads a weight in (rows, columns; see :meth:`pack`)
        self.block = (int(lib.diy_fp16_block_rows()), int(lib.diy_fp16_block_cols()))
        self._max_threads = lib.diy_max_threads
        #: the widest vectors this CPU runs the kernel with (512 or 256; 256 with ``DIYAPP_NATIVE=avx2``,
        #: as on a CPU without AVX-512); 0 where it has no AVX2
        self.width = int(lib.diy_fp16_gemv_width())
        if os.environ.get("DIYAPP_NATIVE") == "avx2":
            self.width = min(self.width, 256)

    def pack(self, weight: Tensor) -> Tensor:
        """An ``(out, in)`` matrix as the kernel reads it: fp16 blocks of ``block[0]`` rows,
        ``block[1]`` columns at a time (``(out / r, in / c, r, c)``, zero-padded to whole blocks), so
        that a product reads one sequential stream (see ``fp16_gemv.c``)."""
        (rows, cols), (out, inner) = self.block, weight.shape
        padded = F.pad(weight.detach().half(), (0, -inner % cols, 0, -out % rows))
        return padded.view(padded.shape[0] // rows, rows, -1, cols).transpose(1, 2).contiguous()

    def packed_shape(self, out: int, inner: int) -> tuple[int, int, int, int]:
        """The shape :meth:`pack` gives an ``(out, inner)`` matrix."""
        rows, cols = self.block
        return (-(-out // rows), -(-inner // cols), rows, cols)

    def __call__(self, weight: Tensor, a: Tensor, y: Tensor, accumulate: bool = False, eps: float | None = None,
                 width: int | None = None) -> Tensor:
        """``weight`` as :meth:`pack` lays it out, for a matrix of ``y.shape[1]`` rows and
        ``a.shape[1]`` columns: a packed shape other than theirs is refused (the kernel would read
        past its end)."""
        rows, (out, inner) = a.shape[0], (y.shape[1], a.shape[1])
        if weight.shape != self.packed_shape(out, inner) or y.shape[0] != rows:
            raise ValueError(f"a packed weight {tuple(weight.shape)} does not multiply {tuple(a.shape)} into "
                             f"{tuple(y.shape)}")
        if self._call(weight.data_ptr(), a.data_ptr(), y.data_ptr(), rows, out, inner, int(accumulate),
                      width or self.width, -1.0 if eps is None else eps):
            raise MemoryError(f"no memory for the scales of {rows} rows")
        return y

    def threads(self) -> int:
        """How many threads a product started now runs on (PyTorch's setting, when the kernel shares
        PyTorch's OpenMP runtime)."""
        return int(self._max_threads())


def library_path(cc: str) -> Path:
    """Where the library built from this source with ``cc`` is kept (a new source, a new file)."""
    key = hashlib.sha256(SOURCE.read_bytes() + cc.encode() + " ".join(FLAGS).encode()).hexdigest()[:16]
    return cache_dir() / f"fp16_gemv-{key}.so"


def _private(folder: Path) -> bool:
    """Whether only this user can write into ``folder`` (a library someone else could replace there
    would run as this user's code)."""
    info = folder.stat()
    return info.st_uid == os.getuid() and not info.st_mode & 0o022


def _build(source: Path, target: Path, cc: str) -> None:
    """Compile ``source`` into ``target``, atomically: a failed or parallel build leaves no partial file."""
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, "-o", tmp, str(source)], check=True, capture_output=True, timeout=BUILD_TIMEOUT_S)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _shares_torch_threads(kernel: Fp16Gemv) -> bool:
    """Whether the kernel's OpenMP runtime is PyTorch's (one thread pool, following
    ``torch.set_num_threads``), not a second one whose threads would compete with PyTorch's."""
    threads = torch.get_num_threads()
    try:
        for n in {1, threads}:
            torch.set_num_threads(n)
            if kernel.threads() != n:
                return False
        return True
    finally:
        torch.set_num_threads(threads)


def _works(kernel: Fp16Gemv) -> bool:
    """The kernel's products equal float32 products of the fp16-rounded weights, at both vector widths."""
    weight = torch.linspace(-2, 2, 9 * 37).reshape(9, 37).half()  # a block and a step of columns part-filled
    a = torch.linspace(-1, 1, 2 * 37).reshape(2, 37)
    expected = a @ weight.float().t()
    normed = (a * (a * a).sum(1, keepdim=True).add(0.5).rsqrt()) @ weight.float().t()
    weight = kernel.pack(weight)
    widths = [w for w in (512, 256) if w <= kernel.width]
    return bool(widths) and all(
        torch.allclose(kernel(weight, a, torch.empty(2, 9), width=w), expected, rtol=1e-5, atol=1e-5)
        and torch.allclose(kernel(weight, a, expected.clone(), accumulate=True, width=w), 2 * expected,
                           rtol=1e-5, atol=1e-5)
        and torch.allclose(kernel(weight, a, torch.empty(2, 9), eps=0.5, width=w), normed, rtol=1e-5, atol=1e-5)
        for w in widths)


@functools.lru_cache(maxsize=None)
def _load() -> tuple[Fp16Gemv | None, str | None]:
    """The kernel, or ``None`` and why not."""
    if os.environ.get("DIYAPP_NATIVE") == "0":
        return None, "turned off by DIYAPP_NATIVE=0"
    if not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"built only on Linux x86-64 (this is {sys.platform} {platform.machine()})"
    cc = compiler()
    if cc is None:
        return None, "no C compiler (cc, gcc or clang) on the PATH"
    target = library_path(cc)
    try:
        if target.parent.exists() and not _private(target.parent):
            return None, f"{target.parent} can be written by other users"
        if not target.exists():
            _build(SOURCE, target, cc)
        try:
            lib = ctypes.CDLL(str(target))
        except OSError:  # a damaged file from an earlier build: built again
            _build(SOURCE, target, cc)
            lib = ctypes.CDLL(str(target))
        kernel = Fp16Gemv(lib)
    except (OSError, subprocess.SubprocessError, AttributeError) as exc:
        return None, f"could not build or load {target}: {(str(exc) or type(exc).__name__).splitlines()[0]}"
    if kernel.width == 0:
        return None, "this CPU has no AVX2 and FMA"
    if not _shares_torch_threads(kernel):
        return None, "its OpenMP runtime is not PyTorch's"
    if not _works(kernel):
        return None, "its products differ from PyTorch's"
    return kernel, None


def fp16_gemv() -> Fp16Gemv | None:
    """The fp16 kernel, built on first use; ``None`` where it cannot be built, loaded or trusted
    (see the module's docstring; :func:`unavailable_reason` says why)."""
    return _load()[0]


def unavailable_reason() -> str | None:
    """Why :func:`fp16_gemv` is ``None`` (``None`` when there is a kernel)."""
    return _load()[1]

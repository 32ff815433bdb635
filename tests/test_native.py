"""The compiled fp16 kernel (diyapp.native): its products against PyTorch's, how it is built and
cached, and what happens where it cannot be built."""

from __future__ import annotations

import os
import platform
import shutil
import sys

import pytest
import torch

from diyapp import native

ON_X86_LINUX = sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64")


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """An empty cache folder, and the kernel loaded again inside the test and after it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native._load.cache_clear()
    yield tmp_path / "diyapp"
    native._load.cache_clear()


def _kernel():
    kernel = native.fp16_gemv()
    if kernel is None:
        pytest.skip(f"no compiled kernel here: {native.unavailable_reason()}")
    return kernel


def test_the_kernel_is_built_where_a_compiler_and_avx2_are():
    """On Linux x86-64 with a C compiler and AVX2 (the machines this project runs on) the kernel is
    there: the other tests of this file are then never skipped."""
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if not (ON_X86_LINUX and native.compiler() and " avx2 " in flags and " fma " in flags
            and os.environ.get("DIYAPP_NATIVE") != "0"):
        pytest.skip("not a Linux x86-64 machine with a C compiler and AVX2")
    assert native.fp16_gemv() is not None, native.unavailable_reason()
    assert native.unavailable_reason() is None
    assert native.fp16_gemv().width == (512 if " avx512f " in flags else 256)


@pytest.mark.parametrize("shape", [(9, 37), (64, 48), (3, 16), (130, 520), (1, 7), (6, 8), (5, 31)])
@pytest.mark.parametrize("rows", [1, 3])
def test_products_equal_float32_products_of_the_fp16_weights(shape, rows):
    """Both vector widths, both tails (rows of W not a multiple of 4, widths not of 16 or 8)."""
    kernel = _kernel()
    torch.manual_seed(1)
    weight = torch.randn(*shape).half()
    a = torch.randn(rows, shape[1])
    expected = a @ weight.float().t()
    eps = 0.3
    normed = (a * (a * a).sum(1, keepdim=True).add(eps).rsqrt()) @ weight.float().t()
    weight = kernel.pack(weight)
    for width in [w for w in (512, 256) if w <= kernel.width]:
        y = torch.full((rows, shape[0]), float("nan"))
        torch.testing.assert_close(kernel(weight, a, y, width=width), expected, rtol=1e-5, atol=1e-5)
        base = torch.randn(rows, shape[0])
        got = kernel(weight, a, base.clone(), accumulate=True, width=width)
        torch.testing.assert_close(got, base + expected, rtol=1e-5, atol=1e-5)
        got = kernel(weight, a, base.clone(), accumulate=True, eps=eps, width=width)
        torch.testing.assert_close(got, base + normed, rtol=1e-5, atol=1e-5)


def test_a_packed_weight_is_every_value_in_blocks_and_zero_padded():
    """The layout the C kernel reads (P[b, c, k, j] = W[4b + k, 16c + j]), and the shape check that
    keeps it from reading past a weight's end."""
    kernel = _kernel()
    rows, cols = kernel.block
    weight = torch.arange(1.0, 1 + 9 * 37).reshape(9, 37)
    packed = kernel.pack(weight)
    assert packed.dtype == torch.float16 and packed.shape == kernel.packed_shape(9, 37)
    for o, i in [(0, 0), (8, 36), (5, 17), (3, 16)]:
        assert packed[o // rows, i // cols, o % rows, i % cols] == weight[o, i]
    assert packed.float().sum() == weight.half().float().sum()  # the padding is zero
    with pytest.raises(ValueError, match="does not multiply"):
        kernel(packed, torch.randn(1, 49), torch.empty(1, 9))
    with pytest.raises(ValueError, match="does not multiply"):
        kernel(packed, torch.randn(1, 37), torch.empty(1, 13))


def test_products_follow_torchs_thread_count():
    kernel = _kernel()
    threads = torch.get_num_threads()
    weight, a = torch.randn(512, 512).half(), torch.randn(1, 512)
    expected = a @ weight.float().t()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert kernel.threads() == n
            torch.testing.assert_close(kernel(kernel.pack(weight), a, torch.empty(1, 512)), expected,
                                       rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_the_library_is_built_once_into_the_cache_folder(fresh_build):
    if not (ON_X86_LINUX and native.compiler()):
        pytest.skip("no compiler here")
    kernel = native.fp16_gemv()
    if kernel is None and "AVX2" in (native.unavailable_reason() or ""):
        pytest.skip(native.unavailable_reason())
    built = list(fresh_build.glob("fp16_gemv-*.so"))
    assert kernel is not None and len(built) == 1
    assert list(fresh_build.iterdir()) == built  # no temporary file left beside it
    stamp = built[0].stat().st_mtime_ns
    native._load.cache_clear()
    assert native.fp16_gemv() is not None and built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt


def test_a_damaged_library_in_the_cache_is_built_again(fresh_build, monkeypatch):
    if not (ON_X86_LINUX and native.compiler()):
        pytest.skip("no compiler here")
    fresh_build.mkdir(parents=True)
    damaged = fresh_build / "fp16_gemv-damaged.so"  # a name this process has not loaded yet
    damaged.write_bytes(b"not a library")
    monkeypatch.setattr(native, "library_path", lambda cc: damaged)
    kernel = native.fp16_gemv()
    if kernel is None and "AVX2" in (native.unavailable_reason() or ""):
        pytest.skip(native.unavailable_reason())
    assert kernel is not None, native.unavailable_reason()
    assert damaged.read_bytes()[:4] == b"\x7fELF"


def test_without_a_compiler_there_is_no_kernel_and_a_reason(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-here")
    assert native.fp16_gemv() is None
    assert "no C compiler" in native.unavailable_reason()
    assert not fresh_build.exists()


def test_a_failing_build_leaves_no_file_and_says_so(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", shutil.which("false") or "false")
    if not ON_X86_LINUX or native.compiler() is None:
        pytest.skip("no `false` command here, or not a machine the kernel is built on")
    assert native.fp16_gemv() is None
    assert "could not build" in native.unavailable_reason()
    assert list(fresh_build.iterdir()) == []  # the temporary output is removed


def test_diyapp_native_0_turns_the_kernel_off(fresh_build, monkeypatch):
    monkeypatch.setenv("DIYAPP_NATIVE", "0")
    assert native.fp16_gemv() is None and "DIYAPP_NATIVE=0" in native.unavailable_reason()


def test_diyapp_native_avx2_keeps_the_kernel_to_its_256_bit_path(fresh_build, monkeypatch):
    """As on a CPU without AVX-512 (what bench_first_run --without-bf16 runs as)."""
    monkeypatch.setenv("DIYAPP_NATIVE", "avx2")
    kernel = _kernel()
    assert kernel.width == 256
    weight, a = torch.randn(40, 72).half(), torch.randn(2, 72)
    torch.testing.assert_close(kernel(kernel.pack(weight), a, torch.empty(2, 40)), a @ weight.float().t(),
                               rtol=1e-5, atol=1e-5)


def test_a_cache_folder_others_can_write_to_is_not_loaded_from(fresh_build):
    fresh_build.mkdir(parents=True)
    fresh_build.chmod(0o777)
    if not ON_X86_LINUX or native.compiler() is None:
        pytest.skip("not a machine the kernel is built on")
    assert native.fp16_gemv() is None
    assert "other users" in native.unavailable_reason()
    assert list(fresh_build.iterdir()) == []

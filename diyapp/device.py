"""Where tensors live and which precision runs fastest there."""

from __future__ import annotations

import functools
import os

import torch


def pick_device(requested: str | None = None) -> torch.device:
    """CUDA when present, else CPU; ``requested`` ("cpu", "cuda", "cuda:1") overrides."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.lru_cache(maxsize=None)
def cpu_supports_bf16() -> bool:
    """True when the CPU has native bfloat16 matrix instructions (AVX-512 BF16 or AMX).

    Without them PyTorch emulates bf16 matmuls, which on an AVX2 machine measured about 60x
    slower than fp32, so autocast would be a large loss there. ``DIYAPP_CPU_BF16=0`` in the
    environment treats the CPU as one without (everything then runs in float32, as there).
    """
    if os.environ.get("DIYAPP_CPU_BF16", "").strip() == "0":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(device: torch.device | str, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype to train with, or None for plain fp32.

    ``precision`` is "auto" (bf16 where the hardware runs it natively), "bf16" or "fp32".
    """
    device = torch.device(device)
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if cpu_supports_bf16() else None
    return None


def precision_name(dtype: torch.dtype | None) -> str:
    """Short label for a training precision ("bf16" or "fp32")."""
    return "bf16" if dtype == torch.bfloat16 else "fp32"

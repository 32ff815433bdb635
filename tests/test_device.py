"""Device and precision choice: DIYAPP_CPU_BF16=0 makes a CPU count as one without native bf16."""

import pytest
import torch

from diyapp.device import autocast_dtype, cpu_supports_bf16
from diyapp.train import TrainConfig, make_optimizers


def test_diyapp_cpu_bf16_0_runs_everything_in_float32(monkeypatch, fresh_detection, tiny_model):
    monkeypatch.setenv("DIYAPP_CPU_BF16", "0")
    assert cpu_supports_bf16() is False
    assert autocast_dtype("cpu", "auto") is None
    assert autocast_dtype("cpu", "bf16") is torch.bfloat16  # an explicit choice still wins
    config = TrainConfig(optimizer="muon")
    _, muon = make_optimizers(tiny_model, config, autocast_dtype("cpu", config.precision))
    assert muon.ns_dtype is None  # Muon's products in float32 too


def test_without_the_variable_detection_asks_the_cpu(monkeypatch, fresh_detection):
    monkeypatch.delenv("DIYAPP_CPU_BF16", raising=False)
    assert cpu_supports_bf16() is bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())

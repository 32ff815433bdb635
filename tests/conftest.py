"""Shared fixtures: tiny model configs keep the suite fast on two cores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_config():
    from diyapp import DIYConfig

    return DIYConfig(vocab_size=97, num_layers=2, hidden_size=32, num_heads=4, max_seq_len=48, dropout=0.0)


@pytest.fixture
def tiny_model(tiny_config):
    from diyapp import DIYForCausalLM

    torch.manual_seed(0)
    return DIYForCausalLM(tiny_config).eval()

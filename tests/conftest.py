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

"""The recipe adapted to the size of the person's corpus: model shape and pretraining settings.

The bundled data (about 20 K characters) is a small corpus: the default model and the engine's
stage recipe (:func:`diyapp.train.default_stage_config`) are tuned on it, and nothing changes for
corpora of that size. A large corpus (from :data:`LARGE_CORPUS_CHARS` characters of text) is a
different problem: the model sees each document only a few times in the time a person gives it,
so it must learn the language instead of memorising rows. What bench/bench_corpus.py measured on
the Song ci corpus (1.8 M characters, ~6,000 distinct) decided the settings here; see
bench/README.md for the figures.

Imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Sequence

from .config import DIYConfig

if TYPE_CHECKING:
    from .train import TrainConfig

#: From this many characters of plain text a corpus gets the large-corpus recipe.
LARGE_CORPUS_CHARS = 200_000
#: Without a time budget, pretraining on a large corpus reads about this many characters in all
#: (epochs = this / corpus size, at least 1): a 1.8 M-character corpus gets 3 epochs, not 16.
NO_BUDGET_PRETRAIN_CHARS = 5_000_000
#: The model for a large corpus. In a budget of minutes on a CPU the model is far from trained
#: (a few tokens per parameter), where a smaller model that reads more text wins: at the same
#: number of tokens 4 layers scored 0.13 bits/char better than 2, but took twice as long.
#: The vocabulary: single characters, not words (whole_characters below), each character seen
#: twice its own token; 8,000 is a cap that a ~6,000-character corpus does not reach (about 5,750).
LARGE_CORPUS_MODEL = {"num_layers": 2, "hidden_size": 256, "num_heads": 4, "max_seq_len": 128, "vocab_size": 8000}
#: A large corpus gets a vocabulary of characters, not words: a word token is one more thing to
#: learn from the few times it occurs, while its characters' statistics are shared.
LARGE_CORPUS_WHOLE_CHARACTERS = True
#: Pretraining settings for a large corpus (the rest as in the engine's recipe). They were measured
#: with AdamW, which they keep: Muon (the bundled recipe's optimizer) is untested on a large corpus.
LARGE_CORPUS_PRETRAIN = {"batch_size": 4, "lr": 3e-3, "min_lr": 3e-4, "dropout": 0.0, "weight_decay": 0.1,
                         "val_fraction": 0.02, "optimizer": "adamw"}
#: Without a time budget, pretraining on a large corpus takes at most this many epochs.
LARGE_CORPUS_MAX_EPOCHS = 16


def text_chars(texts: Sequence[str]) -> int:
    """Characters of plain text in ``texts``."""
    return sum(len(t) for t in texts)


def is_large(chars: int) -> bool:
    """Whether a corpus with ``chars`` characters of text gets the large-corpus recipe."""
    return chars >= LARGE_CORPUS_CHARS


def whole_characters(chars: int) -> bool:
    """Whether the vocabulary of a corpus with ``chars`` characters holds single characters
    rather than words (:meth:`diyapp.tokenizer.DIYTokenizer.train`)."""
    return LARGE_CORPUS_WHOLE_CHARACTERS and is_large(chars)


def model_for(config: DIYConfig, chars: int, explicit: Sequence[str] = ()) -> DIYConfig:
    """``config`` (the default size) adapted to a corpus of ``chars`` characters; fields the person
    set (``explicit``) are kept."""
    if not is_large(chars):
        return config
    changes = {k: v for k, v in LARGE_CORPUS_MODEL.items() if k not in explicit}
    return dataclasses.replace(config, **changes, intermediate_size=None) if changes else config


def pretrain_for(config: "TrainConfig", chars: int) -> "TrainConfig":
    """The pretraining recipe ``config`` adapted to a corpus of ``chars`` characters."""
    if not is_large(chars):
        return config
    epochs = max(1, min(LARGE_CORPUS_MAX_EPOCHS, round(NO_BUDGET_PRETRAIN_CHARS / chars)))
    return dataclasses.replace(config, epochs=epochs, **LARGE_CORPUS_PRETRAIN)

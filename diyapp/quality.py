"""Quality figures that do not depend on the tokenizer: bits per character on held-out text.

A loss per token cannot be compared across vocabularies (a bigger vocabulary packs more text in a
token) nor with other tools; bits per character can. The model predicts each document's tokens
and its end-of-text token, so the count of predicted symbols is every character plus one per
document (:func:`diyapp.ngram.count_symbols`), the same count the n-gram baseline is scored on.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .model import DIYForCausalLM
from .ngram import count_symbols
from .tokenizer import DIYTokenizer


def bits_per_char(nats: float, chars: int) -> float:
    """Total loss in nats over ``chars`` characters, as bits per character."""
    if chars <= 0:
        raise ValueError("bits per character needs at least one character")
    return nats / math.log(2) / chars


def loss_to_bits_per_char(loss_per_token: float, tokens: int, chars: int) -> float:
    """A mean loss per token (nats) over text of ``tokens`` tokens and ``chars`` characters."""
    return bits_per_char(loss_per_token * tokens, chars)


def _windows(ids: list[int], width: int) -> list[tuple[list[int], int]]:
    """(row, first scored position) windows covering ``ids[1:]``: each token is predicted once,
    with at least half a window of context once the document is longer than the window."""
    if len(ids) <= width:
        return [(ids, 1)]
    out = [(ids[:width], 1)]
    stride = max(1, width // 2)
    end = width
    while end < len(ids):
        new_end = min(len(ids), end + stride)
        start = new_end - width
        out.append((ids[start:new_end], end - start))
        end = new_end
    return out


@torch.no_grad()
def score_texts(model: DIYForCausalLM, tokenizer: DIYTokenizer, texts: Sequence[str],
                batch_size: int = 32) -> tuple[float, int]:
    """(total nats, predicted characters) of ``texts``: each document is scored on its own as
    ``<|endoftext|> document <|endoftext|>``, every token after the first predicted once."""
    eos = tokenizer.eos_token_id
    rows: list[tuple[list[int], int]] = []
    for text in texts:
        rows += _windows([eos] + tokenizer.encode(text) + [eos], model.config.max_seq_len)
    rows.sort(key=lambda r: len(r[0]))
    device = model.lm_head.weight.device
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            width = max(len(r) for r, _ in chunk)
            ids = torch.full((len(chunk), width), eos, dtype=torch.long)
            keep = torch.zeros((len(chunk), width - 1), dtype=torch.bool)
            for i, (row, first) in enumerate(chunk):
                ids[i, :len(row)] = torch.tensor(row)
                keep[i, first - 1:len(row) - 1] = True
            ids = ids.to(device)
            logits = model(ids)[:, :-1].float()
            logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            total -= float(logp[keep.to(device)].sum())
    finally:
        model.train(was_training)
    return total, count_symbols(texts)


def held_out_bits_per_char(model: DIYForCausalLM, tokenizer: DIYTokenizer, texts: Sequence[str]) -> float:
    """Bits per character of ``texts`` under ``model`` (see :func:`score_texts`)."""
    nats, chars = score_texts(model, tokenizer, texts)
    return bits_per_char(nats, chars)


def verdict(val_bpc: float | None, best_bpc: float | None, frequency_bpc: float | None) -> str | None:
    """One line on what a pretraining validation figure means, or None without one.

    ``frequency_bpc`` is what counting character frequencies in the training text scores on the
    same validation text: a model that does not beat it has memorised rows, not learned the
    language, and its figure would mislead, so the line says that instead.
    """
    if val_bpc is None:
        return None
    best = val_bpc if best_bpc is None else min(best_bpc, val_bpc)
    if frequency_bpc is not None and best >= frequency_bpc:
        return (f"模型没有学会这门语言（文本太少或训练太短）：在没见过的文本上不比只统计字频强"
                f"（{best:.2f} 对 {frequency_bpc:.2f} bits/char）。 The text is too small to generalise (or the "
                f"training too short): on held-out text the model does no better than counting character "
                f"frequencies ({best:.2f} vs {frequency_bpc:.2f} bits/char).")
    line = f"验证 held-out: {val_bpc:.3f} bits/char"
    if best < val_bpc - 0.01:
        line += f" (best {best:.3f}: it began to memorise the training text)"
    if frequency_bpc is not None:
        line += f"; character frequencies alone: {frequency_bpc:.3f}"
    return line

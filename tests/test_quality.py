"""Honest quality figures: bits per character (hand-computed cases) and the Kneser-Ney baseline."""

from __future__ import annotations

import math

import pytest
import torch

from diyapp.ngram import BOS, EOS, KneserNey, count_symbols
from diyapp.quality import bits_per_char, loss_to_bits_per_char, score_texts, verdict

from .conftest import make_model


# --- bits per character ---------------------------------------------------------------------------------

def test_bits_per_char_arithmetic_by_hand():
    # 10 bits of loss (10 ln 2 nats) over 5 characters is 2 bits per character.
    assert bits_per_char(10 * math.log(2), 5) == pytest.approx(2.0)
    # 2.0 nats per token, 300 tokens over 200 characters: 600 nats / ln 2 / 200 = 4.328 bits/char.
    assert loss_to_bits_per_char(2.0, 300, 200) == pytest.approx(600 / math.log(2) / 200)
    with pytest.raises(ValueError):
        bits_per_char(1.0, 0)


def test_a_uniform_model_scores_log2_vocab_per_token(tokenizer):
    """With the head's logits all zero every token costs ln V nats, so a text of n tokens and c
    characters costs n * log2(V) / c bits per character; every token after the first <eos> is
    predicted exactly once, also when a document is longer than the context (sliding windows)."""
    model = make_model(tokenizer, max_seq_len=16)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    texts = ["春天来了，花儿开了。", "Hello world, it's a small test: 123 + 456 = 579. " * 3]
    assert len(tokenizer.encode(texts[1])) + 2 > 16                  # needs more than one window
    nats, chars = score_texts(model, tokenizer, texts, batch_size=2)
    tokens = sum(len(tokenizer.encode(t)) + 1 for t in texts)        # each document's tokens + its end
    assert chars == count_symbols(texts) == len(texts[0]) + len(texts[1]) + 2
    assert nats == pytest.approx(tokens * math.log(model.config.vocab_size), rel=1e-4)


def test_verdict_says_when_the_text_is_too_small_to_generalise():
    assert "too small to generalise" in verdict(9.5, 9.4, 9.0)
    line = verdict(6.0, 5.8, 9.0)
    assert "6.000 bits/char" in line and "best 5.800" in line and "9.000" in line
    assert verdict(None, None, 9.0) is None


# --- Kneser-Ney ---------------------------------------------------------------------------------------------

def test_counts_and_continuation_counts_of_a_tiny_text():
    model = KneserNey(["ab", "cb"], order=2)
    assert model.counts[2] == {BOS + "a": 1, "ab": 1, "b" + EOS: 2, BOS + "c": 1, "cb": 1}
    # lower order: how many distinct symbols precede each symbol
    assert model.counts[1] == {"a": 1, "b": 2, EOS: 1, "c": 1}
    assert model.vocab_size == 5                                     # a, b, c, end + unknown


def test_unigram_probabilities_by_hand():
    """"aab": counts a=2, b=1, end=1 (total 4). Count-of-counts n1=2, n2=1 give Y = 2/(2+2) = 0.5,
    D1 = 1 - 2*0.5*1/2 = 0.5, D2 = 2 - 0 = 2; gamma = 0.5*2 + 2*1 = 3; V = 4 (a, b, end, unknown).
    P(a) = (2-2 + 3/4)/4, P(b) = P(end) = (1-0.5 + 3/4)/4, P(unknown) = (3/4)/4."""
    model = KneserNey(["aab"], order=1)
    assert model.discount[1][:2] == pytest.approx((0.5, 2.0))
    assert model.prob("", "a") == pytest.approx(0.1875)
    assert model.prob("", "b") == pytest.approx(0.3125)
    assert model.prob("", EOS) == pytest.approx(0.3125)
    assert model.prob("", "z") == pytest.approx(0.1875)
    bits = -(2 * math.log2(0.1875) + math.log2(0.3125) + math.log2(0.3125))
    assert model.bits_per_char(["aab"]) == pytest.approx(bits / 4)


@pytest.mark.parametrize("history", ["", BOS * 2, "春天", "天来", "xyz"])
def test_probabilities_sum_to_one(history):
    texts = ["春天来了，花儿开了。", "春天很暖，花儿很美。", "秋天来了，叶子黄了。"] * 2
    model = KneserNey(texts, order=3)
    symbols = set("".join(texts)) | {EOS}
    total = sum(model.prob(history, s) for s in symbols) + model.prob(history, "\u9fa5")  # + the unknown
    assert total == pytest.approx(1.0)


def test_longer_context_helps_on_repetitive_text():
    texts = ["春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。"] * 20
    held = ["春眠不觉晓，处处闻啼鸟。"]
    assert KneserNey(texts, 5).bits_per_char(held) < KneserNey(texts, 1).bits_per_char(held) - 2

"""A real ChatSession on a tiny model: what the model is shown (history, clear, trimming to the
context window) and that the sampling settings reach the sampler."""

from __future__ import annotations

import pytest

import diyapp.generation as generation
from diyapp.chat import ChatSession
from diyapp.generation import GenerationConfig

from .conftest import make_model

GREEDY = GenerationConfig(max_new_tokens=6, temperature=0.0)


def record_prompts(monkeypatch) -> list[list[int]]:
    """Every prompt the chat hands to ``generate``, as a list of token ids, in order."""
    prompts: list[list[int]] = []
    real = generation.generate

    def spy(model, input_ids, *args, **kwargs):
        prompts.append([int(i) for i in input_ids])
        return real(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(generation, "generate", spy)
    return prompts


def single_turn(tokenizer, message: str) -> list[int]:
    return tokenizer.encode_chat([{"role": "user", "content": message}], add_generation_prompt=True)[0]


def test_history_is_shown_and_clear_forgets_it(tokenizer, monkeypatch):
    prompts = record_prompts(monkeypatch)
    session = ChatSession(make_model(tokenizer, max_seq_len=256), tokenizer, GREEDY)
    first = session.reply("春天来了吗？")
    session.reply("夏天呢？")
    assert [m["role"] for m in session.history] == ["user", "assistant"] * 2
    expected = [{"role": "user", "content": "春天来了吗？"}, {"role": "assistant", "content": first.text},
                {"role": "user", "content": "夏天呢？"}]
    assert prompts[1] == tokenizer.encode_chat(expected, add_generation_prompt=True)[0]  # the earlier turn is seen
    session.clear()
    assert session.history == []
    session.reply("夏天呢？")
    assert prompts[2] == single_turn(tokenizer, "夏天呢？")  # nothing of before reaches the model


def test_old_turns_are_dropped_first_to_fit_max_seq_len(tokenizer, monkeypatch):
    """Six turns in a window that holds about three (the chat template costs this small vocabulary
    about 20 tokens a message): every prompt leaves room for the answer and is the newest message
    after the most recent whole exchanges (the oldest went first)."""
    prompts = record_prompts(monkeypatch)
    max_len = 160
    session = ChatSession(make_model(tokenizer, max_seq_len=max_len), tokenizer, GREEDY)
    said: list[dict] = []
    kept_counts = []
    for i in range(6):
        message = f"question {i}: it's a small test"
        reply = session.reply(message)
        prompt = prompts[-1]
        assert len(prompt) + GREEDY.max_new_tokens <= max_len, i
        suffixes = [k for k in range(0, len(said) + 1, 2)
                    if tokenizer.encode_chat(said[k:] + [{"role": "user", "content": message}],
                                             add_generation_prompt=True)[0] == prompt]
        assert suffixes, f"prompt {i} is not the newest message after the latest whole exchanges"
        kept_counts.append((len(said) - suffixes[0]) // 2)
        said += [{"role": "user", "content": message}, {"role": "assistant", "content": reply.text}]
    assert min(kept_counts[1:]) >= 1              # the latest exchange is always kept ...
    assert kept_counts[-1] < len(kept_counts) - 1  # ... and the oldest were dropped to make room
    assert session.history == said[len(said) - 2 * (kept_counts[-1] + 1):]


@pytest.mark.parametrize("seed", range(4))
def test_a_tiny_top_p_in_the_settings_answers_like_greedy(tokenizer, seed):
    model = make_model(tokenizer)
    greedy = ChatSession(model, tokenizer, GenerationConfig(max_new_tokens=12, temperature=0.0)).reply("你好")
    nucleus = GenerationConfig(max_new_tokens=12, temperature=5.0, top_k=None, top_p=1e-6)
    assert ChatSession(model, tokenizer, nucleus).reply("你好", seed=seed).text == greedy.text
    wide = GenerationConfig(max_new_tokens=12, temperature=5.0, top_k=None, top_p=1.0)
    assert ChatSession(model, tokenizer, wide).reply("你好", seed=seed).text != greedy.text

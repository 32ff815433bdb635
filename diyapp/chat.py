"""Chat with a trained model: the conversation, its context budget, streamed replies, and the
question/answer hit rate used to judge training. No UI here; the app and the CLI render it."""

from __future__ import annotations

import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .generation import GenerationConfig, generate, stream_text
from .model import DIYForCausalLM
from .tokenizer import DIYTokenizer

#: Room always kept for an answer, in tokens, even when the settings ask for less.
MIN_ANSWER_TOKENS = 8


@dataclass
class Reply:
    """One answer: its text, how many tokens it took and how fast, and what the context lost."""

    text: str
    tokens: int
    seconds: float
    dropped_turns: int = 0
    truncated_prompt: bool = False
    stop: str = "end"  #: "end" (the model ended its turn), "limit" (token limit) or "loop" (stuck repeating)

    @property
    def finished(self) -> bool:
        """The model ended the answer itself."""
        return self.stop == "end"

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def answer_budget(settings: GenerationConfig, max_seq_len: int) -> int:
    """Tokens of the context kept free for the answer: ``max_new_tokens``, at most half the
    context and at least :data:`MIN_ANSWER_TOKENS`."""
    return max(MIN_ANSWER_TOKENS, min(settings.max_new_tokens, max_seq_len // 2))


def build_prompt(tokenizer: DIYTokenizer, history: Sequence[dict], message: str, max_seq_len: int,
                 answer_budget: int) -> tuple[list[int], int, bool]:
    """Token ids for ``history`` + the new user ``message`` + the assistant prompt, fitted into
    ``max_seq_len - answer_budget`` tokens by dropping the oldest exchanges first.

    Returns ``(ids, dropped_messages, truncated)``; a lone message that is still too long keeps
    its end (the most recent words) and sets ``truncated``.
    """
    limit = max(1, max_seq_len - answer_budget)
    turns = list(history)
    dropped = 0
    while True:
        ids, _ = tokenizer.encode_chat(turns + [{"role": "user", "content": message}], add_generation_prompt=True)
        if len(ids) <= limit or not turns:
            break
        cut = 2 if len(turns) >= 2 else 1  # drop a whole user/assistant exchange
        turns = turns[cut:]
        dropped += cut
    if len(ids) <= limit:
        return ids, dropped, False
    head, _ = tokenizer.encode_chat([{"role": "user", "content": ""}], add_generation_prompt=True)
    user_ids = tokenizer.encode(message)
    room = max(1, limit - len(head))
    kept = tokenizer.decode(user_ids[-room:])
    ids, _ = tokenizer.encode_chat([{"role": "user", "content": kept}], add_generation_prompt=True)
    return ids[-limit:], dropped, True


class ChatSession:
    """A multi-turn conversation with a model, kept within its context window."""

    def __init__(self, model: DIYForCausalLM, tokenizer: DIYTokenizer,
                 settings: GenerationConfig | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings or GenerationConfig()
        self.history: list[dict] = []

    def clear(self) -> None:
        """Forget the conversation."""
        self.history = []

    def reply(self, message: str, on_text: Callable[[str], object] | None = None,
              seed: int | None = None) -> Reply:
        """Answer ``message``, streaming whole characters to ``on_text`` as they are generated.

        The exchange joins the history once the reply is generated (whatever ``stop`` says); a
        KeyboardInterrupt during generation propagates after the partial answer was streamed,
        leaving the history unchanged.
        """
        max_len = self.model.config.max_seq_len
        budget = answer_budget(self.settings, max_len)
        ids, dropped, truncated = build_prompt(self.tokenizer, self.history, message, max_len, budget)
        max_new = min(self.settings.max_new_tokens, max_len - len(ids))
        out = stream_text(self.model, ids, max_new, self.settings, self.tokenizer.stream_decoder(),
                          self.tokenizer.utf8_guard(self.model.config.vocab_size), self.tokenizer.im_end_id,
                          on_text, seed)
        text = out.text.strip()
        if dropped:
            self.history = self.history[dropped:]
        self.history += [{"role": "user", "content": message}, {"role": "assistant", "content": text}]
        return Reply(text=text, tokens=out.tokens, seconds=out.seconds,
                     dropped_turns=dropped // 2, truncated_prompt=truncated, stop=out.stop)


@dataclass
class AnswerReport:
    """How many questions got exactly their trained answer under greedy decoding, and how many
    got one close to it (character F1 of at least ``f1_threshold``, punctuation ignored)."""

    hits: int
    total: int
    misses: list[tuple[str, str, str]] = field(default_factory=list)
    close: int = 0
    f1_threshold: float = 0.8

    @property
    def rate(self) -> float:
        return self.hits / self.total if self.total else 0.0

    @property
    def close_rate(self) -> float:
        return self.close / self.total if self.total else 0.0


def _normalise(text: str) -> str:
    return "".join(text.split())


def letters_only(text: str) -> str:
    """``text`` without punctuation, symbols and whitespace."""
    return "".join(c for c in text if not c.isspace() and unicodedata.category(c)[0] not in "PSZC")


def char_f1(got: str, expected: str) -> float:
    """F1 of the characters of ``got`` against ``expected`` (as multisets), punctuation and
    whitespace ignored: 1.0 for the same characters, 0.0 for none in common."""
    a, b = Counter(letters_only(got)), Counter(letters_only(expected))
    common = sum((a & b).values())
    if not common:
        return 1.0 if not a and not b else 0.0
    precision, recall = common / sum(a.values()), common / sum(b.values())
    return 2 * precision * recall / (precision + recall)


@torch.inference_mode()
def answer_hit_rate(model: DIYForCausalLM, tokenizer: DIYTokenizer, pairs: Sequence[tuple[str, str]],
                    batch_size: int = 64, histories: Sequence[Sequence[dict]] | None = None,
                    f1_threshold: float = 0.8, precision: str = "auto") -> AnswerReport:
    """Greedy answers to each question compared with the expected answer: exact (whitespace
    ignored) and close (:func:`char_f1` at least ``f1_threshold``).

    ``histories[i]``, when given, are earlier messages of question i's conversation; its prompt
    is then built as the chat builds it (:func:`build_prompt`, the same answer budget), so the
    oldest exchanges are dropped when the context is full. Prompts of the same length are
    decoded together in one batch. ``precision`` is generate's decoding-weight precision.
    """
    max_len = model.config.max_seq_len
    budget = answer_budget(GenerationConfig(), max_len)
    by_length: dict[int, list[tuple[list[int], str, str]]] = {}
    for i, (question, answer) in enumerate(pairs):
        history = histories[i] if histories is not None else ()
        ids, _, _ = build_prompt(tokenizer, history, question, max_len, budget)
        by_length.setdefault(len(ids), []).append((ids, question, answer))
    guard = tokenizer.utf8_guard(model.config.vocab_size)
    hits, close, total, misses = 0, 0, 0, []
    for length, items in sorted(by_length.items()):
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            if length >= max_len:
                total += len(chunk)
                misses += [(q, a, "") for _, q, a in chunk]
                continue
            prompt = torch.tensor([ids for ids, _, _ in chunk])
            out = generate(model, prompt, max_len - length, temperature=0.0, eos_token_id=tokenizer.im_end_id,
                           guard=guard, stop_loops=True, precision=precision)
            for row, (_, question, answer) in zip(out[:, length:].tolist(), chunk):
                if tokenizer.im_end_id in row:
                    row = row[:row.index(tokenizer.im_end_id)]
                got = tokenizer.decode(row).strip()
                total += 1
                if char_f1(got, answer) >= f1_threshold:
                    close += 1
                if _normalise(got) == _normalise(answer):
                    hits += 1
                else:
                    misses.append((question, answer, got))
    return AnswerReport(hits, total, misses, close, f1_threshold)

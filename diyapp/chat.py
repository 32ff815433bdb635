"""Chat with a trained model: the conversation, its context budget, streamed replies, and the
question/answer hit rate used to judge training. No UI here; the app and the CLI render it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .generation import GenerationConfig, generate
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
    finished: bool = True

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


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

        The exchange joins the history only when the answer finished; a KeyboardInterrupt during
        generation propagates after the partial answer was streamed, leaving the history unchanged.
        """
        max_len = self.model.config.max_seq_len
        budget = max(MIN_ANSWER_TOKENS, min(self.settings.max_new_tokens, max_len // 2))
        ids, dropped, truncated = build_prompt(self.tokenizer, self.history, message, max_len, budget)
        max_new = min(self.settings.max_new_tokens, max_len - len(ids))
        decoder = self.tokenizer.stream_decoder()
        pieces: list[str] = []
        count = 0

        def take(token: int) -> None:
            nonlocal count
            count += 1
            piece = decoder.push(token)
            if piece:
                pieces.append(piece)
                if on_text is not None:
                    on_text(piece)

        started = time.perf_counter()
        out = generate(self.model, ids, max_new, temperature=self.settings.temperature, top_k=self.settings.top_k,
                       top_p=self.settings.top_p, repetition_penalty=self.settings.repetition_penalty,
                       eos_token_id=self.tokenizer.im_end_id, seed=seed, on_token=take)
        seconds = time.perf_counter() - started
        tail = decoder.flush()
        if tail:
            pieces.append(tail)
            if on_text is not None:
                on_text(tail)
        finished = int(out[0, -1]) == self.tokenizer.im_end_id
        text = "".join(pieces).strip()
        if dropped:
            self.history = self.history[dropped:]
        self.history += [{"role": "user", "content": message}, {"role": "assistant", "content": text}]
        return Reply(text=text, tokens=count + (1 if finished else 0), seconds=seconds,
                     dropped_turns=dropped // 2, truncated_prompt=truncated, finished=finished)


@dataclass
class AnswerReport:
    """How many questions got exactly their trained answer under greedy decoding."""

    hits: int
    total: int
    misses: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.hits / self.total if self.total else 0.0


def _normalise(text: str) -> str:
    return "".join(text.split())


@torch.inference_mode()
def answer_hit_rate(model: DIYForCausalLM, tokenizer: DIYTokenizer, pairs: Sequence[tuple[str, str]],
                    batch_size: int = 64) -> AnswerReport:
    """Greedy single-turn answers to each question compared with the expected answer (whitespace
    ignored). Questions whose prompts have the same length are decoded together in one batch."""
    max_len = model.config.max_seq_len
    by_length: dict[int, list[tuple[list[int], str, str]]] = {}
    for question, answer in pairs:
        ids, _ = tokenizer.encode_chat([{"role": "user", "content": question}], add_generation_prompt=True)
        by_length.setdefault(len(ids), []).append((ids, question, answer))
    hits, total, misses = 0, 0, []
    for length, items in sorted(by_length.items()):
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            if length >= max_len:
                total += len(chunk)
                misses += [(q, a, "") for _, q, a in chunk]
                continue
            prompt = torch.tensor([ids for ids, _, _ in chunk])
            out = generate(model, prompt, max_len - length, temperature=0.0, eos_token_id=tokenizer.im_end_id)
            for row, (_, question, answer) in zip(out[:, length:].tolist(), chunk):
                if tokenizer.im_end_id in row:
                    row = row[:row.index(tokenizer.im_end_id)]
                got = tokenizer.decode(row).strip()
                total += 1
                if _normalise(got) == _normalise(answer):
                    hits += 1
                else:
                    misses.append((question, answer, got))
    return AnswerReport(hits, total, misses)

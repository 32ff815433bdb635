"""Text completion: continue a prompt the way the training text goes on (no chat template).

A model that was only pretrained knows the corpus's text, not the chat template; completion is
how it is used. A prompt is continued as the start of a new document (it follows an end-of-text
token, as every document did in training) until the model ends the document or the length limit.
No UI here; the app and the CLI render it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from .generation import GenerationConfig, stream_text
from .model import DIYForCausalLM
from .tokenizer import DIYTokenizer

#: Sampling for completion: warmer than chat's default, so a text model does not loop on its
#: likeliest phrase (the same settings can be changed with the same flags and ``set`` command).
COMPLETION_SETTINGS = GenerationConfig(max_new_tokens=96, temperature=0.8, top_k=40, top_p=0.95)
#: Characters that end a sample prompt taken from the corpus (a title, a first phrase).
_PROMPT_ENDS = "：:，,。.！!？?、；; \n"


@dataclass
class Completion:
    """One continuation: its text, how many tokens it took and how fast, whether the model ended
    the document itself (``finished``), whether the prompt had to be cut to fit, and why it
    stopped (``stop``: "end", "limit", or "loop" when generation caught itself repeating)."""

    prompt: str
    text: str
    tokens: int
    seconds: float
    finished: bool
    truncated_prompt: bool = False
    stop: str = "end"

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def prompt_ids(tokenizer: DIYTokenizer, prompt: str, max_seq_len: int, room: int) -> tuple[list[int], bool]:
    """``<|endoftext|>`` + the prompt's ids, keeping the prompt's end when it leaves fewer than
    ``room`` positions of the context for the continuation. Returns (ids, truncated)."""
    ids = [tokenizer.eos_token_id] + tokenizer.encode(prompt)
    limit = max(1, max_seq_len - room)
    if len(ids) <= limit:
        return ids, False
    return ids[-limit:], True


def complete(model: DIYForCausalLM, tokenizer: DIYTokenizer, prompt: str,
             settings: GenerationConfig | None = None, on_text: Callable[[str], object] | None = None,
             seed: int | None = None) -> Completion:
    """Continue ``prompt``, streaming whole characters to ``on_text`` as they are generated.
    A KeyboardInterrupt propagates after the part already streamed."""
    settings = settings or COMPLETION_SETTINGS
    max_len = model.config.max_seq_len
    room = max(1, min(settings.max_new_tokens, max_len // 2))
    ids, truncated = prompt_ids(tokenizer, prompt, max_len, room)
    out = stream_text(model, ids, settings.max_new_tokens, settings, tokenizer.stream_decoder(),
                      tokenizer.utf8_guard(model.config.vocab_size), tokenizer.eos_token_id, on_text, seed)
    return Completion(prompt=prompt, text=out.text, tokens=out.tokens, seconds=out.seconds,
                      finished=out.finished, truncated_prompt=truncated, stop=out.stop)


def sample_prompts(texts: Sequence[str], count: int = 3) -> list[str]:
    """Fixed prompts taken from ``texts``: the opening of documents spread over the corpus (up to
    and including the first title mark or punctuation within 6 characters, else 2 characters)."""
    prompts: list[str] = []
    candidates = [t.strip() for t in texts if t.strip()]
    if not candidates:
        return prompts
    step = max(1, len(candidates) // count)
    for text in candidates[::step]:
        cut = next((i + 1 for i, ch in enumerate(text[:6]) if ch in _PROMPT_ENDS and i > 0), 2)
        prompt = text[:cut].strip()
        if prompt and prompt not in prompts:
            prompts.append(prompt)
        if len(prompts) == count:
            break
    return prompts


def samples(model: DIYForCausalLM, tokenizer: DIYTokenizer, prompts: Sequence[str], max_new_tokens: int = 32,
            seed: int = 0) -> list[Completion]:
    """Short continuations of ``prompts`` with fixed seeds, to show how the model's text develops."""
    settings = GenerationConfig(**{**COMPLETION_SETTINGS.to_dict(), "max_new_tokens": max_new_tokens})
    return [complete(model, tokenizer, p, settings, seed=seed + i) for i, p in enumerate(prompts)]

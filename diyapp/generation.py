"""Text generation: sampling filters and a lean decode loop over the preallocated KV cache."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .model import DIYForCausalLM


@dataclass
class GenerationConfig:
    """Sampling settings a chat session can change with ``set name=value``."""

    max_new_tokens: int = 96
    temperature: float = 0.3
    top_k: int | None = 20
    top_p: float | None = 0.9
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        check_sampling(self.max_new_tokens, self.temperature, self.top_k, self.top_p, self.repetition_penalty)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def updated(self, name: str, text: str) -> "GenerationConfig":
        """A copy with field ``name`` parsed from ``text`` ("none"/"off" clears top_k/top_p).

        Raises ValueError with a message fit to show a user.
        """
        names = [f.name for f in fields(self)]
        if name not in names:
            raise ValueError(f"unknown setting {name!r}; settings: {', '.join(names)}")
        raw = text.strip().lower()
        value: Any
        if name in ("top_k", "top_p") and raw in ("none", "off", "0", ""):
            value = None
        else:
            try:
                value = int(raw) if name in ("max_new_tokens", "top_k") else float(raw)
            except ValueError:
                raise ValueError(f"{name} needs a number, got {text!r}") from None
        return GenerationConfig(**{**self.to_dict(), name: value})


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                   repetition_penalty: float) -> None:
    """Raise ValueError with a readable reason for settings that cannot sample."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 0 <= max_new_tokens <= 100_000:
        raise ValueError(f"max_new_tokens must be an integer from 0 to 100000, got {max_new_tokens!r}")
    if not 0.0 <= temperature <= 100.0:
        raise ValueError(f"temperature must be between 0 and 100 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or none, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or none, got {top_p!r}")
    if not 0.0 < repetition_penalty <= 100.0:
        raise ValueError(f"repetition_penalty must be positive, got {repetition_penalty!r}")


def sample(logits: Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> Tensor:
    """One token id per row of ``logits`` ``(batch, vocab)``: scale by temperature, keep the top-k
    tokens, then the top-p nucleus of those (top-k and top-p compose as in Hugging Face: a token
    survives only if both allow it; the best token always survives), and draw. Only the top-k
    candidates are sorted and drawn from, never the whole vocabulary."""
    scaled = logits / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        values, ids = torch.topk(scaled, top_k, dim=-1)  # sorted, best first
    elif top_p is not None and top_p < 1.0:
        values, ids = torch.sort(scaled, dim=-1, descending=True)
    else:
        return torch.multinomial(scaled.softmax(dim=-1), 1, generator=generator).squeeze(1)
    probs = values.softmax(dim=-1)
    if top_p is not None and top_p < 1.0:
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)
    return ids.gather(-1, torch.multinomial(probs, 1, generator=generator)).squeeze(1)


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL-style penalty: logits of tokens already in the sequence are divided (or multiplied
    when negative) by ``penalty``. ``seen`` is a bool ``(batch, vocab)`` presence mask."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def window_start(start: int, total: int, max_seq_len: int, prompt_phase: bool) -> int:
    """First position of the context window over a sequence of ``total`` tokens.

    The window starts at ``start`` until it would hold more than ``max_seq_len`` tokens. A prompt
    that is too long keeps its last ``max_seq_len`` tokens; during generation the window jumps
    ahead to keep the most recent half, so the cached path re-fills its cache only now and then.
    Both decode paths use this one rule, so they see the same context at every step.
    """
    if total - start <= max_seq_len:
        return start
    keep = max_seq_len if prompt_phase else max(1, max_seq_len // 2)
    return total - keep


@torch.inference_mode()
def generate(model: DIYForCausalLM, input_ids: Tensor | Sequence[int], max_new_tokens: int = 64,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             repetition_penalty: float = 1.0, eos_token_id: int | None = None, use_cache: bool = True,
             seed: int | None = None, on_token: Callable[[int], Any] | None = None) -> Tensor:
    """Continue ``input_ids`` by up to ``max_new_tokens`` tokens; returns prompt + new tokens.

    ``input_ids``: ``(batch, seq)`` long tensor (rows of equal length) or a list of ids (batch 1).
    ``temperature=0`` is greedy; otherwise temperature, ``top_k`` and ``top_p`` filter, then a
    token is drawn (``seed`` makes the draws repeatable). Stops when every row has produced
    ``eos_token_id`` (finished rows are padded with it). ``on_token(id)`` is called for each new
    token (batch 1 only), for streaming. ``use_cache=False`` recomputes the whole window at every
    step: the slow reference path, with the same greedy output. Past ``max_seq_len`` the context
    slides (see :func:`window_start`) instead of failing.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    device = model.lm_head.weight.device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
    if ids.dim() == 1:
        ids = ids[None, :]
    batch, prompt_len = ids.shape
    if prompt_len == 0:
        raise ValueError("generate needs at least one prompt token")
    if on_token is not None and batch != 1:
        raise ValueError("on_token streaming needs a batch of one sequence")
    max_len = model.config.max_seq_len
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=device).manual_seed(seed)
    seq = torch.empty(batch, prompt_len + max_new_tokens, dtype=torch.long, device=device)
    seq[:, :prompt_len] = ids
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(batch, model.config.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, ids, True)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)

    was_training = model.training
    model.eval()
    # One new token of one row is a chain of matrix-vector products too small to split across
    # threads; on a CPU a single thread runs them as fast, and much faster when other processes
    # compete for the cores. Prompt (re)fills keep all threads.
    threads = torch.get_num_threads()
    decode_threads = 1 if batch == 1 and device.type == "cpu" else threads
    try:
        total, start, cache = prompt_len, 0, None
        decode = None  # model.decoder(), fetched once: the weights cannot change while we decode
        for step in range(max_new_tokens):
            new_start = window_start(start, total, max_len, prompt_phase=step == 0)
            if not use_cache:  # the head runs on the last position only
                logits = model.lm_head(model.model(seq[:, new_start:total])[:, -1])
            elif cache is None or new_start != start:  # (re)fill the cache with the whole window
                if cache is None:
                    cache = model.new_cache(batch)
                cache = [(layer, 0) for layer, _ in cache]
                torch.set_num_threads(threads)
                hidden, cache = model.model(seq[:, new_start:total], past_key_values=cache, use_cache=True)
                logits = model.lm_head(hidden[:, -1])
                torch.set_num_threads(decode_threads)
            else:  # one new token: the lean path, same numbers as model(...) up to rounding
                if decode is None:
                    decode = model.decoder()
                logits, cache = decode(seq[:, total - 1:total], cache)
            start = new_start
            logits = logits.float()
            if seen is not None:
                logits = apply_repetition_penalty(logits, seen, repetition_penalty)
            if temperature == 0:
                token = logits.argmax(dim=-1)
            else:
                token = sample(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                token = token.masked_fill(finished, eos_token_id)
            seq[:, total] = token
            total += 1
            if seen is not None:
                seen.scatter_(1, token[:, None], True)
            if batch == 1:
                value = int(token)
                if on_token is not None and not (eos_token_id is not None and value == eos_token_id):
                    on_token(value)
                if eos_token_id is not None and value == eos_token_id:
                    break
            elif eos_token_id is not None:
                finished |= token == eos_token_id
                if bool(finished.all()):
                    break
    finally:
        torch.set_num_threads(threads)
        model.train(was_training)
    return seq[:, :total]

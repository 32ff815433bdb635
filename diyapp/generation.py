"""Text generation: sampling filters, the UTF-8 guard, the repetition-loop stop, and a lean
decode loop over the preallocated KV cache."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch
from torch import Tensor

from .config import DECODE_PRECISIONS
from .decoder import decode_weight_dtype
from .model import DIYForCausalLM


@dataclass
class GenerationConfig:
    """Sampling settings a chat session can change with ``set name=value``."""

    max_new_tokens: int = 96
    temperature: float = 0.3
    top_k: int | None = 20
    top_p: float | None = 0.9
    repetition_penalty: float = 1.0
    #: the one-token steps' weight precision (:func:`~diyapp.decoder.decode_weight_dtype`)
    precision: str = "auto"

    def __post_init__(self) -> None:
        check_sampling(self.max_new_tokens, self.temperature, self.top_k, self.top_p, self.repetition_penalty)
        if self.precision not in DECODE_PRECISIONS:
            raise ValueError(f"精度 precision 必须是 {' / '.join(DECODE_PRECISIONS)} 之一 must be one of "
                             f"{', '.join(DECODE_PRECISIONS)} (got {self.precision!r})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def updated(self, name: str, text: str) -> "GenerationConfig":
        """A copy with field ``name`` parsed from ``text`` ("none"/"off" clears top_k/top_p).

        Raises ValueError with a message fit to show a user.
        """
        names = [f.name for f in fields(self)]
        if name not in names:
            raise ValueError(f"没有这个设置 unknown setting {name!r}; 可用的设置 settings: {', '.join(names)}")
        raw = text.strip().lower()
        value: Any
        if name in ("top_k", "top_p") and raw in ("none", "off", "0", ""):
            value = None
        elif name == "precision":
            value = raw
        else:
            try:
                value = int(raw) if name in ("max_new_tokens", "top_k") else float(raw)
            except ValueError:
                raise ValueError(f"{_LABELS.get(name, name)} {name} 需要一个数字 needs a number (got {text!r})") from None
        return GenerationConfig(**{**self.to_dict(), name: value})


#: The Chinese names of the sampling settings, for messages (``温度 temperature ...``).
_LABELS = {"max_new_tokens": "最长生成", "temperature": "温度", "top_k": "候选数", "top_p": "累计概率",
           "repetition_penalty": "重复惩罚", "precision": "精度"}


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                   repetition_penalty: float) -> None:
    """Raise ValueError with a readable reason for settings that cannot sample."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 0 <= max_new_tokens <= 100_000:
        raise ValueError(f"最长生成 max_new_tokens 必须是 0 到 100000 的整数 must be an integer from 0 to 100000 (got {max_new_tokens!r})")
    if not 0.0 <= temperature <= 100.0:
        raise ValueError(f"温度 temperature 必须在 0 到 100 之间（0 = 总选最可能的） must be between 0 and 100 (0 = greedy; got {temperature!r})")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"候选数 top_k 必须是正整数或 none must be a positive integer or none (got {top_k!r})")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"累计概率 top_p 必须大于 0 且最多为 1，或 none must be in (0, 1] or none (got {top_p!r})")
    if not 0.0 < repetition_penalty <= 100.0:
        raise ValueError(f"重复惩罚 repetition_penalty 必须是正数，最多 100 must be positive, at most 100 (got {repetition_penalty!r})")


def sample(logits: Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> Tensor:
    """One token id per row of ``logits`` ``(batch, vocab)``: scale by temperature, keep the top-k
    tokens, then the top-p nucleus of those (top-k and top-p compose as in Hugging Face: a token
    survives only if both allow it; the best token always survives), and draw. Only the top-k
    candidates are sorted and drawn from, never the whole vocabulary."""
    if top_k is not None and top_k < logits.shape[-1]:
        values, ids = torch.topk(logits, top_k, dim=-1)  # sorted, best first; scaled below, k values only
    elif top_p is not None and top_p < 1.0:
        values, ids = torch.sort(logits, dim=-1, descending=True)
    else:
        return torch.multinomial((logits / temperature).softmax(dim=-1), 1, generator=generator).squeeze(1)
    probs = (values / temperature).softmax(dim=-1)
    if top_p is not None and top_p < 1.0:
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)
    return ids.gather(-1, torch.multinomial(probs, 1, generator=generator)).squeeze(1)


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL-style penalty: logits of tokens already in the sequence are divided (or multiplied
    when negative) by ``penalty``. ``seen`` is a bool ``(batch, vocab)`` presence mask."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


# --- valid UTF-8 only -------------------------------------------------------------------------

# A byte-level vocabulary holds tokens that are only part of a character (a Chinese character is
# three bytes and may be split over two or three tokens). Sampling token by token can therefore
# produce byte sequences that are not UTF-8, which show as U+FFFD. The decoder's state between
# tokens is small: how many continuation bytes a character still needs, and which range the next
# byte must fall in (the first continuation after E0, ED, F0 and F4 is restricted). Eight states.
_ANY = (0x80, 0xBF)
#: state -> (continuation bytes still needed, allowed range of the next byte); state 0 = between characters
_UTF8_STATES: tuple[tuple[int, tuple[int, int]], ...] = (
    (0, _ANY), (1, _ANY), (2, _ANY), (3, _ANY), (2, (0xA0, 0xBF)), (2, (0x80, 0x9F)), (3, (0x90, 0xBF)),
    (3, (0x80, 0x8F)))


def _utf8_step(state: int, byte: int) -> int:
    """The state after ``byte``, or -1 where the byte makes the sequence invalid UTF-8."""
    need, (lo, hi) = _UTF8_STATES[state]
    if need:
        if not lo <= byte <= hi:
            return -1
        return need - 1  # states 0..3 are "k bytes to go, any continuation"
    if byte < 0x80:
        return 0
    if 0xC2 <= byte <= 0xDF:
        return 1
    if byte == 0xE0:
        return 4
    if byte == 0xED:
        return 5
    if 0xE1 <= byte <= 0xEF:
        return 2
    if byte == 0xF0:
        return 6
    if 0xF1 <= byte <= 0xF3:
        return 3
    if byte == 0xF4:
        return 7
    return -1


class Utf8Guard:
    """Which token may come next so that the generated bytes stay valid UTF-8.

    Built once from the bytes of every token (``DIYTokenizer.utf8_guard()`` caches one). Special
    tokens (end of turn, end of text) are allowed only between characters, so a reply never ends
    in the middle of one; tokens with no bytes and ids past the tokenizer's vocabulary (a model
    may have spare rows) are never allowed. ``allowed[state]`` is the mask over the vocabulary
    (``blocked[state]`` the same as 0 / -inf), ``next_state[state, token]`` the state after the token.
    """

    def __init__(self, token_bytes: Sequence[bytes], special_ids: Iterable[int], width: int | None = None) -> None:
        width = max(width or 0, len(token_bytes))
        specials = set(int(i) for i in special_ids)
        n = len(_UTF8_STATES)
        table = [[-1] * width for _ in range(n)]
        for token, raw in enumerate(token_bytes):
            for state in range(n):
                if token in specials:
                    table[state][token] = 0 if state == 0 else -1
                    continue
                if not raw:
                    continue
                s = state
                for byte in raw:
                    s = _utf8_step(s, byte)
                    if s < 0:
                        break
                table[state][token] = s
        nxt = torch.tensor(table, dtype=torch.long)
        self.allowed: Tensor = nxt >= 0
        self.next_state: Tensor = nxt.clamp(min=0)
        self.width = width
        # 0 where a token is allowed, -inf where not: the mask is one addition to the logits
        self.blocked: Tensor = torch.zeros(self.allowed.shape).masked_fill_(~self.allowed, float("-inf"))

    def to(self, device: torch.device) -> "Utf8Guard":
        """The same guard with its tables on ``device``."""
        if self.allowed.device == device:
            return self
        other = object.__new__(Utf8Guard)
        other.allowed, other.next_state, other.width = self.allowed.to(device), self.next_state.to(device), self.width
        other.blocked = self.blocked.to(device)
        return other

    def mask(self, logits: Tensor, states: Tensor) -> Tensor:
        """``logits`` ``(batch, vocab)`` with every token that would break UTF-8 set to -inf."""
        blocked = self.blocked[states]
        vocab = logits.shape[-1]
        if vocab > self.width:  # the model has more rows than the guard knows: those are never allowed
            blocked = torch.cat([blocked, blocked.new_full((blocked.shape[0], vocab - self.width), float("-inf"))], -1)
        elif vocab < self.width:
            blocked = blocked[:, :vocab]
        return logits + (blocked if blocked.dtype == logits.dtype else blocked.to(logits.dtype))

    def advance(self, states: Tensor, tokens: Tensor) -> Tensor:
        """The states after each row's new token."""
        return self.next_state[states, tokens.clamp(max=self.width - 1)]


# --- repetition loops -------------------------------------------------------------------------

#: A reply is stuck when its last tokens are one unit of at most this many tokens repeated ...
LOOP_MAX_PERIOD = 32
#: ... at least three times over at least this many tokens ("和和和…" 16 times, "、和" 8 times).
LOOP_MIN_SPAN = 16


def looping(seq: Tensor, start: int, end: int, max_period: int = LOOP_MAX_PERIOD,
            min_span: int = LOOP_MIN_SPAN) -> Tensor:
    """Per row of ``seq[:, start:end]`` (the generated tokens): True where its end is one unit of
    ``p <= max_period`` tokens repeated at least 3 times and over at least ``min_span`` tokens."""
    n = end - start
    hit = torch.zeros(seq.shape[0], dtype=torch.bool, device=seq.device)
    for p in range(1, min(max_period, n // 3) + 1):
        span = max(3 * p, min_span)
        if span > n:
            break
        hit |= (seq[:, end - span + p:end] == seq[:, end - span:end - p]).all(dim=1)
    return hit


def row_loops(tokens: Sequence[int], max_period: int = LOOP_MAX_PERIOD, min_span: int = LOOP_MIN_SPAN) -> bool:
    """:func:`looping` for one row's generated ``tokens`` as plain ints: the check after every
    token of a reply, where the tensor version's four small operations per period cost about
    0.2 ms a token (a third of the default model's step); a period is compared in full only when
    the last token repeats at its distance."""
    n = len(tokens)
    for p in range(1, min(max_period, n // 3) + 1):
        span = max(3 * p, min_span)
        if span > n:
            break
        if tokens[-1] == tokens[-1 - p] and tokens[n - span + p:] == tokens[n - span:n - p]:
            return True
    return False


#: A thread count that timed slower is tried again after this many steps, times how much slower it was ...
RETRY_EVERY = 16
#: ... and after at most this many.
MAX_RETRY_INTERVAL = 512
#: Weight of the newest step in a thread count's moving average of step times.
SMOOTHING = 0.2


class ThreadPicker:
    """The thread count a one-row decode step on a CPU runs fastest with now, learned while decoding.

    A one-token step is a chain of small matrix-vector products. On a quiet 2-core machine two
    threads read the weights faster than one (default model 1,620 against 1,160 tokens/s, the large
    preset 203 against 115), but while another process holds a core a parallel kernel waits for
    its descheduled thread (two threads fell to ~60 tokens/s where one held ~800). So each option is
    timed, the fastest by a moving average of its step times is used, and each slower one is tried
    again now and then, the more rarely the slower it was, so a change in the machine's load shows.
    The two counts sum a product in different orders (logits differ by ~1e-6), so a greedy near tie
    may go either way between runs; the tests run on one thread, where there is no choice.
    """

    def __init__(self, options: Sequence[int]) -> None:
        self.options = list(dict.fromkeys(options))
        self.seconds: dict[int, float] = {}
        self._since_retry = 0

    def pick(self) -> int:
        """The thread count for the next step."""
        untried = [k for k in self.options if k not in self.seconds]
        if untried:
            return untried[0]
        best = min(self.options, key=self.seconds.__getitem__)
        others = [k for k in self.options if k != best]
        if not others:
            return best
        other = min(others, key=self.seconds.__getitem__)
        self._since_retry += 1
        if self._since_retry >= min(MAX_RETRY_INTERVAL, RETRY_EVERY * self.seconds[other] / self.seconds[best]):
            self._since_retry = 0
            return other
        return best

    def record(self, threads: int, seconds: float) -> None:
        """A step with ``threads`` threads took ``seconds``."""
        old = self.seconds.get(threads)
        self.seconds[threads] = seconds if old is None else old + SMOOTHING * (seconds - old)


_PICKERS: dict[tuple, ThreadPicker] = {}


def thread_picker(model: DIYForCausalLM, threads: int, weight_dtype: torch.dtype) -> ThreadPicker:
    """The process's :class:`ThreadPicker` for one-row decoding of models shaped like ``model``
    with weights in ``weight_dtype`` and up to ``threads`` threads (kept across calls: the machine,
    not the reply, decides)."""
    c = model.config
    key = (c.hidden_size, c.num_layers, c.intermediate_size, c.vocab_size, weight_dtype, threads)
    if key not in _PICKERS:
        _PICKERS[key] = ThreadPicker([1, threads] if threads > 1 else [1])
    return _PICKERS[key]


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
             seed: int | None = None, on_token: Callable[[int], Any] | None = None,
             guard: Utf8Guard | None = None, stop_loops: bool = False, precision: str = "auto") -> Tensor:
    """Continue ``input_ids`` by up to ``max_new_tokens`` tokens; returns prompt + new tokens.

    ``input_ids``: ``(batch, seq)`` long tensor (rows of equal length) or a list of ids (batch 1).
    ``temperature=0`` is greedy; otherwise temperature, ``top_k`` and ``top_p`` filter, then a
    token is drawn (``seed`` makes the draws repeatable). Stops when every row has produced
    ``eos_token_id`` (finished rows are padded with it). ``on_token(id)`` is called for each new
    token (batch 1 only), for streaming. ``use_cache=False`` recomputes the whole window at every
    step: the slow reference path, with the same greedy output. Past ``max_seq_len`` the context
    slides (see :func:`window_start`) instead of failing.

    ``guard`` (a :class:`Utf8Guard`, e.g. ``tokenizer.utf8_guard()``) lets only tokens through
    that keep the new bytes valid UTF-8, greedy or sampled; the prompt must end between
    characters. ``stop_loops`` ends a row whose new tokens fall into a repetition loop (see
    :func:`looping`): a row of one stops there (shorter than ``max_new_tokens``, without
    ``eos_token_id``); in a batch it is finished and padded like a row that produced the EOS.

    ``precision`` is the one-token steps' weight precision (:func:`decode_weight_dtype`): "auto"
    (fp16 where the compiled kernel or the CPU's native bf16 makes it faster), "bf16", "fp16", "fp32" (the model's
    own weights, whose greedy output equals the ``use_cache=False`` path's), or "int8" (CPU only;
    a quarter of fp32's bytes, answers can differ slightly).
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    weight_dtype = decode_weight_dtype(model, precision)
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
    states = None
    if guard is not None:
        guard = guard.to(device)
        states = torch.zeros(batch, dtype=torch.long, device=device)

    was_training = model.training
    model.eval()
    # One new token of one row: one thread or all, whichever runs faster on the machine now
    # (ThreadPicker). Prompt (re)fills and batches keep all threads.
    threads = torch.get_num_threads()
    picker = thread_picker(model, threads, weight_dtype) if batch == 1 and device.type == "cpu" else None
    try:
        total, start, cache = prompt_len, 0, None
        decode = None  # model.decoder(), fetched once: the weights cannot change while we decode
        generated: list[int] = []  # a row of one's new tokens, for the loop check
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
            else:  # one new token: the lean path, same numbers as model(...) up to rounding
                if decode is None:
                    decode = model.decoder(weight_dtype)
                if picker is None:
                    logits, cache = decode(seq[:, total - 1:total], cache)
                else:
                    step_threads = picker.pick()
                    if step_threads != torch.get_num_threads():
                        torch.set_num_threads(step_threads)
                    began = time.perf_counter()
                    logits, cache = decode(seq[:, total - 1:total], cache)
                    picker.record(step_threads, time.perf_counter() - began)
            start = new_start
            if logits.dtype != torch.float32:
                logits = logits.float()
            if seen is not None:
                logits = apply_repetition_penalty(logits, seen, repetition_penalty)
            if states is not None:
                logits = guard.mask(logits, states)
            if temperature == 0:
                token = logits.max(dim=-1).indices  # argmax's first maximum, twice as fast
            else:
                token = sample(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None and batch > 1:  # a row of one stops at its end token
                token = token.masked_fill(finished, eos_token_id)
            seq[:, total] = token
            total += 1
            if states is not None:
                states = guard.advance(states, token)
            if seen is not None:
                seen.scatter_(1, token[:, None], True)
            if batch == 1:
                value = int(token)
                generated.append(value)
                if on_token is not None and not (eos_token_id is not None and value == eos_token_id):
                    on_token(value)
                if eos_token_id is not None and value == eos_token_id or stop_loops and row_loops(generated):
                    break
            else:
                if eos_token_id is not None:
                    finished |= token == eos_token_id
                if stop_loops:
                    finished |= looping(seq, prompt_len, total)
                if bool(finished.all()):
                    break
    finally:
        torch.set_num_threads(threads)
        model.train(was_training)
    return seq[:, :total]


class TextDecoder(Protocol):
    """Turns tokens into text as they come (``DIYTokenizer.stream_decoder()``)."""

    def push(self, token: int) -> str: ...

    def flush(self, drop_partial: bool = False) -> str: ...


@dataclass
class StreamedText:
    """What :func:`stream_text` produced: the text, the tokens generated (the end token
    included), the seconds it took, and why it stopped: "end" (the model's end token), "limit"
    (``max_new_tokens``) or "loop" (the repetition guard)."""

    text: str
    tokens: int
    seconds: float
    stop: str

    @property
    def finished(self) -> bool:
        return self.stop == "end"


def stream_text(model: DIYForCausalLM, ids: list[int], max_new_tokens: int, settings: GenerationConfig,
                decoder: TextDecoder, guard: Utf8Guard, eos_token_id: int,
                on_text: Callable[[str], object] | None = None, seed: int | None = None) -> StreamedText:
    """Continue ``ids`` with ``settings``, streaming whole characters to ``on_text``: the one
    generation loop behind the chat and text completion (UTF-8 guard and loop stop on). A
    KeyboardInterrupt propagates after the part already streamed."""
    pieces: list[str] = []
    count = 0

    def emit(piece: str) -> None:
        if piece:
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)

    def take(token: int) -> None:
        nonlocal count
        count += 1
        emit(decoder.push(token))

    started = time.perf_counter()
    out = generate(model, ids, max_new_tokens, temperature=settings.temperature, top_k=settings.top_k,
                   top_p=settings.top_p, repetition_penalty=settings.repetition_penalty,
                   eos_token_id=eos_token_id, seed=seed, on_token=take, guard=guard, stop_loops=True,
                   precision=settings.precision)
    seconds = time.perf_counter() - started
    emit(decoder.flush(drop_partial=True))  # only a reply cut at its limit can end mid-character
    finished = max_new_tokens > 0 and out.shape[1] > len(ids) and int(out[0, -1]) == eos_token_id
    stop = "end" if finished else "limit" if count >= max_new_tokens else "loop"
    return StreamedText(text="".join(pieces), tokens=count + int(finished), seconds=seconds, stop=stop)

"""Byte-level BPE tokenizer, the ChatML chat template and a streaming decoder.

The vocabulary is built with the Hugging Face ``tokenizers`` library: every one of the 256 byte
values is a token, so any Unicode text encodes without an unknown token and decodes back exactly.
The three special tokens get ids 0, 1, 2 (:data:`SPECIAL_TOKENS`).

Two decisions worth knowing:

* :meth:`DIYTokenizer.encode` treats its input as plain text. A user who types the literal string
  ``<|im_end|>`` gets ordinary byte tokens for it, never the special id, so typed text cannot end a
  turn or forge a role header; ``decode(encode(s)) == s`` still holds. Special ids are placed only
  by :meth:`DIYTokenizer.encode_chat` (or by callers appending ``eos_token_id``).
* :meth:`DIYTokenizer.encode_chat` strips whitespace around each message's content (the Jinja
  template in :attr:`DIYTokenizer.chat_template` does the same with ``| trim``). With that, the ids
  we train on and the ids Hugging Face gets from ``apply_chat_template`` agree for every message
  whose content does not itself contain a literal special-token string.
"""

from __future__ import annotations

import codecs
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

# Tokenizer training uses a thread pool; after that, every fork() (pexpect, subprocess) makes the
# Rust library print a warning on the child's stderr. Deciding up front silences it; an explicit
# choice by the user is kept.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

if TYPE_CHECKING:
    from .generation import Utf8Guard

__all__ = ["SPECIAL_TOKENS", "CHAT_ROLES", "CHAT_TEMPLATE", "DIYTokenizer", "StreamDecoder", "clean_text",
           "text_pieces", "sample_pieces", "PIECE_CHARS"]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_ROLES = ("system", "user", "assistant")
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256

# Standard ChatML, with the content trimmed exactly as encode_chat trims it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] | trim) + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """``text`` with each lone surrogate replaced by U+FFFD. Python keeps undecodable input bytes
    as lone surrogates (``surrogateescape``: terminals, pipes, argv) and JSON may hold them
    (``"\\ud800"``); they are not text, and the tokenizer library refuses them."""
    return _SURROGATE.sub("\ufffd", text)


#: Texts longer than this (in characters) are trained on and encoded a piece at a time, so a
#: corpus that is one 50 MB line never sits in the tokenizer library whole (it keeps tens of bytes
#: per byte of text while it works). Pieces are cut only where the byte-level pre-tokenizer splits
#: anyway, so the ids and the vocabulary are the same as for the whole text.
PIECE_CHARS = 1 << 16
# Punctuation that the pre-tokenizer always splits off a preceding letter or digit.
_PIECE_CUT = re.compile("[，。！？；：、,.!?;:]")


def text_pieces(text: str, size: int | None = None) -> Iterator[str]:
    """``text`` in consecutive pieces of about ``size`` characters (``PIECE_CHARS``), each cut
    before a punctuation mark that follows a letter or digit: a place where byte-level BPE's
    pre-tokenizer cuts anyway. A stretch of ``size`` characters without such a place is cut
    where it ends (only then can the ids differ from encoding the text whole)."""
    size = size or PIECE_CHARS
    start = 0
    while len(text) - start > size:
        cut = _cut_after(text, start + size, start + 2 * size)
        yield text[start:cut]
        start = cut
    yield text[start:] if start else text


def _cut_after(text: str, begin: int, end: int) -> int:
    for match in _PIECE_CUT.finditer(text, begin, end):
        if unicodedata.category(text[match.start() - 1])[0] in "LN":
            return match.start()
    return end


@lru_cache(maxsize=1)
def _char_to_byte() -> dict[str, int]:
    """The GPT-2 byte <-> printable character table that the ByteLevel pre-tokenizer uses,
    inverted: token strings in the vocabulary are made of these characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _readable(raw: bytes) -> str:
    """UTF-8 text of ``raw`` with every byte that is not part of a complete character shown as
    ``<0xE4>``: readable, never a replacement character."""
    out: list[str] = []
    i = 0
    while i < len(raw):
        try:
            out.append(raw[i:].decode("utf-8"))
            break
        except UnicodeDecodeError as err:
            out.append(raw[i:i + err.start].decode("utf-8"))
            out.extend(f"<0x{b:02X}>" for b in raw[i + err.start:i + err.end])
            i += err.end
    return "".join(out)


def _check_messages(messages: Sequence[dict]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i}: expected a dict with 'role' and 'content'")
        if m["role"] not in CHAT_ROLES:
            raise ValueError(f"message {i}: unknown role {m['role']!r} (expected one of {', '.join(CHAT_ROLES)})")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i}: content must be a string, got {type(m['content']).__name__}")


def sample_pieces(texts: Sequence[str], budget: int) -> Iterator[str]:
    """Pieces (:func:`text_pieces`) of ``texts`` spread evenly over them, about ``budget``
    characters in all, or every piece when the texts are no longer than that. A piece is kept
    when it holds one of ``budget // PIECE_CHARS`` points evenly spaced over the text."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is a {type(text).__name__}, expected str")
    total = sum(len(text) for text in texts)
    if total <= budget:
        yield from texts
        return
    period = total / max(1, budget // PIECE_CHARS)
    start = 0
    for text in texts:
        for piece in text_pieces(text):
            end = start + len(piece)
            if int(end / period + 0.5) > int(start / period + 0.5):
                yield piece
            start = end


def _training_pieces(texts: Iterable[str]) -> Iterator[str]:
    """The texts to learn a vocabulary from, checked, cleaned and cut into pieces, one at a time."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is a {type(text).__name__}, expected str")
        for piece in text_pieces(text):
            yield clean_text(piece) if _SURROGATE.search(piece) else piece


class StreamDecoder:
    """Turns generated token ids into text as they arrive, one whole character at a time.

    A Chinese character is usually 3 UTF-8 bytes and may be split over several byte tokens;
    :meth:`push` holds the incomplete bytes back (at most 3) and returns only text that is
    complete, so a character appears once, whole. :meth:`flush` returns what is left (a dangling
    partial character becomes U+FFFD, as in :meth:`DIYTokenizer.decode`). The concatenation of all
    pushes and the flush equals ``decode(all ids)``. Constant work per token.
    """

    def __init__(self, id_bytes: Sequence[bytes], special_ids: frozenset[int],
                 skip_special_tokens: bool = True) -> None:
        self._id_bytes = id_bytes
        self._skip = special_ids if skip_special_tokens else frozenset()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Feed one id; returns the newly completed text (possibly ""). Ids outside the
        vocabulary are ignored, as decode() ignores them."""
        token_id = int(token_id)
        if token_id in self._skip or not 0 <= token_id < len(self._id_bytes):
            return ""
        return self._decoder.decode(self._id_bytes[token_id], final=False)

    @property
    def pending(self) -> int:
        """How many bytes are held back waiting for the rest of a character (0 to 3)."""
        return len(self._decoder.getstate()[0])

    def flush(self, drop_partial: bool = False) -> str:
        """The remaining text; the decoder is then empty and can be reused. ``drop_partial``
        drops a dangling partial character instead of returning U+FFFD for it (a reply cut off
        at its token limit in the middle of a character)."""
        out = "" if drop_partial else self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return out


class DIYTokenizer:
    """Byte-level BPE with ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` at ids 0, 1, 2."""

    chat_template: str = CHAT_TEMPLATE

    def __init__(self, tokenizer: Tokenizer) -> None:
        """Wrap a ``tokenizers.Tokenizer``; use :meth:`train` or :meth:`from_str` instead."""
        for i, tok in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(tok) != i:
                raise ValueError(f"not a diyapp tokenizer: {tok!r} must have id {i}, "
                                 f"found {tokenizer.token_to_id(tok)}")
        self._tok = tokenizer                          # specials recognised: the serialised form
        self._plain = Tokenizer.from_str(tokenizer.to_str())
        self._plain.encode_special_tokens = True       # literal "<|im_end|>" in text stays text
        self._special_ids = frozenset(range(len(SPECIAL_TOKENS)))
        table = _char_to_byte()
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        id_bytes = [b""] * (max(vocab.values()) + 1)
        for token, i in vocab.items():
            if i in self._special_ids or any(c not in table for c in token):
                id_bytes[i] = token.encode("utf-8")
            else:
                id_bytes[i] = bytes(table[c] for c in token)
        self._id_bytes: list[bytes] = id_bytes
        self._newline = self.encode("\n")
        self._headers = {role: [self.im_start_id] + self.encode(f"{role}\n") for role in CHAT_ROLES}

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 6400, min_frequency: int = 2,
              whole_characters: bool = False, sample_chars: int | None = None) -> "DIYTokenizer":
        """Learn a byte-level BPE vocabulary of at most ``vocab_size`` tokens from ``texts``.

        On a small corpus the merges run out earlier and the vocabulary is smaller; read the
        real size from :attr:`vocab_size`. A pair must occur ``min_frequency`` times to be merged:
        the default 2 keeps one-off phrases from becoming tokens that the model sees once and
        can only memorise. ``whole_characters``: merges never join two non-ASCII characters, so
        the vocabulary holds (pieces of) single Chinese characters rather than words, and every
        character seen ``min_frequency`` times gets a token of its own (ASCII words still merge).
        Deterministic: the same texts give the same tokenizer. ``texts`` is read once, lazily,
        and long texts are learned in pieces (:func:`text_pieces`).

        The library's memory grows with the number of distinct words it has seen (about 160
        bytes per character of varied Chinese text), so ``sample_chars`` (``texts`` then a
        sequence) learns from pieces spread evenly over texts longer than that in all
        (:func:`sample_pieces`); a vocabulary of a few thousand tokens needs no more.
        """
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be an integer of at least {MIN_VOCAB_SIZE} "
                             f"(3 special tokens + 256 bytes), got {vocab_size!r}")
        if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 0:
            raise ValueError(f"min_frequency must be a non-negative integer, got {min_frequency!r}")
        if isinstance(texts, str):
            raise TypeError("texts must be an iterable of strings, not a single string")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        if whole_characters:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(r"[^\x00-\x7f]"), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        if sample_chars is not None:
            texts = sample_pieces(texts, sample_chars)
        tok.train_from_iterator(_training_pieces(texts), trainer=trainer)
        return cls(tok)

    @classmethod
    def from_str(cls, s: str) -> "DIYTokenizer":
        """Load from :meth:`to_str`'s JSON (the Hugging Face ``tokenizer.json`` format); no other
        file is needed. Raises ``ValueError`` for text that is not such a tokenizer."""
        if not isinstance(s, str):
            raise ValueError(f"expected the tokenizer JSON as a string, got {type(s).__name__}")
        try:
            tok = Tokenizer.from_str(s)
        except Exception as err:  # the Rust side raises plain Exception
            raise ValueError(f"not a valid tokenizer JSON: {err}") from None
        return cls(tok)

    def to_str(self) -> str:
        """The tokenizer as a JSON string, usable as a Hugging Face ``tokenizer.json``."""
        return self._tok.to_str()

    # --- properties ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """The real number of tokens, special tokens included."""
        return len(self._id_bytes)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def eos_token_id(self) -> int:
        """``<|endoftext|>``: ends every pretraining document."""
        return 0

    @property
    def pad_token_id(self) -> int:
        """Padding uses the end-of-text id (padded positions are masked out of the loss)."""
        return self.eos_token_id

    @property
    def im_start_id(self) -> int:
        return 1

    @property
    def im_end_id(self) -> int:
        """``<|im_end|>``: ends a chat turn; generation stops on it."""
        return 2

    # --- encode / decode ----------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Ids of plain text: no special tokens added, and special-token strings in the text are
        encoded as ordinary text (see the module docstring). Lone surrogates become U+FFFD
        (:func:`clean_text`)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        if len(text) <= PIECE_CHARS:
            return self._encode_piece(text)
        ids: list[int] = []
        for piece in self.encode_pieces(text):
            ids += piece
        return ids

    def encode_pieces(self, text: str) -> Iterator[list[int]]:
        """:meth:`encode` of ``text`` a piece at a time (:func:`text_pieces`): the lists joined
        are ``encode(text)``. For long texts whose ids are stored compactly (pretraining)."""
        for piece in text_pieces(text):
            yield self._encode_piece(piece)

    def _encode_piece(self, text: str) -> list[int]:
        try:
            return self._plain.encode(text, add_special_tokens=False).ids
        except TypeError:  # lone surrogates (undecodable bytes): encoded as U+FFFD
            return self._plain.encode(clean_text(text), add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``. Bytes that do not form a complete UTF-8 character become U+FFFD;
        ids outside the vocabulary (a model may have spare rows) are ignored."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_text(self, id: int) -> str:
        """Readable text of one token, for vocabulary listings. Bytes that are only part of a
        UTF-8 character are written as ``<0xE4>`` (upper-case hex), so a token holding half a
        Chinese character reads e.g. ``<0xE4><0xBD>``; special tokens read as themselves."""
        id = int(id)
        if not 0 <= id < len(self._id_bytes):
            raise IndexError(f"token id {id} is outside the vocabulary (size {len(self._id_bytes)})")
        return _readable(self._id_bytes[id])

    def token_bytes(self, id: int) -> bytes:
        """The raw bytes a token stands for (a special token: its UTF-8 text)."""
        return self._id_bytes[int(id)]

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """A fresh :class:`StreamDecoder` for incremental output while generating."""
        return StreamDecoder(self._id_bytes, self._special_ids, skip_special_tokens)

    def utf8_guard(self, width: int | None = None) -> "Utf8Guard":
        """The :class:`~diyapp.generation.Utf8Guard` of this vocabulary, for a model with
        ``width`` output rows (at least the vocabulary); built once per width, then cached."""
        from .generation import Utf8Guard  # torch is imported only when generating

        width = max(width or 0, self.vocab_size)
        cache = self.__dict__.setdefault("_guards", {})
        if width not in cache:
            cache[width] = Utf8Guard(self._id_bytes, self._special_ids, width)
        return cache[width]

    # --- chat -----------------------------------------------------------------------------------

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False
                    ) -> tuple[list[int], list[int]]:
        """ChatML ids and the assistant loss mask.

        Each message is ``[<|im_start|>] + encode(f"{role}\\n") + encode(content.strip())
        + [<|im_end|>] + encode("\\n")``. The mask is 1 on an assistant message's content tokens
        and its closing ``<|im_end|>`` (what the model must learn to say, and when to stop), 0
        elsewhere. ``add_generation_prompt`` appends ``<|im_start|>assistant\\n`` for inference.
        Raises ``ValueError`` for an unknown role or non-string content.
        """
        _check_messages(messages)
        newline = self._newline
        ids: list[int] = []
        mask: list[int] = []
        for m in messages:
            head = self._headers[m["role"]]
            body = self.encode(m["content"].strip()) + [self.im_end_id]
            learn = 1 if m["role"] == "assistant" else 0
            ids += head + body + newline
            mask += [0] * len(head) + [learn] * len(body) + [0] * len(newline)
        if add_generation_prompt:
            head = self._headers["assistant"]
            ids += head
            mask += [0] * len(head)
        return ids, mask

    @staticmethod
    def render_chat(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The chat as text, exactly what :attr:`chat_template` renders (content trimmed)."""
        _check_messages(messages)
        parts = [f"<|im_start|>{m['role']}\n{m['content'].strip()}<|im_end|>\n" for m in messages]
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts)

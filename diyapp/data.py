"""Corpus readers: RustGPT-Chinese JSON arrays (and their shard folders), .jsonl and .txt.

What is read:

* ``.json``: a JSON array. A string entry is a pretraining document, or a chat exchange when it
  is written with role markers: ``用户：…助手：…`` (more turns may follow: ``…用户：…助手：…``) or
  ``User: … Assistant: …``; either colon (``:`` / ``：``), spaces optional, an optional leading
  ``系统：`` / ``System:`` turn. A marker counts only at the start of the entry or after a space or
  punctuation, so a word such as ``目标用户：`` inside a sentence is not mistaken for one. Each file
  is judged as a whole: when most entries carry markers it is a chat file and every entry with a
  marker must parse as a dialogue (else :class:`DataError`); otherwise it is a pretraining file
  and a marked entry becomes a dialogue only if it parses cleanly. Entries without markers are
  documents in either case, so mixed files work. An entry may also be an object, as in .jsonl.
* ``.jsonl``: one JSON value a line: ``{"text": …}`` (a document) or ``{"conversations": [{"role":
  …, "content": …}, …]}`` (a dialogue; ``"messages"`` and ShareGPT's ``"from"``/``"value"`` with
  roles ``human``/``gpt`` are accepted too), or a string treated like a .json entry. Blank lines
  are skipped.
* ``.txt``: one document per non-empty line.
* a folder: every .json, .jsonl and .txt file below it (recursively, hidden files and folders
  left out), in sorted path order, merged. A .json file there whose top level is an object (such
  as RustGPT-Chinese's ``data/idioms/chinese_idioms_enhanced.json``, or a stray settings file) is
  skipped, and the skip is noted in :attr:`Corpus.sources`; the same file loaded on its own is an
  error, because then it is all the data there is.

Contents are stripped of surrounding whitespace. Any bad input raises :class:`DataError` with a
one-line message naming the file and, for a problem in one entry, the entry (counted from 1, as
are lines) and what is wrong, e.g. ``data/chat.json: entry 17 (line 18): no "助手：" /
"Assistant:" marker``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

__all__ = ["Message", "Corpus", "DataError", "load_corpus", "load_pretraining", "load_chat",
           "bundled_corpus", "qa_pairs", "DATA_DIR", "SUPPORTED_SUFFIXES"]

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
SUPPORTED_SUFFIXES = (".json", ".jsonl", ".txt")


class Message(TypedDict):
    """One chat turn; ``role`` is "system", "user" or "assistant"."""

    role: str
    content: str


class DataError(ValueError):
    """Unreadable or malformed training data. ``str(err)`` is one line naming the file and, for
    an entry-level problem, the entry; ``path`` and ``where`` hold those parts separately."""

    def __init__(self, message: str, path: str | None = None, where: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.where = where


@dataclass
class Corpus:
    """Training data: pretraining documents, chat dialogues, and where they came from (file
    paths, plus notes for files that were skipped)."""

    texts: list[str] = field(default_factory=list)
    dialogues: list[list[Message]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def merged(self, other: "Corpus") -> "Corpus":
        """A new corpus holding this one's data followed by ``other``'s."""
        return Corpus(self.texts + other.texts, self.dialogues + other.dialogues,
                      self.sources + other.sources)

    def __len__(self) -> int:
        """Documents plus dialogues."""
        return len(self.texts) + len(self.dialogues)

    @property
    def is_empty(self) -> bool:
        """True when there is neither a document nor a dialogue."""
        return not self.texts and not self.dialogues


# --- public entry points ------------------------------------------------------------------------

def load_corpus(path: str | os.PathLike[str]) -> Corpus:
    """Read a file or a folder of files (format chosen by extension and content, see the module
    docstring). Raises :class:`DataError` for anything unreadable or malformed, or no data."""
    p = Path(os.path.expanduser(os.fspath(path)))
    try:
        if p.is_dir():
            return _load_folder(p)
        if not p.exists():
            raise DataError(f"{p}: 找不到这个文件或文件夹 no such file or folder", str(p))
        if not p.is_file():
            raise DataError(f"{p}: 不是普通文件或文件夹 not a regular file or folder", str(p))
    except OSError as err:
        raise DataError(f"{p}: 无法访问 cannot access ({err.strerror or err})", str(p)) from None
    return _load_file(p, in_folder=False)


def load_pretraining(path: str | os.PathLike[str]) -> list[str]:
    """The pretraining documents found at ``path``; a :class:`DataError` if there are none."""
    corpus = load_corpus(path)
    if not corpus.texts:
        raise DataError(f"{os.fspath(path)}: 没有预训练文本，请当作对话数据加载 no pretraining texts found (it holds "
                        f"{len(corpus.dialogues)} dialogues: load it as chat data)", os.fspath(path))
    return corpus.texts


def load_chat(path: str | os.PathLike[str]) -> list[list[Message]]:
    """The dialogues found at ``path``; a :class:`DataError` if there are none."""
    corpus = load_corpus(path)
    if not corpus.dialogues:
        raise DataError(f"{os.fspath(path)}: 没有对话，请当作预训练数据加载 no chat dialogues found (it holds {len(corpus.texts)} "
                        f"plain texts: load it as pretraining data)", os.fspath(path))
    return corpus.dialogues


def bundled_corpus() -> Corpus:
    """The data shipped with diyapp: ``data/pretraining_data.json`` + ``data/chat_training_data.json``."""
    corpus = Corpus()
    for name in ("pretraining_data.json", "chat_training_data.json"):
        path = DATA_DIR / name
        if not path.is_file():
            raise DataError(f"{path}: 找不到自带的数据，安装不完整 not found (the bundled data is missing from this installation)",
                            str(path))
        corpus = corpus.merged(_load_file(path, in_folder=False))
    return corpus


def qa_pairs(corpus: Corpus) -> list[tuple[str, str]]:
    """(question, answer) for every single-turn dialogue (exactly one user turn then one assistant
    turn, no system prompt), in corpus order: what the answer hit rate is measured on."""
    return [(d[0]["content"], d[1]["content"]) for d in corpus.dialogues
            if len(d) == 2 and d[0]["role"] == "user" and d[1]["role"] == "assistant"]


# --- files and folders --------------------------------------------------------------------------

class _SkipFile(Exception):
    """A file inside a folder that holds no recognisable data; carries the reason."""


class _EntryError(Exception):
    """A problem in one entry; the caller adds the file and entry to the message."""


def _load_folder(folder: Path) -> Corpus:
    def fail(err: OSError) -> None:
        raise DataError(f"{err.filename}: 无法读取文件夹 cannot read folder ({err.strerror or err})", str(err.filename))

    found: list[Path] = []
    for root, dirs, files in os.walk(folder, onerror=fail):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in files
                  if not f.startswith(".") and Path(f).suffix.lower() in SUPPORTED_SUFFIXES]
    found.sort(key=lambda p: p.relative_to(folder).parts)
    if not found:
        raise DataError(f"{folder}: 没有找到数据 no data found (no .json, .jsonl or .txt files in this folder)", str(folder))
    corpus = Corpus()
    skipped: list[str] = []
    for path in found:
        try:
            part = _load_file(path, in_folder=True)
            corpus.texts += part.texts
            corpus.dialogues += part.dialogues
            corpus.sources += part.sources
        except _SkipFile as why:
            corpus.sources.append(f"{path} (skipped: {why})")
            skipped.append(path.name)
    if corpus.is_empty:
        raise DataError(f"{folder}: 没有找到数据 no data found (skipped {', '.join(skipped)}: JSON objects, "
                        f"not arrays of texts or dialogues)", str(folder))
    return corpus


def _load_file(path: Path, in_folder: bool) -> Corpus:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(f"{path}: 不支持的文件类型，请用 .json、.jsonl 或 .txt unsupported file type {suffix or '(no extension)'!r} "
                        f"(expected .json, .jsonl or .txt, or a folder of them)", str(path))
    if suffix == ".txt":
        corpus = Corpus(texts=[doc for _, line in _read_lines(path) if (doc := line.strip())])
    elif suffix == ".jsonl":
        corpus = _parse_jsonl(path, _read_lines(path))
    else:
        corpus = _parse_json(path, _read_text(path), in_folder)
    if corpus.is_empty:
        raise DataError(f"{path}: 没有找到数据 no data found (the file is empty)", str(path))
    corpus.sources = [str(path)]
    return corpus


_BOM = b"\xef\xbb\xbf"


def _read_text(path: Path) -> str:
    """The whole file as text (a .json array is parsed whole)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: 无法读取 cannot read ({err.strerror or err})", str(path)) from None
    skipped = 3 if raw.startswith(_BOM) else 0
    try:
        return raw[skipped:].decode("utf-8") if skipped else raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, raw[skipped:], err, raw.count(b"\n", 0, skipped + err.start) + 1,
                        skipped + err.start) from None


def _read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line of a UTF-8 file, read a line at a time (a .txt or .jsonl
    corpus is never held whole as bytes and text at once), without its "\\n"."""
    offset = 0
    try:
        with path.open("rb") as stream:
            for number, raw in enumerate(stream, 1):
                size = len(raw)
                skipped = 3 if number == 1 and raw.startswith(_BOM) else 0
                end = size - 1 if raw.endswith(b"\n") else size
                line = memoryview(raw)[skipped:end]  # no copy of a long line
                try:
                    yield number, str(line, "utf-8")
                except UnicodeDecodeError as err:
                    raise _not_utf8(path, line, err, number, offset + skipped + err.start) from None
                offset += size
    except OSError as err:
        raise DataError(f"{path}: 无法读取 cannot read ({err.strerror or err})", str(path)) from None


def _not_utf8(path: Path, raw: bytes | memoryview, err: UnicodeDecodeError, line: int, offset: int) -> DataError:
    hint = " (看起来是 UTF-16 it looks like UTF-16)" if offset == err.start and raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
    return DataError(f"{path}: 不是 UTF-8 文本，请另存为 UTF-8 not UTF-8 text{hint}: byte 0x{raw[err.start]:02X} at line {line} "
                     f"(byte offset {offset}); save the file as UTF-8", str(path))


def _parse_json(path: Path, text: str, in_folder: bool) -> Corpus:
    if not text.strip():
        raise DataError(f"{path}: 没有找到数据 no data found (the file is empty)", str(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: JSON 格式错误 invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}",
                        str(path)) from None
    except (ValueError, RecursionError) as err:
        raise DataError(f"{path}: JSON 格式错误 invalid JSON: {err}", str(path)) from None
    if isinstance(data, dict):
        if in_folder:
            raise _SkipFile("a JSON object, not an array of texts or dialogues")
        raise DataError(f"{path}: 顶层应是数组，不是 JSON 对象 the top level is a JSON object; expected an array of strings "
                        f"(RustGPT-Chinese format) or of {{\"text\"}} / {{\"conversations\"}} objects",
                        str(path))
    if not isinstance(data, list):
        raise DataError(f"{path}: 顶层应是数组 the top level is {_kind(data)}; expected an array of strings", str(path))
    if not data:
        raise DataError(f"{path}: 没有找到数据 no data found (an empty array)", str(path))

    def where(i: int) -> str:
        line = _array_entry_line(text, i)
        return f"entry {i + 1}" + (f" (line {line})" if line else "")

    return _parse_values(path, data, where)


def _parse_jsonl(path: Path, numbered_lines: Iterator[tuple[int, str]]) -> Corpus:
    values: list[Any] = []
    lines: list[int] = []
    for n, line in numbered_lines:
        if not line.strip():
            continue
        try:
            values.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {n}: JSON 格式错误 invalid JSON at column {err.colno}: {err.msg}",
                            str(path), f"line {n}") from None
        except (ValueError, RecursionError) as err:
            raise DataError(f"{path}: line {n}: JSON 格式错误 invalid JSON: {err}", str(path), f"line {n}") from None
        lines.append(n)
    return _parse_values(path, values, lambda i: f"line {lines[i]}")


def _parse_values(path: Path, values: list[Any], where: Callable[[int], str]) -> Corpus:
    """Documents and dialogues from the entries of one file (see the module docstring)."""
    strings = [v for v in values if isinstance(v, str)]
    chat_file = 2 * sum(1 for s in strings if _is_marked(s)) > len(strings)
    corpus = Corpus()
    for i, value in enumerate(values):
        try:
            if isinstance(value, str):
                if _is_marked(value):
                    try:
                        corpus.dialogues.append(_parse_marked(value))
                        continue
                    except _EntryError:
                        if chat_file:
                            raise
                corpus.texts.append(_document(value))
            elif isinstance(value, dict):
                kind, item = _record(value)
                (corpus.texts if kind == "text" else corpus.dialogues).append(item)
            else:
                raise _EntryError(f"应是字符串或带 text / conversations 的对象 expected a string or an object with \"text\" or \"conversations\", "
                                  f"got {_kind(value)}")
        except _EntryError as err:
            loc = where(i)
            raise DataError(f"{path}: {loc}: {err}", str(path), loc) from None
    return corpus


# --- entries ------------------------------------------------------------------------------------

_USER_NAMES = ("用户", "User")
_ASSISTANT_NAMES = ("助手", "Assistant")
_SYSTEM_NAMES = ("系统", "System")
_ROLE_OF_NAME = {**dict.fromkeys(_USER_NAMES, "user"), **dict.fromkeys(_ASSISTANT_NAMES, "assistant"),
                 **dict.fromkeys(_SYSTEM_NAMES, "system")}
# A marker: a role name not glued to a preceding letter/digit, optional spaces, either colon.
_MARKER = re.compile(r"(?<!\w)(用户|User|助手|Assistant)[ \t]*[:：]")
_START = re.compile(r"\s*(系统|System|用户|User)[ \t]*[:：]")
_ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
                 "system": "system"}
_NO_ASSISTANT = "缺少“助手：”标记 no \"助手：\" / \"Assistant:\" marker"


def _is_marked(s: str) -> bool:
    """Does the string carry chat markers (starts with one, or has an assistant marker)?"""
    return bool(_START.match(s)) or any(m.group(1) in _ASSISTANT_NAMES for m in _MARKER.finditer(s))


def _parse_marked(s: str) -> list[Message]:
    """``用户：…助手：…`` (more turns allowed) as a dialogue."""
    start = _START.match(s)
    if not start:
        raise _EntryError("没有以“用户：”开头 does not start with a \"用户：\" / \"User:\" marker")
    turns: list[tuple[str, int]] = [(_ROLE_OF_NAME[start.group(1)], start.end())]
    ends: list[int] = []
    for m in _MARKER.finditer(s, start.end()):
        ends.append(m.start())
        turns.append((_ROLE_OF_NAME[m.group(1)], m.end()))
    ends.append(len(s))
    if not any(role == "assistant" for role, _ in turns):
        raise _EntryError(_NO_ASSISTANT)
    dialogue = [Message(role=role, content=s[begin:end].strip()) for (role, begin), end in zip(turns, ends)]
    _check_dialogue(dialogue)
    return dialogue


def _document(s: str) -> str:
    text = s.strip()
    if not text:
        raise _EntryError("文本是空的 empty text")
    return text


def _record(obj: dict[str, Any]) -> tuple[str, Any]:
    """A ``{"text": …}`` or ``{"conversations": [...]}`` object as ("text", str) or ("dialogue", list)."""
    conv_key = next((k for k in ("conversations", "messages") if k in obj), None)
    if "text" in obj and conv_key:
        raise _EntryError(f"text 和 {conv_key} 只能有一个 has both \"text\" and \"{conv_key}\"; expected one of them")
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise _EntryError(f"text 必须是字符串 \"text\" must be a string, got {_kind(obj['text'])}")
        return "text", _document(obj["text"])
    if conv_key is None:
        keys = ", ".join(json.dumps(k, ensure_ascii=False) for k in list(obj)[:5]) or "none"
        raise _EntryError(f"缺少 text 或 conversations 键 expected a \"text\" or \"conversations\" key (found: {keys})")
    turns = obj[conv_key]
    if not isinstance(turns, list):
        raise _EntryError(f"{conv_key} 必须是轮次的数组 \"{conv_key}\" must be an array of turns, got {_kind(turns)}")
    dialogue: list[Message] = []
    for n, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise _EntryError(f"第 {n} 轮应是带 role 和 content 的对象 turn {n}: expected an object with \"role\" and \"content\", got {_kind(turn)}")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if not isinstance(role, str):
            raise _EntryError(f"第 {n} 轮的 role 缺失或不是字符串 turn {n}: " + ("no \"role\"" if role is None else f"\"role\" must be a string, got {_kind(role)}"))
        mapped = _ROLE_ALIASES.get(role.strip().lower())
        if mapped is None:
            raise _EntryError(f"第 {n} 轮的角色未知 turn {n}: unknown role {json.dumps(role, ensure_ascii=False)} "
                              f"(expected user, assistant or system; human and gpt are accepted too)")
        if not isinstance(content, str):
            raise _EntryError(f"第 {n} 轮的 content 缺失或不是字符串 turn {n}: " + ("no \"content\"" if content is None
                                               else f"\"content\" must be a string, got {_kind(content)}"))
        dialogue.append(Message(role=mapped, content=content.strip()))
    _check_dialogue(dialogue)
    return "dialogue", dialogue


def _check_dialogue(dialogue: list[Message]) -> None:
    """Optional system turn first, then user/assistant alternating, ending with the assistant."""
    if not dialogue:
        raise _EntryError("对话是空的 an empty conversation")
    for n, m in enumerate(dialogue, 1):
        if not m["content"]:
            raise _EntryError(f"第 {n} 轮内容是空的 empty {m['role']} content (turn {n})")
    offset = 1 if dialogue[0]["role"] == "system" else 0
    for n, m in enumerate(dialogue[offset:], offset + 1):
        expected = "user" if (n - offset) % 2 == 1 else "assistant"
        if m["role"] == "system":
            raise _EntryError(f"第 {n} 轮：系统轮只能在最前面 turn {n}: a system turn may only come first")
        if m["role"] != expected:
            raise _EntryError(f"第 {n} 轮应是{'用户' if expected == 'user' else '助手'}，用户和助手要轮流 turn {n}: expected {'a user' if expected == 'user' else 'an assistant'} "
                              f"turn, got {m['role']} "
                              f"(turns must alternate user, assistant, ...)")
    if not any(m["role"] == "assistant" for m in dialogue):
        raise _EntryError("没有助手的回答 no assistant turn")
    if dialogue[-1]["role"] != "assistant":
        raise _EntryError(f"最后一个用户轮没有助手回答 turn {len(dialogue)}: the last user turn has no assistant reply")


# --- helpers ------------------------------------------------------------------------------------

def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


_WS = re.compile(r"[ \t\n\r]*")


def _array_entry_line(text: str, index: int) -> int | None:
    """Line number (from 1) where entry ``index`` of a top-level JSON array starts; only used to
    word an error, so it re-scans the already validated text."""
    decoder = json.JSONDecoder()
    try:
        pos = _WS.match(text, 0).end() + 1  # past "["
        for _ in range(index):
            pos = _WS.match(text, pos).end()
            _, pos = decoder.raw_decode(text, pos)
            pos = _WS.match(text, pos).end() + 1  # past ","
        pos = _WS.match(text, pos).end()
    except (ValueError, AttributeError, RecursionError):
        return None
    return text.count("\n", 0, pos) + 1

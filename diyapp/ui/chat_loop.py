"""The chat loop: streamed answers, commands (exit, clear, save, help, set) and Ctrl-C/Ctrl-D."""

from __future__ import annotations

import contextlib
import shlex
import signal
import threading
from typing import TYPE_CHECKING, Callable, Iterator, TextIO

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .prompts import CHAT_PROMPT, Prompter

if TYPE_CHECKING:
    from ..chat import ChatSession, Reply
    from ..generation import GenerationConfig
    from ..workflow import Workbench

ASSISTANT_PREFIX = "🤖 助手: "
NOT_UTF8 = "输入中不是 UTF-8 的字节已换成 � (bytes that are not UTF-8 were replaced with �)"
COMMANDS = {
    "exit": "exit", "quit": "exit", "退出": "exit", "bye": "exit",
    "clear": "clear", "清空": "clear", "reset": "clear",
    "save": "save", "保存": "save",
    "help": "help", "帮助": "help", "?": "help", "？": "help",
    "set": "set", "设置": "set",
    "complete": "complete", "续写": "complete",
}
#: What :func:`run_chat` returns when the person asks for text completion instead.
SWITCH_TO_COMPLETION = "complete"
HELP = """命令 commands:
  exit / quit / 退出        结束对话 end the chat
  clear / 清空              忘掉之前的对话 forget the conversation
  save / 保存               保存模型 save the model (.pt / JSON)
  set                       查看生成设置 show the sampling settings
  set temperature=0.7       修改设置 change one (also top_k=, top_p=, max_new_tokens=; top_k=none turns it off)
  set precision=int8        int8 权重（字节最少），回答可能略有不同 int8 weights, fewest bytes (CPU), answers may differ slightly
  complete / 续写           切换到续写模式 switch to text completion
  help / 帮助               显示本帮助 this help
回答时按 Ctrl-C 可打断回答；在提示符处按 Ctrl-C 或 Ctrl-D 退出。
Ctrl-C while answering stops the answer; Ctrl-C or Ctrl-D at the prompt quits."""


def readable_line(line: str | bytes) -> tuple[str, bool]:
    """One line of input as text, and whether it held bytes that are not UTF-8: those (raw bytes,
    or the lone surrogates Python keeps for them) become U+FFFD, so the line can still be answered."""
    from ..tokenizer import clean_text

    if isinstance(line, bytes):
        try:
            return line.decode("utf-8"), False
        except UnicodeDecodeError:
            return line.decode("utf-8", "replace"), True
    text = clean_text(line)
    return text, text != line


def parse_command(line: str) -> tuple[str, str] | None:
    """``(command, rest)`` when ``line`` is a chat command (a leading ``/`` is allowed), else None."""
    text = line.strip()
    word, _, rest = text.lstrip("/").partition(" ")
    name = COMMANDS.get(word.lower())
    if name is None:
        return None
    if name != "set" and rest.strip():
        return None  # "exit the building" is a message, not a command
    return name, rest.strip()


def apply_settings(settings: "GenerationConfig", text: str) -> tuple["GenerationConfig", list[str]]:
    """``temperature=0.7 top_k=20`` (or ``temperature 0.7``) applied to ``settings``; returns the new
    settings and the problems found (settings that failed are left as they were)."""
    problems: list[str] = []
    try:
        words = shlex.split(text)
    except ValueError:
        words = text.split()
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(words):
        word = words[i]
        if "=" in word:
            name, _, value = word.partition("=")
            if not value and i + 1 < len(words):
                value, i = words[i + 1], i + 1
            pairs.append((name, value))
        elif i + 1 < len(words):
            pairs.append((word, words[i + 1]))
            i += 1
        else:
            problems.append(f"{word}: 缺少取值 missing a value (e.g. set {word}=0.7)")
        i += 1
    for name, value in pairs:
        try:
            settings = settings.updated(name.strip().lower(), value)
        except ValueError as err:
            problems.append(str(err))
    return settings, problems


def settings_table(settings: "GenerationConfig") -> Table:
    table = Table(title="生成设置 sampling settings", title_justify="left", show_header=False, box=None,
                  padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    for name, value in settings.to_dict().items():
        table.add_row(name, "none" if value is None else str(value))
    return table


def reply_stats(reply: "Reply") -> str:
    """The dim line under an answer."""
    parts = [f"{reply.tokens} tokens", f"{reply.tokens_per_s:.1f} tokens/s"]
    if reply.dropped_turns:
        parts.append(f"上下文已满，丢弃了最早的 {reply.dropped_turns} 轮对话 (oldest turns dropped)")
    if reply.truncated_prompt:
        parts.append("消息太长，只保留了结尾 (message cut to fit)")
    if reply.stop == "limit":
        parts.append("达到长度上限 (length limit)")
    elif reply.stop == "loop":
        parts.append("回答陷入重复，已停止 (stopped: the answer was repeating itself)")
    return " · ".join(parts)


@contextlib.contextmanager
def streaming_to(out: TextIO) -> Iterator[Callable[[str], None]]:
    """A writer of streamed model text to ``out`` (flushed piece by piece) that Ctrl-C stops.

    Ctrl-C raises KeyboardInterrupt at once, as usual, and is also remembered: should the
    exception be lost on its way (one raised inside a finalizer is only reported, never passed
    on), the next piece written raises it again, so an answer never runs on after Ctrl-C.
    """
    pressed = False

    def on_sigint(signum: int, frame: object) -> None:
        nonlocal pressed
        pressed = True
        raise KeyboardInterrupt

    def write(piece: str) -> None:
        if pressed:
            raise KeyboardInterrupt
        out.write(piece)
        out.flush()

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield write
        return
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield write
    finally:
        signal.signal(signal.SIGINT, previous)


def stream_answer(session: "ChatSession", message: str, out: TextIO, seed: int | None = None) -> "Reply":
    """Answer ``message``, writing the text to ``out`` as plain text as it is generated."""
    with streaming_to(out) as write:
        return session.reply(message, on_text=write, seed=seed)


def next_line(prompter: Prompter, console: Console, prompt: str) -> str | int:
    """The next line typed at ``prompt``, made readable (a note says when it was not UTF-8), or
    the exit code when the person ends there: 0 for Ctrl-D, 130 for Ctrl-C."""
    try:
        line = prompter.chat_line(prompt)
    except KeyboardInterrupt:
        console.print(Text("\n再见 bye (Ctrl-C)", style="dim"))
        return 130
    except EOFError:
        console.print(Text("\n再见 bye", style="dim"))
        return 0
    line, replaced = readable_line(line)
    if replaced:
        console.print(Text(NOT_UTF8, style="yellow"))
    return line


def run_chat(bench: "Workbench", console: Console, prompter: Prompter,
             on_save: Callable[[], None] | None = None, settings: "GenerationConfig | None" = None) -> int | str:
    """Chat until ``exit`` (0), Ctrl-D (0) or Ctrl-C at the prompt (130); returns
    :data:`SWITCH_TO_COMPLETION` when the person types ``complete``."""
    from ..chat import ChatSession

    session = ChatSession(bench.model, bench.tokenizer, settings)
    console.print(Text("开始对话吧！输入 help 查看命令，exit 退出。 Chat away; type help for commands, exit to quit.",
                       style="bold green"))
    while True:
        line = next_line(prompter, console, CHAT_PROMPT)
        if isinstance(line, int):
            return line
        if not line.strip():
            continue
        command = parse_command(line)
        if command is None:
            _answer(session, line.strip(), console)
            continue
        name, rest = command
        if name == "exit":
            console.print(Text("再见 bye", style="dim"))
            return 0
        if name == "complete":
            return SWITCH_TO_COMPLETION
        if name == "clear":
            session.clear()
            console.print(Text("已清空对话 conversation cleared", style="dim"))
        elif name == "help":
            console.print(Text(HELP))
        elif name == "set":
            if rest:
                session.settings, problems = apply_settings(session.settings, rest)
                for problem in problems:
                    console.print(Text(f"✗ {problem}", style="red"))
            console.print(settings_table(session.settings))
        elif name == "save":
            if on_save is None:
                console.print(Text("这里不能保存 saving is not available here", style="yellow"))
            else:
                on_save()


def _answer(session: "ChatSession", message: str, console: Console) -> None:
    console.out(ASSISTANT_PREFIX, end="", highlight=False)
    console.file.flush()
    try:
        reply = stream_answer(session, message, console.file)
    except KeyboardInterrupt:
        console.out("")
        console.print(Text("（回答已中断 answer stopped）", style="yellow"))
        return
    except (RuntimeError, ValueError) as err:  # e.g. out of memory: say so and keep the conversation
        console.out("")
        console.print(Text(f"✗ 生成失败 generation failed: {' '.join(str(err).split())}", style="red"))
        return
    if not reply.text:
        console.print(Text("（没有生成内容 no text）", style="dim"), end="")
    console.out("")
    console.print(Text(reply_stats(reply), style="dim"))

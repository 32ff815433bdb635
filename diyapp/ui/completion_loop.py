"""The completion loop: the person types the start of a text and the model continues it.

For models that were only pretrained (they know the corpus's text, not the chat template), and
for chat models when the person switches with ``complete``. Commands as in the chat (exit, save,
help, set), plus ``chat`` to go (back) to the chat loop for a chat-tuned model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from rich.console import Console
from rich.text import Text

from .chat_loop import (SWITCH_TO_COMPLETION, apply_settings, next_line, parse_command, run_chat, settings_table,
                        streaming_to)
from .prompts import Prompter

if TYPE_CHECKING:
    from ..completion import Completion
    from ..generation import GenerationConfig
    from ..workflow import Workbench

COMPLETION_PROMPT = "✍️  开头 text: "
#: What :func:`run_completion` returns when the person asks for the chat loop instead.
SWITCH_TO_CHAT = "chat"
HELP = """续写模式 completion mode: 输入一段开头，模型接着写下去。 Type the start of a text; the model goes on.
命令 commands:
  exit / quit / 退出        结束 end
  chat / 对话               切换到对话 switch to chat (chat-tuned models)
  save / 保存               保存模型 save the model
  set                       查看生成设置 show the sampling settings (set temperature=0.9 changes one)
  help / 帮助               显示本帮助 this help
续写时按 Ctrl-C 可打断；在提示符处按 Ctrl-C 或 Ctrl-D 退出。
Ctrl-C while writing stops it; Ctrl-C or Ctrl-D at the prompt quits."""


def is_text_model(bench: "Workbench") -> bool:
    """True for a model that was pretrained but never chat-tuned (it should complete, not chat)."""
    return bench.stage == "pretrain"


def completion_stats(c: "Completion") -> str:
    """The dim line under a continuation."""
    parts = [f"{c.tokens} tokens", f"{c.tokens_per_s:.1f} tokens/s"]
    if c.truncated_prompt:
        parts.append("开头太长，只保留了结尾 (text cut to fit)")
    parts.append({"end": "模型结束了这段文本 (end of text)", "limit": "达到长度上限 (length limit)",
                  "loop": "出现重复，已停止 (stopped a repeating loop)"}.get(c.stop, c.stop))
    return " · ".join(parts)


def run_completion(bench: "Workbench", console: Console, prompter: Prompter,
                   on_save: Callable[[], None] | None = None, settings: "GenerationConfig | None" = None,
                   can_chat: bool = False) -> int | str:
    """Continue texts until ``exit`` (0), Ctrl-D (0) or Ctrl-C at the prompt (130); returns
    :data:`SWITCH_TO_CHAT` when the person types ``chat`` and ``can_chat`` is true."""
    from ..completion import COMPLETION_SETTINGS

    settings = settings or COMPLETION_SETTINGS
    console.print(Text("续写模式：输入一段开头，模型接着写。输入 help 查看命令，exit 退出。 Completion mode: type "
                       "the start of a text and the model continues it; help for commands, exit to quit.",
                       style="bold green"))
    while True:
        line = next_line(prompter, console, COMPLETION_PROMPT)
        if isinstance(line, int):
            return line
        if not line.strip():
            continue
        command = _command(line)
        if command is None:
            _continue(bench, line.strip(), settings, console)
            continue
        name, rest = command
        if name == "exit":
            console.print(Text("再见 bye", style="dim"))
            return 0
        if name == "chat":
            if can_chat:
                return SWITCH_TO_CHAT
            console.print(Text("这个模型没有经过对话微调，只能续写。 This model was not chat-tuned; it can only "
                               "continue text.", style="yellow"))
        elif name == "help":
            console.print(Text(HELP))
        elif name == "set":
            if rest:
                settings, problems = apply_settings(settings, rest)
                for problem in problems:
                    console.print(Text(f"✗ {problem}", style="red"))
            console.print(settings_table(settings))
        elif name == "save":
            if on_save is None:
                console.print(Text("这里不能保存 saving is not available here", style="yellow"))
            else:
                on_save()
        elif name == "clear":
            console.print(Text("续写没有对话记录可清空 completion keeps no conversation", style="dim"))


def _command(line: str) -> tuple[str, str] | None:
    word = line.strip().lstrip("/").lower()
    if word in ("chat", "对话"):
        return "chat", ""
    return parse_command(line)


def _continue(bench: "Workbench", prompt: str, settings: "GenerationConfig", console: Console) -> None:
    from ..completion import complete

    console.out(prompt, end="", highlight=False)
    console.file.flush()

    try:
        with streaming_to(console.file) as write:
            result = complete(bench.model, bench.tokenizer, prompt, settings, on_text=write)
    except KeyboardInterrupt:
        console.out("")
        console.print(Text("（续写已中断 stopped）", style="yellow"))
        return
    except (RuntimeError, ValueError) as err:
        console.out("")
        console.print(Text(f"✗ 生成失败 generation failed: {' '.join(str(err).split())}", style="red"))
        return
    console.out("")
    console.print(Text(completion_stats(result), style="dim"))


def run_session(bench: "Workbench", console: Console, prompter: Prompter,
                on_save: Callable[[], None] | None = None, settings: "GenerationConfig | None" = None) -> int:
    """Use the model: a chat for a chat-tuned model, the completion loop (saying why) for a model
    that was only pretrained; ``complete`` and ``chat`` switch between the two. Returns the exit code."""
    if is_text_model(bench):
        console.print(Text("这个模型只做过预训练（没有对话微调），所以打开续写模式而不是对话。 This model was only "
                           "pretrained (no chat tuning), so it opens in completion mode rather than chat.",
                           style="yellow"))
        return int(run_completion(bench, console, prompter, on_save=on_save))
    while True:
        code = run_chat(bench, console, prompter, on_save=on_save, settings=settings)
        if code != SWITCH_TO_COMPLETION:
            return int(code)
        code = run_completion(bench, console, prompter, on_save=on_save, can_chat=True)
        if code != SWITCH_TO_CHAT:
            return int(code)
        console.print(Text("回到对话 back to chat", style="dim"))

"""Validated questions (questionary over prompt_toolkit).

A bad answer is refused in place: the reason shows under the prompt and the question stays open.
An empty answer takes the default shown in the question. Ctrl-C raises ``KeyboardInterrupt`` and
Ctrl-D ``EOFError``; callers decide what that means. Tests pass a prompt_toolkit pipe input and
``DummyOutput`` to :class:`Prompter`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, Sequence, TypeVar

from ..workflow import MAX_EPOCHS, int_parser

T = TypeVar("T")

#: A validator: the parsed value, or raises ValueError with a message for the person.
Parser = Callable[[str], Any]

CHAT_PROMPT = "👤 用户: "


# --- parsers (pure, testable) ---------------------------------------------------------------------

def epochs_parser() -> Parser:
    """A number of training epochs (the question that asks names itself in a refusal)."""
    return int_parser(1, MAX_EPOCHS)


def check(parser: Parser, text: str, default: str = "") -> str | None:
    """The message for a refused answer, or None when ``text`` (or the default for "") is fine."""
    try:
        parser(text if text.strip() else default)
    except ValueError as err:
        return str(err)
    return None


def refusal(question: str, parser: Parser, text: str, default: str = "") -> str | None:
    """What is shown under ``question`` when ``text`` is refused (None when it is taken): the
    parser's reason, in both languages, after the question's name, so each message says which
    question it belongs to. Empty ``text`` takes ``default``; with no default it is refused."""
    if not text.strip() and not default:
        problem: str | None = "请输入一个值 please type a value"
    else:
        problem = check(parser, text, default)
    if problem is None or problem.startswith(question):
        return problem
    return f"{question}：{problem}"


# --- the questions --------------------------------------------------------------------------------

@dataclass
class Option(Generic[T]):
    """One menu entry: its label and the value it stands for (``disabled``: why it cannot be picked)."""

    title: str
    value: T
    disabled: str | None = None


class Prompter:
    """Asks questions on the terminal, or on a given prompt_toolkit input/output (tests)."""

    def __init__(self, input: Any = None, output: Any = None) -> None:
        self.io: dict[str, Any] = {}
        if input is not None:
            self.io["input"] = input
        if output is not None:
            self.io["output"] = output
        self._chat_session: Any = None

    def select(self, message: str, options: Sequence[Option[T]], default: T | None = None) -> T:
        """One of ``options`` (arrow keys or its number, then Enter)."""
        import questionary

        choices = [questionary.Choice(o.title, value=o.value, disabled=o.disabled) for o in options]
        start = None
        if default is not None:
            start = next((c for c, o in zip(choices, options) if o.value == default and not o.disabled), None)
        answer = questionary.select(message, choices=choices, default=start, use_shortcuts=len(choices) <= 36,
                                    instruction="（方向键或数字选择，回车确认）", **self.io).unsafe_ask()
        return answer

    def confirm(self, message: str, default: bool = True) -> bool:
        """Yes or no (y/n then Enter; Enter alone takes the default)."""
        import questionary

        return bool(questionary.confirm(message, default=default, auto_enter=False, **self.io).unsafe_ask())

    def ask(self, message: str, parse: Parser, default: Any = None) -> Any:
        """A typed answer parsed by ``parse``; refused answers show why (:func:`refusal`) and the
        question stays open. Empty input takes ``default`` (shown in the question)."""
        import questionary

        default_text = "" if default is None else str(default)
        label = f"{message}（默认 {default_text}）" if default_text else message

        def validate(text: str) -> bool | str:
            return refusal(message, parse, text, default_text) or True

        text = questionary.text(label, validate=validate, **self.io).unsafe_ask()
        return parse(text if text.strip() else default_text)

    def chat_line(self, message: str = CHAT_PROMPT) -> str:
        """One line typed at the chat prompt (with history for the up arrow)."""
        from prompt_toolkit import PromptSession

        if self._chat_session is None:
            self._chat_session = PromptSession(**self.io)
        return self._chat_session.prompt(message)

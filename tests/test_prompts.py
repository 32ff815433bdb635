"""Prompt logic on a prompt_toolkit pipe input: validated questions, the chat loop, the save flow."""

from __future__ import annotations

import io
import os
import re
import signal
import time
from pathlib import Path

import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console

from diyapp import workflow as wf
from diyapp.chat import Reply
from diyapp.generation import GenerationConfig
from diyapp.ui import chat_loop
from diyapp.ui.app import App, _heads_parser
from diyapp.ui.prompts import Option, Prompter, check, epochs_parser, int_parser, refusal
from diyapp.workflow import parse_lr

from .test_workflow import TINY, write_corpus

CLEAR = "\x15"  # Ctrl-U: empty the line after a refused answer


@pytest.fixture
def pipe():
    with create_pipe_input() as inp:
        yield inp


@pytest.fixture
def prompter(pipe):
    return Prompter(input=pipe, output=DummyOutput())


@pytest.fixture
def console():
    return Console(file=io.StringIO(), width=120, highlight=False)


def output(console: Console) -> str:
    return console.file.getvalue()


# --- parsers ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["abc", "0", "-5", "2.5", "", "1000000000"])
def test_epochs_refuses_nonsense(text):
    assert check(epochs_parser(), text) is not None


@pytest.mark.parametrize("text", ["abc", "0", "-0.001", "nan", "inf", "5", "0.5"])
def test_learning_rate_refuses_nonsense(text):
    assert check(parse_lr, text) is not None


@pytest.mark.parametrize("parser, text, chinese, english", [
    (int_parser(1, 10), "abc", "整数", "whole number"), (int_parser(1, 10), "-3", "至少是 1", "at least 1"),
    (int_parser(1, 10), "11", "最多是 10", "at most 10"), (parse_lr, "fast", "数字", "must be a number"),
    (parse_lr, "nan", "有限", "finite"), (parse_lr, "0", "大于 0", "greater than 0"),
    (parse_lr, "5", "最多是 0.1", "at most 0.1"),
])
def test_refusals_say_why_in_both_languages(parser, text, chinese, english):
    problem = check(parser, text)
    assert chinese in problem and english in problem


@pytest.mark.parametrize("question, parser, text, good", [
    ("预训练轮数 pretraining epochs", epochs_parser(), "-3", "8"),
    ("对话微调轮数 chat-tuning epochs", epochs_parser(), "x", "8"),
    ("学习率 learning rate", parse_lr, "fast", "0.001"), ("注意力头数 heads", _heads_parser(32), "3", "4"),
])
def test_a_refusal_names_the_question_it_belongs_to(question, parser, text, good):
    problem = refusal(question, parser, text)
    assert problem.startswith(question + "：") and problem.count(question) == 1
    assert re.search(r"[\u4e00-\u9fff]", problem.split("：", 1)[1]) and re.search(r"[a-z]{4}", problem)
    assert refusal(question, parser, "", default=good) is None
    assert refusal(question, parser, "") is not None                   # nothing typed, no default


def test_parsers_accept_sensible_values_and_defaults():
    assert epochs_parser()(" 50 ") == 50
    assert parse_lr("1e-4") == 1e-4
    assert check(parse_lr, "", default="0.0001") is None
    assert check(int_parser(1, 4), "5") is not None
    assert check(_heads_parser(32), "3") is not None       # 32 is not divisible by 3
    assert check(_heads_parser(48), "16") is not None      # head size 3 is odd
    assert _heads_parser(32)("4") == 4


# --- questions on a pipe ----------------------------------------------------------------------------

def test_questions_take_numbers_defaults_and_reask_after_bad_answers(pipe, prompter):
    pipe.send_text("2\r")                                   # select by number
    pipe.send_text("\r")                                    # Enter takes the default
    pipe.send_text("abc\r" + CLEAR + "0\r" + CLEAR + "-3\r" + CLEAR + "7\r")
    pipe.send_text("\r")                                    # default learning rate
    pipe.send_text("x\r" + CLEAR + "0.5\r" + CLEAR + "0.002\r")
    pipe.send_text("y\r")
    pipe.send_text("\r")
    options = [Option("a", "a"), Option("b", "b"), Option("c", "c")]
    assert prompter.select("pick", options) == "b"
    assert prompter.select("pick", options, default="c") == "c"
    assert prompter.ask("epochs", epochs_parser(), default=50) == 7
    assert prompter.ask("lr", parse_lr, default="0.0001") == 1e-4
    assert prompter.ask("lr", parse_lr, default="0.0001") == 0.002
    assert prompter.confirm("sure?", default=False) is True
    assert prompter.confirm("sure?", default=False) is False


def test_ctrl_c_and_ctrl_d_reach_the_caller(pipe, prompter):
    pipe.send_text("\x03")
    with pytest.raises(KeyboardInterrupt):
        prompter.ask("epochs", epochs_parser(), default=5)
    pipe.send_text("\x03")
    with pytest.raises(KeyboardInterrupt):
        prompter.select("pick", [Option("a", 1)])
    pipe.send_text("\x04")
    with pytest.raises(EOFError):
        prompter.chat_line()
    pipe.send_text("hello\r")
    assert prompter.chat_line() == "hello"


# --- chat commands ----------------------------------------------------------------------------------

def test_chat_commands_are_recognised():
    assert chat_loop.parse_command("exit") == ("exit", "")
    assert chat_loop.parse_command(" 退出 ") == ("exit", "")
    assert chat_loop.parse_command("/clear") == ("clear", "")
    assert chat_loop.parse_command("set top_k=5") == ("set", "top_k=5")
    assert chat_loop.parse_command("exit the building") is None
    assert chat_loop.parse_command("你好") is None


def test_set_changes_settings_and_reports_bad_ones():
    settings, problems = chat_loop.apply_settings(GenerationConfig(), "temperature=0.7 top_k=none max_new_tokens 12")
    assert (settings.temperature, settings.top_k, settings.max_new_tokens) == (0.7, None, 12) and not problems
    settings, problems = chat_loop.apply_settings(settings, "temperature=hot top_p=2 colour=red top_k")
    assert len(problems) == 4 and settings.temperature == 0.7
    settings, problems = chat_loop.apply_settings(settings, "precision=INT8")
    assert settings.precision == "int8" and not problems
    settings, problems = chat_loop.apply_settings(settings, "precision=fp8")
    assert settings.precision == "int8" and len(problems) == 1 and "auto, fp32, bf16, fp16, int8" in problems[0]
    settings, problems = chat_loop.apply_settings(settings, "precision=fp16")
    assert settings.precision == "fp16" and not problems


class FakeSession:
    """Stands in for ChatSession: streams a fixed answer, or is interrupted mid-answer."""

    answers: list = []

    def __init__(self, model, tokenizer, settings=None):
        self.settings = settings or GenerationConfig()
        self.history: list = []

    def clear(self):
        self.history = []

    def reply(self, message, on_text=None, seed=None):
        answer = FakeSession.answers.pop(0)
        if isinstance(answer, BaseException):
            on_text("部分")
            raise answer
        for piece in answer:
            on_text(piece)
        self.history += [message, answer]
        return Reply(text=answer, tokens=7, seconds=0.5, dropped_turns=1)


def test_chat_loop_commands_markup_interrupts_and_ends(pipe, prompter, console, monkeypatch):
    monkeypatch.setattr("diyapp.chat.ChatSession", FakeSession)
    FakeSession.answers = ["[bold red]不是标记[/]", KeyboardInterrupt()]
    saves = []
    pipe.send_text("\r   \r你好\rhelp\rset temperature=0.5\rset temperature=abc\r第二个问题\rclear\rsave\rexit\r")
    code = chat_loop.run_chat(wf.Workbench(model=None, tokenizer=None), console, prompter,
                              on_save=lambda: saves.append(1))
    text = output(console)
    assert code == 0 and saves == [1]
    assert "🤖 助手: [bold red]不是标记[/]" in text                    # model text is never markup
    assert "7 tokens · 14.0 tokens/s" in text and "丢弃了最早的 1 轮" in text
    assert "回答已中断" in text and "已清空" in text and "exit / quit" in text
    assert re.search(r"temperature\s+0\.5", text) and "温度 temperature 需要一个数字 needs a number" in text


def test_ctrl_c_while_streaming_stops_the_text_even_when_its_exception_was_swallowed():
    """A Ctrl-C whose KeyboardInterrupt is lost on its way (here: caught) still stops the stream
    at its next piece, and the process's own Ctrl-C handler is back afterwards."""
    out = io.StringIO()
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with chat_loop.streaming_to(out) as write:
            write("第一")
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)  # the handler runs in this thread within the sleep and raises
            except KeyboardInterrupt:
                pass  # swallowed, as inside a finalizer
            write("第二")
    assert out.getvalue() == "第一"
    assert signal.getsignal(signal.SIGINT) is before
    with chat_loop.streaming_to(out) as write:  # a new answer starts without the old Ctrl-C
        write("新的")
    assert out.getvalue() == "第一新的"


@pytest.mark.parametrize("key, code", [("\x04", 0), ("\x03", 130)])
def test_chat_loop_ends_on_ctrl_d_and_ctrl_c(pipe, prompter, console, monkeypatch, key, code):
    monkeypatch.setattr("diyapp.chat.ChatSession", FakeSession)
    pipe.send_text(key)
    assert chat_loop.run_chat(wf.Workbench(model=None, tokenizer=None), console, prompter) == code


def test_clear_in_the_chat_loop_forgets_the_conversation(pipe, prompter, console, bench, monkeypatch):
    """A real model behind the loop: after ``clear`` the model is shown only the new message."""
    from .test_chat import record_prompts, single_turn

    prompts = record_prompts(monkeypatch)
    pipe.send_text("你好\r你是谁？\rclear\r你是谁？\rexit\r")
    settings = GenerationConfig(max_new_tokens=4, temperature=0.0)
    assert chat_loop.run_chat(bench, console, prompter, settings=settings) == 0
    alone = single_turn(bench.tokenizer, "你是谁？")
    assert len(prompts) == 3
    assert len(prompts[1]) > len(alone) and prompts[1][-len(alone):] == alone  # the first exchange, then this
    assert prompts[2] == alone


# --- the save flow (real model, real files) -------------------------------------------------------------

@pytest.fixture
def bench(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    corpus = wf.load_data(write_corpus(tmp_path))
    return wf.start_new(corpus, wf.model_config("custom", **TINY))


def test_chat_loop_answers_after_a_line_that_is_not_utf8(pipe, prompter, console, bench):
    pipe.send_bytes(b"ab\xff\xfecd\r" + "你好\r".encode() + b"exit\r")
    assert chat_loop.run_chat(bench, console, prompter, settings=GenerationConfig(max_new_tokens=3)) == 0
    text = output(console)
    assert text.count("🤖 助手:") == 2 and "生成失败" not in text
    assert "UTF-8" in text


def test_save_flow_both_formats_with_defaults(pipe, prompter, console, bench):
    app = App(console, prompter, preload=False)
    pipe.send_text("\r3\r\r\r")
    saved = app.save_flow(bench)
    assert [s.path for s in saved] == [Path("checkpoints/model_final.pt"), Path("exports/model_final.json")]
    assert all(s.path.is_file() for s in saved)
    assert "已保存到 saved to checkpoints/model_final.pt" in output(console)


def test_save_flow_offers_gguf_with_its_weight_type(pipe, prompter, console, bench):
    gguf = pytest.importorskip("gguf")
    app = App(console, prompter, preload=False)
    pipe.send_text("\r4\r3\r\r")                                        # yes, GGUF, q8_0, default path
    [saved] = app.save_flow(bench)
    assert saved.path == Path("exports/model_final.gguf") and saved.format == "gguf"
    assert Path("exports/model_final.Modelfile").is_file()
    assert gguf.GGUFReader(saved.path).get_field("general.file_type").contents() == 7  # mostly q8_0


def test_save_flow_refuses_bad_paths_and_asks_before_overwriting(pipe, prompter, console, bench, tmp_path):
    app = App(console, prompter, preload=False)
    (tmp_path / "checkpoints").mkdir()
    existing = tmp_path / "checkpoints" / "model_final.pt"
    existing.write_bytes(b"keep me")
    (tmp_path / "blocker").write_text("a file")
    pipe.send_text("\r")                                                   # yes, save
    pipe.send_text("\r")                                                   # .pt
    pipe.send_text("checkpoints\r" + CLEAR + "m.txt\r" + CLEAR)            # a folder, a wrong suffix
    pipe.send_text("blocker/m.pt\r" + CLEAR)                               # under a file
    pipe.send_text("\r")                                                   # the default ...
    pipe.send_text("\r")                                                   # ... exists: no, ask again
    pipe.send_text("checkpoints/other\r")
    [saved] = app.save_flow(bench)
    assert saved.path == Path("checkpoints/other.pt") and saved.path.is_file()
    assert existing.read_bytes() == b"keep me"


def test_save_flow_cancelled_by_ctrl_c_or_declined(pipe, prompter, console, bench):
    app = App(console, prompter, preload=False)
    pipe.send_text("\r\x03")
    assert app.save_flow(bench) == []
    assert "已取消保存" in output(console)
    pipe.send_text("n\r")
    assert app.save_flow(bench) == []
    assert not Path("checkpoints").exists()


def test_save_flow_reports_a_failed_write_and_asks_again(pipe, prompter, console, bench, monkeypatch):
    from diyapp.checkpoint import CheckpointError

    real_save = wf.save
    calls = []

    def flaky(b, path, fmt):
        calls.append(path)
        if len(calls) == 1:
            raise CheckpointError(path, "could not write: No space left on device")
        return real_save(b, path, fmt)

    monkeypatch.setattr(wf, "save", flaky)
    app = App(console, prompter, preload=False)
    pipe.send_text("\r\r\rcheckpoints/second.pt\r")
    [saved] = app.save_flow(bench)
    assert saved.path == Path("checkpoints/second.pt") and len(calls) == 2
    assert "No space left on device" in output(console)

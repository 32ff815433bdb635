"""The guided session end to end, through a real pseudo-terminal (pexpect), with a tiny model.

The first run trains and saves once (a module fixture); every later run works in its own copy of
that folder, so the tests pass in any order: load and chat, load and continue training, resume
from the pretraining checkpoint; then the rude cases: bad answers, Ctrl-C during training, Ctrl-C
during an answer, Ctrl-D and Ctrl-C at the chat prompt.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

pexpect = pytest.importorskip("pexpect")

from diyapp import workflow as wf  # noqa: E402
from diyapp.checkpoint import describe_checkpoint, load_model_binary  # noqa: E402

from .test_workflow import TINY, write_corpus  # noqa: E402

MAIN = Path(__file__).resolve().parents[1] / "main.py"
CLEAR = "\x15"  # Ctrl-U empties the line after a refused answer
CHAT = "👤 用户:"
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")


class Terminal:
    """``python main.py`` on a pseudo-terminal; every step waits for its prompt before typing."""

    opened: list["Terminal"] = []

    def __init__(self, cwd: Path, *args: str) -> None:
        env = dict(os.environ, PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm", COLUMNS="120", LINES="40")
        self.log = io.StringIO()
        self.child = pexpect.spawn(sys.executable, [str(MAIN), *args], cwd=str(cwd), env=env, encoding="utf-8",
                                   dimensions=(40, 120), timeout=60)
        self.child.delaybeforesend = None
        self.child.logfile_read = self.log
        Terminal.opened.append(self)

    def wait(self, pattern: str) -> re.Match:
        try:
            self.child.expect(pattern)
        except (pexpect.TIMEOUT, pexpect.EOF) as err:
            screen = self.screen
            # errors reported on the way (e.g. "Exception ignored in ...") may have scrolled far up
            reported = "\n".join(line for line in screen.splitlines() if "Exception" in line or "Error" in line)
            raise AssertionError(f"did not see {pattern!r}; errors reported: {reported or 'none'}; "
                                 f"the screen ended with:\n{screen[-3000:]}") from err
        return self.child.match

    def answer(self, pattern: str, keys: str) -> None:
        self.wait(pattern)
        self.child.send(keys)

    def choose(self, menu: str, label: str) -> None:
        """Pick the menu entry whose text starts with ``label`` by its number."""
        self.wait(menu)
        number = self.wait(r"(\d+)\) " + re.escape(label)).group(1)
        self.child.send(number + "\r")

    def refused(self, bad: str, message: str) -> None:
        """Type a bad answer, see why it is refused, and empty the line."""
        self.child.send(bad + "\r")
        self.wait(message)
        self.child.send(CLEAR)

    def finish(self) -> int:
        self.wait(pexpect.EOF)
        self.child.close()
        return self.child.exitstatus

    @property
    def screen(self) -> str:
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", self.log.getvalue())


def custom_tiny_model(term: Terminal, pretrain_epochs: str, chat_epochs: str, budget: str = "") -> None:
    """Answer the "train a new model" questions: the tiny custom size, corpus.json, the time budget
    (Enter: the default), few epochs."""
    term.answer("模型大小", "3\r")
    term.wait("hidden_size")
    term.refused("abc", "整数")
    term.child.send(str(TINY["hidden_size"]) + "\r")
    term.answer("layers", f"{TINY['num_layers']}\r")
    term.wait("heads")
    term.refused("3", "整除")
    term.child.send(f"{TINY['num_heads']}\r")
    term.answer("max_seq_len", f"{TINY['max_seq_len']}\r")
    term.answer("vocab_size", f"{TINY['vocab_size']}\r")
    term.answer("训练数据", "2\r")
    term.wait("语料路径")
    term.refused("nowhere.json", "找不到")
    term.child.send("corpus.json\r")
    term.wait("训练最多用多久")
    term.refused("10 parsecs", "看不懂")
    term.child.send(budget + "\r")
    term.answer("使用推荐的训练设置", "n\r")
    term.wait("预训练轮数")
    term.refused("0", "至少")
    term.child.send(pretrain_epochs + "\r")
    term.answer("对话微调轮数", chat_epochs + "\r")
    term.wait("学习率")
    term.refused("-1", "必须大于")
    term.child.send("\r")


@pytest.fixture(autouse=True)
def _no_stray_processes():
    """A failed test must not leave its app running."""
    yield
    while Terminal.opened:
        term = Terminal.opened.pop()
        if term.child.isalive():
            term.child.terminate(force=True)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """A first run in an empty folder holding only a corpus: train, save both formats, chat, save
    again. Returns (folder, exit status, screen)."""
    folder = tmp_path_factory.mktemp("app")
    write_corpus(folder)
    term = Terminal(folder)
    try:
        term.wait("还没有找到保存的模型")
        custom_tiny_model(term, pretrain_epochs="1", chat_epochs="2")
        term.answer("保存预训练检查点", "\r")
        term.answer("保存到", "\r")
        term.wait("已保存到 saved to checkpoints/model_pretrained.pt")
        term.wait("训练结果")
        term.wait("step")                                  # the loss chart's axis label
        term.answer("保存当前模型", "\r")
        term.answer("保存格式", "3\r")
        term.answer(r"保存到 save to \(pt\)", "\r")
        term.answer(r"保存到 save to \(json\)", "\r")
        term.wait("exports/model_final.json")
        term.answer(CHAT, "你好\r")
        term.wait("🤖 助手:")
        term.wait(r"\d+ tokens · [\d.]+ tokens/s")
        term.answer(CHAT, "save\r")
        term.answer("保存格式", "\r")
        term.answer("保存到", "\r")
        term.answer("已存在，覆盖吗", "y\r")
        term.wait("已保存到")
        term.answer(CHAT, "exit\r")
        status = term.finish()
    finally:
        if term.child.isalive():
            term.child.terminate(force=True)
    return folder, status, term.screen


@pytest.fixture
def workdir(first_run, tmp_path):
    """This test's own copy of the first run's folder."""
    folder = tmp_path / "app"
    shutil.copytree(first_run[0], folder)
    return folder


def test_1_first_run_trains_saves_and_chats(first_run):
    folder, status, screen = first_run
    assert status == 0
    for name in ("checkpoints/model_pretrained.pt", "checkpoints/model_final.pt", "exports/model_final.json"):
        assert (folder / name).is_file(), name
    assert "Traceback" not in screen


def test_2_second_run_lists_loads_and_chats(workdir):
    term = Terminal(workdir)
    term.wait("已保存的模型")
    term.wait("可以继续未完成的训练")                  # the table's caption: the table is complete
    table = term.screen.split("已保存的模型")[-1]
    assert all(name in table for name in ("model_final.pt", "model_pretrained.pt", "model_final.json"))
    assert re.search(r"model_pretrained\.pt.*预训练 ⟳", table) and not re.search(r"model_final\.pt.*⟳", table)
    term.choose("要做什么", "加载模型")
    term.choose("加载哪个模型", "model_final.json")
    term.wait("词表大小")
    term.wait("参数量")
    term.answer("继续训练这个模型吗", "\r")
    term.answer("要另存一份吗", "\r")
    term.answer(CHAT, "天空为什么是蓝色的？\r")
    term.wait("tokens/s")
    term.answer(CHAT, "clear\r")
    term.wait("已清空对话")
    term.answer(CHAT, "exit\r")
    assert term.finish() == 0


def test_3_third_run_continues_training_with_given_epochs_and_lr(workdir):
    before = describe_checkpoint(workdir / "checkpoints/model_final.pt")["metadata"]["steps"]
    term = Terminal(workdir)
    term.choose("要做什么", "加载模型")
    term.choose("加载哪个模型", "model_final.pt")
    term.answer("继续训练这个模型吗", "y\r")
    term.wait("训练轮数")
    term.refused("abc", "整数")
    term.refused("0", "至少")
    term.refused("99999999", "不合理")
    term.child.send("2\r")
    term.wait("学习率")
    term.refused("0", "必须大于")
    term.refused("5", "太大")
    term.refused("fast", "需要一个数字")
    term.child.send("0.001\r")
    term.wait("训练数据 data:")
    term.wait("训练结果")
    term.answer("保存当前模型", "\r")
    term.answer("保存格式", "\r")
    term.answer("保存到", "checkpoints/continued\r")
    term.wait("continued.pt")
    term.answer(CHAT, "你是谁？\r")
    term.wait("tokens/s")
    term.answer(CHAT, "exit\r")
    assert term.finish() == 0
    meta = describe_checkpoint(workdir / "checkpoints/continued.pt")["metadata"]
    assert meta["steps"] == before + 2 and meta["stage"] == "chat"      # 6 dialogues: one step per epoch
    assert meta["stage_results"][-1]["total_steps"] == 2


def test_4_resume_from_the_pretraining_checkpoint_is_exact(workdir):
    term = Terminal(workdir)
    term.choose("要做什么", "继续未完成的训练")
    term.choose("从哪个检查点继续", "model_pretrained.pt")
    term.wait("之后 then: 对话微调")
    term.wait("训练结果")
    term.answer("保存当前模型", "\r")
    term.answer("保存格式", "\r")
    term.answer("保存到", "checkpoints/resumed.pt\r")
    term.wait("resumed.pt")
    term.answer(CHAT, "\x04")                           # Ctrl-D at the prompt ends cleanly
    assert term.finish() == 0
    straight = load_model_binary(workdir / "checkpoints/model_final.pt").model.state_dict()
    resumed = load_model_binary(workdir / "checkpoints/resumed.pt").model.state_dict()
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed[name]), name


def test_5_ctrl_c_during_training_keeps_what_was_learned(workdir):
    term = Terminal(workdir)
    term.choose("要做什么", "训练新模型")
    custom_tiny_model(term, pretrain_epochs="3000", chat_epochs="1", budget="none")
    total = int(term.wait(r"\b[1-9]\d*/(\d+) loss").group(1))  # inside the step loop of 3000 epochs
    term.child.send("\x03")
    term.wait("已在第")
    term.answer("保存当前模型", "\r")
    term.answer("保存格式", "\r")
    term.answer("保存到", "checkpoints/stopped\r")
    term.wait("stopped.pt")
    term.wait("只做过预训练")                             # a text model: completion, not chat
    term.answer("开头 text:", "\x03")                    # Ctrl-C at the prompt ends with 130
    assert term.finish() == 130
    assert "Traceback" not in term.screen
    meta = describe_checkpoint(workdir / "checkpoints/stopped.pt")["metadata"]
    assert meta["stage"] == "pretrain" and meta["resumable"] and meta["next_stages"] == ["pretrain", "chat"]
    assert total >= 3000 and 0 < meta["steps"] < total


def test_6_ctrl_c_during_an_answer_returns_to_the_prompt(tmp_path):
    """A model that can never end its answer answers for a long time: its end-of-turn embedding
    is zero, so the end-of-turn logit is 0 while about half of the others are positive and the
    top-20 filter never lets it through. Sampled (greedy would fall into a repetition loop,
    which the chat ends by itself). Ctrl-C stops that answer, the chat goes on."""
    corpus = wf.load_data(write_corpus(tmp_path))
    bench = wf.start_new(corpus, wf.model_config("custom", **{**TINY, "max_seq_len": 2048}))
    with torch.no_grad():  # the output head is tied to the embedding: a zero row scores 0 while others win
        bench.model.model.embed_tokens.weight[bench.tokenizer.im_end_id].zero_()
        bench.model.lm_head.weight[bench.tokenizer.im_end_id].zero_()
    wf.save(bench, tmp_path / "checkpoints" / "endless.pt", "pt")
    term = Terminal(tmp_path)
    term.choose("要做什么", "加载模型")
    term.choose("加载哪个模型", "endless.pt")
    term.answer("继续训练这个模型吗", "\r")
    term.answer("要另存一份吗", "\r")
    term.answer(CHAT, "set temperature=1 top_k=20 max_new_tokens=2000\r")
    term.wait("precision")                             # the last row of the settings table
    assert re.search(r"max_new_tokens\s+2000", term.screen) and re.search(r"temperature\s+1\.0", term.screen)
    term.answer(CHAT, "你好\r")
    term.wait("🤖 助手: .")
    term.child.send("\x03")
    term.wait("回答已中断")
    term.answer(CHAT, "\x04")
    assert term.finish() == 0
    assert "Traceback" not in term.screen


def test_7_chat_subcommand_on_a_terminal_uses_the_chat_loop(workdir):
    term = Terminal(workdir, "chat", "--model", "checkpoints/model_final.pt")
    term.answer(CHAT, "help\r")
    term.wait("set temperature=0.7")
    term.answer(CHAT, "你好\r")
    term.wait("tokens/s")
    term.answer(CHAT, "quit\r")
    assert term.finish() == 0

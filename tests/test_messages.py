"""Every message a person sees for bad input is one line in both languages (Chinese first, then the
English), naming the file, field or option it is about (issue 14: "every message whole")."""

from __future__ import annotations

import re

import pytest

from diyapp.cli import main
from diyapp.config import ConfigError, DIYConfig
from diyapp.generation import GenerationConfig
from diyapp.ui.chat_loop import apply_settings

CJK = re.compile(r"[\u4e00-\u9fff]")


def assert_bilingual(line: str, english: str, named: str) -> None:
    """One line with a Chinese part before the English ``english``, naming ``named``."""
    assert "\n" not in line, line
    assert english in line and named in line, line
    assert CJK.search(line[:line.index(english)]), f"no Chinese before the English: {line}"


def _write_cases(tmp_path) -> None:
    (tmp_path / "bad.json").write_text('[\n"a",\n"b"\n"c"]', encoding="utf-8")
    (tmp_path / "top.json").write_text('{"title": "x"}', encoding="utf-8")
    (tmp_path / "roles.jsonl").write_text('{"conversations": [{"role": "tool", "content": "q"}]}\n',
                                          encoding="utf-8")
    (tmp_path / "half.json").write_text('["用户：甲？助手：乙。", "用户：只有问题"]', encoding="utf-8")
    (tmp_path / "gbk.txt").write_bytes("你好".encode("gbk"))
    (tmp_path / "notes.csv").write_text("a,b", encoding="utf-8")
    (tmp_path / "garbage.pt").write_bytes(b"garbage")
    (tmp_path / "empty.json").write_bytes(b"")
    (tmp_path / "hello.json").write_text("hello", encoding="utf-8")
    (tmp_path / "hfdir").mkdir()
    (tmp_path / "hfdir" / "config.json").write_text("{}", encoding="utf-8")


# (argv, exit code, the English part, what the line must name)
CLI_CASES = [
    (["train", "--data", "nope.json"], 1, "no such file or folder", "nope.json"),
    (["train", "--data", "bad.json"], 1, "invalid JSON at line 4", "bad.json"),
    (["train", "--data", "top.json"], 1, "the top level is a JSON object", "top.json"),
    (["train", "--data", "roles.jsonl"], 1, 'unknown role "tool"', "roles.jsonl: line 1"),
    (["train", "--data", "half.json"], 1, 'no "助手：" / "Assistant:" marker', "half.json: entry 2"),
    (["train", "--data", "gbk.txt"], 1, "not UTF-8 text", "gbk.txt"),
    (["train", "--data", "notes.csv"], 1, "unsupported file type '.csv'", "notes.csv"),
    (["train", "--preset", "huge"], 2, "unknown preset 'huge'", "huge"),
    (["train", "--hidden-size", "30", "--heads", "4"], 2, "must be divisible by num_heads (4)", "hidden_size"),
    (["train", "--time-budget", "5s"], 2, "the budget must be at least 10 s", "--time-budget"),
    (["train", "--time-budget", "soon"], 2, "not a duration", "--time-budget"),
    (["train", "--lr", "fast"], 2, "must be a number such as 0.0001", "--lr"),
    (["chat", "--model", "m.pt", "--temperature", "500"], 2, "must be between 0 and 100", "temperature"),
    (["chat", "--model", "m.pt", "--top-p", "2"], 2, "must be in (0, 1] or none", "top_p"),
    (["chat", "--model", "m.pt", "--top-k", "many"], 2, "must be a whole number", "--top-k"),
    (["chat", "--model", "m.pt", "--max-new-tokens", "-1"], 2, "must be an integer from 0 to 100000",
     "max_new_tokens"),
    (["chat", "--model", "missing.pt"], 1, "not found: no such file", "missing.pt"),
    (["info", "--model", "garbage.pt"], 1, "is not a diyapp checkpoint", "garbage.pt"),
    (["chat", "--model", "empty.json"], 1, "is empty (0 bytes)", "empty.json"),
    (["info", "--model", "hello.json"], 1, "is not a diyapp JSON export", "hello.json"),
    (["chat", "--model", "hfdir"], 1, "is not a Hugging Face export", "hfdir"),
    (["export", "--model", "garbage.pt", "--gguf", "out.gguf", "--gguf-type", "q4"], 2, "invalid choice",
     "--gguf-type"),
    (["chat"], 2, "the following arguments are required: --model", "--model"),
    (["frobnicate"], 2, "invalid choice: 'frobnicate'", "COMMAND"),
    (["info", "--model", "m.pt", "--bogus"], 2, "unrecognized arguments: --bogus", "--bogus"),
]


@pytest.mark.parametrize("argv, code, english, named", CLI_CASES, ids=[" ".join(c[0]) for c in CLI_CASES])
def test_cli_refusals_are_one_bilingual_line(tmp_path, monkeypatch, capsys, argv, code, english, named):
    monkeypatch.chdir(tmp_path)
    _write_cases(tmp_path)
    assert main(argv) == code
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines()
             if line.strip() and not line.startswith(("usage:", " "))]  # (argparse's usage block)
    assert len(lines) == 1, captured.err
    assert "error" in lines[0] and "Traceback" not in captured.err
    assert_bilingual(lines[0], english, named)


@pytest.mark.parametrize("command, english, named", [
    ("set temperature=hot", "needs a number (got 'hot')", "temperature"),
    ("set top_k=-2", "must be a positive integer or none", "top_k"),
    ("set repetition_penalty 0", "must be positive", "repetition_penalty"),
    ("set colour=blue", "unknown setting 'colour'", "colour"),
    ("set precision=fp8", "must be one of auto, fp32, bf16, fp16, int8 (got 'fp8')", "precision"),
])
def test_chat_set_refusals_are_bilingual(command, english, named):
    """What the chat loop (and piped chat) print for a bad ``set``: the settings stay as they were."""
    before = GenerationConfig()
    after, problems = apply_settings(before, command.removeprefix("set "))
    assert after == before and len(problems) == 1
    assert_bilingual(problems[0], english, named)


@pytest.mark.parametrize("data, english, named", [
    ({"hidden_size": 0}, "must be a positive integer (got 0)", "hidden_size"),
    ({"dropout": 1.5}, "must be in [0, 1) (got 1.5)", "dropout"),
    ({"hidden_size": 30, "num_heads": 6}, "head size hidden_size/num_heads = 5 must be even", "head size"),
    ({"num_heads": 4, "num_kv_heads": 3}, "must be a multiple of num_kv_heads (3)", "num_kv_heads"),
    ({"colour": "blue"}, "unknown config field(s): colour", "colour"),
    ({"hidden_size": "big"}, "must be a positive integer (got 'big')", "hidden_size"),
])
def test_model_config_refusals_are_bilingual(data, english, named):
    """The refusal shown when a file's stored config or a custom size cannot make a model."""
    base = {k: v for k, v in DIYConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2,
                                       max_seq_len=16).to_dict().items() if k != "intermediate_size"}
    with pytest.raises(ConfigError) as info:
        DIYConfig.from_dict({**base, **data})
    assert_bilingual(str(info.value), english, named)

"""Subcommands for scripts: train, resume, chat (one prompt and piped), export, info, list; exit codes."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diyapp.cli import main

from .test_workflow import TINY, write_corpus

MAIN = Path(__file__).resolve().parents[1] / "main.py"
TINY_FLAGS = ["--hidden-size", str(TINY["hidden_size"]), "--layers", str(TINY["num_layers"]),
              "--heads", str(TINY["num_heads"]), "--max-seq-len", str(TINY["max_seq_len"]),
              "--vocab-size", str(TINY["vocab_size"]), "--batch-size", "4"]


LR = 0.0021  # not the recipe's (3e-3): the saved training config shows whether --lr reached training


def run_main(*args: str, cwd: Path | None = None, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(MAIN), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120, **kwargs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained once through ``train``: both formats plus a pretraining checkpoint."""
    folder = tmp_path_factory.mktemp("cli")
    corpus = write_corpus(folder)
    code = main(["train", "--data", str(corpus), *TINY_FLAGS, "--pretrain-epochs", "1", "--chat-epochs", "2",
                 "--format", "both", "--save", str(folder / "m"), "--save-pretrained", str(folder / "pre.pt"),
                 "--seed", "3", "--lr", str(LR), "--max-steps", "50"])
    assert code == 0
    return folder


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_help_answers_without_importing_torch():
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-X", "importtime", str(MAIN), "--help"], capture_output=True,
                            text=True, timeout=60)
    elapsed = time.perf_counter() - started
    assert result.returncode == 0
    for command in ("train", "resume", "chat", "export", "info", "list"):
        assert command in result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "rich", "questionary", "tokenizers", "diyapp.workflow"}
    assert elapsed < 10


def test_bare_command_without_a_terminal_explains_and_exits_2(tmp_path):
    result = run_main(cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    line = one_line_error(result.stderr)
    assert "terminal" in line and "train" in line and "chat" in line


@pytest.mark.parametrize("argv", [
    ["bogus"], ["train", "--lr", "5"], ["train", "--lr", "abc"], ["train", "--pretrain-epochs", "-1"],
    ["train", "--heads", "3"], ["train", "--preset", "enormous"], ["chat"], ["export", "--model", "x.pt"],
    ["chat", "--model", "x.pt", "--prompt", "  "], ["chat", "--model", "x.pt", "--temperature", "-1"],
    ["train", "--format", "yaml"], ["chat", "--model", "x.pt", "--precision", "int4"],
])
def test_usage_errors_exit_2(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("argv, chinese, english", [
    (["train", "--pretrain-epochs", "-3"], "至少是 0", "must be at least 0"),
    (["train", "--layers", "two"], "整数", "whole number"),
    (["train", "--lr", "fast"], "数字", "must be a number"),
    (["chat", "--model", "x.pt", "--prompt", " "], "空", "empty"),
    (["export", "--model", "x.pt"], "请说明", "say what to write"),
])
def test_usage_errors_are_bilingual_and_name_the_option(argv, chinese, english, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert chinese in line and english in line
    option = next((a for a in argv if a.startswith("--") and a != "--model"), None)
    assert option is None or option in line


def test_train_writes_what_was_asked(trained, capsys):
    for name in ("m.pt", "m.json", "pre.pt"):
        assert (trained / name).is_file()


def test_train_flags_reach_training(trained):
    """The flags given to ``train`` are what each stage trained with, as the checkpoints record it."""
    from diyapp import workflow as wf
    from diyapp.train import lr_at

    flags = {"lr": LR, "batch_size": 4, "seed": 3, "max_steps": 50}
    pre, final = wf.open_model(trained / "pre.pt"), wf.open_model(trained / "m.pt")
    for loaded in (pre, final):
        assert {k: getattr(loaded.config, k) for k in TINY} == TINY
    pretrain = pre.train_state
    [pending] = pretrain["pending_stages"]
    chat = final.train_state
    assert (pretrain["stage"], pending["stage"], chat["stage"]) == ("pretrain", "chat", "chat")
    for config in (pretrain["config"], pending["config"], chat["config"]):
        assert {k: config[k] for k in flags} == flags
    assert (pretrain["config"]["epochs"], chat["config"]["epochs"]) == (1, 2)
    assert chat["config"] == pending["config"]
    # The optimizer ran the schedule of that peak: its last learning rate is the schedule's.
    sched = chat["scheduler"]
    assert chat["optimizer"]["param_groups"][0]["lr"] == pytest.approx(
        lr_at(chat["step"] - 1, sched["total_steps"], LR, chat["config"]["min_lr"], sched["warmup_steps"]))


def test_info_and_list(trained, capsys, monkeypatch):
    assert main(["info", "--model", str(trained / "pre.pt")]) == 0
    out = capsys.readouterr().out
    assert "stage:          pretrain" in out and "resumable:      yes" in out and "vocab_size:" in out
    assert main(["list", str(trained)]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0].startswith("path\tformat") and len(rows) == 5
    [foreign] = [row for row in rows if "corpus.json" in row]
    assert foreign.split("\t")[-1] != "-"                      # unreadable files are listed as such
    monkeypatch.chdir(trained)
    assert main(["list"]) == 0
    assert "no saved models" in capsys.readouterr().out


def test_piped_clear_forgets_the_conversation(trained, monkeypatch, capsys):
    from .test_chat import record_prompts, single_turn
    from diyapp import workflow as wf

    prompts = record_prompts(monkeypatch)
    monkeypatch.setattr(sys, "stdin", io.StringIO("你好\n你是谁？\nclear\n你是谁？\n"))
    assert main(["chat", "--model", str(trained / "m.pt"), "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.count("\n") == 3
    alone = single_turn(wf.open_model(trained / "m.pt").tokenizer, "你是谁？")
    assert len(prompts) == 3
    assert len(prompts[1]) > len(alone) and prompts[1][-len(alone):] == alone  # the first exchange, then this
    assert prompts[2] == alone


def test_chat_top_p_flag_reaches_the_sampler(trained, capsys):
    def answer(*flags):
        assert main(["chat", "--model", str(trained / "m.pt"), "--prompt", "你好", "--max-new-tokens", "12",
                     *flags]) == 0
        return capsys.readouterr().out

    greedy = answer("--temperature", "0")
    for seed in ("1", "2", "3"):
        hot = ["--temperature", "5", "--top-k", "0", "--seed", seed]
        assert answer(*hot, "--top-p", "0.000001") == greedy
        assert answer(*hot, "--top-p", "1") != greedy


def test_precision_flag_reaches_the_decoder(trained, capsys, monkeypatch):
    from diyapp import generation

    asked = []
    real = generation.decode_weight_dtype
    monkeypatch.setattr(generation, "decode_weight_dtype", lambda model, precision: asked.append(precision) or real(model, precision))
    for command in ("chat", "generate"):
        assert main([command, "--model", str(trained / "m.pt"), "--prompt", "你好", "--max-new-tokens", "5",
                     "--precision", "int8"]) == 0
        assert capsys.readouterr().out.strip()
    assert asked == ["int8", "int8"]


def test_int8_on_a_model_off_the_cpu_is_a_usage_error(trained, capsys, monkeypatch):
    from diyapp import workflow as wf

    real = wf.bench_from_loaded

    def elsewhere(*a):  # as if loaded onto a GPU ("meta": a device that is not the CPU)
        bench = real(*a)
        bench.model.to("meta")
        return bench
    monkeypatch.setattr(wf, "bench_from_loaded", elsewhere)
    assert main(["chat", "--model", str(trained / "m.pt"), "--prompt", "你好", "--precision", "int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CPU only" in err[0] and "Traceback" not in err[0]


def test_chat_one_prompt_and_piped_lines(trained, capsys, monkeypatch):
    assert main(["chat", "--model", str(trained / "m.pt"), "--prompt", "你好", "--max-new-tokens", "5",
                 "--seed", "1"]) == 0
    assert capsys.readouterr().out.count("\n") == 1
    monkeypatch.setattr(sys, "stdin", io.StringIO("你好\n\nclear\nset temperature=0\n你是谁？\nexit\n不会被回答\n"))
    assert main(["chat", "--model", str(trained / "m.json"), "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 2 and "Traceback" not in captured.err


@pytest.mark.parametrize("encoding", [None, "utf-8:strict"])
def test_piped_chat_survives_bytes_that_are_not_utf8(trained, encoding):
    env = {} if encoding is None else {"PYTHONIOENCODING": encoding}
    result = subprocess.run([sys.executable, str(MAIN), "chat", "--model", str(trained / "m.pt"), "--max-new-tokens",
                             "3", "--seed", "1"], input=b"ab\xff\xfecd\n\xe4\xbd\xa0\xe5\xa5\xbd\n", capture_output=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", **env), timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode("utf-8").count("\n") == 2            # both lines answered
    err = result.stderr.decode("utf-8")
    assert "Traceback" not in err and "error" not in err
    assert "line 1" in one_line_error(err) and "UTF-8" in err        # one note, naming the line


def test_export_formats_and_refusals(trained, capsys, tmp_path):
    out = tmp_path / "exported"
    assert main(["export", "--model", str(trained / "m.pt"), "--json", str(out / "e.json"), "--pt",
                 str(out / "e.pt"), "--hf", str(out / "hf")]) == 0
    assert (out / "e.json").is_file() and (out / "e.pt").is_file() and (out / "hf" / "config.json").is_file()
    capsys.readouterr()
    assert main(["export", "--model", str(trained / "m.pt"), "--json", str(out / "e.json")]) == 1
    assert "--force" in one_line_error(capsys.readouterr().err)
    assert main(["export", "--model", str(trained / "m.pt"), "--json", str(out / "e.json"), "--force"]) == 0
    assert main(["export", "--model", str(trained / "m.pt"), "--pt", str(trained / "m.pt"), "--force"]) == 2


def test_failures_exit_1_with_one_line(trained, capsys, tmp_path):
    assert main(["chat", "--model", str(tmp_path / "missing.pt"), "--prompt", "hi"]) == 1
    assert "missing.pt" in one_line_error(capsys.readouterr().err)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"PK\x03\x04 not really")
    assert main(["info", "--model", str(broken)]) == 1
    assert "broken.pt" in one_line_error(capsys.readouterr().err)
    bad_data = tmp_path / "bad.json"
    bad_data.write_text('["ok", 3]', encoding="utf-8")
    assert main(["train", "--data", str(bad_data), *TINY_FLAGS, "--save", str(tmp_path / "x.pt")]) == 1
    assert "bad.json" in one_line_error(capsys.readouterr().err)
    assert main(["train", "--data", str(tmp_path / "nowhere.json"), "--save", str(tmp_path / "x.pt")]) == 1
    assert "nowhere.json" in one_line_error(capsys.readouterr().err)
    assert main(["train", "--data", str(trained / "corpus.json"), "--save", str(trained / "m.pt")]) == 1
    assert "--force" in one_line_error(capsys.readouterr().err)
    assert main(["resume", "--model", str(trained / "m.pt")]) == 1
    assert "no unfinished training" in one_line_error(capsys.readouterr().err)


def test_resume_runs_the_pending_stage(trained, capsys, tmp_path):
    target = tmp_path / "resumed.pt"
    assert main(["resume", "--model", str(trained / "pre.pt"), "--save", str(target)]) == 0
    assert "chat completed" in capsys.readouterr().out
    assert main(["info", "--model", str(target)]) == 0
    out = capsys.readouterr().out
    assert "stage:          chat" in out and "resumable:      no" in out


def test_non_zero_rank_neither_prints_nor_writes(trained, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "1")  # what torchrun sets in a second process
    assert main(["export", "--model", str(trained / "m.pt"), "--pt", str(tmp_path / "rank1.pt"),
                 "--json", str(tmp_path / "rank1.json")]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "" and not list(tmp_path.iterdir())


def test_ctrl_c_during_training_saves_a_resumable_checkpoint(tmp_path):
    corpus = write_corpus(tmp_path)
    proc = subprocess.Popen([sys.executable, str(MAIN), "train", "--data", str(corpus), *TINY_FLAGS,
                             "--pretrain-epochs", "5000", "--chat-epochs", "1", "--save", "stopped.pt"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if line.startswith("[pretrain] start"):
                break
        time.sleep(1.0)  # well inside the step loop
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    err = "".join(seen) + err
    assert proc.returncode == 130, err
    assert "resume --model stopped.pt" in err and "Traceback" not in err
    assert "saved stopped.pt" in out
    info = run_main("info", "--model", "stopped.pt", cwd=tmp_path)
    assert "stage:          pretrain" in info.stdout and "resumable:      yes" in info.stdout


def test_generate_one_prompt_and_piped_lines_until_eof(trained, capsys, monkeypatch):
    assert main(["generate", "--model", str(trained / "pre.pt"), "--prompt", "春天", "--max-new-tokens", "6",
                 "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("春天")
    monkeypatch.setattr(sys, "stdin", io.StringIO("春天\n\n秋天来了\n夏天"))        # no newline before EOF
    assert main(["generate", "--model", str(trained / "m.json"), "--max-new-tokens", "4", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert [line[:len(p)] for line, p in zip(lines, ("春天", "秋天来了", "夏天"))] == ["春天", "秋天来了", "夏天"]
    assert len(lines) == 3 and "Traceback" not in captured.err


def test_generate_refuses_bad_sampling_flags(trained, capsys):
    assert main(["generate", "--model", str(trained / "pre.pt"), "--prompt", "春天", "--top-p", "3"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert main(["generate", "--model", str(trained / "pre.pt"), "--prompt", "  "]) == 2


def test_train_with_a_time_budget_shows_the_plan_before_training(tmp_path, capsys):
    corpus = write_corpus(tmp_path)
    code = main(["train", "--data", str(corpus), *TINY_FLAGS, "--time-budget", "40s", "--save",
                 str(tmp_path / "b.pt")])
    assert code == 0
    err = capsys.readouterr().err
    assert "time budget 40s" in err and "ETA" in err
    assert err.index("ETA") < err.index("[pretrain] start")
    assert main(["train", "--data", str(corpus), "--time-budget", "10 parsecs"]) == 2
    assert "--time-budget" in capsys.readouterr().err

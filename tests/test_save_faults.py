"""Saving under faults (issue 14): write errors say the path and the system's reason in the same
words for every format, and the temporary files of killed saves are cleaned up."""

from __future__ import annotations

import errno
import fcntl
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diyapp.formats import common
from diyapp.formats.common import CheckpointError
from diyapp.formats.hf import export_hf
from diyapp.formats.json import save_model_json
from diyapp.formats.pt import save_model_binary

from .conftest import REPO, make_model

SAVERS = {"pt": (save_model_binary, "m.pt"), "json": (save_model_json, "m.json"), "hf": (export_hf, "hf")}
MAIN = REPO / "main.py"


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# --- write errors --------------------------------------------------------------------------------

def test_a_file_size_limit_is_reported_alike_for_every_format(tmp_path):
    """In a forked child (the limit is its own) whose files may not grow past 100 kB, every format
    fails with the same line and leaves the old files as they were."""
    from diyapp import DIYConfig, DIYForCausalLM
    from diyapp.tokenizer import DIYTokenizer

    (tmp_path / "m.pt").write_bytes(b"old pt")
    (tmp_path / "m.json").write_bytes(b"old json")
    tok = DIYTokenizer.train(["春天来了，花儿开了。"] * 5, 300)
    model = DIYForCausalLM(DIYConfig(vocab_size=tok.vocab_size, num_layers=2, hidden_size=64, num_heads=4,
                                     max_seq_len=32))
    out, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: each save's outcome, one line each
        try:
            import resource
            os.close(out)
            resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
            for name, (save, target) in SAVERS.items():
                try:
                    save(tmp_path / target, model, tok)
                    line = f"saved {target}"
                except CheckpointError as err:
                    line = str(err)
                except Exception as err:
                    line = f"unexpected {type(err).__name__} {err}"
                os.write(out_w, line.encode() + b"\n")
        finally:
            os._exit(0)
    os.close(out_w)
    with os.fdopen(out, encoding="utf-8") as f:
        lines = f.read().splitlines()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0  # no SIGXFSZ: Python ignores it
    assert lines == [f"{tmp_path / name}: 写入失败 could not write: File too large" for name in ("m.pt", "m.json", "hf")]
    assert (tmp_path / "m.pt").read_bytes() == b"old pt" and (tmp_path / "m.json").read_bytes() == b"old json"
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize("fmt", SAVERS)
@pytest.mark.parametrize("code, where", [(errno.ENOSPC, "fsync"), (errno.EACCES, "mkstemp"),
                                         (errno.EDQUOT, "rename")])
def test_injected_os_errors_name_the_path_and_the_reason(fmt, code, where, tmp_path, tokenizer, monkeypatch):
    save, name = SAVERS[fmt]
    model = make_model(tokenizer)
    target = tmp_path / name

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    if where == "fsync":
        monkeypatch.setattr(common.os, "fsync", fail)
    elif where == "mkstemp":
        monkeypatch.setattr(common.tempfile, "mkstemp", fail)
        monkeypatch.setattr(common.tempfile, "mkdtemp", fail)
    else:
        monkeypatch.setattr(common.os, "replace", fail)
        monkeypatch.setattr(common.os, "rename", fail)
    with pytest.raises(CheckpointError) as err:
        save(target, model, tokenizer)
    assert str(err.value) == f"{target}: 写入失败 could not write: {os.strerror(code)}"
    assert not target.exists() or fmt == "hf" and not any(target.iterdir())
    assert temp_files(tmp_path) == []


def test_the_cli_says_which_file_and_why_in_one_line(tmp_path, tokenizer):
    model = make_model(tokenizer)
    source = save_model_binary(tmp_path / "source.pt", model, tokenizer)

    def limit() -> None:
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.RLIM_INFINITY))

    target = tmp_path / "out" / "copy.pt"
    result = subprocess.run([sys.executable, str(MAIN), "export", "--model", str(source), "--pt", str(target)],
                            capture_output=True, text=True, timeout=120, preexec_fn=limit,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {target}: 写入失败 could not write: File too large"


# --- leftovers of killed saves -------------------------------------------------------------------

def kill_during(save, kills: int, seed: int = 0, caught=lambda: False) -> int:
    """Run ``save`` over and over in a forked child and SIGKILL it at a random moment, ``kills``
    times; returns after how many kills ``caught()`` was true (the kill landed inside a write)."""
    rng = random.Random(seed)
    landed = 0
    for _ in range(kills):
        pid = os.fork()
        if pid == 0:  # the child: save until killed
            try:
                while True:
                    save()
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        landed += bool(caught())
    return landed


def test_ten_killed_pt_saves_leave_at_most_one_temporary_file_after_the_next_save(tmp_path, tokenizer):
    model = make_model(tokenizer, hidden_size=256, num_heads=4, num_layers=4)
    target = tmp_path / "model.pt"
    landed = kill_during(lambda: save_model_binary(target, model, tokenizer), kills=10,
                         caught=lambda: temp_files(tmp_path))
    assert landed >= 3, f"only {landed} of 10 kills landed inside a write"
    save_model_binary(target, model, tokenizer)
    assert len(temp_files(tmp_path)) <= 1
    assert save_model_binary(target, model, tokenizer) and target.stat().st_size > 0


def test_only_our_unowned_leftovers_are_removed_and_list_mentions_them(tmp_path, tokenizer, capsys):
    from diyapp.cli import main

    model = make_model(tokenizer)
    stale = tmp_path / ".old.pt.abcd1234.tmp"
    held = tmp_path / ".busy.pt.wxyz5678.tmp"
    foreign = [tmp_path / "notes.tmp", tmp_path / ".m.pt.tmp", tmp_path / ".cache"]
    for path in (stale, held, *foreign):
        path.write_bytes(b"x" * 1000)
    old = time.time() - 60
    for path in (stale, held):
        os.utime(path, (old, old))
    assert main(["list", str(tmp_path)]) == 0
    note = capsys.readouterr().err
    assert str(stale) in note and str(held) in note and "notes.tmp" not in note
    fd = os.open(held, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)                 # a live writer holds this one
    try:
        save_model_json(tmp_path / "m.json", model, tokenizer)
        assert not stale.exists() and held.exists() and all(p.exists() for p in foreign)
    finally:
        os.close(fd)
    save_model_binary(tmp_path / "m.pt", model, tokenizer)
    assert not held.exists() and all(p.exists() for p in foreign)
    assert main(["list", str(tmp_path)]) == 0
    assert "temporary" not in capsys.readouterr().err


# --- Hugging Face folders: replaced whole, mixed folders refused ----------------------------------

def two_models():
    """Two exports that differ in every file: vocabulary, shapes, weights."""
    from diyapp.tokenizer import DIYTokenizer

    tok_a = DIYTokenizer.train(["春天来了，花儿开了，小草也绿了。"] * 4, vocab_size=300)
    tok_b = DIYTokenizer.train(["The sun rises in the east and sets in the west."] * 4, vocab_size=290)
    return (make_model(tok_a, seed=1), tok_a), (make_model(tok_b, seed=2, hidden_size=64), tok_b)


def same_export(loaded, model, tok) -> bool:
    import torch

    return (loaded.tokenizer.to_str() == tok.to_str() and loaded.config == model.config
            and all(torch.equal(loaded.model.state_dict()[k], v) for k, v in model.state_dict().items()))


def test_ten_kills_during_hf_exports_always_leave_one_whole_export(tmp_path):
    from diyapp.formats.catalog import load_checkpoint

    a, b = two_models()
    folder = tmp_path / "hf"
    export_hf(folder, *a)

    def export_both() -> None:
        export_hf(folder, *b)
        export_hf(folder, *a)

    rng = random.Random(1)
    for kill in range(10):
        kill_during(export_both, kills=1, seed=rng.randrange(1 << 30))
        loaded = load_checkpoint(folder)
        assert same_export(loaded, *a) or same_export(loaded, *b), f"kill {kill + 1}: a mix of two exports"
    export_hf(folder, *b)
    assert same_export(load_checkpoint(folder), *b)
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize("borrowed, what", [("tokenizer.json", "tokenizer.json is not the tokenizer"),
                                            ("config.json", "config.json says vocab_size ")])
def test_a_folder_whose_files_disagree_is_refused_in_one_line(tmp_path, borrowed, what):
    from diyapp.formats.catalog import describe_checkpoint, load_checkpoint

    a, b = two_models()
    export_hf(tmp_path / "a", *a)
    export_hf(tmp_path / "b", *b)
    (tmp_path / "a" / borrowed).write_bytes((tmp_path / "b" / borrowed).read_bytes())
    for read in (load_checkpoint, describe_checkpoint):
        with pytest.raises(CheckpointError, match="is inconsistent") as err:
            read(tmp_path / "a")
        assert str(err.value).startswith(f"{tmp_path / 'a'}: ") and what in str(err.value)
        assert "\n" not in str(err.value)


def test_an_export_never_replaces_a_folder_of_other_files(tmp_path, tokenizer):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.txt").write_text("years of work")
    with pytest.raises(CheckpointError, match="not part of an export"):
        export_hf(folder, make_model(tokenizer), tokenizer)
    assert (folder / "thesis.txt").read_text() == "years of work"


# --- sizes a file claims ---------------------------------------------------------------------------

def with_config(path: Path, fmt: str, **changes) -> None:
    """Rewrite the model config stored in ``path`` (a file or an HF folder)."""
    import json

    import torch

    if fmt == "pt":
        obj = torch.load(path, weights_only=True)
        obj["config"].update(changes)
        torch.save(obj, path)
    elif fmt == "json":
        head, rest = path.read_bytes().split(b"\n", 1)
        doc = json.loads(head.removesuffix(b",") + b"}")
        doc["config"].update(changes)
        path.write_bytes(json.dumps(doc, separators=(",", ":")).encode()[:-1] + b",\n" + rest)
    else:
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        weights = path / "model.safetensors"
        with safe_open(weights, "pt") as f:
            meta = f.metadata()
        config = json.loads(meta["diyapp_config"])
        config.update(changes)
        meta["diyapp_config"] = json.dumps(config)
        save_file(load_file(weights), weights, metadata=meta)


@pytest.mark.parametrize("fmt", SAVERS)
def test_impossible_sizes_are_refused_before_allocating(fmt, tmp_path, tokenizer, capsys):
    from diyapp.cli import main
    from diyapp.formats.catalog import describe_checkpoint, load_checkpoint

    save, name = SAVERS[fmt]
    path = tmp_path / name
    save(path, make_model(tokenizer), tokenizer)
    with_config(path, fmt, hidden_size=10 ** 12)
    for read in (load_checkpoint, describe_checkpoint):
        with pytest.raises(CheckpointError) as err:
            read(path)
        assert str(err.value).startswith(f"{path}: ") and "hidden_size = 1000000000000" in str(err.value)
    for command in ("info", "chat"):
        argv = [command, "--model", str(path)] + (["--prompt", "hi"] if command == "chat" else [])
        assert main(argv) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0] and "hidden_size" in lines[0]


@pytest.mark.parametrize("fmt", SAVERS)
def test_a_model_too_large_for_memory_is_refused_naming_the_need(fmt, tmp_path, tokenizer, monkeypatch):
    from diyapp.formats.catalog import load_checkpoint

    save, name = SAVERS[fmt]
    path = tmp_path / name
    model = make_model(tokenizer)
    save(path, model, tokenizer)
    monkeypatch.setattr(common, "available_memory", lambda: 100_000)
    with pytest.raises(CheckpointError, match="too large for this machine") as err:
        load_checkpoint(path)
    assert str(err.value).startswith(f"{path}: ") and "hidden_size 32" in str(err.value)
    monkeypatch.setattr(common, "available_memory", lambda: 10 ** 9)
    assert load_checkpoint(path).config == model.config


def test_a_json_tensor_claiming_more_values_than_it_holds_is_refused(tmp_path, tokenizer):
    from diyapp.formats.catalog import load_checkpoint

    path = tmp_path / "m.json"
    save_model_json(path, make_model(tokenizer), tokenizer)
    text = path.read_text()
    start = text.index('"model.norm.weight":{"shape":[32]')
    path.write_text(text[:start] + '"model.norm.weight":{"shape":[1000000000000]' +
                    text[start + len('"model.norm.weight":{"shape":[32]'):])
    with pytest.raises(CheckpointError, match="model.norm.weight claims 1000000000000 values"):
        load_checkpoint(path)


# --- the GGUF export's file pair -------------------------------------------------------------------

@pytest.mark.parametrize("fault", ["writing the Modelfile", "putting the GGUF in place"])
def test_a_gguf_export_cut_between_its_two_files_is_never_a_silent_mismatch(fault, tmp_path, tokenizer,
                                                                            monkeypatch, capsys):
    """X.gguf and X.Modelfile are two renames: a save stopped between them leaves the old pair, or a
    pair that ``info`` and ``list`` refuse in one line; never a new GGUF beside an old Modelfile
    that looks fine."""
    pytest.importorskip("gguf")
    from diyapp.cli import main
    from diyapp.formats import gguf as gguf_format

    target = tmp_path / "m.gguf"
    gguf_format.export_gguf(target, make_model(tokenizer, seed=1), tokenizer)
    modelfile = gguf_format.modelfile_path(target)
    old = (target.read_bytes(), modelfile.read_bytes())
    assert main(["info", "--model", str(target)]) == 0  # a whole pair reads
    capsys.readouterr()

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if fault == "writing the Modelfile":
        monkeypatch.setattr(gguf_format, "write_modelfile", fail)
    else:
        replace = os.replace
        monkeypatch.setattr(common.os, "replace",
                            lambda a, b: fail() if str(b).endswith(".gguf") else replace(a, b))
    with pytest.raises((CheckpointError, OSError)):
        gguf_format.export_gguf(target, make_model(tokenizer, seed=2), tokenizer)
    monkeypatch.undo()
    now = (target.read_bytes(), modelfile.read_bytes())
    if now == old:
        assert main(["info", "--model", str(target)]) == 0
        return
    assert now[0] == old[0], "a new GGUF must never be beside the old Modelfile"
    assert main(["info", "--model", str(target)]) == 1
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and str(target) in line and "does not match m.Modelfile" in line
    assert re.search(r"[\u4e00-\u9fff]", line.split("does not match")[0])
    assert main(["list", str(tmp_path)]) == 0
    assert "does not match m.Modelfile" in capsys.readouterr().out

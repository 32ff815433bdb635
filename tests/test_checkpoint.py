"""The .pt checkpoint: round trip, exact resume, safety, atomic writes, clear errors, discovery."""

from __future__ import annotations

import builtins
import dataclasses
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import pytest
import torch

from diyapp import DIYConfig, DIYForCausalLM, DIYTokenizer
from diyapp.checkpoint import (
    CheckpointError,
    LoadedModel,
    build_metadata,
    describe_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model_binary,
    save_model_binary,
)

from .conftest import REPO, SMALL_TEXTS as TEXTS, assert_one_line_error, make_model, write_unreadable



@pytest.fixture
def model(tokenizer):
    return make_model(tokenizer)


def adamw_state(model, steps=3):
    """A real optimizer state plus the kinds of values a Trainer state holds."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    model.train()
    for _ in range(steps):
        loss = model.compute_loss(ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return {"version": 1, "stage": "pretrain", "optimizer": opt.state_dict(), "step": steps, "epoch": 0,
            "batch_in_epoch": 6, "best_val_loss": None, "worst": float("inf"), "last_loss": 4.25,
            "loss_history": [[1, 5.5], [2, 5.0], [3, 4.25]], "pair": (1, "a", 2.5),
            "rng": {"torch": torch.get_rng_state()}, "sources": ["data/x.json"]}


def assert_same(a, b, where="state"):
    """Deep equality with types: tensors bit-exact with the same dtype, tuples stay tuples."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def assert_same_model(a, b):
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name]), name
    ids = torch.randint(0, a.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


# --- round trip ----------------------------------------------------------------------------------

def test_round_trip_is_exact(tmp_path, model, tokenizer):
    state = adamw_state(model)
    path = save_model_binary(tmp_path / "m.pt", model, tokenizer, train_state=state,
                             metadata={"stage": "pretrain", "train_loss": 4.25, "note": "hello"})
    loaded = load_model_binary(path)
    assert isinstance(loaded, LoadedModel) and loaded.format == "pt"
    assert not loaded.model.training and loaded.model.lm_head.weight.device.type == "cpu"
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight  # still tied
    assert loaded.config == model.config
    assert_same_model(model, loaded.model)
    assert loaded.tokenizer.to_str() == tokenizer.to_str()
    assert loaded.tokenizer.encode("夏天很热") == tokenizer.encode("夏天很热")
    assert_same(state, loaded.train_state)
    meta = loaded.metadata
    assert meta["stage"] == "pretrain" and meta["note"] == "hello" and meta["train_loss"] == 4.25
    assert meta["parameters"] == model.num_parameters() and meta["steps"] == 3
    assert meta["created_at"].endswith("Z") and meta["app_version"]
    assert not (loaded.missing_keys or loaded.unexpected_keys or loaded.mismatched_keys)


def test_without_train_state_and_untied(tmp_path, tokenizer):
    model = make_model(tokenizer, tie_word_embeddings=False, num_kv_heads=2)
    save_model_binary(tmp_path / "m.pt", model, tokenizer)
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert loaded.train_state is None
    assert loaded.model.lm_head.weight is not loaded.model.model.embed_tokens.weight
    assert_same_model(model, loaded.model)
    assert describe_checkpoint(tmp_path / "m.pt")["has_train_state"] is False


def test_describe_reads_the_header(tmp_path, model, tokenizer):
    save_model_binary(tmp_path / "m.pt", model, tokenizer, train_state={"step": 4, "best": float("inf")},
                      metadata={"stage": "chat"})
    d = describe_checkpoint(tmp_path / "m.pt")
    assert d["format"] == "pt" and d["format_version"] == 1 and d["has_train_state"] is True
    assert d["config"] == model.config.to_dict()
    assert d["metadata"]["stage"] == "chat" and d["metadata"]["parameters"] == model.num_parameters()
    assert d["size_bytes"] == (tmp_path / "m.pt").stat().st_size


def test_metadata_helper_fills_and_downsamples(model):
    history = [(i, 10.0 / i) for i in range(1, 1001)]
    meta = build_metadata(model, stage="pretrain", steps=1000, train_loss=float("nan"), val_loss=2.5,
                          loss_history=history, run="a")
    assert len(meta["loss_history"]) <= 200
    assert meta["loss_history"][0] == [1, 10.0] and meta["loss_history"][-1] == [1000, 0.01]
    assert meta["train_loss"] is None and meta["val_loss"] == 2.5 and meta["run"] == "a"
    assert meta["parameters"] == model.num_parameters() and meta["created_at"].endswith("Z")


def test_resume_from_file_equals_uninterrupted_training(tmp_path, tokenizer):
    from diyapp.data import Corpus
    from diyapp.train import TrainConfig, Trainer

    corpus = Corpus(texts=TEXTS, dialogues=[], sources=["test"])
    config = TrainConfig(epochs=4, batch_size=3, lr=3e-3, val_fraction=0.2, seed=3, precision="fp32")

    def fresh():
        return make_model(tokenizer, dropout=0.1)  # dropout: the RNG state must be restored too

    straight = fresh()
    a = Trainer(straight, tokenizer, "pretrain", corpus, config)
    a.run()
    assert a.total_steps >= 6

    first = fresh()
    b = Trainer(first, tokenizer, "pretrain", corpus, config)
    assert b.run(steps=a.total_steps // 2).status == "paused"
    save_model_binary(tmp_path / "resume.pt", first, tokenizer, train_state=b.state_dict(),
                      metadata={"stage": "pretrain"})
    torch.manual_seed(999)  # whatever happens in between must not matter
    loaded = load_model_binary(tmp_path / "resume.pt")
    assert loaded.metadata["steps"] == a.total_steps // 2
    c = Trainer(loaded.model, loaded.tokenizer, "pretrain", corpus, config)
    c.load_state_dict(loaded.train_state)
    assert c.run().status == "completed"
    for name, value in straight.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[name]), name


# --- safety --------------------------------------------------------------------------------------

class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_a_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path, model, tokenizer):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    save_model_binary(path, model, tokenizer)
    payload = torch.load(path, weights_only=True)
    payload["metadata"]["x"] = _RunsCode(marker)
    torch.save(payload, path)
    for fn in (load_model_binary, describe_checkpoint, load_checkpoint):
        with pytest.raises(CheckpointError, match="refused.*run code"):
            fn(path)
    [info] = list_checkpoints([tmp_path])
    assert info.error and "run code" in info.error
    assert not marker.exists()


def test_non_plain_train_state_is_refused_at_save(tmp_path, model, tokenizer):
    import numpy as np

    path = tmp_path / "m.pt"
    save_model_binary(path, model, tokenizer)
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=r"train_state\['rng'\]\['numpy'\].*plain data"):
        save_model_binary(path, model, tokenizer, train_state={"rng": {"numpy": np.zeros(3)}})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.pt"]  # no temporary file left


# --- broken files --------------------------------------------------------------------------------

def _rewrite(path, change):
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)


def _make_broken(kind, path, model, tokenizer):
    if write_unreadable(kind, path):
        return
    if kind == "other_zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("hello.txt", "not a model")
        return
    if kind == "json":
        path.write_text('{"a": 1}')
        return
    if kind == "bare_state_dict":
        torch.save(model.state_dict(), path)
        return
    save_model_binary(path, model, tokenizer, train_state={"step": 1, "rng": torch.get_rng_state()})
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "newer":
        _rewrite(path, lambda p: p.update(format_version=99))
    elif kind == "shape":
        _rewrite(path, lambda p: p["model"].update(
            {"model.norm.weight": torch.ones(model.config.hidden_size + 1)}))
    elif kind == "bad_config":
        _rewrite(path, lambda p: p["config"].update(hidden_size=30))


BROKEN = {
    "missing": "not found",
    "empty": "empty",
    "random": "not a diyapp checkpoint",
    "other_zip": "zip archive, but not a PyTorch file",
    "json": "JSON file.*load_model_json",
    "bare_state_dict": "not a diyapp checkpoint.*bare state dict",
    "truncated": "truncated",
    "newer": "newer diyapp.*version 99",
    "shape": r"shape mismatch: model\.norm\.weight is \[33\].*needs \[32\]",
    "bad_config": "stored model config is invalid",
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_files_give_one_clear_error(tmp_path, model, tokenizer, kind):
    path = tmp_path / f"{kind}.pt"
    _make_broken(kind, path, model, tokenizer)
    # header-level problems are seen by describe without the weights; describe reads any format
    header = None if kind in ("shape", "bad_config") else \
        "not a diyapp JSON export" if kind == "json" else BROKEN[kind]
    assert_one_line_error(load_model_binary, path, BROKEN[kind], header)


def test_strict_false_loads_what_matches(tmp_path, model, tokenizer):
    path = tmp_path / "m.pt"
    save_model_binary(path, model, tokenizer)
    _rewrite(path, lambda p: (p["model"].update({"model.norm.weight": torch.ones(7), "extra.weight": torch.ones(2)}),
                              p["model"].pop("model.layers.1.mlp.down_proj.weight")))
    loaded = load_model_binary(path, strict=False)
    assert loaded.mismatched_keys == [("model.norm.weight", (7,), (32,))]
    assert loaded.unexpected_keys == ["extra.weight"]
    assert loaded.missing_keys == ["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(loaded.model.model.layers[0].self_attn.qkv_proj.weight,
                       model.model.layers[0].self_attn.qkv_proj.weight)


# --- atomic writes -------------------------------------------------------------------------------

def _save_a_bigger_model_and_pause(mode, path, tokenizer, ready_fd) -> None:
    """In a forked child: save a bigger model over ``path`` and stop partway, with half of the
    bytes on disk ("mid-write") or every byte written before the rename ("before-rename"), say so
    on ``ready_fd`` and wait to be killed."""
    model = DIYForCausalLM(DIYConfig(vocab_size=tokenizer.vocab_size, num_layers=4, hidden_size=256, num_heads=4,
                                     max_seq_len=64))

    def pause(note: bytes) -> None:
        os.write(ready_fd, note + b"\n")
        time.sleep(120)

    if mode == "mid-write":
        real_save = torch.save

        def half_save(obj, f):
            import io
            buf = io.BytesIO()
            real_save(obj, buf)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            pause(b"HALF")
        torch.save = half_save
    else:
        os.fsync = lambda fd: pause(b"SYNC")
    save_model_binary(path, model, tokenizer)


@pytest.mark.parametrize("mode", ["mid-write", "before-rename"])
def test_a_save_killed_midway_leaves_the_previous_file(tmp_path, model, tokenizer, mode):
    path = tmp_path / "model_final.pt"
    save_model_binary(path, model, tokenizer, metadata={"stage": "pretrain"})
    ready, ready_w = os.pipe()
    pid = os.fork()  # a process of its own that SIGKILL ends, without the start-up of a new Python
    if pid == 0:
        try:
            os.close(ready)
            _save_a_bigger_model_and_pause(mode, path, tokenizer, ready_w)
        finally:
            os._exit(1)
    os.close(ready_w)
    try:
        readable, _, _ = select.select([ready], [], [], 120)
        assert readable, "the saving process never reached the write"
        line = os.read(ready, 100).decode().strip()
        assert line in ("HALF", "SYNC"), f"the saving process ended before the write ({line!r})"
        temps = [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
        assert len(temps) == 1 and os.path.getsize(tmp_path / temps[0]) > 0
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(ready)
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    loaded = load_model_binary(path)  # the old model, complete
    assert_same_model(model, loaded.model)
    # The leftover temporary file is not offered as a checkpoint.
    infos = list_checkpoints([tmp_path])
    assert [i.name for i in infos] == ["model_final.pt"] and infos[0].error is None


# --- discovery -----------------------------------------------------------------------------------

def test_list_checkpoints_reports_every_file_quickly(tmp_path, model, tokenizer):
    from diyapp.json_export import save_model_json

    ckpt, exports = tmp_path / "checkpoints", tmp_path / "exports"
    save_model_binary(ckpt / "model_final.pt", model, tokenizer, train_state={"step": 12, "pos": [3, 4]},
                      metadata={"stage": "chat", "steps": 12, "train_loss": 1.5})
    for i in range(30):
        shutil.copy(ckpt / "model_final.pt", ckpt / f"copy_{i:02d}.pt")
    save_model_json(exports / "model_final.json", model, tokenizer, metadata={"stage": "pretrain"})
    (ckpt / "broken.pt").write_bytes(b"PK\x03\x04 not really")
    (exports / "other.json").write_text('{"hello": "world"}')
    (exports / "notes.txt").write_text("ignored")
    (ckpt / ".model_final.pt.abc123.tmp").write_bytes(b"partial")

    start = time.perf_counter()
    infos = list_checkpoints([ckpt, exports, tmp_path / "missing"])
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, elapsed
    by_name = {i.name: i for i in infos}
    assert len(infos) == 34 and "notes.txt" not in by_name and not any(n.endswith(".tmp") for n in by_name)
    pt = by_name["model_final.pt"]
    assert (pt.format, pt.stage, pt.steps, pt.last_loss, pt.has_train_state, pt.error) == \
        ("pt", "chat", 12, 1.5, True, None)
    assert pt.parameters == model.num_parameters() and pt.size_bytes == (ckpt / "model_final.pt").stat().st_size
    js = by_name["model_final.json"]
    assert (js.format, js.stage, js.has_train_state, js.error) == ("json", "pretrain", False, None)
    assert "truncated" in by_name["broken.pt"].error
    assert "not a diyapp JSON export" in by_name["other.json"].error


def test_listing_does_not_import_torch(tmp_path, model, tokenizer):
    save_model_binary(tmp_path / "a.pt", model, tokenizer)
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from diyapp.checkpoint import list_checkpoints
        [info] = list_checkpoints([{str(tmp_path)!r}])
        assert info.error is None and info.parameters == {model.num_parameters()}, info
        print("torch" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_default_paths():
    from diyapp.checkpoint import DEFAULT_BINARY_PATH, PRETRAINED_BINARY_PATH

    assert str(DEFAULT_BINARY_PATH) == os.path.join("checkpoints", "model_final.pt")
    assert str(PRETRAINED_BINARY_PATH) == os.path.join("checkpoints", "model_pretrained.pt")


def test_saving_a_compiled_or_wrapped_model_saves_the_model(tmp_path, model, tokenizer):
    wrapper = torch.nn.Module()
    wrapper._orig_mod = model  # what torch.compile's wrapper exposes
    save_model_binary(tmp_path / "m.pt", wrapper, tokenizer)
    assert_same_model(model, load_model_binary(tmp_path / "m.pt").model)


def test_config_dataclass_round_trip_is_unchanged(tmp_path, tokenizer):
    model = make_model(tokenizer, rope_theta=500.0, rms_norm_eps=1e-6)
    save_model_binary(tmp_path / "m.pt", model, tokenizer)
    assert dataclasses.asdict(load_model_binary(tmp_path / "m.pt").config) == dataclasses.asdict(model.config)


def test_persistence_example_saves_loads_and_continues(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("model_persistence", REPO / "examples" / "model_persistence.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    path = str(tmp_path / "example.pt")
    threads = torch.get_num_threads()
    try:
        assert example.main(["save", "--sample", "--steps", "2", "--path", path]) == 0
        assert example.main(["load", "--path", path, "--prompt", "你好"]) == 0
        assert example.main(["continue", "--path", path, "--steps", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "saved" in out and "model:" in out and "continuing from step 2 of" in out
    assert describe_checkpoint(path)["metadata"]["steps"] == 4

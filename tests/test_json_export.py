"""The JSON export: bit-exact round trip, layout, non-finite refusal, errors, and the NumPy reader."""

from __future__ import annotations

import importlib.util
import json
import math

import orjson
import pytest
import torch

from diyapp import DIYConfig, DIYForCausalLM, DIYTokenizer
from diyapp.checkpoint import CheckpointError, describe_checkpoint, load_checkpoint
from diyapp.json_export import load_model_json, save_model_json

from .conftest import (REPO, SMALL_TEXTS as TEXTS, assert_one_line_error, assert_write_failing_midway_changes_nothing,
                       make_model, write_unreadable)



@pytest.fixture
def model(tokenizer):
    return make_model(tokenizer)


@pytest.fixture(scope="module")
def reader():
    """examples/json_forward_numpy.py, imported from its path (it is not part of the package)."""
    spec = importlib.util.spec_from_file_location("json_forward_numpy", REPO / "examples" / "json_forward_numpy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bits(t):
    return t.detach().contiguous().view(torch.int32)


def ids_for(model, n=20, seed=3):
    return torch.randint(0, model.config.vocab_size, (2, n), generator=torch.Generator().manual_seed(seed))


def test_round_trip_is_bit_exact(tmp_path, model, tokenizer):
    path = save_model_json(tmp_path / "m.json", model, tokenizer, metadata={"stage": "chat", "steps": 7})
    loaded = load_model_json(path)
    assert loaded.format == "json" and not loaded.model.training
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight  # re-tied
    for name, value in model.state_dict().items():
        assert torch.equal(bits(value), bits(loaded.model.state_dict()[name])), name
    with torch.no_grad():
        assert torch.equal(model(ids_for(model)), loaded.model(ids_for(model)))
    assert loaded.config == model.config and loaded.train_state is None
    assert loaded.tokenizer.encode("秋天的树叶") == tokenizer.encode("秋天的树叶")
    assert loaded.metadata["stage"] == "chat" and loaded.metadata["steps"] == 7
    assert loaded.metadata["parameters"] == model.num_parameters()


def test_extreme_float32_values_read_back_bit_exact(tmp_path, tokenizer):
    model = make_model(tokenizer, tie_word_embeddings=False)
    weight = model.lm_head.weight
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        raw = torch.randint(-2**31, 2**31 - 1, (weight.numel(),), generator=gen, dtype=torch.int64)
        values = raw.to(torch.int32).view(torch.float32)
        values[~torch.isfinite(values)] = 1.5  # every finite bit pattern is fair game
        special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1.1754944e-38, 3.4028235e38, -3.4028235e38,
                                0.1, 1 / 3, 16777217.0, 1e-7, 123456.789])
        values[: len(special)] = special
        weight.copy_(values.view_as(weight))
    save_model_json(tmp_path / "m.json", model, tokenizer)
    loaded = load_model_json(tmp_path / "m.json").model
    assert torch.equal(bits(loaded.lm_head.weight), bits(weight))
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight


def test_layout_header_first_and_readable_vocabulary(tmp_path, model, tokenizer):
    path = save_model_json(tmp_path / "m.json", model, tokenizer)
    lines = path.read_bytes().splitlines()
    header = orjson.loads(lines[0].removesuffix(b",") + b"}")
    assert list(header)[:4] == ["format", "format_version", "config", "metadata"]
    assert header["format"] == "diyapp-json" and header["format_version"] == 1
    assert header["config"] == model.config.to_dict()
    doc = json.loads(path.read_text(encoding="utf-8"))  # the standard library reads it whole too
    assert doc["vocab"] == [tokenizer.token_text(i) for i in range(tokenizer.vocab_size)]
    assert any("\u4e00" <= c <= "\u9fff" for v in doc["vocab"] for c in v)  # whole characters read as text
    assert "<0xE4>" in doc["vocab"]  # a lone byte of a character reads as its hex
    assert doc["tied_weights"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "lm_head.weight" not in doc["tensors"]  # stored once
    spec = doc["tensors"]["model.layers.0.self_attn.qkv_proj.weight"]
    assert spec["dtype"] == "float32" and spec["shape"] == [96, 32] and len(spec["data"]) == 96 * 32
    assert "train_state" not in doc and doc["has_train_state"] is False
    assert DIYTokenizer.from_str(json.dumps(doc["tokenizer"])).encode("夏天") == tokenizer.encode("夏天")


def test_describe_reads_only_the_header(tmp_path, model, tokenizer):
    path = save_model_json(tmp_path / "m.json", model, tokenizer, metadata={"stage": "pretrain"})
    d = describe_checkpoint(path)
    assert d["format"] == "json" and d["metadata"]["stage"] == "pretrain" and d["config"]["hidden_size"] == 32
    # Garbage after line 1 does not matter to describe (it never parses the body) but does to load.
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + b"this is not json at all\n}\n")
    assert describe_checkpoint(path)["metadata"]["stage"] == "pretrain"
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model_json(path)


def test_train_state_only_when_asked_and_exact(tmp_path, model, tokenizer):
    from .test_checkpoint import adamw_state, assert_same

    state = adamw_state(model)
    state["odd"] = {"$not_a_tag": 1, 3: "int key", "nan": float("nan"), "big": 2**70, "neg": -float("inf")}
    plain = save_model_json(tmp_path / "plain.json", model, tokenizer, train_state=state)
    assert load_model_json(plain).train_state is None and not describe_checkpoint(plain)["has_train_state"]
    full = save_model_json(tmp_path / "full.json", model, tokenizer, include_optimizer=True, train_state=state)
    loaded = load_model_json(full)
    assert describe_checkpoint(full)["has_train_state"] is True
    assert_same(state, loaded.train_state)
    assert loaded.train_state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    # The restored state drives a real optimizer.
    opt = torch.optim.AdamW(loaded.model.parameters(), lr=1e-3)
    opt.load_state_dict(loaded.train_state["optimizer"])
    with pytest.raises(ValueError, match="needs the train_state"):
        save_model_json(tmp_path / "x.json", model, tokenizer, include_optimizer=True)


def test_a_muon_training_state_resumes_from_json_exactly(tmp_path, model, tokenizer):
    from diyapp.data import Corpus
    from diyapp.train import TrainConfig, Trainer

    corpus = Corpus(texts=[], dialogues=[[{"role": "user", "content": t[:6]}, {"role": "assistant", "content": t}]
                                         for t in TEXTS], sources=["test"])
    config = TrainConfig(epochs=2, batch_size=2, val_fraction=0.0, optimizer="muon", precision="fp32", seed=1)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    Trainer(model, tokenizer, "chat", corpus, config).run()
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model.load_state_dict(start)
    first = Trainer(model, tokenizer, "chat", corpus, config)
    first.run(steps=first.total_steps // 2)
    path = save_model_json(tmp_path / "run.json", model, tokenizer, include_optimizer=True,
                           train_state=first.state_dict())
    loaded = load_model_json(path)
    assert loaded.train_state["muon"]["state"]  # Muon's momentum buffers travel in the JSON
    second = Trainer(loaded.model, tokenizer, "chat", corpus, config)
    second.load_state_dict(loaded.train_state)
    second.run()
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value, expected[name]), name


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path, model, tokenizer, bad):
    path = tmp_path / "m.json"
    save_model_json(path, model, tokenizer)
    before = path.read_bytes()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 4] = bad
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.weight holds 1 non-finite"):
        save_model_json(path, model, tokenizer)
    assert path.read_bytes() == before  # the previous export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_pretty_printed_export_still_loads(tmp_path, model, tokenizer):
    path = save_model_json(tmp_path / "m.json", model, tokenizer)
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps(json.loads(path.read_text(encoding="utf-8")), indent=2, ensure_ascii=False),
                      encoding="utf-8")
    assert describe_checkpoint(pretty)["config"] == model.config.to_dict()
    loaded = load_checkpoint(pretty)
    with torch.no_grad():
        assert torch.equal(model(ids_for(model)), loaded.model(ids_for(model)))


def _broken(kind, path, model, tokenizer):
    if write_unreadable(kind, path):
        return
    if kind == "foreign":
        path.write_text('{"weights": [1, 2, 3]}')
        return
    if kind == "pt":
        from diyapp.checkpoint import save_model_binary

        save_model_binary(path, model, tokenizer)
        return
    save_model_json(path, model, tokenizer)
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) * 2 // 3])
    elif kind == "newer":
        path.write_bytes(data.replace(b'"format_version":1,', b'"format_version":7,', 1))
    elif kind == "shape":
        first, rest = data.split(b"\n", 1)
        path.write_bytes(first.replace(b'"hidden_size":32', b'"hidden_size":64', 1) + b"\n" + rest)
    elif kind == "short_tensor":
        path.write_bytes(data.replace(b'"shape":[32],', b'"shape":[33],', 1))


BROKEN = {
    "missing": "not found",
    "empty": "empty",
    "random": "not a diyapp JSON export",
    "foreign": "not a diyapp JSON export",
    "pt": r"\.pt checkpoint.*load_model_binary",
    "truncated": "truncated",
    "newer": "newer diyapp.*version 7",
    "shape": "shape mismatch",
    "short_tensor": "should hold 33 values",
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_exports_give_one_clear_error(tmp_path, model, tokenizer, kind):
    path = tmp_path / f"{kind}.json"
    _broken(kind, path, model, tokenizer)
    header_level = kind in ("missing", "empty", "random", "foreign", "truncated", "newer")
    assert_one_line_error(load_model_json, path, BROKEN[kind], BROKEN[kind] if header_level else None)


def test_strict_false_loads_what_fits(tmp_path, model, tokenizer):
    path = save_model_json(tmp_path / "m.json", model, tokenizer)
    data = path.read_bytes()
    first, rest = data.split(b"\n", 1)
    path.write_bytes(first.replace(b'"num_layers":2', b'"num_layers":3', 1) + b"\n" + rest)
    loaded = load_model_json(path, strict=False)
    assert "model.layers.2.self_attn.qkv_proj.weight" in loaded.missing_keys
    assert torch.equal(loaded.model.model.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight)


# --- the NumPy-only reader -----------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [{}, {"num_kv_heads": 2, "tie_word_embeddings": False, "rope_theta": 500.0}])
def test_numpy_reader_matches_the_model(tmp_path, tokenizer, reader, overrides):
    model = make_model(tokenizer, **overrides)
    with torch.no_grad():  # move the norms away from 1 so that they matter
        for layer in model.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    path = save_model_json(tmp_path / "m.json", model, tokenizer)
    export = reader.load_export(str(path))
    ids = tokenizer.encode_chat([{"role": "user", "content": "冬天下雪了吗？"}], add_generation_prompt=True)[0]
    ids = (ids + tokenizer.encode("Hello world, it's a test " * 3))[: model.config.max_seq_len]
    with torch.no_grad():
        expected = model(torch.tensor([ids]))[0].numpy()
    got = reader.next_token_logits(export, ids)
    assert got.shape == expected.shape
    assert abs(got - expected).max() < 1e-4


def test_numpy_reader_tokenizes_like_the_tokenizer(tmp_path, model, tokenizer, reader, capsys):
    path = save_model_json(tmp_path / "m.json", model, tokenizer)
    export = reader.load_export(str(path))
    bpe = reader.BPE(export["tokenizer"])
    for text in TEXTS[:5] + ["  two  spaces\n\nnew lines\t tab", "it's don't 'quoted' 12345", "<|im_end|>x", "😀！"]:
        assert bpe.encode(text) == tokenizer.encode(text), text
    chat = tokenizer.encode_chat([{"role": "user", "content": " 你好 "}], add_generation_prompt=True)[0]
    assert bpe.encode_chat_prompt(" 你好 ") == chat
    assert reader.main([str(path), "夏天", "--chat", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("prompt ids:") and len(out.strip().splitlines()) == 4
    top = int(out.splitlines()[1].split()[0])
    with torch.no_grad():
        assert top == int(model(torch.tensor([chat[:0] + bpe.encode_chat_prompt("夏天")]))[0, -1].argmax())


def test_non_finite_training_numbers_leave_no_nan_in_the_file(tmp_path, model, tokenizer):
    """JSON has no NaN or Infinity. Where the training record holds them (a diverged loss in the
    metadata, an infinite best loss in the train state) the file is still strict JSON, and they
    read back as they were (tagged, in the train state) or as null (in the metadata)."""
    inf = float("inf")
    state = {"best_val_loss": inf, "last_loss": float("nan"), "loss_history": [[1, -inf], [2, 1.5]]}
    path = save_model_json(tmp_path / "m.json", model, tokenizer, include_optimizer=True, train_state=state,
                           metadata={"train_loss": float("nan"), "val_loss": inf})

    def refuse(word):
        raise ValueError(f"{word} is not JSON")

    doc = json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)  # NaN, Infinity refused
    assert doc["metadata"]["train_loss"] is None and doc["metadata"]["val_loss"] is None
    loaded = load_model_json(path).train_state
    assert loaded["best_val_loss"] == inf and math.isnan(loaded["last_loss"])
    assert loaded["loss_history"] == [[1, -inf], [2, 1.5]]


def test_a_write_that_fails_midway_leaves_the_previous_export(tmp_path, model, tokenizer, monkeypatch):
    """The disk fills up halfway through writing a new export over an old one: the old file is
    still there, byte for byte, and no partial file is left beside it or in its place."""
    path = save_model_json(tmp_path / "m.json", model, tokenizer, metadata={"stage": "pretrain"})
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(2)
    assert_write_failing_midway_changes_nothing(
        monkeypatch, tmp_path, "m.json", lambda: save_model_json(path, model, tokenizer, metadata={"stage": "chat"}))
    assert load_model_json(path).metadata["stage"] == "pretrain"

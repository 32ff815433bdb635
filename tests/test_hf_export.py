"""export_hf: transformers loads the folder offline and computes the same logits; tokenizer and chat
template agree with ours; our own loader reads it back."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from diyapp import DIYConfig, DIYForCausalLM, DIYTokenizer
from diyapp.checkpoint import CheckpointError, describe_checkpoint, list_checkpoints, load_checkpoint
from diyapp.hf_export import export_hf, load_model_hf

from .conftest import assert_write_failing_midway_changes_nothing

transformers = pytest.importorskip("transformers")

TEXTS = ["春天来了，花儿开了，小草也绿了。", "夏天很热，我们常去河边游泳。", "秋天的树叶变黄，慢慢落下来。",
         "冬天下雪，孩子们在外面堆雪人。", "Hello world, it's a small test."] * 3
DIALOGUE = [{"role": "system", "content": "你是一个助手。"}, {"role": "user", "content": " 夏天热吗？ "},
            {"role": "assistant", "content": "夏天很热。"}]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tokenizer():
    return DIYTokenizer.train(TEXTS, vocab_size=300)


def make_model(tokenizer, **overrides):
    torch.manual_seed(0)
    fields = dict(vocab_size=tokenizer.vocab_size, num_layers=2, hidden_size=32, num_heads=4, max_seq_len=48,
                  dropout=0.0)
    model = DIYForCausalLM(DIYConfig(**{**fields, **overrides})).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
    return model


#: How close the logits of transformers must come to ours. Float32 rounding puts them about 1e-7
#: apart; a mistake in the attention (rotary pairing, head order, grouped key/value heads) moves them
#: by what the attention pattern contributes, which the test first checks is over 1000x this.
LOGIT_TOLERANCE = 1e-5


def sharp_attention(model):
    """Query/key/value weights scaled 8x: at initialisation the attention is nearly uniform, so
    where each position looks (and the rotary positions that steer it) barely reaches the logits."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.qkv_proj.weight.mul_(8.0)
    return model


@pytest.mark.parametrize("overrides", [{}, {"num_kv_heads": 2, "tie_word_embeddings": False, "rope_theta": 500.0,
                                            "rms_norm_eps": 1e-6}])
def test_transformers_loads_it_with_the_same_logits(tmp_path, tokenizer, overrides):
    model = sharp_attention(make_model(tokenizer, **overrides))
    ids = torch.randint(0, model.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(1))
    # The attention pattern matters here: other rotary frequencies on the same weights move the
    # logits by far more than the tolerance (at random initialisation, by about 1e-4).
    shifted = DIYForCausalLM(dataclasses.replace(model.config, rope_theta=model.config.rope_theta * 4)).eval()
    shifted.load_state_dict(model.state_dict())
    with torch.no_grad():
        ours = model(ids)
        assert (ours - shifted(ids)).abs().max() > 1000 * LOGIT_TOLERANCE
    folder = export_hf(tmp_path / "hf", model, tokenizer, metadata={"stage": "chat"})
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - ours).abs().max() < LOGIT_TOLERANCE


def test_tokenizer_and_chat_template_agree(tmp_path, tokenizer):
    folder = export_hf(tmp_path / "hf", make_model(tokenizer), tokenizer)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    for text in TEXTS[:5] + ["  two  spaces\nand 123"]:
        ids = hf_tok.encode(text, add_special_tokens=False)
        assert ids == tokenizer.encode(text)
        assert hf_tok.decode(ids) == text
    assert hf_tok.eos_token_id == tokenizer.eos_token_id and hf_tok.pad_token_id == tokenizer.pad_token_id
    templated = hf_tok.apply_chat_template(DIALOGUE, tokenize=True)
    templated = templated["input_ids"] if isinstance(templated, dict) or hasattr(templated, "keys") else templated
    assert list(templated) == tokenizer.encode_chat(DIALOGUE)[0]
    prompt = hf_tok.apply_chat_template(DIALOGUE[:2], add_generation_prompt=True, tokenize=False)
    assert prompt == tokenizer.render_chat(DIALOGUE[:2], add_generation_prompt=True)
    config = json.loads((folder / "generation_config.json").read_text())
    assert tokenizer.im_end_id in config["eos_token_id"]  # generation stops at the end of a turn


def test_our_loader_reads_it_back_exactly(tmp_path, tokenizer):
    model = make_model(tokenizer)
    folder = export_hf(tmp_path / "exports" / "hf", model, tokenizer, metadata={"stage": "chat", "steps": 5})
    loaded = load_model_hf(folder)
    assert loaded.format == "hf" and loaded.config == model.config
    for name, value in model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[name]), name
    assert loaded.tokenizer.encode("夏天") == tokenizer.encode("夏天")
    assert load_checkpoint(folder).metadata["steps"] == 5
    d = describe_checkpoint(folder)
    assert d["format"] == "hf" and d["metadata"]["stage"] == "chat"
    [info] = list_checkpoints([tmp_path / "exports"])
    assert (info.format, info.stage, info.steps, info.error) == ("hf", "chat", 5, None)
    assert info.parameters == model.num_parameters()


def test_non_finite_weights_are_refused(tmp_path, tokenizer):
    model = make_model(tokenizer)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    with pytest.raises(CheckpointError, match=r"model.norm.weight holds \d+ non-finite"):
        export_hf(tmp_path / "hf", model, tokenizer)


def test_a_write_that_fails_midway_leaves_the_previous_weights(tmp_path, tokenizer, monkeypatch):
    """The disk fills up halfway through the weights of a new export over an old folder: every old
    file is still there byte for byte, and no partial file is left beside them or in their place.
    (Each file is replaced whole; the folder as a whole is not swapped at once.)"""
    model = make_model(tokenizer)
    folder = export_hf(tmp_path / "hf", model, tokenizer, metadata={"stage": "pretrain"})
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(2)
    assert_write_failing_midway_changes_nothing(
        monkeypatch, folder, "model.safetensors", lambda: export_hf(folder, model, tokenizer, metadata={"stage": "chat"}))
    assert load_model_hf(folder).metadata["stage"] == "pretrain"


def test_truncated_weights_are_reported(tmp_path, tokenizer):
    folder = export_hf(tmp_path / "hf", make_model(tokenizer), tokenizer)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model_hf(folder)
    [info] = list_checkpoints([tmp_path])
    assert "truncated" in info.error

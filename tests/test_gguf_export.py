"""The GGUF export: header and tensors read back with gguf's own reader; the Modelfile; refusals;
and, when llama-cpp-python is installed, llama.cpp itself tokenises, continues and scores like us."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
import torch

from diyapp.formats.common import CheckpointError
from diyapp.formats.gguf import export_gguf, modelfile_path, modelfile_text, rotary_to_interleaved

from .conftest import SHARED, make_model
from .helpers.llama_cpp_check import greedy_llama, open_llama

gguf = pytest.importorskip("gguf", reason="the gguf package is a dependency: pip install -e .")

WHEEL = SHARED / "wheels" / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"
try:
    import llama_cpp
except ImportError:  # pragma: no cover - depends on the machine
    llama_cpp = None
needs_llama = pytest.mark.skipif(
    llama_cpp is None, reason=f"llama_cpp is not installed, so llama.cpp itself is not checked; install the "
                              f"prebuilt wheel: pip install {WHEEL} (.ci/run does when ../shared has it)")

#: Mixed text: Chinese, English, digits, emoji, whitespace runs, punctuation, literal special strings.
MIXED = [
    "春眠不觉晓，处处闻啼鸟。", "Hello world, it's a test: I'm 23 and you'll be 42.", "1234567890 3.14159 1e-5",
    "emoji 😀🎉👍🏽 and 中文😀混合", "tabs\tand  two   three    spaces", "trailing spaces   ", "   leading",
    "a\nb\n\nc \n d", "\n\n\n", " ", "", "x" * 50, "What's up?!... (yes) [no] {maybe} <tag> #1 @you",
    "<|im_start|>user\n你好<|im_end|>", "<|endoftext|> literal", "Ünïcödé café naïve", "한국어 日本語 العربية",
    "ｆｕｌｌｗｉｄｔｈ１２３", "mixed123abc４５６def", "  \t\n  \r\n", "don't DON'T 'quoted' 'll 've 're",
]

#: Texts for the test tokenizer: Chinese verse, English, digits, emoji.
TRAIN_TEXTS = ["春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。", "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
               "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。", "Hello world, it's a small test: 123 + 456 = 579.",
               "The quick brown fox jumps over the lazy dog 😀 again and again.",
               "你好！我是一个小模型。 I am a small model, 我会说中文 and English."] * 4
CHATS = [[{"role": "user", "content": "你好"}],
         [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "你是谁？"},
          {"role": "assistant", "content": "我是一个小模型。"}, {"role": "user", "content": "Hello!"}]]
PROMPTS = ["春眠不觉晓", "Hello world", "床前明月光，疑是"]


@pytest.fixture(scope="module")
def tok():
    from diyapp.tokenizer import DIYTokenizer

    # Trained on the mixed texts too, so that merges span digit runs, spaces and punctuation: a
    # pre-tokenizer in llama.cpp that splits any of them differently then gives other ids.
    return DIYTokenizer.train(TRAIN_TEXTS + MIXED * 3, vocab_size=600)


def _trained(tok, steps=120, **overrides):
    """A tiny model trained a little on TRAIN_TEXTS, so its next-token choices are clear-cut
    (a random model's near-ties would make greedy comparisons meaningless)."""
    model = make_model(tok, max_seq_len=160, hidden_size=64, **overrides).train()
    ids = []
    for text in TRAIN_TEXTS[:6]:
        ids += tok.encode(text) + [tok.eos_token_id]
    for chat in CHATS:
        ids += tok.encode_chat(chat)[0]
    data = torch.tensor(ids[: len(ids) // 64 * 64]).view(-1, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(steps):
        loss = model.compute_loss(data)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def gqa_untied(tok):
    """Grouped-query attention (4 query heads, 2 key/value heads) and a separate output head."""
    return _trained(tok, num_heads=4, num_kv_heads=2, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tied(tok):
    return _trained(tok, num_heads=4)


def _field(reader, key):
    f = reader.get_field(key)
    assert f is not None, f"missing key {key}"
    return f.contents()


# --- the file itself, read back with gguf's reader ----------------------------------------------

def test_header_and_tensors_read_back(tmp_path, tok, gqa_untied):
    path = export_gguf(tmp_path / "m.gguf", gqa_untied, tok, metadata={"stage": "pretrain"})
    cfg = gqa_untied.config
    r = gguf.GGUFReader(path)
    expect = {"general.architecture": "llama", "llama.context_length": cfg.max_seq_len,
              "llama.embedding_length": cfg.hidden_size, "llama.block_count": cfg.num_layers,
              "llama.feed_forward_length": cfg.intermediate_size, "llama.attention.head_count": 4,
              "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": cfg.head_dim,
              "llama.vocab_size": cfg.vocab_size, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
              "tokenizer.ggml.eos_token_id": 0, "tokenizer.ggml.eot_token_id": 2,
              "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.add_bos_token": False,
              "tokenizer.chat_template": tok.chat_template}
    for key, value in expect.items():
        assert _field(r, key) == value, key
    assert _field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.rms_norm_eps)
    assert _field(r, "llama.rope.freq_base") == pytest.approx(cfg.rope_theta)
    tokens = _field(r, "tokenizer.ggml.tokens")
    types = _field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == cfg.vocab_size
    assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert types[:3] == [gguf.TokenType.CONTROL] * 3 and set(types[3:]) == {gguf.TokenType.NORMAL}
    assert len(_field(r, "tokenizer.ggml.merges")) == len(__import__("json").loads(tok.to_str())["model"]["merges"])
    assert '"stage": "pretrain"' in _field(r, "diyapp.metadata")

    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == 2 + 1 + 9 * cfg.num_layers  # embeddings, final norm, output head, 9 per block
    hd, d = cfg.head_dim, cfg.hidden_size
    assert list(tensors["blk.0.attn_q.weight"].shape) == [d, 4 * hd]  # ggml order: columns first
    assert list(tensors["blk.0.attn_k.weight"].shape) == [d, 2 * hd]
    assert list(tensors["blk.1.ffn_gate.weight"].shape) == [d, cfg.intermediate_size]
    layer = gqa_untied.model.layers[1]
    qkv = layer.self_attn.qkv_proj.weight.detach()
    v = qkv[(4 + 2) * hd:]
    assert np.array_equal(tensors["blk.1.attn_v.weight"].data, v.numpy())
    assert np.array_equal(tensors["output.weight"].data, gqa_untied.lm_head.weight.detach().numpy())
    up = layer.mlp.gate_up_proj.weight.detach().chunk(2)[1]
    assert np.array_equal(tensors["blk.1.ffn_up.weight"].data, up.numpy())
    # q rows of head 0: our first half (rows 0..hd/2) lands on the even rows, the second on the odd.
    q = tensors["blk.1.attn_q.weight"].data
    assert np.array_equal(q[0:hd:2], qkv[: hd // 2].numpy()) and np.array_equal(q[1:hd:2], qkv[hd // 2:hd].numpy())


def test_tied_head_is_left_to_the_embedding(tmp_path, tok, tied):
    r = gguf.GGUFReader(export_gguf(tmp_path / "t.gguf", tied, tok))
    names = {t.name for t in r.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    assert _field(r, "llama.attention.head_count_kv") == 4


@pytest.mark.parametrize("kind, qtype, tol", [("f16", "F16", 1e-3), ("q8_0", "Q8_0", 2e-2)])
def test_smaller_types_are_close_and_keep_norms_exact(tmp_path, tok, tied, kind, qtype, tol):
    path = export_gguf(tmp_path / f"{kind}.gguf", tied, tok, gguf_type=kind)
    r = gguf.GGUFReader(path)
    tensors = {t.name: t for t in r.tensors}
    emb = tensors["token_embd.weight"]
    assert emb.tensor_type.name == qtype
    values = gguf.quants.dequantize(emb.data, emb.tensor_type).reshape(tied.config.vocab_size, -1)
    ref = tied.model.embed_tokens.weight.detach().numpy()
    assert np.abs(values - ref).max() < tol * max(1.0, np.abs(ref).max())
    norm = tensors["blk.0.attn_norm.weight"]
    assert norm.tensor_type.name == "F32"
    assert np.array_equal(norm.data, tied.model.layers[0].input_layernorm.weight.detach().numpy())
    assert path.stat().st_size < export_gguf(tmp_path / "f32.gguf", tied, tok).stat().st_size


def test_rotary_reordering_turns_half_rotation_into_pair_rotation():
    """Rotating q by halves (ours) then reordering equals reordering then rotating pairs (llama.cpp)."""
    torch.manual_seed(0)
    heads, hd, pos = 3, 8, 5
    w = torch.randn(heads * hd, 4)
    freqs = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    ang = pos * freqs
    x = w.view(heads, hd, 4)
    a, b = x[:, : hd // 2], x[:, hd // 2:]
    c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
    ours = torch.cat([a * c - b * s, b * c + a * s], dim=1).reshape(heads * hd, 4)
    y = rotary_to_interleaved(w, heads).view(heads, hd // 2, 2, 4)
    ye, yo = y[:, :, 0], y[:, :, 1]
    theirs = torch.stack([ye * c - yo * s, yo * c + ye * s], dim=2).reshape(heads * hd, 4)
    assert torch.allclose(rotary_to_interleaved(ours, heads), theirs, atol=1e-6)


def test_modelfile_names_the_file_chatml_stop_and_our_sampling(tmp_path, tok, tied):
    from diyapp.generation import GenerationConfig

    path = export_gguf(tmp_path / "chat.gguf", tied, tok)
    text = modelfile_path(path).read_text(encoding="utf-8")
    lines = text.splitlines()
    export_id = gguf.GGUFReader(path).get_field("diyapp.export_id").contents()
    assert re.fullmatch(rf"# diyapp export {export_id}: chat\.gguf, {path.stat().st_size} bytes, sha256 "
                        rf"{hashlib.sha256(path.read_bytes()).hexdigest()}", lines[-1])
    assert modelfile_path(path).name == "chat.Modelfile" and text == modelfile_text(path, tied.config, lines[-1])
    g = GenerationConfig()
    assert lines[0] == "FROM ./chat.gguf"
    assert 'PARAMETER stop "<|im_end|>"' in lines
    assert f"PARAMETER temperature {g.temperature}" in lines and f"PARAMETER top_k {g.top_k}" in lines
    assert f"PARAMETER top_p {g.top_p}" in lines and f"PARAMETER num_ctx {tied.config.max_seq_len}" in lines
    assert "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>" in text and text.count('"""') == 2


# --- refusals --------------------------------------------------------------------------------------

def test_non_finite_weights_are_refused_and_nothing_is_written(tmp_path, tok):
    model = make_model(tok)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    target = tmp_path / "bad.gguf"
    with pytest.raises(CheckpointError, match=r"blk\.1\.ffn_down\.weight holds 1 non-finite") as err:
        export_gguf(target, model, tok)
    assert "\n" not in str(err.value) and str(err.value).startswith(str(target))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["folder", "under_a_file", "bad_type"])
def test_bad_targets_are_refused_in_one_line(tmp_path, tok, where):
    model = make_model(tok)
    (tmp_path / "plain.txt").write_text("x")
    target = {"folder": tmp_path, "under_a_file": tmp_path / "plain.txt" / "m.gguf",
              "bad_type": tmp_path / "m.gguf"}[where]
    with pytest.raises(CheckpointError) as err:
        export_gguf(target, model, tok, gguf_type="q4" if where == "bad_type" else "f32")
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.txt"]


def test_cli_export_gguf_and_its_errors(tmp_path, tok, tied, capsys):
    from diyapp.cli import main
    from diyapp.formats.pt import save_model_binary

    src = save_model_binary(tmp_path / "m.pt", tied, tok)
    assert main(["export", "--model", str(src), "--gguf", str(tmp_path / "out"), "--gguf-type", "f16"]) == 0
    assert (tmp_path / "out.gguf").is_file() and (tmp_path / "out.Modelfile").is_file()
    assert gguf.GGUFReader(tmp_path / "out.gguf").get_field("general.file_type").contents() == 1  # mostly f16
    capsys.readouterr()
    assert main(["export", "--model", str(tmp_path / "missing.pt"), "--gguf", str(tmp_path / "x.gguf")]) == 1
    err = capsys.readouterr().err.strip()
    assert "missing.pt" in err and "\n" not in err and "Traceback" not in err
    assert main(["export", "--model", str(src), "--gguf", str(tmp_path / "out.gguf")]) == 1  # exists, no --force
    assert "--force" in capsys.readouterr().err


# --- llama.cpp itself ------------------------------------------------------------------------------

def _llama(path, n_ctx=160):
    return open_llama(path, n_ctx, threads=1)  # one thread, like the rest of the suite (conftest.py)


def _greedy_ours(model, prompt, n):
    from diyapp.generation import generate

    return generate(model, prompt, max_new_tokens=n, temperature=0.0, precision="fp32")[0, len(prompt):].tolist()


@needs_llama
def test_llama_cpp_tokenises_like_us(tmp_path, tok, tied):
    llm = _llama(export_gguf(tmp_path / "m.gguf", tied, tok))
    for text in MIXED:
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == tok.encode(text), repr(text)
        assert llm.detokenize(tok.encode(text)) == text.encode("utf-8"), repr(text)
    for chat in CHATS:  # with special-token parsing on, the rendered chat gives our chat ids
        rendered = tok.render_chat(chat, add_generation_prompt=True)
        assert llm.tokenize(rendered.encode("utf-8"), add_bos=False, special=True) == \
            tok.encode_chat(chat, add_generation_prompt=True)[0]


@needs_llama
@pytest.mark.parametrize("which", ["gqa_untied", "tied"])
def test_llama_cpp_continues_and_scores_like_us(tmp_path, tok, which, request):
    model = request.getfixturevalue(which)
    llm = _llama(export_gguf(tmp_path / f"{which}.gguf", model, tok))
    prompts = [tok.encode(p) for p in PROMPTS] + [tok.encode_chat(c, add_generation_prompt=True)[0] for c in CHATS]
    for prompt in prompts:
        assert greedy_llama(llm, prompt, 64) == _greedy_ours(model, prompt, 64), tok.decode(prompt)
    prompt = prompts[-1]
    llm.reset()
    llm.eval(prompt)
    theirs = np.array(llm.scores[: len(prompt)])
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0].numpy()
    assert np.abs(theirs - ours).max() < 1e-3


@needs_llama
def test_llama_cpp_runs_the_q8_0_export(tmp_path, tok, gqa_untied):
    llm = _llama(export_gguf(tmp_path / "q.gguf", gqa_untied, tok, gguf_type="q8_0"))
    prompt = tok.encode(PROMPTS[0])
    llm.eval(prompt)
    theirs = np.array(llm.scores[: len(prompt)])
    with torch.no_grad():
        ours = gqa_untied(torch.tensor([prompt]))[0].numpy()
    assert np.abs(theirs - ours).max() < 0.1 * np.abs(ours).max()

"""The training engine: masks, learning, exact resume, Ctrl-C, NaN stop, early stopping (DDP: test_distributed.py)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from diyapp import DIYConfig, DIYForCausalLM
from diyapp.data import Corpus
from diyapp.train import (TrainConfig, Trainer, TrainingError, build_tokenizer, encode_dialogues, lr_at,
                          new_model, pack_texts)

from .conftest import REPO

TEXTS = [
    "春天来了，花儿开了，小草也绿了。", "夏天很热，我们常去河边游泳。", "秋天的树叶变黄，慢慢落下来。",
    "冬天下雪，孩子们在外面堆雪人。", "太阳从东边升起，从西边落下。", "月亮绕着地球转，一个月转一圈。",
    "水在零度会结冰，在一百度会沸腾。", "多喝水，早点睡，身体才会好。", "读书可以让人知道更多的事情。",
    "朋友之间要互相帮助，互相理解。", "中秋节的时候，家人一起吃月饼。", "茶是中国人喜欢的饮料。",
]
DIALOGUES = [
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！很高兴见到你。"}],
    [{"role": "user", "content": "天空为什么是蓝色的？"}, {"role": "assistant", "content": "阳光里的蓝光被空气散射得最多。"}],
    [{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是小迪，一个小小的语言模型。"}],
    [{"role": "user", "content": "水在几度结冰？"}, {"role": "assistant", "content": "在标准大气压下是零度。"},
     {"role": "user", "content": "那沸腾呢？"}, {"role": "assistant", "content": "一百度的时候会沸腾。"}],
    [{"role": "user", "content": "怎样睡得好？"}, {"role": "assistant", "content": "按时睡觉，睡前少看手机。"}],
    [{"role": "user", "content": "谢谢你"}, {"role": "assistant", "content": "不客气，随时可以问我。"}],
]


@pytest.fixture(scope="module")
def corpus():
    return Corpus(texts=TEXTS, dialogues=DIALOGUES, sources=["test"])


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return build_tokenizer(corpus, vocab_size=400)


def tiny(tokenizer, dropout=0.1):
    torch.manual_seed(0)
    config = DIYConfig(vocab_size=400, num_layers=2, hidden_size=32, num_heads=4, max_seq_len=48, dropout=dropout)
    return new_model(config, tokenizer)


def fast(**overrides):
    base = dict(epochs=3, batch_size=4, lr=3e-3, val_fraction=0.2, seed=3, precision="fp32")
    return TrainConfig(**{**base, **overrides})


def params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_new_model_uses_the_real_vocabulary(tokenizer):
    model = tiny(tokenizer)
    assert model.config.vocab_size == tokenizer.vocab_size <= 400


def test_chat_loss_counts_only_the_assistant(tokenizer):
    rows = encode_dialogues(tokenizer, DIALOGUES[:1], 48)
    ids, mask = rows.ids[0], rows.masks[0]
    counted = tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert counted == "你好！很高兴见到你。<|im_end|>"
    model = tiny(tokenizer, dropout=0.0).eval()
    ids_t, mask_t = torch.tensor([ids]), torch.tensor([mask])
    logits = model(ids_t)
    keep = mask_t[0, 1:].bool()
    manual = torch.nn.functional.cross_entropy(logits[0, :-1][keep], ids_t[0, 1:][keep])
    assert torch.allclose(model.compute_loss(ids_t, loss_mask=mask_t), manual, atol=1e-6)
    # Changing the user's words' targets changes nothing the loss sees except through context.
    assert keep.sum() < len(ids) - 1


def test_learning_rate_warms_up_then_decays():
    lrs = [lr_at(s, 100, 1e-3, 1e-4, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)

def test_pretraining_rows_are_the_documents_packed(tokenizer):
    stream = [i for text in TEXTS for i in tokenizer.encode(text) + [tokenizer.eos_token_id]]
    for width in (16, len(stream) - 1, len(stream)):                      # a last row of 1 token is dropped
        rows = pack_texts(tokenizer, TEXTS, width).ids
        expected = [r for r in (stream[k:k + width] for k in range(0, len(stream), width)) if len(r) >= 2]
        assert len(rows) == len(expected) and list(rows) == expected and rows[-1] == expected[-1]


def test_a_long_single_line_corpus_is_read_and_tokenised_without_copies(tmp_path):
    """A 2 MB one-line corpus: reading it, learning the vocabulary and building the pretraining
    rows may grow the peak memory by at most 40 bytes per byte of text (holding the text as
    Python lists of ids and the tokenizer library's per-byte records took about 200)."""
    import random

    rng = random.Random(0)
    alphabet = "春夏秋冬日月山水风雨花草树木天地人心我你他她们的了是在有和不这那大小多少"
    clauses = ["".join(rng.choice(alphabet) for _ in range(rng.randint(3, 9))) for _ in range(400)]
    text = "".join(rng.choice(clauses) + rng.choice("，。！？") for _ in range(120_000))
    corpus = tmp_path / "one_line.txt"
    corpus.write_text(text + "\n", encoding="utf-8")
    size = corpus.stat().st_size
    assert size > 2_000_000 and text.count("\n") == 0
    result = subprocess.run([sys.executable, str(REPO / "tests" / "helpers" / "corpus_memory.py"), str(corpus)],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)
    assert measured["rows"] > 1000
    assert measured["after"] - measured["before"] < 40 * size, measured



@pytest.mark.parametrize("stage", ["pretrain", "chat"])
def test_loss_goes_down_and_events_report_progress(tokenizer, corpus, stage):
    model = tiny(tokenizer)
    events = []
    trainer = Trainer(model, tokenizer, stage, corpus, fast(epochs=80, val_fraction=0.0), on_event=events.append)
    result = trainer.run()
    assert result.status == "completed" and result.steps == trainer.total_steps
    steps = [e for e in events if e.kind == "step"]
    assert len(steps) == trainer.total_steps
    assert steps[-1].loss < 0.6 * steps[0].loss
    assert all(e.tokens_per_s and e.tokens_per_s > 0 and e.lr > 0 for e in steps)
    assert events[0].kind == "start" and events[-1].kind == "end"


def test_loss_goes_down_on_the_bundled_data():
    from diyapp.data import bundled_corpus

    try:
        corpus = bundled_corpus()
    except Exception as exc:  # the bundled files are part of the repo; their absence is a failure
        pytest.fail(f"bundled data unreadable: {exc}")
    small = Corpus(texts=corpus.texts[:60], dialogues=corpus.dialogues[:60], sources=corpus.sources)
    tok = build_tokenizer(small, vocab_size=600)
    for stage in ("pretrain", "chat"):
        model = tiny(tok)
        trainer = Trainer(model, tok, stage, small, fast(epochs=4, batch_size=8))
        before = trainer.evaluate()
        result = trainer.run()
        assert result.val_loss < before, stage


def _save_load(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("stage, optimizer", [("pretrain", "adamw"), ("chat", "adamw"), ("chat", "muon")])
def test_resume_is_bit_exact(tokenizer, corpus, stage, optimizer):
    config = fast(epochs=10, batch_size=3, grad_accum=2, val_fraction=0.2, optimizer=optimizer)
    straight = tiny(tokenizer)
    a = Trainer(straight, tokenizer, stage, corpus, config)
    assert a.total_steps >= 6
    a.run()

    first = tiny(tokenizer)
    b = Trainer(first, tokenizer, stage, corpus, config)
    assert b.run(steps=a.total_steps // 2).status == "paused"
    weights, state = _save_load(params(first)), _save_load(b.state_dict())
    assert ("muon" in state) == (optimizer == "muon")
    torch.manual_seed(12345)  # whatever happens in between must not matter

    second = tiny(tokenizer)
    second.load_state_dict(weights)
    c = Trainer(second, tokenizer, stage, corpus, config)
    c.load_state_dict(state)
    assert c.run().status == "completed"
    for name, value in straight.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]), name


def test_ctrl_c_stops_at_a_step_boundary(tokenizer, corpus):
    model = tiny(tokenizer)
    seen = {}

    def on_event(event):
        if event.kind == "step" and event.step == 2:
            seen["weights"] = params(model)
            os.kill(os.getpid(), signal.SIGINT)

    handler_before = signal.getsignal(signal.SIGINT)
    trainer = Trainer(model, tokenizer, "pretrain", corpus, fast(epochs=20), on_event=on_event)
    result = trainer.run()
    assert result.status == "interrupted" and result.steps == 2
    assert signal.getsignal(signal.SIGINT) is handler_before
    state = trainer.state_dict()
    assert state["step"] == 2
    for name, value in params(model).items():
        assert torch.equal(value, seen["weights"][name]), name


def test_nan_loss_stops_without_touching_the_weights(tokenizer, corpus):
    model = tiny(tokenizer)
    seen = {}

    def on_event(event):
        if event.kind == "step" and event.step == 3:
            seen["weights"] = params(model)
            model.model.norm.register_forward_hook(lambda m, i, out: out * float("nan"))

    result = Trainer(model, tokenizer, "pretrain", corpus, fast(epochs=20), on_event=on_event).run()
    assert result.status == "diverged" and result.steps == 3
    assert "NaN" in result.message
    for name, value in params(model).items():
        assert torch.equal(value, seen["weights"][name]), name


def test_early_stopping_with_patience(tokenizer, corpus):
    model = tiny(tokenizer)
    config = fast(epochs=50, lr=1e-9, min_lr=0.0, eval_every=1, patience=2)
    result = Trainer(model, tokenizer, "pretrain", corpus, config).run()
    assert result.status == "early_stopped" and result.steps == 3


def test_no_data_for_a_stage_is_a_clear_error(tokenizer):
    with pytest.raises(TrainingError, match="对话微调阶段没有训练数据.* no training data for the chat stage"):
        Trainer(tiny(tokenizer), tokenizer, "chat", Corpus(texts=TEXTS, dialogues=[], sources=[]), fast())


def test_bad_train_config_is_refused():
    for bad in [dict(epochs=0), dict(lr=-1.0), dict(batch_size=0), dict(precision="fp8"), dict(val_fraction=1.0)]:
        with pytest.raises(ValueError):
            TrainConfig(**bad)


def test_bf16_autocast_trains_and_keeps_fp32_weights(tokenizer, corpus):
    model = tiny(tokenizer)
    trainer = Trainer(model, tokenizer, "chat", corpus, fast(epochs=2, precision="bf16"))
    assert trainer.amp_dtype == torch.bfloat16
    before = params(model)
    result = trainer.run()
    assert result.status == "completed" and all(p.dtype == torch.float32 for p in model.parameters())
    assert result.train_loss is not None and math.isfinite(result.train_loss)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())

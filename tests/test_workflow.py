"""The UI-free steps of the app: sizes, stage plans, training, exact resume, continue, save, export."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from diyapp import workflow as wf
from diyapp.checkpoint import list_checkpoints
from diyapp.config import ConfigError
from diyapp.data import Corpus, DataError
from diyapp.train import TrainingError

TEXTS = [
    "春天来了，花儿开了，小草也绿了。", "夏天很热，我们常去河边游泳。", "秋天的树叶变黄，慢慢落下来。",
    "冬天下雪，孩子们在外面堆雪人。", "太阳从东边升起，从西边落下。", "月亮绕着地球转，一个月转一圈。",
    "水在零度会结冰，在一百度会沸腾。", "多喝水，早点睡，身体才会好。", "读书可以让人知道更多的事情。",
    "朋友之间要互相帮助，互相理解。",
]
CHATS = [
    "用户：你好 助手：你好！很高兴见到你。", "用户：天空为什么是蓝色的？ 助手：阳光里的蓝光被空气散射得最多。",
    "用户：你是谁？ 助手：我是小迪，一个小小的语言模型。", "用户：谢谢你 助手：不客气，随时可以问我。",
    "用户：水在几度结冰？ 助手：在标准大气压下是零度。", "用户：怎样睡得好？ 助手：按时睡觉，睡前少看手机。",
]
#: The tiny model every app test trains (a few thousand parameters: seconds per stage).
TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "max_seq_len": 64, "vocab_size": 300}


def write_corpus(folder: Path, name: str = "corpus.json") -> Path:
    """A small RustGPT-Chinese style corpus: plain sentences and 用户：…助手：… exchanges."""
    path = folder / name
    path.write_text(json.dumps(TEXTS + CHATS, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path):
    return wf.load_data(write_corpus(tmp_path))


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty working directory (the app saves under ./checkpoints and ./exports)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def tiny_plans(corpus, pretrain=2, chat=3, dropout=None, **extra):
    """The tiny model's config and stage plans; ``dropout`` overrides the recipe's (which is off)."""
    config = wf.model_config("custom", **TINY)
    plans, notes = wf.plan_new(corpus, config, pretrain_epochs=pretrain, chat_epochs=chat, seed=7, batch_size=4,
                               **extra)
    if dropout is not None:
        for plan in plans:
            plan.config = dataclasses.replace(plan.config, dropout=dropout)
    return config, plans, notes


def assert_same_weights(expected, path):
    """The model saved at ``path`` has exactly (bit for bit) the weights of ``expected``."""
    got = wf.open_model(path).model.state_dict()
    for name, tensor in expected.state_dict().items():
        assert torch.equal(tensor.cpu(), got[name].cpu()), name


def resume_with_the_cli(source, target):
    """``python main.py resume`` (in this process), after scrambling the random state: an exact
    resume must restore it from the checkpoint."""
    from diyapp.cli import main

    torch.manual_seed(12345)
    assert main(["resume", "--model", str(source), "--save", str(target)]) == 0


def test_sizes_and_custom_fields():
    assert wf.model_config("default").hidden_size == 256
    large = wf.model_config("large")
    assert (large.hidden_size, large.num_layers, large.num_heads, large.max_seq_len) == (512, 8, 8, 512)
    custom = wf.model_config("custom", hidden_size=64, num_layers=None)
    assert custom.hidden_size == 64 and custom.num_layers == 2
    with pytest.raises(ConfigError):
        wf.model_config("custom", hidden_size=30, num_heads=4)
    with pytest.raises(ConfigError):
        wf.model_config("enormous")


def test_stage_config_overrides_keep_a_valid_schedule():
    cfg = wf.stage_config("chat", epochs=50, lr=1e-4)
    assert cfg.epochs == 50 and cfg.lr == 1e-4 and cfg.min_lr <= cfg.lr / 10 + 1e-12
    default = wf.stage_config("chat")
    assert default.optimizer == "muon" and cfg.muon_lr == pytest.approx(default.muon_lr * 1e-4 / default.lr)
    recipe = wf.stage_config("pretrain")
    assert recipe.epochs >= 1 and recipe.min_lr <= recipe.lr


def test_plan_new_skips_stages_without_data_or_epochs(corpus):
    config = wf.model_config("custom", **TINY)
    plans, notes = wf.plan_new(corpus, config, chat_epochs=0)
    assert [p.stage for p in plans] == ["pretrain"] and "0 epochs" in notes[0]
    texts_only = Corpus(texts=list(TEXTS), dialogues=[], sources=["x"])
    plans, notes = wf.plan_new(texts_only, config)
    assert [p.stage for p in plans] == ["pretrain"] and "no dialogues" in notes[0]
    with pytest.raises(TrainingError):
        wf.plan_new(corpus, config, pretrain_epochs=0, chat_epochs=0)


def test_train_both_stages_save_both_formats_and_list(corpus, in_tmp):
    config, plans, _ = tiny_plans(corpus, dropout=0.2)  # dropout draws random numbers: resume must restore them
    bench = wf.start_new(corpus, config, seed=1)
    seen_events, after = [], []
    results = wf.run_plans(bench, plans, corpus, on_event=seen_events.append,
                           after_stage=lambda b, r: after.append((r.stage, wf.save(b, wf.DEFAULT_PRETRAINED, "pt"))))
    assert [r.status for r in results] == ["completed", "completed"]
    assert [stage for stage, _ in after] == ["pretrain"]
    assert bench.stage == "chat" and bench.steps == sum(r.steps for r in results)
    assert {e.kind for e in seen_events} >= {"start", "step", "end"}
    assert [s for s, _ in bench.loss_history()] == list(range(1, bench.steps + 1))

    pt = wf.save(bench, "checkpoints/model_final", "pt")
    js = wf.save(bench, wf.DEFAULT_JSON, "json")
    assert pt.path == Path("checkpoints/model_final.pt") and pt.size_bytes > 0 and js.path.exists()
    infos = {i.name: i for i in list_checkpoints(wf.MODEL_FOLDERS)}
    assert set(infos) == {"model_final.pt", "model_pretrained.pt", "model_final.json"}
    assert not any(i.error for i in infos.values())
    assert wf.info_resumable(infos["model_pretrained.pt"])      # chat tuning still to come
    assert not wf.info_resumable(infos["model_final.pt"])       # everything done
    assert not wf.info_resumable(infos["model_final.json"])     # exports hold no training state
    assert infos["model_pretrained.pt"].metadata["next_stages"] == ["chat"]
    assert infos["model_final.pt"].steps == bench.steps

    loaded = wf.bench_from_loaded(wf.open_model(js.path), js.path)
    assert loaded.stage == "chat" and loaded.steps == bench.steps
    assert loaded.corpus_sources == list(corpus.sources)
    for name, tensor in bench.model.state_dict().items():
        assert torch.allclose(tensor.cpu(), loaded.model.state_dict()[name], atol=1e-6)

    # Resuming the pretraining checkpoint runs the pending chat stage exactly as the straight run
    # did (same dropout masks), through the workflow and through the CLI.
    torch.manual_seed(12345)
    resumed, corpus2, plans2 = wf.prepare_resume(wf.open_model(wf.DEFAULT_PRETRAINED), wf.DEFAULT_PRETRAINED)
    assert [(p.stage, p.state is None, p.rng is not None, p.config.dropout) for p in plans2] == \
        [("chat", True, True, 0.2)]
    wf.run_plans(resumed, plans2, corpus2)
    assert resumed.steps == bench.steps
    assert_same_weights(resumed.model, pt.path)
    resume_with_the_cli(wf.DEFAULT_PRETRAINED, "checkpoints/cli_resumed.pt")
    assert_same_weights(bench.model, "checkpoints/cli_resumed.pt")


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_interrupted_run_resumes_exactly_through_a_saved_file(corpus, in_tmp):
    """Stop mid-pretraining, save, load, resume (workflow and CLI): the weights are bit for bit an
    uninterrupted run's, dropout on, so the dropout masks after the resume must be the same too."""
    config, plans, _ = tiny_plans(corpus, pretrain=3, chat=2, dropout=0.2)
    straight = wf.start_new(corpus, config, seed=3)
    wf.run_plans(straight, plans, corpus)

    config, plans, _ = tiny_plans(corpus, pretrain=3, chat=2, dropout=0.2)
    bench = wf.start_new(corpus, config, seed=3)
    trainers = []

    def stop_at_two(event):
        if event.kind == "step" and event.stage == "pretrain" and event.step == 2:
            trainers[-1].request_stop()

    results = wf.run_plans(bench, plans, corpus, on_event=stop_at_two, on_trainer=trainers.append)
    assert [r.status for r in results] == ["interrupted"] and results[0].steps == 2
    state = wf.train_state(bench)
    assert wf.is_resumable(state) and state["pending_stages"][0]["stage"] == "chat"
    saved = wf.save(bench, "checkpoints/partial.pt", "pt")

    torch.manual_seed(12345)  # whatever ran in between must not matter
    resumed, corpus2, plans2 = wf.prepare_resume(wf.open_model(saved.path), saved.path)
    assert [p.stage for p in plans2] == ["pretrain", "chat"] and plans2[0].state is not None
    results2 = wf.run_plans(resumed, plans2, corpus2)
    assert [r.status for r in results2] == ["completed", "completed"]
    assert resumed.steps == straight.steps
    for name, tensor in _params(straight.model).items():
        assert torch.equal(tensor, resumed.model.state_dict()[name].cpu()), name
    resume_with_the_cli(saved.path, "checkpoints/cli_resumed.pt")
    assert_same_weights(straight.model, "checkpoints/cli_resumed.pt")
    assert not wf.is_resumable(wf.train_state(resumed))
    with pytest.raises(ValueError, match="no unfinished training"):
        wf.prepare_resume(wf.open_model(wf.save(resumed, "checkpoints/done.pt", "pt").path))


def test_continue_training_a_loaded_model(corpus, in_tmp):
    config, plans, _ = tiny_plans(corpus, pretrain=1, chat=1)
    bench = wf.start_new(corpus, config)
    wf.run_plans(bench, plans, corpus)
    path = wf.save(bench, "checkpoints/m.pt", "pt").path
    loaded = wf.bench_from_loaded(wf.open_model(path), path)
    plan = wf.continue_plan(loaded, epochs=2, lr=1e-3)
    assert plan.stage == "chat" and plan.config.epochs == 2 and plan.config.lr == 1e-3
    assert wf.continue_plan(loaded, stage="pretrain").config.epochs == wf.CONTINUE_EPOCHS
    data = wf.corpus_for(loaded)
    assert data is not None and data.dialogues == corpus.dialogues
    before = loaded.steps
    [result] = wf.run_plans(loaded, [plan], data)
    assert result.status == "completed" and loaded.steps == before + result.steps


def test_corpus_from_sources(corpus, tmp_path):
    from diyapp.data import bundled_corpus

    again = wf.corpus_from_sources(corpus.sources + [f"{tmp_path}/odd.json (skipped: a JSON object)"])
    assert again.texts == corpus.texts and again.dialogues == corpus.dialogues
    try:
        bundled = bundled_corpus()
    except DataError:
        bundled = None
    if bundled is not None:
        assert wf.corpus_from_sources(bundled.sources).sources == bundled.sources
    with pytest.raises(DataError, match="no longer there"):
        wf.corpus_from_sources([str(tmp_path / "gone.json")])
    with pytest.raises(DataError):
        wf.corpus_from_sources([])


def test_paths_and_number_parsing(tmp_path):
    assert wf.with_suffix("a/b", "pt") == Path("a/b.pt")
    assert wf.with_suffix("a/b.pt", "pt") == Path("a/b.pt")
    assert wf.default_path("json") == Path("exports/model_final.json")
    assert wf.path_problem(tmp_path / "new" / "m.pt", "pt") is None
    assert "folder" in wf.path_problem(tmp_path, "pt")
    assert ".json" in wf.path_problem(tmp_path / "m.txt", "json")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "not a folder" in wf.path_problem(blocker / "m.pt", "pt")
    assert wf.path_problem("  ", "pt")
    parse_epochs = wf.int_parser(1, wf.MAX_EPOCHS, "epochs")
    assert parse_epochs(" 7 ") == 7
    assert wf.parse_lr("1e-4") == 1e-4
    for bad in ("abc", "0", "-3", "1.5", "1000000000"):
        with pytest.raises(ValueError):
            parse_epochs(bad)
    for bad in ("abc", "0", "-1e-3", "nan", "inf", "5"):
        with pytest.raises(ValueError):
            wf.parse_lr(bad)
    assert wf.human_size(1536) == "1.5 KB" and wf.human_count(1_234_567) == "1.23M"


def test_export_every_format(corpus, in_tmp):
    config, plans, _ = tiny_plans(corpus, pretrain=1, chat=0)
    bench = wf.start_new(corpus, config)
    wf.run_plans(bench, plans, corpus)
    saved = wf.export(bench, json_path="out/m.json", pt_path="out/m.pt", hf_dir="out/hf")
    assert [s.format for s in saved] == ["pt", "json", "hf"]
    assert (in_tmp / "out/hf/config.json").is_file() and all(s.size_bytes > 0 for s in saved)
    hf = wf.open_model("out/hf")
    assert hf.config.hidden_size == TINY["hidden_size"]
    pt = wf.open_model("out/m.pt")
    for key in ("stage", "steps", "train_loss"):  # every format carries the same training record
        assert hf.metadata[key] == pt.metadata[key] is not None, key

"""The guided session (``python main.py``): pick or train a model, watch it train, save it, chat.

Everything that is not a question or a picture is a call into :mod:`diyapp.workflow`.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .. import workflow as wf
from .completion_loop import run_session
from .prompts import Option, Prompter, epochs_parser, int_parser
from .views import (banner, checkpoint_table, loss_chart, model_summary, plan_table, results_table, stage_label,
                    TrainingView)

if TYPE_CHECKING:
    from ..data import Corpus
    from ..train import TrainResult

def _preload() -> threading.Thread:
    """Import PyTorch and the engine in the background while the person reads the first menu."""
    def work() -> None:
        try:
            from .. import chat, train  # noqa: F401
            from ..formats import catalog  # noqa: F401
            import torch._dynamo  # noqa: F401  (the optimizer imports it on first use: ~1.5 s)
        except Exception:  # noqa: BLE001 - the real import later reports any problem properly
            pass
    thread = threading.Thread(target=work, name="diyapp-preload")
    thread.start()
    return thread


class App:
    """The interactive flow. ``console`` and ``prompter`` are injectable for tests."""

    def __init__(self, console: Console | None = None, prompter: Prompter | None = None,
                 preload: bool = True) -> None:
        self.console = console or Console(highlight=False)
        self.prompter = prompter or Prompter()
        self.preload = preload

    # -- small helpers ------------------------------------------------------------------------------

    def say(self, text: str, style: str | None = None) -> None:
        """Print ``text`` as plain text (never markup)."""
        self.console.print(Text(text, style=style or ""))

    def error(self, err: BaseException | str) -> None:
        self.say(f"✗ {err}", "red")

    # -- entry ---------------------------------------------------------------------------------------

    def run(self) -> int:
        """The whole session; returns the exit code (0, or 130 after Ctrl-C)."""
        if self.preload:
            _preload()
        banner(self.console)
        try:
            return self._main()
        except KeyboardInterrupt:
            self.say("\n已退出 bye (Ctrl-C)", "dim")
            return 130
        except EOFError:
            self.say("\n已退出 bye", "dim")
            return 0
        except Exception as err:  # noqa: BLE001 - one line, never a traceback (DIYAPP_DEBUG=1 shows it)
            if os.environ.get("DIYAPP_DEBUG"):
                raise
            self.error(f"意外错误 unexpected error: {type(err).__name__}: {' '.join(str(err).split())}")
            return 1

    def _main(self) -> int:
        from ..formats.catalog import list_checkpoints

        while True:
            infos = list_checkpoints(wf.MODEL_FOLDERS)
            if infos:
                self.console.print(checkpoint_table(infos))
                action = self._menu(infos)
            else:
                self.say("还没有找到保存的模型（checkpoints/、exports/ 为空），先训练一个新模型吧。"
                         " No saved models found: let's train a new one.", "yellow")
                action = "new"
            if action == "quit":
                self.say("再见 bye", "dim")
                return 0
            try:
                bench = {"load": self._load, "resume": self._resume, "new": self._new}[action](infos)
            except wf.known_errors() as err:
                self.error(err)
                continue
            if bench is not None:
                return run_session(bench, self.console, self.prompter,
                                   on_save=lambda: self.save_flow(bench, ask_first=False))

    def _menu(self, infos: list[Any]) -> str:
        options = [Option("加载模型 load a model", "load")]
        if any(wf.info_resumable(i) for i in infos):
            options.append(Option("继续未完成的训练 resume training", "resume"))
        options += [Option("训练新模型 train a new model", "new"), Option("退出 quit", "quit")]
        return self.prompter.select("要做什么？ What would you like to do?", options, default="load")

    def _pick(self, message: str, infos: list[Any]) -> Any:
        options = [Option(f"{i.name}  ({i.format}, {stage_label(i.stage)}, {i.steps or 0} 步 steps)", i)
                   for i in infos]
        options.append(Option("返回 back", None))
        return self.prompter.select(message, options)

    # -- load / resume / new ---------------------------------------------------------------------

    def _open(self, info: Any) -> Any:
        """The loaded file (a failure goes up to the menu loop, which shows it)."""
        with self.console.status(f"正在加载 loading {info.path} …"):
            return wf.open_model(info.path)

    def _load(self, infos: list[Any]) -> wf.Workbench | None:
        readable = [i for i in infos if not i.error and i.format != "gguf"]  # (GGUF: an export only)
        if not readable:
            self.error("没有可以读取的模型 no readable model")
            return None
        info = self._pick("加载哪个模型？ Which model?", readable)
        if info is None:
            return None
        bench = wf.bench_from_loaded(self._open(info), info.path)
        self.console.print(model_summary(bench.summary(), f"模型概况 {info.name}"))
        if self.prompter.confirm("继续训练这个模型吗？ Continue training it?", default=False):
            epochs = self.prompter.ask("训练轮数 epochs", epochs_parser(), default=wf.CONTINUE_EPOCHS)
            lr = self.prompter.ask("学习率 learning rate", wf.parse_lr, default=f"{wf.CONTINUE_LR:g}")
            corpus = wf.corpus_for(bench)
            if corpus is None:
                self.say("找不到这个模型当初的训练数据，请选择数据。 The original training data is not "
                         "available; choose the data.", "yellow")
                corpus = self._ask_data()
            else:
                self.say(f"训练数据 data: {', '.join(corpus.sources)}", "dim")
            plan = wf.continue_plan(bench, epochs=epochs, lr=lr)
            self._train(bench, [plan], corpus)
        else:
            self.save_flow(bench, question="要另存一份吗（例如换一种格式）？ Save a copy (e.g. in another format)?",
                           default=False)
        return bench

    def _resume(self, infos: list[Any]) -> wf.Workbench | None:
        candidates = [i for i in infos if wf.info_resumable(i)]
        info = self._pick("从哪个检查点继续？ Resume which checkpoint?", candidates)
        if info is None:
            return None
        bench, corpus, plans = wf.prepare_resume(self._open(info), info.path)
        self.console.print(model_summary(bench.summary(), f"模型概况 {info.name}"))
        first = plans[0]
        if first.state is not None:
            total = first.state.get("scheduler", {}).get("total_steps")
            self.say(f"从{stage_label(first.stage)}第 {first.state.get('step')}/{total} 步继续 "
                     f"resuming at step {first.state.get('step')}/{total}")
        later = [stage_label(p.stage) for p in plans if p.state is None]
        if later:
            self.say("之后 then: " + " → ".join(later))
        self._train(bench, plans, corpus)
        return bench

    def _new(self, _infos: list[Any]) -> wf.Workbench | None:
        config = self._ask_size()
        corpus = self._ask_data()
        if config == wf.model_config("default"):
            adapted = wf.model_for_corpus(config, corpus)
            if adapted != config:
                self.say(f"语料很大，默认模型改为 {adapted.num_layers} 层。 A large corpus: the default model gets "
                         f"{adapted.num_layers} layers.", "dim")
            config = adapted
        recipe = Table(title="推荐的训练设置 recommended settings", title_justify="left", header_style="bold")
        for column in ("阶段 stage", "轮数 epochs", "学习率 lr", "批大小 batch", "优化器 optimizer"):
            recipe.add_column(column)
        from ..recipe import text_chars

        defaults = {stage: wf.stage_config(stage, config, corpus_chars=text_chars(corpus.texts))
                    for stage in wf.STAGES}
        for stage, cfg in defaults.items():
            recipe.add_row(stage_label(stage), str(cfg.epochs), f"{cfg.lr:g}", str(cfg.batch_size),
                           f"Muon ({cfg.muon_lr:g}) + AdamW" if cfg.optimizer == "muon" else "AdamW")
        self.console.print(recipe)
        overrides: dict[str, Any] = {}
        from ..plan import DEFAULT_BUDGET, parse_budget

        budget_s = self.prompter.ask("训练最多用多久？ How long may training take? (例如 e.g. 90s, 10m, 1h; "
                                     "none = 不限 no limit)", parse_budget, default=DEFAULT_BUDGET)
        started = time.monotonic()
        if not self.prompter.confirm("使用推荐的训练设置吗？ Use these settings?", default=True):
            overrides["pretrain_epochs"] = self.prompter.ask(
                "预训练轮数 pretraining epochs", epochs_parser(), default=defaults["pretrain"].epochs)
            overrides["chat_epochs"] = self.prompter.ask(
                "对话微调轮数 chat-tuning epochs", epochs_parser(), default=defaults["chat"].epochs)
            overrides["lr"] = self.prompter.ask("学习率 learning rate", wf.parse_lr,
                                                default=f"{defaults['pretrain'].lr:g}")
        try:
            plans, notes = wf.plan_new(corpus, config, **overrides)
            for note in notes:
                self.say(note, "yellow")
            with self.console.status("正在构建词表和模型 building the vocabulary and the model …"):
                bench = wf.start_new(corpus, config)
            self.console.print(model_summary(bench.summary(), "新模型 new model"))
            with self.console.status("正在测量这台机器的速度 timing a few warm-up steps on this machine …"):
                budget = wf.plan_budget(bench, plans, corpus, budget_s, started=started)
        except KeyboardInterrupt:
            self.say("已取消 cancelled", "yellow")
            return None
        self.console.print(plan_table(budget))
        if not self._train(bench, plans, corpus, budget):
            return None
        return bench

    def _ask_size(self) -> Any:
        from ..config import ConfigError, DIYConfig, PRESETS

        size = self.prompter.select("模型大小 model size", [
            Option("默认 default（256 宽 · 2 层 · 4 头 · 上下文 128）", "default"),
            Option("大 large（512 宽 · 8 层 · 8 头 · 上下文 512，约 29M 参数，训练慢很多）", "large"),
            Option("自定义 custom", "custom"),
        ], default="default")
        if size != "custom":
            return wf.model_config(size)
        base = DIYConfig(**PRESETS["default"])
        while True:
            hidden = self.prompter.ask("宽度 hidden_size", int_parser(8, 8192),
                                       default=base.hidden_size)
            layers = self.prompter.ask("层数 layers", int_parser(1, 128), default=base.num_layers)
            heads = self.prompter.ask("注意力头数 heads", _heads_parser(hidden), default=_default_heads(hidden))
            seq = self.prompter.ask("上下文长度 max_seq_len", int_parser(8, 32768),
                                    default=base.max_seq_len)
            vocab = self.prompter.ask("词表大小 vocab_size", int_parser(259, 1_000_000),
                                      default=base.vocab_size)
            try:
                return wf.model_config("custom", hidden_size=hidden, num_layers=layers, num_heads=heads,
                                       max_seq_len=seq, vocab_size=vocab)
            except ConfigError as err:
                self.error(err)

    def _ask_data(self) -> "Corpus":
        from ..data import DataError

        while True:
            source = self.prompter.select("训练数据 training data", [
                Option("自带数据 bundled data (data/)", "bundled"),
                Option("我自己的语料 my own corpus (.json / .jsonl / .txt / folder)", "path"),
            ], default="bundled")
            path = None
            if source == "path":
                path = self.prompter.ask("语料路径 corpus path", _existing_path)
            try:
                with self.console.status("正在读取数据 reading the data …"):
                    corpus = wf.load_data(path)
            except (DataError, OSError) as err:
                self.error(err)
                continue
            self.say(f"数据 data: {len(corpus.texts)} 篇文本 documents, {len(corpus.dialogues)} 段对话 dialogues")
            return corpus

    # -- training ------------------------------------------------------------------------------------

    def _train(self, bench: wf.Workbench, plans: list[wf.StagePlan], corpus: "Corpus",
               budget: Any = None) -> bool:
        """Run the stages with a live view (with samples from fixed prompts while pretraining), then
        show the results and offer to save. False when nothing was trained."""
        view = TrainingView(self.console)
        before = len(bench.results)
        self.say("训练中，按 Ctrl-C 可在当前步结束后停止。 Training; Ctrl-C stops after the current step.", "dim")
        try:
            wf.run_plans(bench, plans, corpus, on_event=view, after_stage=self._after_stage, budget=budget,
                         on_samples=view.samples)
        except KeyboardInterrupt:
            view.close()
            self.say("已取消 cancelled (Ctrl-C)", "yellow")
        except wf.known_errors() as err:
            view.close()
            self.error(err)
        finally:
            view.close()
        new = bench.results[before:]
        if not new:
            return False
        last = new[-1]
        if last.status == "interrupted":
            self.say(f"已在第 {last.steps}/{last.total_steps} 步停止 (Ctrl-C)。学到的都还在：保存为 .pt 后可以之后"
                     f"继续训练。 Stopped; nothing learned is lost, and a .pt save can be resumed later.", "yellow")
        elif last.status == "diverged":
            self.error(last.message)
        elif last.status == "early_stopped":
            self.say(f"提前停止 early stop: {last.message}", "yellow")
        self.console.print(results_table(new))
        for line in wf.quality_lines(bench):
            self.say(line, "yellow" if "too small" in line else None)
        chart = loss_chart(bench.loss_history(), width=self.console.width - 2)
        if chart:
            self.console.out(chart, highlight=False)
        self.save_flow(bench)
        return True

    def _after_stage(self, bench: wf.Workbench, result: "TrainResult") -> None:
        self.say(f"{stage_label(result.stage)}完成 done: loss {result.train_loss:.4f}"
                 if result.train_loss is not None else f"{stage_label(result.stage)}完成 done", "green")
        stem = "model_pretrained" if result.stage == "pretrain" else f"model_{result.stage}"
        try:
            if self.prompter.confirm("保存预训练检查点吗？ Save a pretraining checkpoint?"
                                     if result.stage == "pretrain" else "保存这个阶段的检查点吗？ Save a checkpoint?",
                                     default=True):
                self._save_one(bench, "pt", wf.default_path("pt", stem))
        except (KeyboardInterrupt, EOFError):
            self.say("未保存 not saved", "yellow")

    # -- saving --------------------------------------------------------------------------------------

    def save_flow(self, bench: wf.Workbench, question: str = "保存当前模型吗？ Save the current model?",
                  default: bool = True, ask_first: bool = True) -> list[wf.SavedFile]:
        """Ask whether and how to save, then save; Ctrl-C or Ctrl-D here cancels only the save."""
        saved: list[wf.SavedFile] = []
        try:
            if ask_first and not self.prompter.confirm(question, default=default):
                return saved
            fmt = self.prompter.select("保存格式 format", [
                Option(".pt 二进制（推荐，可继续训练） binary, recommended, resumable", "pt"),
                Option("JSON 导出（其他工具可读） export, readable by other tools", "json"),
                Option("两者都要 both", "both"),
                Option("GGUF（llama.cpp / Ollama 可运行） runs in llama.cpp and Ollama", "gguf"),
            ], default="pt")
            gguf_type = "f32"
            if fmt == "gguf":
                gguf_type = self.prompter.select("GGUF 权重类型 weight type", [
                    Option("f32 精确，与本程序同样的输出 exact, the same tokens as here", "f32"),
                    Option("f16 一半大小 half the size", "f16"),
                    Option("q8_0 约四分之一大小 about a quarter of the size", "q8_0"),
                ], default="f32")
            for one in (("pt", "json") if fmt == "both" else (fmt,)):
                saved.append(self._save_one(bench, one, wf.default_path(one), gguf_type=gguf_type))
        except (KeyboardInterrupt, EOFError):
            self.say("已取消保存 save cancelled", "yellow")
        return saved

    def _save_one(self, bench: wf.Workbench, fmt: str, default: Path, gguf_type: str = "f32") -> wf.SavedFile:
        from ..formats.common import CheckpointError

        while True:
            text = self.prompter.ask(f"保存到 save to ({fmt})", _save_path_parser(fmt), default=str(default))
            path = wf.with_suffix(text, fmt)
            if path.exists() and not self.prompter.confirm(f"{path} 已存在，覆盖吗？ It exists; overwrite?",
                                                           default=False):
                continue
            try:
                with self.console.status(f"正在保存 saving {path} …"):
                    saved = wf.save(bench, path, fmt, **({"gguf_type": gguf_type} if fmt == "gguf" else {}))
            except (CheckpointError, OSError, TypeError) as err:
                self.error(f"保存失败 could not save: {err}")
                continue
            self.say(f"✓ 已保存到 saved to {saved.path}（{wf.human_size(saved.size_bytes)}）", "green")
            return saved


def _save_path_parser(fmt: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        problem = wf.path_problem(text, fmt)
        if problem:
            raise ValueError(problem)
        return text.strip()
    return parse


def _existing_path(text: str) -> str:
    path = Path(text.strip()).expanduser()
    if not text.strip():
        raise ValueError("请输入路径 please give a path")
    if not path.exists():
        raise ValueError(f"找不到 not found: {path}")
    return str(path)


def _default_heads(hidden: int) -> int:
    for heads in (4, 8, 2, 1):
        if hidden % heads == 0 and (hidden // heads) % 2 == 0:
            return heads
    return 1


def _heads_parser(hidden: int) -> Callable[[str], int]:
    base = int_parser(1, 1024)

    def parse(text: str) -> int:
        heads = base(text)
        if hidden % heads:
            raise ValueError(f"宽度 {hidden} 必须能被头数 {heads} 整除 hidden_size {hidden} must be divisible by "
                             f"{heads} heads")
        if (hidden // heads) % 2:
            raise ValueError(f"每个头的宽度 {hidden}/{heads} 必须是偶数 the head size {hidden}/{heads} must be even")
        return heads
    return parse


def run_app() -> int:
    """Entry point for ``python main.py`` on a terminal."""
    return App().run()

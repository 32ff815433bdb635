"""Rich rendering: banner, checkpoint table, model summary, training progress, results, loss chart.

Model text never goes through here as markup: callers print it with ``markup=False`` or as Text.
"""

from __future__ import annotations

import datetime as _dt
import sys
import time
from typing import IO, TYPE_CHECKING, Any, Iterable, Sequence

from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ..workflow import STAGE_NAMES, human_count, human_size

if TYPE_CHECKING:
    from ..completion import Completion
    from ..plan import BudgetPlan
    from ..train import TrainEvent, TrainResult

STAGE_NAMES_SHORT = {"pretrain": "预训练", "chat": "对话微调"}
STATUS_NAMES = {"completed": "完成 completed", "early_stopped": "提前停止 early stop",
                "interrupted": "已中断 interrupted", "diverged": "发散 diverged", "paused": "暂停 paused"}


def make_console(stderr: bool = False) -> Console:
    """The app's console (stdout, or stderr for progress in scripts)."""
    return Console(stderr=stderr, highlight=False)


def banner(console: Console) -> None:
    """The start-up banner."""
    title = Text("diyapp · 从零训练你自己的中文小模型", style="bold cyan")
    body = Text("训练 train · 对话 chat · 保存 save · 续训 resume · 导出 export", style="dim")
    console.print(Panel(Text.assemble(title, "\n", body), expand=False, border_style="cyan"))


def fmt_duration(seconds: float | None) -> str:
    """``75`` -> ``"1:15"``; None -> ``"-"``."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def fmt_loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _fmt_modified(value: Any) -> str:
    if isinstance(value, (int, float)):
        value = _dt.datetime.fromtimestamp(value)
    if isinstance(value, _dt.datetime):
        return value.strftime("%m-%d %H:%M" if value.year == _dt.datetime.now().year else "%Y-%m-%d")
    return str(value) if value else "-"


def stage_label(stage: str | None) -> str:
    return STAGE_NAMES.get(stage or "", stage or "-")


def checkpoint_table(infos: Sequence[Any]) -> Group:
    """The saved models found (``CheckpointInfo`` values) as a table; unreadable files are marked
    in it and their reasons listed under it."""
    from ..workflow import info_resumable

    resumable = any(info_resumable(info) for info in infos)
    table = Table(title="已保存的模型 saved models", title_justify="left", header_style="bold", box=box.SIMPLE_HEAD,
                  padding=(0, 1), collapse_padding=True, show_edge=False, caption_justify="left",
                  caption="⟳ = 可以继续未完成的训练 (resumable)" if resumable else None)
    table.add_column("#", justify="right")
    table.add_column("名称 name", no_wrap=True)
    for column in ("格式", "大小", "修改时间", "参数", "阶段", "步数", "损失"):
        table.add_column(column, no_wrap=column in ("大小", "修改时间", "阶段"))
    notes: list[Text] = []
    for i, info in enumerate(infos, 1):
        if getattr(info, "error", None):
            table.add_row(str(i), Text(str(info.name)), info.format or "-", human_size(info.size_bytes or 0),
                          _fmt_modified(info.modified), Text("无法读取", style="red"), Text("✗", style="red"))
            notes.append(Text(f"✗ {info.name}: 无法读取 unreadable: {info.error}", style="red"))
            continue
        stage = STAGE_NAMES_SHORT.get(info.stage or "", info.stage or "-")
        if info_resumable(info):
            stage += " ⟳"
        table.add_row(str(i), Text(str(info.name)), info.format or "-", human_size(info.size_bytes or 0),
                      _fmt_modified(info.modified), human_count(info.parameters), stage,
                      "-" if info.steps is None else str(info.steps), fmt_loss(info.last_loss))
    return Group(table, *notes)


def model_summary(summary: dict[str, Any], title: str = "模型概况 model") -> Table:
    """Vocabulary, parameters, shape, stage and steps of a model."""
    table = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("词表大小 vocab", str(summary.get("vocab_size"))),
        ("参数量 parameters", f"{human_count(summary.get('parameters'))} ({summary.get('parameters'):,})"
         if summary.get("parameters") is not None else "-"),
        ("层数 layers / 宽度 hidden / 头数 heads",
         f"{summary.get('layers')} / {summary.get('hidden_size')} / {summary.get('heads')}"),
        ("上下文长度 max_seq_len", str(summary.get("max_seq_len"))),
        ("阶段 stage", stage_label(summary.get("stage"))),
        ("步数 steps", str(summary.get("steps") or 0)),
    ]
    if summary.get("train_loss") is not None:
        rows.append(("训练损失 loss", fmt_loss(summary.get("train_loss"))))
    if summary.get("val_loss") is not None:
        rows.append(("验证损失 val loss", fmt_loss(summary.get("val_loss"))))
    for key, value in rows:
        table.add_row(key, Text(value))
    return table


def results_table(results: Iterable["TrainResult"]) -> Table:
    """One row per stage trained: status, steps, losses (validation also in bits per character),
    time and speed."""
    table = Table(title="训练结果 results", title_justify="left", header_style="bold")
    for column in ("阶段 stage", "状态 status", "步数 steps", "训练损失 loss", "验证损失 val", "bits/char",
                   "用时 time", "tokens/s"):
        table.add_column(column)
    for r in results:
        speed = f"{r.tokens / r.elapsed_s:,.0f}" if r.elapsed_s > 0 and r.tokens else "-"
        table.add_row(stage_label(r.stage), STATUS_NAMES.get(r.status, r.status), f"{r.steps}/{r.total_steps}",
                      fmt_loss(r.train_loss), fmt_loss(r.val_loss), "-" if r.val_bpc is None else f"{r.val_bpc:.3f}",
                      fmt_duration(r.elapsed_s), speed)
    return table


def plan_lines(plan: "BudgetPlan") -> list[str]:
    """The training plan as plain lines: each stage's steps, batch, epochs and time, then the ETA."""
    from ..plan import format_duration

    lines = []
    head = (f"时间预算 time budget {format_duration(plan.budget_s)}" if plan.budget_s is not None
            else "没有时间预算 no time budget: the recipe as it is")
    lines.append(f"训练计划 plan ({head}; 准备 preparation {format_duration(plan.spent_s)}):")
    for a in plan.stages:
        lines.append(f"  {stage_label(a.stage)}: {a.steps} steps × batch {a.batch_size} ({a.epochs:.2f} epochs), "
                     f"{a.step_s * 1000:.0f} ms/step measured"
                     + (" on 1 thread (faster on this busy machine)" if a.threads == 1 else "")
                     + f", ≈ {format_duration(a.seconds)}"
                     + (f" (the recipe's {a.recipe_steps} steps would not fit)" if a.shortened else ""))
    lines.append(f"  预计用时 ETA {format_duration(plan.eta_s)} in all; the learning-rate schedule completes "
                 "at the last step")
    return lines


def plan_table(plan: "BudgetPlan") -> Group:
    """The training plan for the guided session (the same facts as :func:`plan_lines`)."""
    lines = plan_lines(plan)
    return Group(Text(lines[0], style="bold"), *(Text(line) for line in lines[1:]))


def sample_lines(step: int, completions: Sequence["Completion"]) -> list[str]:
    """Samples from fixed prompts, one line each (line breaks shown as spaces)."""
    lines = [f"样例 samples at step {step}:"]
    for c in completions:
        text = " ".join((c.prompt + c.text).split())
        lines.append(f"  {text}")
    return lines


def loss_chart(points: Sequence[tuple[int, float]], width: int = 80, height: int = 14) -> str | None:
    """The loss curve drawn with text characters (plotext), or None with fewer than two points or
    when the plotting library cannot draw it (the chart is a nicety, never a failure)."""
    if len(points) < 2:
        return None
    step = max(1, len(points) // 2000)  # thin very long runs; the shape is what matters
    xs = [p[0] for p in points[::step]]
    ys = [p[1] for p in points[::step]]
    width = max(30, min(width, 120))
    try:
        import plotext as plt

        if hasattr(plt, "build"):  # plotext 5.x: module-level functions
            plt.clear_figure()
            plt.theme("clear")
            plt.plotsize(width, height)
            plt.plot(xs, ys, marker="braille")
            plt.title("loss")
            plt.xlabel("step")
            chart = plt.build()
            plt.clear_figure()
            return chart
        fig = plt.figure  # plotext 6: an explicit figure object
        fig.clear()
        fig.theme("colorless")
        fig.plot_size(width, height)
        signal = fig.signal(xs, ys, marker="braille")
        signal.lines()
        fig.draw(signal)
        fig.title("loss")
        fig.label("step", axis=0)
        chart = fig.build().string(colorless=True)
        fig.clear()
        return chart
    except Exception:  # noqa: BLE001
        return None


class _Throttle:
    """True at most once per ``interval`` seconds."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.last = float("-inf")

    def __call__(self, force: bool = False) -> bool:
        now = time.monotonic()
        if force or now - self.last >= self.interval:
            self.last = now
            return True
        return False


class TrainingView:
    """A live rich progress bar per stage, fed by the trainer's events (at most ~10 updates/s).

    Use as the ``on_event`` callback and call :meth:`close` at the end (also a context manager).
    """

    def __init__(self, console: Console, interval: float = 0.1) -> None:
        self.console = console
        self.throttle = _Throttle(interval)
        self.progress: Progress | None = None
        self.task: Any = None
        self.val_loss: float | None = None

    def __enter__(self) -> "TrainingView":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _new_progress(self) -> Progress:
        return Progress(
            TextColumn("[bold cyan]{task.description}"),
            BarColumn(bar_width=None),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("val {task.fields[val]}"),
            TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[speed]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA {task.fields[eta]}"),
            console=self.console, refresh_per_second=10, transient=False,
        )

    def __call__(self, event: "TrainEvent") -> None:
        if event.kind == "start":
            self.close()
            self.val_loss = None
            self.progress = self._new_progress()
            self.task = self.progress.add_task(stage_label(event.stage), total=max(1, event.total_steps),
                                               completed=event.step, loss="-", val="-", lr="-", speed="-", eta="-")
            self.progress.start()
            if event.message:
                self.console.print(Text(f"{stage_label(event.stage)}: {event.message}", style="dim"))
            return
        if self.progress is None:
            return
        if event.kind == "eval":
            self.val_loss = event.val_loss
        if event.kind == "step" and not self.throttle(event.step >= event.total_steps):
            return
        fields: dict[str, Any] = {"completed": event.step, "total": max(1, event.total_steps),
                                  "val": fmt_loss(self.val_loss)}
        if event.loss is not None:
            fields["loss"] = fmt_loss(event.loss)
        if event.lr is not None:
            fields["lr"] = f"{event.lr:.2e}"
        if event.tokens_per_s is not None:
            fields["speed"] = f"{event.tokens_per_s:,.0f}"
        if event.kind == "step":
            fields["eta"] = fmt_duration(event.eta_s)
        self.progress.update(self.task, **fields)
        if event.kind == "end":
            self.progress.update(self.task, eta="0:00" if event.step >= event.total_steps else "-")
            self.close()

    def samples(self, step: int, completions: Sequence["Completion"]) -> None:
        """Show samples from fixed prompts above the live bar."""
        for line in sample_lines(step, completions):
            self.console.print(Text(line, style="dim" if line.startswith(" ") else "cyan"))

    def close(self) -> None:
        """Stop the live display (idempotent)."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class PlainProgress:
    """Progress as plain lines (for logs): one at each stage's start and end, one every few seconds."""

    def __init__(self, stream: IO[str] | None = None, interval: float = 5.0) -> None:
        self.stream = stream or sys.stderr
        self.throttle = _Throttle(interval)
        self.val_loss: float | None = None

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def __call__(self, event: "TrainEvent") -> None:
        if event.kind == "start":
            self.val_loss = None
            self.throttle.last = time.monotonic()
            self._write(f"[{event.stage}] start: {event.total_steps} steps, {event.epochs} epochs; {event.message}")
        elif event.kind == "eval":
            self.val_loss = event.val_loss
            bpc = "" if event.val_bpc is None else f", {event.val_bpc:.3f} bits/char"
            self._write(f"[{event.stage}] eval at step {event.step}: val loss {fmt_loss(event.val_loss)}{bpc}")
        elif event.kind == "step" and self.throttle():
            parts = [f"[{event.stage}] step {event.step}/{event.total_steps}", f"epoch {event.epoch + 1}",
                     f"loss {fmt_loss(event.loss)}"]
            if self.val_loss is not None:
                parts.append(f"val {fmt_loss(self.val_loss)}")
            if event.lr is not None:
                parts.append(f"lr {event.lr:.2e}")
            if event.tokens_per_s:
                parts.append(f"{event.tokens_per_s:,.0f} tok/s")
            parts += [f"elapsed {fmt_duration(event.elapsed_s)}", f"eta {fmt_duration(event.eta_s)}"]
            self._write("  ".join(parts))
        elif event.kind == "end":
            self._write(f"[{event.stage}] {event.message}: step {event.step}/{event.total_steps}, "
                        f"loss {fmt_loss(event.loss)}, val {fmt_loss(event.val_loss)}, "
                        f"{fmt_duration(event.elapsed_s)}")

    def samples(self, step: int, completions: Sequence["Completion"]) -> None:
        """Samples from fixed prompts as plain lines."""
        for line in sample_lines(step, completions):
            self._write(line)

    def close(self) -> None:
        """Nothing to stop (same interface as :class:`TrainingView`)."""

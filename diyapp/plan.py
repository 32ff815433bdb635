"""Training plans that fit a time budget.

A plan gives each stage a number of optimizer steps so that training, evaluations included, ends
within the budget with its learning-rate schedule completed: the cosine schedule is laid over the
planned steps, not cut off when time runs out. The speed comes from the machine itself: a few
warm-up steps of each stage are timed (:func:`measure_step_seconds`) and rolled back. While
training, :class:`BudgetGuard` compares the real pace with the plan and moves the last step (so
the schedule still completes) when the machine turns out busier or quieter than in the warm-up.

Nothing here prints; the plan is plain data for the UI and the CLI to show.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    from .train import Trainer, TrainEvent

#: Share of the budget kept free for what follows the last step (the final save, the summary).
RESERVE_FRACTION = 0.02
#: With time left over, pretraining on a large corpus may take up to this many times the recipe's
#: steps (songci, 1.6 M characters: the recipe's 3 epochs took 430 s of a 10-minute budget).
MAX_GROWTH = 2
#: Evaluations per stage in a budgeted plan (plus the one after the last step).
EVALS_PER_STAGE = 4
#: A forward pass over a row costs about this share of a training step over it (no backward, no optimizer).
EVAL_COST = 0.4

_UNITS = {"s": 1, "sec": 1, "秒": 1, "m": 60, "min": 60, "分": 60, "分钟": 60, "h": 3600, "hr": 3600,
          "小时": 3600}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z秒分钟小时]*)")


def parse_duration(text: str) -> float:
    """Seconds in ``"90s"``, ``"10m"``, ``"1h"``, ``"1h30m"``, ``"2.5m"`` or a bare number of
    seconds. Raises ValueError with a message fit to show a person."""
    raw = str(text).strip().lower().replace(" ", "")
    example = "例如 e.g. 90s, 10m, 1h, 1h30m"
    if not raw:
        raise ValueError(f"请给出时长 please give a duration ({example})")
    pos, total = 0, 0.0
    while pos < len(raw):
        match = _PART.match(raw, pos)
        if match is None or match.end() == pos:
            raise ValueError(f"看不懂的时长 not a duration: {text!r} ({example})")
        unit = match.group(2) or ("s" if pos == 0 and match.end() == len(raw) else "")
        if unit not in _UNITS:
            raise ValueError(f"看不懂的时长单位 unknown unit in {text!r} ({example})")
        total += float(match.group(1)) * _UNITS[unit]
        pos = match.end()
    if total < 10:
        raise ValueError(f"时长至少 10 秒 the budget must be at least 10 s (got {text!r})")
    if total > 7 * 24 * 3600:
        raise ValueError(f"时长最多 7 天 the budget must be at most 7 days (got {text!r})")
    return total


#: The guided session's answer to "how long may training take?" when the person presses Enter.
DEFAULT_BUDGET = "10m"
_NO_LIMIT = ("none", "no", "off", "不限", "无", "0")


def parse_budget(text: str) -> float | None:
    """A time budget as typed at the prompt: a duration (:func:`parse_duration`) or "none" (no limit)."""
    if str(text).strip().lower() in _NO_LIMIT:
        return None
    return parse_duration(text)


def format_duration(seconds: float) -> str:
    """``615`` -> ``"10m 15s"``; ``4000`` -> ``"1h 6m"``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


@dataclass
class StageNeed:
    """What planning one stage needs to know: the recipe's steps, the measured seconds per step,
    the rows an epoch has and how many validation rows one evaluation scores. ``max_steps``: the
    most steps the stage may take when the budget leaves time over (None: the recipe's)."""

    stage: str
    recipe_steps: int
    step_s: float
    steps_per_epoch: int
    batch_size: int
    val_rows: int = 0
    threads: int = 0
    max_steps: int | None = None


@dataclass
class StageAllotment:
    """The plan for one stage: how many steps, how often it evaluates, how long it should take."""

    stage: str
    steps: int
    batch_size: int
    step_s: float
    eval_every: int
    eval_s: float
    seconds: float
    epochs: float
    recipe_steps: int
    #: the most steps the stage may take if the machine turns out faster than measured (the
    #: recipe's, or the need's ``max_steps`` for a stage that may grow; never below ``steps``):
    #: :class:`BudgetGuard`'s cap
    max_steps: int
    threads: int = 0

    @property
    def shortened(self) -> bool:
        """True when the budget gives fewer steps than the recipe would take."""
        return self.steps < self.recipe_steps


@dataclass
class BudgetPlan:
    """The stages' allotments, the seconds already spent before training (data, vocabulary,
    warm-up), the budget (None: no limit, the recipe as it is) and the clock value by which the
    last stage must end."""

    stages: list[StageAllotment]
    spent_s: float
    budget_s: float | None = None
    notes: list[str] = field(default_factory=list)
    deadline: float | None = None

    @property
    def eta_s(self) -> float:
        """Expected seconds from the start (``spent_s`` included) to the end of the last stage."""
        return self.spent_s + sum(s.seconds for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return {"budget_s": self.budget_s, "spent_s": self.spent_s, "eta_s": self.eta_s, "deadline": self.deadline,
                "stages": [asdict(s) for s in self.stages], "notes": list(self.notes)}


def _eval_seconds(need: StageNeed) -> float:
    """Seconds one evaluation of the stage's validation rows should take."""
    return need.val_rows / max(1, need.batch_size) * need.step_s * EVAL_COST


def _allot_one(need: StageNeed, seconds: float | None, spread_evals: bool = False) -> StageAllotment:
    """The most steps of ``need`` (the recipe's, or its ``max_steps``, at most) that fit in
    ``seconds`` with evaluations. ``seconds`` None: the recipe's steps, evaluated once an epoch,
    or ``EVALS_PER_STAGE`` times spread over them with ``spread_evals``."""
    one_eval = _eval_seconds(need)
    if seconds is None:
        steps = need.recipe_steps
        eval_every = max(1, math.ceil(steps / EVALS_PER_STAGE)) if spread_evals else 0
        evals = math.ceil(steps / (eval_every or max(1, need.steps_per_epoch)))
    else:
        usable = seconds - one_eval * (EVALS_PER_STAGE + 1)
        steps = max(1, min(need.max_steps or need.recipe_steps, math.floor(usable / need.step_s)))
        eval_every = max(1, math.ceil(steps / EVALS_PER_STAGE))
        evals = math.ceil(steps / eval_every)
    rows = need.steps_per_epoch
    return StageAllotment(stage=need.stage, steps=steps, batch_size=need.batch_size, step_s=need.step_s,
                          eval_every=eval_every, eval_s=one_eval * evals,
                          seconds=steps * need.step_s + one_eval * evals, epochs=steps / max(1, rows),
                          recipe_steps=need.recipe_steps, threads=need.threads,
                          max_steps=max(need.recipe_steps, need.max_steps or 0))


def allot(needs: Sequence[StageNeed], available_s: float | None) -> list[StageAllotment]:
    """Split ``available_s`` seconds between the stages.

    When the recipe fits, every stage gets the recipe's steps, and the time left over goes to the
    stages that may take more (``max_steps``: pretraining on a large corpus, where more passes keep
    lowering held-out loss; on small data more would only overfit), so the budget is used. When it
    does not fit, each stage gets a share of the time proportional to what the recipe would take,
    and as many steps as fit in its share. With a budget each stage evaluates (and pretraining shows
    its samples) ``EVALS_PER_STAGE`` times plus at its end, not once an epoch (the bundled recipe's
    16 pretraining epochs gave 16 rounds of samples). ``available_s`` None means no limit (the
    recipe as it is).
    """
    if available_s is None:
        return [_allot_one(n, None) for n in needs]
    full = [_allot_one(n, None, spread_evals=True) for n in needs]
    wanted = sum(a.seconds for a in full)
    if wanted <= available_s:
        growing = [i for i, n in enumerate(needs) if (n.max_steps or 0) > n.recipe_steps]
        if not growing:
            return full
        spare = available_s - wanted
        share = sum(full[i].seconds for i in growing)
        for i in growing:
            grown = _allot_one(needs[i], full[i].seconds + spare * full[i].seconds / share)
            full[i] = grown if grown.steps > full[i].steps else full[i]
        return full
    return [_allot_one(n, available_s * a.seconds / wanted) for n, a in zip(needs, full)]


def measure_step_seconds(trainer: "Trainer", steps: int = 6, skip: int = 2,
                         clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds per optimizer step of ``trainer`` on this machine now: ``skip + steps`` real steps
    are run (the first ``skip`` pay one-time costs and are not counted), then the model, the
    optimizer, the data position and the random state are put back as they were."""
    import torch

    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    state = trainer.state_dict()
    on_event = trainer.on_event
    stamps: list[float] = []
    trainer.on_event = lambda event: stamps.append(clock()) if event.kind in ("start", "step") else None
    try:
        trainer.run(steps=skip + steps)
    finally:
        trainer.on_event = on_event
        with torch.no_grad():
            trainer.model.load_state_dict(weights)
        trainer.load_state_dict(state)
    counted = stamps[1 + skip:] if len(stamps) > 1 + skip else stamps
    if len(counted) < 2:
        return max(1e-6, (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)) if len(stamps) > 1 else 1e-3
    intervals = sorted(b - a for a, b in zip(counted, counted[1:]))
    return max(1e-6, intervals[len(intervals) // 2])


def fastest_threads(trainer: "Trainer", steps: int = 6) -> tuple[int, float]:
    """(threads, seconds per step): the stage timed with PyTorch's threads and, on a CPU where it
    uses several, with one. On a busy machine one thread is often faster: the threads of a
    parallel kernel wait for each other whenever the system runs another process on one of the
    cores. One thread is chosen only when it is clearly (10%) faster. One thread is timed over
    half the steps after one skipped: on a quiet machine it is far slower (1.8x for the default
    chat step) and those steps are thrown away (as on AVX2, both stages' probes of the default
    recipe took 7.4 s with one thread timed like all, 5.0 s so)."""
    import torch

    many = torch.get_num_threads()
    seconds = measure_step_seconds(trainer, steps=steps)
    if trainer.device.type != "cpu" or many == 1:
        return many, seconds
    torch.set_num_threads(1)
    try:
        one = measure_step_seconds(trainer, steps=max(2, steps // 2), skip=1)
    finally:
        torch.set_num_threads(many)
    return (1, one) if one < 0.9 * seconds else (many, seconds)


class BudgetGuard:
    """Keeps a running stage on time: every few steps it projects the stage's end from the recent
    pace (the last quarter of the steps done, so a machine that gets busier or quieter shows
    soon; evaluations included) and, when that misses ``deadline`` by more than ``tolerance`` of
    the stage's time, moves the stage's last step so it ends on time. The schedule is laid over
    the new step count, so it still completes. Growing is allowed only in the first 85% of the
    stage (late in the decay a longer schedule would raise the learning rate again).

    Call it with every :class:`TrainEvent` of the stage (pass it as, or chain it into, ``on_event``).
    """

    def __init__(self, trainer: "Trainer", deadline: float, clock: Callable[[], float] = time.monotonic,
                 tolerance: float = 0.03, max_steps: int | None = None) -> None:
        self.trainer = trainer
        self.deadline = deadline
        self.clock = clock
        self.tolerance = tolerance
        self.max_steps = max_steps
        self.started: float | None = None
        self.start_step = 0
        self.adjustments: list[tuple[int, int]] = []
        self._marks: list[tuple[int, float]] = []

    def __call__(self, event: "TrainEvent") -> None:
        if event.kind == "start":
            self.started = self.clock()
            self.start_step = self.trainer.step
            self._marks = [(self.start_step, self.started)]
            return
        if event.kind != "step" or self.started is None:
            return
        done = self.trainer.step - self.start_step
        total = self.trainer.total_steps
        check_every = max(5, (total - self.start_step) // 40)
        if done < 10 or done % check_every or self.trainer.step >= total:
            return
        now = self.clock()
        step = self.trainer.step
        self._marks.append((step, now))
        since = step - max(10, done // 4)
        first_step, first_time = next(m for m in self._marks if m[0] >= since or m is self._marks[-2])
        pace = max(1e-9, (now - first_time) / max(1, step - first_step))  # a clock that stood still
        left = self.deadline - now
        span = max(1e-9, self.deadline - self.started)
        projected = (total - self.trainer.step) * pace
        if abs(projected - left) <= self.tolerance * span:
            return
        target = self.trainer.step + max(1, math.floor(left / pace))
        if self.max_steps is not None:
            target = min(target, self.max_steps)
        if target > total and self.trainer.step > 0.85 * total:
            return
        if target != total:
            self.adjustments.append((self.trainer.step, target))
            self.trainer.set_total_steps(target)


def chain(*callbacks: Callable[[Any], Any] | None) -> Callable[[Any], None]:
    """One callback that calls each given one in turn (None entries are skipped)."""
    live = [c for c in callbacks if c is not None]

    def call(event: Any) -> None:
        for c in live:
            c(event)
    return call

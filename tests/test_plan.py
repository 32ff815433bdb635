"""Time budgets: durations, the allotment of steps, the warm-up timing, the guard, resume keeps the plan."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from diyapp import plan as budget_plan
from diyapp import recipe
from diyapp import workflow as wf
from diyapp.plan import BudgetGuard, StageNeed, allot, parse_budget, parse_duration
from diyapp.train import lr_at

from .test_workflow import TINY, corpus  # noqa: F401  (the fixture)


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("10m", 600), ("1h", 3600), ("1h30m", 5400),
                                           ("2.5m", 150), ("600", 600), (" 10 M ", 600), ("5分钟", 300)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten minutes", "10 parsecs", "5s", "-3m", "m10", "30d"])
def test_bad_durations_are_refused_with_a_reason(text):
    with pytest.raises(ValueError, match="e.g.|至少|最多"):
        parse_duration(text)


def test_no_limit_answers():
    assert parse_budget("none") is None and parse_budget("不限") is None and parse_budget("2m") == 120


def test_allot_keeps_the_recipe_when_it_fits_and_shares_the_time_when_not():
    needs = [StageNeed("pretrain", recipe_steps=1000, step_s=0.1, steps_per_epoch=100, batch_size=4, val_rows=40),
             StageNeed("chat", recipe_steps=500, step_s=0.2, steps_per_epoch=50, batch_size=16, val_rows=0)]
    roomy = allot(needs, 10_000)
    assert [a.steps for a in roomy] == [1000, 500] and not any(a.shortened for a in roomy)
    tight = allot(needs, 60)
    assert all(a.shortened for a in tight)
    assert sum(a.seconds for a in tight) <= 60
    assert sum(a.seconds for a in tight) > 0.9 * 60                   # and it uses the time it has
    # each stage keeps about its share of what the recipe would take (pretrain ~100 s + evals, chat 100 s)
    assert tight[0].seconds == pytest.approx(tight[1].seconds, rel=0.15)


def test_allot_gives_time_left_over_to_a_stage_that_may_grow():
    """A large corpus's pretraining (``max_steps`` above the recipe's) takes the time the recipe
    leaves over, up to its ``max_steps``; the other stage keeps the recipe."""
    needs = [StageNeed("pretrain", recipe_steps=1000, step_s=0.1, steps_per_epoch=100, batch_size=4, val_rows=40,
                       max_steps=2000),
             StageNeed("chat", recipe_steps=500, step_s=0.2, steps_per_epoch=50, batch_size=16, val_rows=0)]
    recipe = allot(needs, None)
    grown = allot(needs, 260)
    assert grown[1].steps == 500 and 1000 < grown[0].steps < 2000 and not any(a.shortened for a in grown)
    assert 0.9 * 260 < sum(a.seconds for a in grown) <= 260          # the budget is used, not exceeded
    assert grown[0].epochs > recipe[0].epochs
    assert allot(needs, 100_000)[0].steps == 2000                     # never past max_steps
    assert all(a.shortened for a in allot(needs, 150))                # and shortened when tight


def test_a_budgeted_plan_fits_and_its_schedule_completes(corpus, monkeypatch):  # noqa: F811
    """A fake speed (0.5 s a step) and a fake clock: the planned steps fit in the 30 s budget, and
    the real run ends on the last planned step with the learning rate at its floor."""
    monkeypatch.setattr(budget_plan, "measure_step_seconds", lambda trainer, steps=6, skip=2: 0.5)
    now = [100.0]
    config = wf.model_config("custom", **TINY)
    plans, _ = wf.plan_new(corpus, config, pretrain_epochs=50, chat_epochs=50, seed=1, batch_size=2)
    bench = wf.start_new(corpus, config)
    plan = wf.plan_budget(bench, plans, corpus, budget_s=30, started=90.0, clock=lambda: now[0])
    assert plan.spent_s == 10.0                                       # counted from the start, data included
    assert plan.eta_s <= 30 and plan.eta_s > 25
    steps = [p.config.max_steps for p in plans]
    assert [a.steps for a in plan.stages] == steps and all(a.shortened for a in plan.stages)
    assert sum(steps) * 0.5 <= 20
    lrs = []
    results = wf.run_plans(bench, plans, corpus, on_event=lambda e: lrs.append(e.lr) if e.kind == "step" else None)
    assert [(r.status, r.steps, r.total_steps) for r in results] == [("completed", s, s) for s in steps]
    for last_lr, p in ((lrs[steps[0] - 1], plans[0]), (lrs[-1], plans[1])):  # the decay ran to its end
        assert last_lr <= p.config.min_lr + 0.05 * (p.config.lr - p.config.min_lr)


def _budgeted_bench(corpus, monkeypatch, step_s: float, large: bool = False):
    """A tiny new model whose warm-up measures ``step_s`` seconds a step, and a function giving its
    stage plans (``large``: the corpus counts as large, so pretraining may grow)."""
    monkeypatch.setattr(budget_plan, "measure_step_seconds", lambda trainer, steps=6, skip=2: step_s)
    if large:
        monkeypatch.setattr(recipe, "is_large", lambda chars: True)
    config = wf.model_config("custom", **TINY)
    bench = wf.start_new(corpus, config)

    def plans(pretrain_epochs: int, chat_epochs: int, batch_size: int = 2):
        return wf.plan_new(corpus, config, pretrain_epochs=pretrain_epochs, chat_epochs=chat_epochs, seed=1,
                           batch_size=batch_size)[0]
    return bench, plans


def _ticking(now: list[float], step_s: float):
    """A clock over ``now`` that moves ``step_s`` seconds each time it is read."""
    def clock() -> float:
        now[0] += step_s
        return now[0]
    return clock


def test_a_grown_pretraining_plan_runs_to_its_end(corpus, monkeypatch):  # noqa: F811
    """On a large corpus (faked) with time to spare, pretraining is planned past the recipe's steps,
    and the guard that keeps the run on time does not cut it back to the recipe's count."""
    bench, make_plans = _budgeted_bench(corpus, monkeypatch, 0.01, large=True)
    plans = make_plans(2, 1)
    now = [0.0]
    plan = wf.plan_budget(bench, plans, corpus, budget_s=60, started=0.0, clock=lambda: now[0])
    pre = plan.stages[0]
    assert pre.steps == budget_plan.MAX_GROWTH * pre.recipe_steps and plan.stages[1].steps == plan.stages[1].recipe_steps
    # a machine well ahead of the plan's pace
    results = wf.run_plans(bench, plans, corpus, budget=plan, clock=_ticking(now, 0.001))
    assert [(r.stage, r.status, r.steps) for r in results] == [
        ("pretrain", "completed", pre.steps), ("chat", "completed", plan.stages[1].steps)]


def test_a_growable_stage_grows_past_its_plan_on_a_faster_machine(corpus, monkeypatch):  # noqa: F811
    """The warm-up measured steps slower than the run turns out to be (songci: 48 ms measured, 40 ms
    run, and training ended at 84% of the budget): the guard grows a growable stage past its planned
    steps, towards its most, so the budget is used; it never passes the most."""
    bench, make_plans = _budgeted_bench(corpus, monkeypatch, 0.01, large=True)
    now = [0.0]
    recipe_steps = wf.plan_budget(bench, make_plans(4, 0), corpus, budget_s=None, clock=lambda: now[0]).stages[0].steps
    plans = make_plans(4, 0)
    budget_s = recipe_steps * 1.5 * 0.01 / (1 - budget_plan.RESERVE_FRACTION)
    plan = wf.plan_budget(bench, plans, corpus, budget_s=budget_s, started=0.0, clock=lambda: now[0])
    pre = plan.stages[0]
    assert recipe_steps < pre.steps < pre.max_steps == budget_plan.MAX_GROWTH * recipe_steps

    # each step takes half the measured time
    results = wf.run_plans(bench, plans, corpus, budget=plan, clock=_ticking(now, 0.005))
    assert results[0].status == "completed"
    assert pre.steps < results[0].steps <= pre.max_steps


def test_a_budget_the_recipe_fits_evaluates_a_few_times_not_every_epoch(corpus, monkeypatch):  # noqa: F811
    """The recipe fits the budget: its steps are kept, but pretraining evaluates (and shows samples)
    EVALS_PER_STAGE times and at its end, not once an epoch (16 rounds of samples on the bundled
    recipe); without a budget the recipe's once-an-epoch stays."""
    import math

    bench, make_plans = _budgeted_bench(corpus, monkeypatch, 0.001)
    plans = make_plans(12, 1, batch_size=1)
    now = [0.0]
    plan = wf.plan_budget(bench, plans, corpus, budget_s=600, started=0.0, clock=lambda: now[0])
    pre = plan.stages[0]
    assert pre.steps == pre.recipe_steps and pre.epochs == 12
    assert pre.eval_every == math.ceil(pre.steps / budget_plan.EVALS_PER_STAGE)
    evals, samples = [], []
    wf.run_plans(bench, plans, corpus, budget=plan, clock=_ticking(now, 0.001),  # the measured pace
                 on_event=lambda e: evals.append(e.step) if e.kind == "eval" and e.stage == "pretrain" else None,
                 on_samples=lambda step, completions: samples.append(step))
    assert 2 <= len(evals) <= budget_plan.EVALS_PER_STAGE + 1 and len(samples) <= budget_plan.EVALS_PER_STAGE + 2
    assert wf.plan_budget(bench, make_plans(12, 1, batch_size=1), corpus, budget_s=None).stages[0].eval_every == 0


def test_warm_up_timing_leaves_the_model_and_the_data_position_as_they_were(corpus):  # noqa: F811
    from diyapp.train import Trainer

    config = wf.model_config("custom", **TINY)
    plans, _ = wf.plan_new(corpus, config, pretrain_epochs=3, chat_epochs=0, seed=1, batch_size=2)
    bench = wf.start_new(corpus, config)
    trainer = Trainer(bench.model, bench.tokenizer, "pretrain", corpus, plans[0].config)
    before = {k: v.clone() for k, v in bench.model.state_dict().items()}
    rng = torch.get_rng_state()
    seconds = budget_plan.measure_step_seconds(trainer, steps=3, skip=1)
    assert seconds > 0
    assert all(torch.equal(before[k], v) for k, v in bench.model.state_dict().items())
    assert trainer.step == 0 and trainer.batch_in_epoch == 0 and not trainer.optimizer.state
    assert torch.equal(torch.get_rng_state(), rng)


class FakeTrainer:
    """What the guard reads and moves: the step count and the last step."""

    def __init__(self, total: int) -> None:
        self.step = 0
        self.total_steps = total

    def set_total_steps(self, total: int) -> None:
        self.total_steps = max(self.step + 1, total)


def _drive(guard: BudgetGuard, trainer: FakeTrainer, clock: list[float], step_s: float,
           later_s: float | None = None) -> None:
    """Steps of ``step_s`` seconds (``later_s`` from step 50 on: the machine's load changed)."""
    from diyapp.train import TrainEvent

    guard(TrainEvent("start", "pretrain", trainer.step, trainer.total_steps))
    while trainer.step < trainer.total_steps:
        clock[0] += step_s if later_s is None or trainer.step < 50 else later_s
        trainer.step += 1
        guard(TrainEvent("step", "pretrain", trainer.step, trainer.total_steps))


@pytest.mark.parametrize("step_s", [2.0, 0.5])
def test_the_guard_keeps_a_slower_or_faster_machine_on_time(step_s):
    """Planned for 1 s a step (100 steps, 100 s); the machine turns out 2x slower or 2x faster."""
    clock = [0.0]
    trainer = FakeTrainer(100)
    guard = BudgetGuard(trainer, deadline=100.0, clock=lambda: clock[0], max_steps=1000)
    _drive(guard, trainer, clock, step_s)
    assert guard.adjustments
    assert 94.0 <= clock[0] <= 103.0
    assert trainer.step == trainer.total_steps


@pytest.mark.parametrize("later_s", [0.5, 1.6])
def test_the_guard_follows_a_machine_whose_load_changes_midway(later_s):
    clock = [0.0]
    trainer = FakeTrainer(100)
    guard = BudgetGuard(trainer, deadline=100.0, clock=lambda: clock[0], max_steps=1000)
    _drive(guard, trainer, clock, 1.0, later_s)
    assert 94.0 <= clock[0] <= 103.0 and trainer.step == trainer.total_steps


def test_the_guard_leaves_an_on_time_run_alone():
    clock = [0.0]
    trainer = FakeTrainer(100)
    guard = BudgetGuard(trainer, deadline=100.0, clock=lambda: clock[0])
    _drive(guard, trainer, clock, 1.0)
    assert not guard.adjustments and trainer.total_steps == 100


def test_a_resumed_run_keeps_its_plan(corpus, monkeypatch):  # noqa: F811
    monkeypatch.setattr(budget_plan, "measure_step_seconds", lambda trainer, steps=6, skip=2: 0.25)
    config = wf.model_config("custom", **TINY)
    plans, _ = wf.plan_new(corpus, config, pretrain_epochs=50, chat_epochs=50, seed=1, batch_size=2)
    bench = wf.start_new(corpus, config)
    wf.plan_budget(bench, plans, corpus, budget_s=20, started=0.0, clock=lambda: 1.0)
    planned = [dataclasses.asdict(p.config) for p in plans]
    trainer = plans[0].trainer
    trainer.run(steps=3)                                              # paused, as if Ctrl-C
    bench.trainer, bench.pending = trainer, [p.to_dict() for p in plans[1:]]
    resumed = wf.resume_plans(wf.train_state(bench))
    assert [dataclasses.asdict(p.config) for p in resumed] == planned
    from diyapp.train import Trainer

    again = Trainer(bench.model, bench.tokenizer, "pretrain", corpus, resumed[0].config)
    again.load_state_dict(resumed[0].state)
    assert (again.step, again.total_steps, again.warmup) == (3, trainer.total_steps, trainer.warmup)
    last = lr_at(again.total_steps - 1, again.total_steps, again.config.lr, again.config.min_lr, again.warmup)
    assert last <= again.config.min_lr + 0.05 * (again.config.lr - again.config.min_lr)


def test_without_a_budget_the_recipe_adapts_to_a_large_corpus():
    from diyapp.data import Corpus

    small = Corpus(texts=["春天来了，花儿开了。"] * 100, sources=["small"])
    large = Corpus(texts=["春天来了，花儿开了，小草也绿了。" * 10] * 1200, sources=["large"])   # 192 K chars ...
    large.texts.extend(["秋天的树叶变黄，慢慢落下来。" * 10] * 1000)                            # ... + 140 K
    default = wf.model_config("default")
    assert wf.model_for_corpus(default, small) == default
    big = wf.model_for_corpus(default, large)
    assert big == wf.model_config("default", **recipe.LARGE_CORPUS_MODEL)
    assert wf.model_for_corpus(wf.model_config("tiny"), large, "tiny") == wf.model_config("tiny")
    [small_plan], _ = wf.plan_new(small, default, chat_epochs=0)
    [large_plan], _ = wf.plan_new(large, big, chat_epochs=0)
    assert small_plan.config == wf.stage_config("pretrain", default)          # the bundled-size recipe as it was
    chars = recipe.text_chars(large.texts)
    assert large_plan.config.epochs == round(recipe.NO_BUDGET_PRETRAIN_CHARS / chars) <= recipe.LARGE_CORPUS_MAX_EPOCHS
    assert large_plan.config.val_fraction < 0.05 and large_plan.config.optimizer == "adamw"  # as measured
    [chosen], _ = wf.plan_new(large, big, chat_epochs=0, pretrain_epochs=7)
    assert chosen.config.epochs == 7                                           # the person's choice wins


@pytest.fixture
def two_threads():
    """PyTorch on two threads for one test (the suite runs on one; the step timings are faked)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("one_thread_s, expected", [(0.5, 1), (0.95, None)])
def test_one_thread_is_chosen_only_when_clearly_faster(monkeypatch, two_threads, one_thread_s, expected):
    many = torch.get_num_threads()
    assert many == 2
    probes = []

    def measure(trainer, steps=6, skip=2):
        probes.append((torch.get_num_threads(), steps, skip))
        return 1.0 if torch.get_num_threads() > 1 else one_thread_s

    monkeypatch.setattr(budget_plan, "measure_step_seconds", measure)
    trainer = type("T", (), {"device": torch.device("cpu")})()
    threads, seconds = budget_plan.fastest_threads(trainer)
    assert (threads, seconds) == ((1, 0.5) if expected == 1 else (many, 1.0))
    assert probes == [(many, 6, 2), (1, 3, 1)]                        # the slow probe is the short one
    assert torch.get_num_threads() == many                            # put back


def test_the_guard_survives_a_clock_that_stands_still():
    """A clock that does not move between checks (a pace of zero) must not stop training with a
    ZeroDivisionError: the guard then only lets the stage grow up to its most steps."""
    from diyapp.train import TrainEvent

    trainer = FakeTrainer(200)
    guard = BudgetGuard(trainer, deadline=100.0, clock=lambda: 5.0, max_steps=300)
    guard(TrainEvent("start", "pretrain", 0, trainer.total_steps))
    while trainer.step < trainer.total_steps:
        trainer.step += 1
        guard(TrainEvent("step", "pretrain", trainer.step, trainer.total_steps))
    assert trainer.step == 300  # grown to its most, and no further

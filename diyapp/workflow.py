"""The app's steps without any UI: start a model, train its stages, resume, continue, save, export.

The guided session (``diyapp/ui``) and the subcommands (``diyapp/cli.py``) are thin layers over
these functions. Nothing here prints or asks; progress goes to ``on_event`` callbacks and problems
are raised as the engine's errors (``DataError``, ``CheckpointError``, ``TrainingError``,
``ConfigError``, ``ValueError``, ``OSError``), each with a message fit to show a person.

PyTorch and the engine are imported inside the functions so that importing this module is cheap.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .config import DIYConfig, preset

if TYPE_CHECKING:
    from .formats.common import LoadedModel
    from .data import Corpus
    from .completion import Completion
    from .model import DIYForCausalLM
    from .plan import BudgetPlan
    from .tokenizer import DIYTokenizer
    from .train import TrainConfig, Trainer, TrainEvent, TrainResult

STAGES = ("pretrain", "chat")
STAGE_NAMES = {"pretrain": "预训练 pretrain", "chat": "对话微调 chat"}
#: Where the app looks for saved models, relative to the working directory.
MODEL_FOLDERS = ("checkpoints", "exports")
DEFAULT_PRETRAINED = Path("checkpoints/model_pretrained.pt")
DEFAULT_JSON = Path("exports/model_final.json")
CONTINUE_EPOCHS = 50
CONTINUE_LR = 1e-4
#: Sanity bounds for numbers a person types (values outside are refused as mistakes).
MAX_EPOCHS = 100_000
MAX_LR = 0.1

EventCallback = Callable[["TrainEvent"], None]
#: A validator for typed text: the parsed value, or ValueError with a message for the person.
Parser = Callable[[str], Any]


def is_main_process() -> bool:
    """False on the non-zero ranks of a ``torchrun`` launch (they neither print nor write files)."""
    return int(os.environ.get("RANK", "0")) == 0


# --- model size and data -----------------------------------------------------------------------

def model_config(size: str = "default", **fields_: Any) -> DIYConfig:
    """The config of a new model: a named size ("default", "large", "tiny", or "custom", which is the
    default with the given fields changed). ``None`` field values are ignored."""
    name = "default" if size == "custom" else size
    return preset(name, **{k: v for k, v in fields_.items() if v is not None})


def model_for_corpus(config: DIYConfig, corpus: "Corpus", size: str = "default",
                     explicit: Sequence[str] = ()) -> DIYConfig:
    """The model for ``corpus``: the default size becomes the large-corpus shape for a large
    corpus (:mod:`diyapp.recipe`); other sizes, and fields the person set, stay as they are."""
    from .recipe import model_for, text_chars

    return model_for(config, text_chars(corpus.texts), explicit) if size == "default" else config


def load_data(path: str | os.PathLike | None = None) -> "Corpus":
    """The bundled corpus (``path`` None) or the user's corpus at ``path`` (file or folder)."""
    from .data import DataError, bundled_corpus, load_corpus

    if path is None or str(path).strip() == "":
        return bundled_corpus()
    target = Path(path).expanduser()
    if not target.exists():
        raise DataError(f"{target}: 找不到这个文件或文件夹 no such file or folder")
    return load_corpus(target.resolve())


def corpus_from_sources(sources: Sequence[str]) -> "Corpus":
    """Reload the corpus a model was trained on from its recorded source files (exact resume needs
    the same rows). The bundled data is read like any other files."""
    from .data import Corpus, DataError, load_corpus

    # A folder's listing also notes the files it skipped ("path (skipped: why)"): they held no data.
    sources = [str(s) for s in sources or [] if not str(s).endswith(")") or " (skipped: " not in str(s)]
    if not sources:
        raise DataError("这个检查点没有记录训练数据 the checkpoint does not record which data it was trained on")
    missing = [s for s in sources if not Path(s).exists()]
    if missing:
        raise DataError(f"训练数据 {missing[0]} 已经不在了，请放回原处或换别的数据 the training data {missing[0]} is no "
                        f"longer there; put it back or train on other data")
    corpus = Corpus()
    for source in sources:
        corpus = corpus.merged(load_corpus(Path(source)))
    return corpus


# --- stages ------------------------------------------------------------------------------------

@dataclass
class StagePlan:
    """One stage to train: its name and config, and, for an exact resume, the saved trainer state
    (an unfinished stage) or the random-number state to start from (the next pending stage).
    ``trainer`` is the stage's trainer when :func:`plan_budget` already built it."""

    stage: str
    config: "TrainConfig"
    state: dict | None = None
    rng: dict | None = None
    trainer: "Trainer | None" = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The form kept in a checkpoint's ``train_state["pending_stages"]``."""
        return {"stage": self.stage, "config": self.config.to_dict()}


def stage_config(stage: str, model_cfg: DIYConfig | None = None, *, epochs: int | None = None,
                 lr: float | None = None, seed: int | None = None, batch_size: int | None = None,
                 max_steps: int | None = None, corpus_chars: int = 0) -> "TrainConfig":
    """The engine's recipe for ``stage``, adapted to a corpus of ``corpus_chars`` characters of
    text (:mod:`diyapp.recipe`), with the given fields overridden. A learning rate below the
    recipe's floor lowers the floor to a tenth of it, so the schedule still decays; Muon's rate
    (where the recipe uses Muon) is scaled by the same factor."""
    from .recipe import pretrain_for
    from .train import default_stage_config

    config = default_stage_config(stage, model_cfg)
    if stage == "pretrain":
        config = pretrain_for(config, corpus_chars)
    changes: dict[str, Any] = {}
    if epochs is not None:
        changes["epochs"] = int(epochs)
    if lr is not None:
        changes["lr"] = float(lr)
        changes["min_lr"] = min(config.min_lr, float(lr) / 10)
        changes["muon_lr"] = min(1.0, config.muon_lr * float(lr) / config.lr)  # Muon's rate follows
    for name, value in (("seed", seed), ("batch_size", batch_size), ("max_steps", max_steps)):
        if value is not None:
            changes[name] = value
    return dataclasses.replace(config, **changes) if changes else config


def plan_new(corpus: "Corpus", model_cfg: DIYConfig, *, pretrain_epochs: int | None = None,
             chat_epochs: int | None = None, lr: float | None = None, seed: int | None = None,
             batch_size: int | None = None, max_steps: int | None = None) -> tuple[list[StagePlan], list[str]]:
    """The stages that train a new model on ``corpus``, and notes about stages left out.

    Epochs of 0 leave a stage out; so does a corpus without that stage's kind of data (documents
    for pretraining, dialogues for chat tuning). Raises ``TrainingError`` when nothing is left.
    """
    from .train import TrainingError

    from .recipe import text_chars

    plans: list[StagePlan] = []
    notes: list[str] = []
    chars = text_chars(corpus.texts)
    wanted = {"pretrain": pretrain_epochs, "chat": chat_epochs}
    has_data = {"pretrain": bool(corpus.texts), "chat": bool(corpus.dialogues)}
    for stage in STAGES:
        if wanted[stage] == 0:
            notes.append(f"{STAGE_NAMES[stage]}：跳过（0 轮）skipped (0 epochs)")
            continue
        if not has_data[stage]:
            zh, en = ("文本", "plain-text documents") if stage == "pretrain" else ("对话", "dialogues")
            notes.append(f"{STAGE_NAMES[stage]}：跳过，数据里没有{zh} skipped, the data has no {en}")
            continue
        plans.append(StagePlan(stage, stage_config(stage, model_cfg, epochs=wanted[stage], lr=lr, seed=seed,
                                                   batch_size=batch_size, max_steps=max_steps,
                                                   corpus_chars=chars)))
    if not plans:
        raise TrainingError("没有可训练的阶段 nothing to train: " + "; ".join(notes))
    return plans, notes


# --- the model being worked on -------------------------------------------------------------------

@dataclass
class Workbench:
    """The model in hand, with what is known about its training so far.

    ``trainer`` is the last stage's trainer (its state makes a saved ``.pt`` resumable), ``pending``
    the stages still planned after it, ``loaded_state`` the training state of a loaded checkpoint
    (kept when it is saved again untrained).
    """

    model: "DIYForCausalLM"
    tokenizer: "DIYTokenizer"
    stage: str | None = None
    steps: int = 0
    train_loss: float | None = None
    val_loss: float | None = None
    corpus_sources: list[str] = field(default_factory=list)
    results: list["TrainResult"] = field(default_factory=list)
    trainer: "Trainer | None" = None
    pending: list[dict] = field(default_factory=list)
    loaded_state: dict | None = None
    metadata: dict = field(default_factory=dict)
    source_path: str | None = None
    steps_before_stage: int = 0

    @property
    def config(self) -> DIYConfig:
        return self.model.config

    def summary(self) -> dict[str, Any]:
        """What the app shows about the model."""
        cfg = self.model.config
        return {"vocab_size": self.tokenizer.vocab_size, "parameters": self.model.num_parameters(),
                "layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "heads": cfg.num_heads,
                "max_seq_len": cfg.max_seq_len, "stage": self.stage, "steps": self.steps,
                "train_loss": self.train_loss, "val_loss": self.val_loss}

    def loss_history(self) -> list[tuple[int, float]]:
        """(cumulative step, loss) over every stage trained in this session."""
        points: list[tuple[int, float]] = []
        offset = 0
        for result in self.results:
            first = result.loss_history[0][0] - 1 if result.loss_history else 0
            points += [(offset + step - first, loss) for step, loss in result.loss_history]
            offset = points[-1][0] if points else offset
        return points


def start_new(corpus: "Corpus", model_cfg: DIYConfig, seed: int = 42) -> Workbench:
    """A fresh model with a vocabulary learned from ``corpus`` (``model_cfg.vocab_size`` at most;
    of single characters rather than words for a large corpus, :func:`diyapp.recipe.whole_characters`)."""
    import torch

    from .recipe import text_chars, whole_characters
    from .train import build_tokenizer, new_model

    tokenizer = build_tokenizer(corpus, model_cfg.vocab_size, whole_characters(text_chars(corpus.texts)))
    torch.manual_seed(seed)
    model = new_model(model_cfg, tokenizer)
    return Workbench(model=model, tokenizer=tokenizer, corpus_sources=list(corpus.sources))


def open_model(path: str | os.PathLike, device: str | None = "auto") -> "LoadedModel":
    """Load a ``.pt`` checkpoint, a JSON export or a Hugging Face export folder (by its content)
    onto ``device``: "auto" is the engine's choice (:func:`diyapp.device.pick_device`), None the CPU."""
    from .formats.catalog import load_checkpoint
    from .device import pick_device

    target = pick_device() if device == "auto" else device
    return load_checkpoint(Path(path).expanduser(), device=target)


def bench_from_loaded(loaded: "LoadedModel", path: str | os.PathLike | None = None) -> Workbench:
    """A Workbench around a loaded model, keeping its training record."""
    from .formats.common import CheckpointError

    if loaded.tokenizer is None:
        raise CheckpointError(path or "model", "没有词表，不能对话或训练 holds no tokenizer, so it cannot chat or train")
    meta = dict(loaded.metadata or {})
    state = loaded.train_state or None
    sources = meta.get("corpus_sources") or (state or {}).get("corpus_sources") or []
    return Workbench(model=loaded.model, tokenizer=loaded.tokenizer, stage=meta.get("stage"),
                     steps=int(meta.get("steps") or 0), train_loss=_num(meta.get("train_loss")),
                     val_loss=_num(meta.get("val_loss")), corpus_sources=list(sources), loaded_state=state,
                     metadata=meta, source_path=str(path) if path is not None else None)


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def plan_budget(bench: Workbench, plans: Sequence[StagePlan], corpus: "Corpus", budget_s: float | None = None,
                started: float | None = None, clock: Callable[[], float] = time.monotonic,
                probe_steps: int = 6) -> "BudgetPlan":
    """Fit the stages into ``budget_s`` seconds counted from ``started`` (a ``clock()`` value; by
    default now), or lay out the recipe as it is when ``budget_s`` is None.

    Each stage's trainer is built (its data tokenised) and timed over a few warm-up steps that are
    then rolled back (:func:`diyapp.plan.measure_step_seconds`); the stages then get as many steps
    as fit (:func:`diyapp.plan.allot`), and each plan's config records them, so a saved run
    resumes with the same plan. :func:`run_plans` then trains with these trainers.
    """
    from .plan import MAX_GROWTH, RESERVE_FRACTION, BudgetPlan, StageNeed, allot, fastest_threads
    from .recipe import is_large, text_chars
    from .train import Trainer, TrainingError, rng_state, set_rng_state

    started = clock() if started is None else started
    if budget_s is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TrainingError("时间预算只能在单进程里用，不能在 torchrun 下 a time budget works in a single process, not under torchrun")
    large = is_large(text_chars(corpus.texts))
    needs = []
    for plan in plans:
        if plan.rng:
            set_rng_state(plan.rng)
        before = rng_state()
        trainer = Trainer(bench.model, bench.tokenizer, plan.stage, corpus, plan.config)
        if plan.state is not None:
            trainer.load_state_dict(plan.state)
        threads, step_s = fastest_threads(trainer, steps=probe_steps)
        set_rng_state(before)
        left = trainer.total_steps - trainer.step
        grow = plan.stage == "pretrain" and plan.state is None and large
        needs.append(StageNeed(plan.stage, left, step_s, trainer.steps_per_epoch, trainer.config.batch_size,
                               len(trainer.val_rows.ids), threads,
                               max_steps=MAX_GROWTH * left if grow else None))
        plan.trainer = trainer
    spent = clock() - started
    available = None if budget_s is None else max(0.0, budget_s * (1 - RESERVE_FRACTION) - spent)
    allotments = allot(needs, available)
    notes = []
    for plan, allotment in zip(plans, allotments):
        trainer = plan.trainer
        if budget_s is not None:
            trainer.set_total_steps(trainer.step + allotment.steps)
            if allotment.eval_every:
                trainer.config.eval_every = allotment.eval_every
        if allotment.shortened:
            notes.append(f"{STAGE_NAMES[plan.stage]}: {allotment.steps} of the recipe's {allotment.recipe_steps} "
                         "steps fit in the time budget")
    deadline = None if budget_s is None else started + budget_s * (1 - RESERVE_FRACTION)
    return BudgetPlan(allotments, spent, budget_s, notes=notes, deadline=deadline)


def run_plans(bench: Workbench, plans: Sequence[StagePlan], corpus: "Corpus",
              on_event: EventCallback | None = None,
              after_stage: Callable[[Workbench, "TrainResult"], None] | None = None,
              on_trainer: Callable[["Trainer"], None] | None = None, budget: "BudgetPlan | None" = None,
              on_samples: "Callable[[int, list[Completion]], None] | None" = None,
              clock: Callable[[], float] = time.monotonic) -> list["TrainResult"]:
    """Train the stages in order. Stops after a stage that did not finish (Ctrl-C, divergence):
    the model keeps what it learned and :func:`train_state` makes it resumable. ``after_stage`` runs
    after each finished stage that has more stages after it (the app offers a save there);
    ``on_trainer`` gets each trainer before it runs (to stop it from elsewhere).

    With a ``budget`` from :func:`plan_budget` (which built the trainers), a
    :class:`diyapp.plan.BudgetGuard` keeps each stage on time. ``on_samples(step, completions)``
    gets short continuations of fixed prompts at each pretraining evaluation and at its end.
    """
    from .plan import BudgetGuard, chain
    from .train import Trainer, set_rng_state

    results = []
    prompts = _sample_prompts(corpus) if on_samples is not None else []
    for index, plan in enumerate(plans):
        trainer = plan.trainer
        if trainer is None:
            if plan.rng:
                set_rng_state(plan.rng)
            trainer = Trainer(bench.model, bench.tokenizer, plan.stage, corpus, plan.config)
            if plan.state is not None:
                trainer.load_state_dict(plan.state)
        plan.trainer = None  # a plan's trainer runs once
        bench.steps_before_stage = max(0, bench.steps - trainer.step) if plan.state is not None else bench.steps
        bench.trainer = trainer
        bench.pending = [p.to_dict() for p in plans[index + 1:]]
        bench.corpus_sources = list(corpus.sources)
        if on_trainer is not None:
            on_trainer(trainer)
        callbacks: list[Any] = []
        if budget is not None and budget.deadline is not None and trainer.world == 1:
            later = sum(a.seconds for a in budget.stages[index + 1:])
            # The guard may shorten the plan, or grow it up to the stage's most steps when the
            # machine runs faster than the warm-up measured.
            callbacks.append(BudgetGuard(trainer, budget.deadline - later, clock=clock,
                                         max_steps=trainer.step + budget.stages[index].max_steps))
        if prompts and plan.stage == "pretrain":
            callbacks.append(_sampler(bench, trainer, prompts, on_samples))
        if trainer.rank == 0:
            trainer.on_event = chain(*callbacks, on_event)
        result = _run_with_threads(trainer, budget.stages[index].threads if budget is not None else 0)
        bench.stage = plan.stage
        bench.steps = bench.steps_before_stage + result.steps
        bench.train_loss = result.train_loss if result.train_loss is not None else bench.train_loss
        bench.val_loss = result.val_loss
        bench.results.append(result)
        results.append(result)
        if result.status not in ("completed", "early_stopped"):
            break
        if after_stage is not None and index + 1 < len(plans):
            after_stage(bench, result)
    return results


def _run_with_threads(trainer: "Trainer", threads: int) -> "TrainResult":
    """``trainer.run()`` with PyTorch using ``threads`` threads (0: as it is), then as before."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return trainer.run()
    finally:
        torch.set_num_threads(before)


def _sample_prompts(corpus: "Corpus") -> list[str]:
    from .completion import sample_prompts

    return sample_prompts(corpus.texts)


def _sampler(bench: Workbench, trainer: "Trainer", prompts: list[str],
             on_samples: "Callable[[int, list[Completion]], None]") -> EventCallback:
    """An event callback that continues ``prompts`` after each evaluation and at the end."""
    from .completion import samples

    last = [-1]

    def call(event: "TrainEvent") -> None:
        if event.kind in ("eval", "end") and event.step > 0 and event.step != last[0]:
            last[0] = event.step
            on_samples(event.step, samples(bench.model, bench.tokenizer, prompts))
    return call


def quality_lines(bench: Workbench) -> list[str]:
    """What this session's pretraining validation figures mean, one line per pretraining run."""
    from .quality import verdict

    lines = []
    for result in bench.results:
        if result.stage == "pretrain":
            line = verdict(result.val_bpc, result.best_val_bpc, result.frequency_bpc)
            if line:
                lines.append(line)
    return lines


def train_state(bench: Workbench) -> dict | None:
    """The training state to store in a ``.pt``: the last trainer's, with the stages still to come."""
    if bench.trainer is not None:
        state = bench.trainer.state_dict()
        state["pending_stages"] = list(bench.pending)
        last = bench.results[-1] if bench.results else None
        if last is not None and last.stage == bench.trainer.stage and last.status == "early_stopped":
            state["stage_finished"] = True  # stopped on purpose before its last step
        return state
    return bench.loaded_state


def is_resumable(state: dict | None) -> bool:
    """True when ``state`` holds an unfinished stage or stages still to come."""
    if not state:
        return False
    return bool(state.get("pending_stages")) or _stage_unfinished(state)


def _stage_unfinished(state: dict) -> bool:
    total = (state.get("scheduler") or {}).get("total_steps")
    return (isinstance(total, int) and int(state.get("step", 0)) < total
            and not state.get("stage_finished"))


def resume_plans(state: dict) -> list[StagePlan]:
    """The stages an exact resume runs: the unfinished one (from its saved state), then the pending."""
    from .train import TrainConfig

    if not is_resumable(state):
        raise ValueError("这个检查点没有未完成的训练 this checkpoint has no unfinished training to resume")
    plans = []
    if _stage_unfinished(state):
        plans.append(StagePlan(state["stage"], TrainConfig.from_dict(state["config"]), state=state))
    for item in state.get("pending_stages") or []:
        plans.append(StagePlan(item["stage"], TrainConfig.from_dict(item["config"])))
    if plans[0].state is None:  # the saved stage had finished: go on with the randomness it left
        plans[0].rng = state.get("rng")
    return plans


def prepare_resume(loaded: "LoadedModel", path: str | os.PathLike | None = None
                   ) -> tuple[Workbench, "Corpus", list[StagePlan]]:
    """Everything an exact resume needs: the workbench, its corpus reloaded, and the stages to run."""
    state = loaded.train_state
    if not is_resumable(state):
        raise ValueError(f"{path or 'this model'}: 没有未完成的训练可以继续 holds no unfinished training to resume")
    plans = resume_plans(state)
    corpus = corpus_from_sources(state.get("corpus_sources") or [])
    return bench_from_loaded(loaded, path), corpus, plans


def continue_plan(bench: Workbench, epochs: int = CONTINUE_EPOCHS, lr: float = CONTINUE_LR,
                  stage: str | None = None, seed: int | None = None) -> StagePlan:
    """More training for a loaded model: a new run of its stage (chat tuning when unknown)."""
    stage = stage or (bench.stage if bench.stage in STAGES else "chat")
    return StagePlan(stage, stage_config(stage, bench.config, epochs=epochs, lr=lr, seed=seed))


def corpus_for(bench: Workbench) -> "Corpus | None":
    """The corpus the model was trained on, when its sources are recorded and still readable."""
    from .data import DataError

    if not bench.corpus_sources:
        return None
    try:
        return corpus_from_sources(bench.corpus_sources)
    except (DataError, OSError):
        return None


# --- saving ---------------------------------------------------------------------------------------

@dataclass
class SavedFile:
    """Where a model was written, in which format and how big it is."""

    path: Path
    format: str
    size_bytes: int


def with_suffix(path: str | os.PathLike, fmt: str) -> Path:
    """``path`` with the suffix of ``fmt`` ("pt" or "json") added when it has none."""
    target = Path(path).expanduser()
    return Path(f"{target}.{fmt}") if target.suffix == "" else target


def default_path(fmt: str, stem: str = "model_final") -> Path:
    """The suggested file for a format: ``checkpoints/<stem>.pt`` or ``exports/<stem>.json``."""
    return Path("checkpoints" if fmt == "pt" else "exports") / f"{stem}.{fmt}"


def path_problem(path: str | os.PathLike, fmt: str) -> str | None:
    """Why ``path`` cannot take a model of format ``fmt``, or None. An existing file is no problem
    here (the caller asks before overwriting it)."""
    text = str(path).strip()
    if not text:
        return "请给出文件名 please give a file name"
    target = Path(text).expanduser()
    if target.suffix.lower() not in ("." + fmt, ""):
        return f"{fmt} 文件应以 .{fmt} 结尾 a {fmt} file should end in .{fmt}"
    if target.is_dir():
        return f"{target} 是文件夹，请给出文件名 is a folder; give a file name"
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        return f"{parent} 是文件，不是文件夹 is a file, not a folder"
    if not os.access(parent, os.W_OK):
        return f"{parent} 不可写 cannot write in {parent}"
    return None


def metadata_for(bench: Workbench, state: dict | None = None) -> dict[str, Any]:
    """The metadata stored with a saved model (stage, steps, losses, data, per-stage results).
    ``state`` is the training state saved alongside (``.pt`` only): ``resumable`` and
    ``next_stages`` summarise it so a listing can tell without loading the file."""
    from .formats.common import AUTOMATIC_KEYS, build_metadata

    history = [[s, l] for s, l in bench.loss_history()] or bench.metadata.get("loss_history") or []
    stages = list(bench.metadata.get("stage_results") or [])
    stages += [{"stage": r.stage, "status": r.status, "steps": r.steps, "total_steps": r.total_steps,
                "train_loss": r.train_loss, "val_loss": r.val_loss, "elapsed_s": round(r.elapsed_s, 3)}
               for r in bench.results]
    kept = {k: v for k, v in bench.metadata.items() if k not in AUTOMATIC_KEYS}
    kept.update(corpus_sources=list(bench.corpus_sources), stage_results=stages, resumable=is_resumable(state),
                next_stages=_next_stages(state))
    return build_metadata(bench.model, stage=bench.stage, steps=bench.steps, train_loss=bench.train_loss,
                          val_loss=bench.val_loss, loss_history=history, **kept)


def _next_stages(state: dict | None) -> list[str]:
    """The stages an exact resume of ``state`` would train, in order."""
    if not is_resumable(state):
        return []
    return [plan.stage for plan in resume_plans(state)]


def info_resumable(info: Any) -> bool:
    """Whether a listed checkpoint (``CheckpointInfo``) can be resumed: a readable ``.pt`` with
    training state that is unfinished (as its metadata says; files from elsewhere are given the
    benefit of the doubt and checked on loading)."""
    if getattr(info, "error", None) or info.format != "pt" or not info.has_train_state:
        return False
    return bool((info.metadata or {}).get("resumable", True))


#: What :func:`save` writes.
FORMATS = ("pt", "json", "hf", "gguf")


def save(bench: Workbench, path: str | os.PathLike, fmt: str, *, gguf_type: str = "f32") -> SavedFile:
    """Write the model as ``fmt`` ("pt": binary with training state; "json": export; "hf": a Hugging
    Face Llama folder; "gguf": a llama.cpp / Ollama file of ``gguf_type`` f32, f16 or q8_0, with a
    Modelfile beside it). Folders are created; each write is atomic (diyapp.formats). Every format
    carries the same metadata. Only rank 0 writes under torchrun."""
    from .formats.common import dir_size

    if fmt not in FORMATS:
        raise ValueError(f"格式必须是 pt、json、hf 或 gguf format must be pt, json, hf or gguf (got {fmt!r})")
    target = Path(path).expanduser() if fmt == "hf" else with_suffix(path, fmt)
    if is_main_process():
        if fmt == "pt":
            state = train_state(bench)
            from .formats.pt import save_model_binary
            save_model_binary(target, bench.model, bench.tokenizer, train_state=state,
                              metadata=metadata_for(bench, state))
        elif fmt == "json":
            from .formats.json import save_model_json
            save_model_json(target, bench.model, bench.tokenizer, metadata=metadata_for(bench))
        elif fmt == "gguf":
            from .formats.gguf import export_gguf
            export_gguf(target, bench.model, bench.tokenizer, gguf_type=gguf_type, metadata=metadata_for(bench))
        else:
            from .formats.hf import export_hf
            export_hf(target, bench.model, bench.tokenizer, metadata=metadata_for(bench))
    if not target.exists():
        size = 0
    else:
        size = dir_size(target) if target.is_dir() else target.stat().st_size
    return SavedFile(target, fmt, size)


def export(bench: Workbench, *, json_path: str | os.PathLike | None = None, pt_path: str | os.PathLike | None = None,
           hf_dir: str | os.PathLike | None = None, gguf_path: str | os.PathLike | None = None,
           gguf_type: str = "f32") -> list[SavedFile]:
    """Write the model in each requested form (``hf_dir``: a Hugging Face Llama folder; ``gguf_path``:
    a GGUF file of ``gguf_type`` for llama.cpp / Ollama)."""
    wanted = (("pt", pt_path), ("json", json_path), ("hf", hf_dir), ("gguf", gguf_path))
    return [save(bench, path, fmt, gguf_type=gguf_type) for fmt, path in wanted if path is not None]


def human_size(size: int) -> str:
    """``1536`` -> ``"1.5 KB"``."""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def human_count(n: int | None) -> str:
    """``1234567`` -> ``"1.23M"``."""
    if n is None:
        return "-"
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def known_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message is fit to show a person as it is (anything else is a bug)."""
    from .formats.common import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .train import TrainingError

    return (CheckpointError, ConfigError, DataError, TrainingError, ValueError, OSError)


def int_parser(low: int, high: int, what: str = "") -> Parser:
    """Whole numbers from ``low`` to ``high``. Refusals say why in Chinese and English, after
    ``what`` (a label) when given; the question that asks adds its own name (``ui.prompts``)."""
    def parse(text: str) -> int:
        raw = text.strip()
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(_labelled(what, f"需要一个整数 must be a whole number (got {raw!r})")) from None
        if value < low:
            raise ValueError(_labelled(what, f"至少是 {low} must be at least {low} (got {value})"))
        if value > high:
            raise ValueError(_labelled(what, f"最多是 {high}，这个值不合理 must be at most {high} (got {value})"))
        return value
    return parse


def float_parser(low_exclusive: float, high: float, what: str = "", example: str = "0.0001") -> Parser:
    """Finite numbers in ``(low_exclusive, high]``; refusals as in :func:`int_parser`."""
    def parse(text: str) -> float:
        raw = text.strip()
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(_labelled(what, f"需要一个数字，例如 {example} must be a number such as {example} "
                                             f"(got {raw!r})")) from None
        if not math.isfinite(value):
            raise ValueError(_labelled(what, f"必须是有限的数字 must be a finite number (got {raw})"))
        if value <= low_exclusive:
            raise ValueError(_labelled(what, f"必须大于 {low_exclusive:g} must be greater than {low_exclusive:g} "
                                             f"(got {raw})"))
        if value > high:
            raise ValueError(_labelled(what, f"最多是 {high:g}，{raw} 太大了 must be at most {high:g} (got {raw})"))
        return value
    return parse


def _labelled(what: str, reason: str) -> str:
    return f"{what.strip()}：{reason}" if what.strip() else reason


#: Parses a learning rate typed on the command line or at a prompt.
parse_lr = float_parser(0.0, MAX_LR)

"""The training engine: pretraining on plain text and chat tuning on dialogues.

It prints nothing; progress goes to an ``on_event`` callback as :class:`TrainEvent` values. The
learning-rate schedule is a pure function of the step and the data order a pure function of
(seed, epoch), so the state needed for an exact resume is small and plain (see
:meth:`Trainer.state_dict`). Under ``torchrun`` the same entry point trains with
DistributedDataParallel; only rank 0 reports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import threading
import time
from array import array
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from .allocator import keep_freed_memory
from .config import DIYConfig
from .data import Corpus
from .device import autocast_dtype, pick_device, precision_name
from .model import DIYForCausalLM
from .muon import Muon
from .ngram import KneserNey, count_symbols
from .tokenizer import DIYTokenizer

STAGES = ("pretrain", "chat")
OPTIMIZERS = ("adamw", "muon")
STATE_VERSION = 1
#: The vocabulary is learned from at most about this many characters, spread over the corpus
#: (4M characters of varied Chinese cost the tokenizer library about 650 MB; the bundled data
#: and songci.txt are smaller and learned from whole).
VOCAB_SAMPLE_CHARS = 4_000_000


@dataclass
class TrainConfig:
    """How one stage trains. ``warmup_steps=None`` means 5% of the steps (at least 1);
    ``dropout`` overrides the model's dropout rate while this stage trains (None keeps it)."""

    epochs: int = 10
    batch_size: int = 16
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup_steps: int | None = None
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1
    val_fraction: float = 0.05
    eval_every: int = 0
    patience: int = 0
    seed: int = 42
    precision: str = "auto"
    max_steps: int | None = None
    dropout: float | None = None
    #: "adamw" for every weight, or "muon": :class:`diyapp.muon.Muon` for the transformer blocks'
    #: matrices (peak rate ``muon_lr``, on the same schedule) and AdamW for the rest.
    optimizer: str = "adamw"
    muon_lr: float = 0.02

    def __post_init__(self) -> None:
        problems = []
        for name in ("epochs", "batch_size", "grad_accum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive integer")
        for name in ("lr", "muon_lr"):
            if not (isinstance(getattr(self, name), (int, float)) and 0 < getattr(self, name) <= 1):
                problems.append(f"{name} must be a number in (0, 1]")
        if not (isinstance(self.min_lr, (int, float)) and 0 <= self.min_lr <= self.lr):
            problems.append("min_lr must be between 0 and lr")
        if not 0 <= self.val_fraction < 1:
            problems.append("val_fraction must be in [0, 1)")
        if self.precision not in ("auto", "fp32", "bf16"):
            problems.append("precision must be auto, fp32 or bf16")
        for name in ("eval_every", "patience"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append("max_steps must be positive")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            problems.append("dropout must be in [0, 1)")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {', '.join(OPTIMIZERS)}")
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class TrainEvent:
    """One progress report. ``kind``: start | step | eval | end."""

    kind: str
    stage: str
    step: int
    total_steps: int
    epoch: int = 0
    epochs: int = 0
    loss: float | None = None
    lr: float | None = None
    tokens_per_s: float | None = None
    elapsed_s: float = 0.0
    eta_s: float | None = None
    val_loss: float | None = None
    message: str = ""
    val_bpc: float | None = None


@dataclass
class TrainResult:
    """How a run ended. ``status``: completed | early_stopped | interrupted | diverged | paused."""

    status: str
    stage: str
    steps: int
    total_steps: int
    train_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    elapsed_s: float
    tokens: int
    message: str = ""
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    val_bpc: float | None = None
    best_val_bpc: float | None = None
    frequency_bpc: float | None = None


class TrainingError(RuntimeError):
    """Training cannot start (no usable data) or cannot go on."""


def build_tokenizer(corpus: Corpus, vocab_size: int = 6400, whole_characters: bool = False) -> DIYTokenizer:
    """A byte-level BPE trained on the corpus: its documents and its dialogues as the chat
    template lays them out (role names included, special markers left to the tokenizer).
    ``whole_characters``: a vocabulary of characters, not words (:meth:`DIYTokenizer.train`)."""
    texts = list(corpus.texts)
    for dialogue in corpus.dialogues:
        texts.extend(f"{m['role']}\n{m['content']}\n" for m in dialogue)
    if not texts:
        raise TrainingError("语料是空的，无法构建词表 the corpus is empty: nothing to build a vocabulary from")
    return DIYTokenizer.train(texts, vocab_size, whole_characters=whole_characters,
                              sample_chars=VOCAB_SAMPLE_CHARS)


def new_model(config: DIYConfig, tokenizer: DIYTokenizer) -> DIYForCausalLM:
    """A freshly initialised model whose vocabulary is the tokenizer's real size."""
    return DIYForCausalLM(dataclasses.replace(config, vocab_size=tokenizer.vocab_size))


def default_stage_config(stage: str, model_config: DIYConfig | None = None) -> TrainConfig:
    """The recipe the app uses for a stage when the person presses Enter through the questions.

    Both stages train the blocks' matrices with Muon (:mod:`diyapp.muon`) and the rest with AdamW.
    Pretraining teaches the language in many small steps (batch 4) over the documents. Chat tuning
    trains on every dialogue (no held-out split, so every bundled question is learned) with dropout
    off and a strong weight decay, on rows that are conversations of several dialogues
    (:func:`compose_rows`). Chosen by a scratch sweep on a dev split of rephrasings left out of
    training (bench/README.md, "Muon", has the table): Muon reached in 8 + 8 epochs at batch 8 what
    AdamW reached in 16 + 16 (97.7% against 97.5% of trained questions at turn 1, 71% against 60%
    of the dev rephrasings); chat batch 16 costs fewer, larger steps (a Muon step's extra cost is
    per step, not per row); 10 chat epochs leave a margin (98.7%; 9 epochs, after 4 of pretraining: 97.7%); 2 pretraining
    epochs instead of 4 cost half a point and kept a CPU without native bf16 inside 3 minutes.
    """
    if stage == "pretrain":
        return TrainConfig(epochs=2, batch_size=4, lr=3e-3, min_lr=3e-4, val_fraction=0.05, dropout=0.0,
                           optimizer="muon")
    if stage == "chat":
        return TrainConfig(epochs=10, batch_size=16, lr=3e-3, min_lr=1e-4, weight_decay=0.6, val_fraction=0.0,
                           dropout=0.0, optimizer="muon")
    raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")


# --- data -----------------------------------------------------------------------------------

@dataclass
class _Examples:
    """Tokenised pieces: ids and, for chat, the loss mask (1 where the target counts). A training
    row is one piece (pretraining) or several pieces in sequence (chat: see :func:`compose_rows`).
    Packed text also records its size in tokens and in predicted characters (each document's
    characters and its end), which turn a loss per token into bits per character."""

    ids: Sequence[list[int]]
    masks: list[list[int]] | None
    #: chat: pieces are whole dialogues and rows join several of them, up to this many tokens
    row_tokens: int | None = None
    tokens: int = 0
    chars: int = 0
    frequency_bpc: float | None = None

    def layout(self, seed: int, epoch: int) -> list[list[int]]:
        """The rows of one epoch, each a list of piece indices (a function of seed and epoch)."""
        if self.row_tokens is None:
            return [[i] for i in range(len(self.ids))]
        return compose_rows([len(r) for r in self.ids], self.row_tokens, seed, epoch)


class _PackedRows(Sequence):
    """Rows of ``width`` tokens cut from one token stream kept as 4-byte integers (a list of lists
    of Python ints takes about nine times the memory); row ``i`` becomes a list when asked for.
    A last row shorter than 2 tokens (nothing to predict) is left out."""

    def __init__(self, stream: array, width: int) -> None:
        self._stream = stream
        self._width = width
        count = -(-len(stream) // width) if width >= 2 else 0
        if count and len(stream) - (count - 1) * width < 2:
            count -= 1
        self._count = count

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._count))]
        if index < 0:
            index += self._count
        if not 0 <= index < self._count:
            raise IndexError(f"row {index} of {self._count}")
        return self._stream[index * self._width:(index + 1) * self._width].tolist()


def _split(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic train/validation split; at least one item stays in training."""
    if fraction <= 0 or len(items) < 2:
        return items, []
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(len(items) - 1, max(1, round(len(items) * fraction)))
    val = set(order[:n_val])
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]


def split_texts(texts: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Training and validation documents; a validation document that also occurs in the training
    part (a duplicate in the corpus) is dropped, so the validation figures are on unseen text."""
    train, val = _split(list(texts), val_fraction, seed)
    seen = set(train)
    return train, [t for t in val if t not in seen]


def pack_texts(tokenizer: DIYTokenizer, texts: list[str], max_seq_len: int) -> _Examples:
    """Documents joined with end-of-text markers and cut into rows of ``max_seq_len`` tokens.
    Each text is encoded a piece at a time into one compact stream (a long corpus is never held
    as Python lists)."""
    stream = array("i")
    for text in texts:
        for ids in tokenizer.encode_pieces(text):
            stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    return _Examples(_PackedRows(stream, max_seq_len), None, tokens=len(stream), chars=count_symbols(texts))


def encode_dialogues(tokenizer: DIYTokenizer, dialogues: list[list[dict]], max_seq_len: int) -> _Examples:
    """Each dialogue with its assistant mask, cut at ``max_seq_len``; one left with no assistant
    token is dropped. Training rows then join several dialogues in sequence (:func:`compose_rows`)."""
    ids, masks = [], []
    for dialogue in dialogues:
        row, mask = tokenizer.encode_chat(dialogue)
        row, mask = row[:max_seq_len], mask[:max_seq_len]
        if any(mask[1:]):
            ids.append(row)
            masks.append(mask)
    return _Examples(ids, masks, row_tokens=max_seq_len)


def compose_rows(lengths: list[int], row_tokens: int, seed: int, epoch: int) -> list[list[int]]:
    """Chat rows as conversations: the dialogues in a shuffled order (a function of seed and
    epoch), each row taking the next whole dialogues while they fit in ``row_tokens`` tokens.

    The chat carries earlier exchanges in its prompt, dropping the oldest whole exchanges when
    the context is full (:func:`diyapp.chat.build_prompt`); rows built this way train every
    answer after 0, 1, 2 ... unrelated earlier exchanges, always starting at an exchange
    boundary, with the loss on every assistant turn. Each dialogue is in exactly one row per
    epoch, in a different company each epoch; rows are nearly full, so little is padding.
    """
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed * 7_919 + epoch)).tolist()
    rows: list[list[int]] = []
    row: list[int] = []
    used = 0
    for i in order:
        if row and used + lengths[i] > row_tokens:
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += lengths[i]
    if row:
        rows.append(row)
    return rows


def stage_examples(tokenizer: DIYTokenizer, corpus: Corpus, stage: str, max_seq_len: int,
                   val_fraction: float, seed: int) -> tuple[_Examples, _Examples]:
    """Training and validation rows for a stage, split by document/dialogue before tokenising."""
    if stage == "pretrain":
        train, val = split_texts(corpus.texts, val_fraction, seed)
        held_out = pack_texts(tokenizer, val, max_seq_len)
        if val:
            held_out.frequency_bpc = KneserNey(train, order=1).bits_per_char(val)
        return pack_texts(tokenizer, train, max_seq_len), held_out
    if stage == "chat":
        train, val = _split(list(corpus.dialogues), val_fraction, seed)
        return encode_dialogues(tokenizer, train, max_seq_len), encode_dialogues(tokenizer, val, max_seq_len)
    raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")


def _epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: shuffled, then grouped by length in windows of 32 batches so
    rows of a batch pad little, then the batch order shuffled. A function of (seed, epoch) only."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    window = batch_size * 32
    batches = []
    for i in range(0, len(order), window):
        chunk = sorted(order[i:i + window], key=lambda j: lengths[j])
        batches.extend(chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size))
    shuffle = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in shuffle]


#: Batch widths are rounded up to a multiple of this many tokens. bf16 matrix products on a CPU
#: (oneDNN) compile a kernel for each new shape, which costs 3-10 ms per product: with chat rows of
#: every width from 2 to 128 tokens that cost more than the products themselves (a chat-tuning step
#: of the default model took 68 ms instead of 56 ms). A few widths are compiled once and reused.
WIDTH_MULTIPLE = 16


def _collate(examples: _Examples, rows: list[list[int]], pad_id: int, device: torch.device,
             max_width: int | None = None) -> tuple[Tensor, Tensor, Tensor | None, int]:
    """Right-padded ``(ids, lengths, loss_mask, target_count)`` for rows of piece indices (the
    pieces of a row joined in order). With ``max_width`` (the model's context) the width is rounded
    up to a multiple of :data:`WIDTH_MULTIPLE`, never past ``max_width``."""
    joined = [[t for i in row for t in examples.ids[i]] for row in rows]
    width = max(len(r) for r in joined)
    if max_width is not None:
        width = max(width, min(-(-width // WIDTH_MULTIPLE) * WIDTH_MULTIPLE, max_width))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    lengths = torch.tensor([len(r) for r in joined], dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long) if examples.masks is not None else None
    for r, row in enumerate(joined):
        ids[r, :len(row)] = torch.tensor(row)
        if mask is not None:
            m = [t for i in rows[r] for t in examples.masks[i]]
            mask[r, :len(m)] = torch.tensor(m)
    count = int((lengths - 1).clamp(min=0).sum()) if mask is None else int(mask[:, 1:].sum())
    return (ids.to(device), lengths.to(device), None if mask is None else mask.to(device), count)


# --- the engine -------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """PyTorch's random-number state (CPU, and every CUDA device when present) as plain data."""
    rng: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def set_rng_state(rng: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (parts that are missing, or CUDA without a GPU, are skipped)."""
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def lr_at(step: int, total: int, peak: float, floor: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to ``floor`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def make_optimizer(params: Sequence[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over ``params``, with weight decay on matrices (and embeddings) only, never on norm scales."""
    decay = [p for p in params if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in params if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    params = decay + no_decay
    # The fused kernel measured 2.6 ms per step against 6.9 ms for foreach on the default model
    # (bench/bench_speed.py); it needs every parameter on one CPU or CUDA device.
    fused = len({p.device for p in params}) == 1 and params[0].device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def block_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The transformer blocks' weight matrices (attention and MLP projections): what Muon trains."""
    return [p for name, p in model.named_parameters()
            if p.requires_grad and p.dim() == 2 and name.startswith("model.layers.")]


def make_optimizers(model: nn.Module, config: TrainConfig, low_precision: torch.dtype | None = None
                    ) -> tuple[torch.optim.AdamW, Muon | None]:
    """The stage's optimizers: AdamW for every weight, or (``config.optimizer == "muon"``) AdamW
    for the embeddings, head and norm scales and Muon for the blocks' matrices. Muon's weight decay
    is scaled so that each step shrinks a matrix as much as AdamW's would (``lr·weight_decay``);
    its Newton-Schulz products run in ``low_precision`` (the stage's autocast dtype, bf16 where
    the hardware runs it natively), else in float32."""
    if config.optimizer != "muon":
        return make_optimizer(list(model.parameters()), config.lr, config.weight_decay), None
    matrices = block_matrices(model)
    chosen = {id(p) for p in matrices}
    rest = [p for p in model.parameters() if id(p) not in chosen]
    muon = Muon(matrices, lr=config.muon_lr, weight_decay=config.weight_decay * config.lr / config.muon_lr,
                ns_dtype=low_precision)
    return make_optimizer(rest, config.lr, config.weight_decay), muon


class _LossModule(nn.Module):
    """Puts the loss in ``forward`` so DistributedDataParallel sees every training call."""

    def __init__(self, model: DIYForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor, lengths: Tensor, loss_mask: Tensor | None) -> Tensor:
        return self.model.compute_loss(ids, seq_lengths=lengths, loss_mask=loss_mask)


def _dist_world() -> tuple[int, int]:
    """(rank, world size): from an initialised process group, else from torchrun's variables."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class Trainer:
    """Trains one stage ("pretrain" or "chat") of ``model`` on ``corpus``.

    Call :meth:`run`; it returns a :class:`TrainResult` and leaves the model, optimizer and data
    position consistent at a step boundary whatever the ending (Ctrl-C included), so
    :meth:`state_dict` can be saved and a later Trainer can :meth:`load_state_dict` and go on.
    """

    def __init__(self, model: DIYForCausalLM, tokenizer: DIYTokenizer, stage: str, corpus: Corpus,
                 config: TrainConfig | None = None, on_event: Callable[[TrainEvent], None] | None = None,
                 device: torch.device | str | None = None) -> None:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.config = config or TrainConfig()
        self.stage = stage
        self.tokenizer = tokenizer
        self.corpus_sources = list(corpus.sources)
        self.rank, self.world = _dist_world()
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch.distributed.init_process_group(backend)
        if self.world > 1 and torch.cuda.is_available() and device is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        self.device = pick_device(str(device) if device is not None else None)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)
        self.model = model.to(self.device)
        self.on_event = on_event if self.rank == 0 else None
        self.amp_dtype = autocast_dtype(self.device, self.config.precision)
        if self.device.type == "cpu" and self.amp_dtype is not None:
            keep_freed_memory()  # each bf16 step's buffers reused, not page-faulted in again
        if model.config.vocab_size < tokenizer.vocab_size:
            raise TrainingError(f"模型的词表 ({model.config.vocab_size}) 比分词器的 ({tokenizer.vocab_size}) 小 "
                                f"the model's vocabulary ({model.config.vocab_size}) is smaller than the "
                                f"tokenizer's ({tokenizer.vocab_size})")
        self.train_rows, self.val_rows = stage_examples(
            tokenizer, corpus, stage, model.config.max_seq_len, self.config.val_fraction, self.config.seed)
        if not self.train_rows.ids:
            zh, en = (("预训练", "text documents") if stage == "pretrain"
                      else ("对话微调", "dialogues with an assistant answer"))
            raise TrainingError(f"{zh}阶段没有训练数据（语料里没有{'文本' if stage == 'pretrain' else '带回答的对话'}） "
                                f"no training data for the {stage} stage: the corpus has no {en}")
        if len(self.train_rows.layout(self.config.seed, 0)) < self.world:
            rows = len(self.train_rows.layout(self.config.seed, 0))
            raise TrainingError(f"{rows} 行训练数据不够分给 {self.world} 个进程 {rows} training rows cannot feed "
                                f"{self.world} processes")
        self._layout_cache: tuple[int, list[list[int]]] | None = None
        self.steps_per_epoch = self._epoch_steps(0)
        if self.train_rows.row_tokens is None:  # the same rows every epoch
            total = self.steps_per_epoch * self.config.epochs
        else:  # rows are composed anew each epoch, so their number varies a little
            total = 0
            for epoch in range(self.config.epochs):
                total += self._epoch_steps(epoch)
                if self.config.max_steps and total >= self.config.max_steps:
                    break
        self.total_steps = min(total, self.config.max_steps) if self.config.max_steps else total
        self.warmup = self.config.warmup_steps if self.config.warmup_steps is not None \
            else max(1, round(0.05 * self.total_steps))
        self.optimizer, self.muon = make_optimizers(self.model, self.config, self.amp_dtype)
        self._module: nn.Module = _LossModule(self.model)
        if self.world > 1:
            self._module = nn.parallel.DistributedDataParallel(
                self._module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.tokens_seen = 0
        self.best_val: float | None = None
        self.bad_evals = 0
        self.last_loss: float | None = None
        self.last_val: float | None = None
        self.loss_history: list[tuple[int, float]] = []
        self._stop = False

    def _layout(self, epoch: int) -> list[list[int]]:
        """The training rows of ``epoch`` (lists of piece indices); the last one is kept."""
        if self._layout_cache is None or self._layout_cache[0] != epoch:
            self._layout_cache = (epoch, self.train_rows.layout(self.config.seed, epoch))
        return self._layout_cache[1]

    def _epoch_steps(self, epoch: int) -> int:
        batches = math.ceil(len(self._layout(epoch)) / self.config.batch_size)
        return math.ceil(batches / self.config.grad_accum)

    # -- control ------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the run to stop at the next step boundary (safe from a signal handler)."""
        self._stop = True

    def set_total_steps(self, total: int) -> None:
        """End the stage after ``total`` optimizer steps (at least one more than done so far). The
        schedule is laid over the new count, and ``config.max_steps``/``epochs`` follow it, so a
        saved state resumes with the same plan."""
        total = max(self.step + 1, int(total))
        self.config.max_steps = total
        if self.train_rows.row_tokens is None:
            self.config.epochs = math.ceil(total / self.steps_per_epoch)
        else:  # composed rows: epochs differ a little in length, so count them
            epochs, steps = 0, 0
            while steps < total:
                steps += self._epoch_steps(epochs)
                epochs += 1
            self.config.epochs = epochs
        self.total_steps = total
        if self.config.warmup_steps is None:
            self.warmup = max(1, round(0.05 * total))

    def bits_per_char(self, val_loss: float | None) -> float | None:
        """A validation loss per token as bits per character of the validation text (pretraining
        only: chat tuning scores only the answers' tokens)."""
        if val_loss is None or not self.val_rows.chars:
            return None
        return val_loss * self.val_rows.tokens / self.val_rows.chars / math.log(2)

    @contextlib.contextmanager
    def _sigint_stops(self) -> Iterator[None]:
        """While training in the main thread, Ctrl-C asks for a stop instead of raising mid-step."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, lambda *_: self.request_stop())
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _agree(self, flag: bool) -> bool:
        """True on every rank when any rank says so (no-op for one process)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(t)
        return bool(t.item() > 0)

    def _emit(self, kind: str, **values: Any) -> None:
        if self.on_event is not None:
            self.on_event(TrainEvent(kind=kind, stage=self.stage, step=self.step, total_steps=self.total_steps,
                                     epoch=self.epoch, epochs=self.config.epochs, **values))

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # -- evaluation ---------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean validation loss per target token, or None without a validation split."""
        if not self.val_rows.ids:
            return None
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        layout = self.val_rows.layout(self.config.seed, 0)
        for start in range(0, len(layout), self.config.batch_size):
            rows = layout[start:start + self.config.batch_size]
            ids, lengths, mask, n = _collate(self.val_rows, rows, self.tokenizer.pad_token_id, self.device,
                                           self.model.config.max_seq_len)
            if n == 0:
                continue
            with self._autocast():
                loss = self.model.compute_loss(ids, seq_lengths=lengths, loss_mask=mask)
            total += float(loss) * n
            count += n
        self.model.train(was_training)
        return total / count if count else None

    # -- the loop -----------------------------------------------------------------------------

    def _micro_batches(self) -> Iterator[tuple[int, list[list[list[int]]]]]:
        """(epoch, micro-batches of one optimizer step), from the saved position onwards."""
        accum = self.config.grad_accum
        pieces = self.train_rows.ids
        while self.epoch < self.config.epochs:
            layout = self._layout(self.epoch)
            lengths = [sum(len(pieces[i]) for i in row) for row in layout]
            batches = _epoch_batches(lengths, self.config.batch_size, self.config.seed, self.epoch)
            while self.batch_in_epoch < len(batches):
                group = [[layout[j] for j in batch]
                         for batch in batches[self.batch_in_epoch:self.batch_in_epoch + accum]]
                yield self.epoch, group
            self.epoch += 1
            self.batch_in_epoch = 0

    def _step(self, group: list[list[list[int]]]) -> tuple[float, int] | None:
        """One optimizer step over ``group``; returns (loss, tokens) or None if the loss was not finite."""
        self._zero_grad()
        parts = []
        for rows in group:
            mine = rows[self.rank::self.world]
            parts.append(_collate(self.train_rows, mine, self.tokenizer.pad_token_id, self.device,
                                  self.model.config.max_seq_len))
        total_targets = float(sum(p[3] for p in parts))
        if self.world > 1:
            t = torch.tensor([total_targets], device=self.device)
            torch.distributed.all_reduce(t)
            total_targets = float(t)
        loss_sum = 0.0
        tokens = 0
        for ids, lengths, mask, n_local in parts:
            tokens += int(lengths.sum())
            # Each micro-batch's mean is re-weighted by its share of all targets in the step (over
            # every rank), so K processes and one process compute the same gradient.
            weight = n_local / total_targets * self.world if total_targets else 0.0
            with self._autocast():
                loss = self._module(ids, lengths, mask)
            (loss * weight).backward()
            loss_sum += float(loss.detach()) * n_local
        loss_value = loss_sum / total_targets if total_targets else 0.0  # this rank's share of the mean
        if self.world > 1:
            t = torch.tensor([loss_value], device=self.device)
            torch.distributed.all_reduce(t)
            loss_value = float(t)  # the same on every rank, so every rank sees a NaN
        if not math.isfinite(loss_value):
            self._zero_grad()
            return None
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        lr = lr_at(self.step, self.total_steps, self.config.lr, self.config.min_lr, self.warmup)
        for group_ in self.optimizer.param_groups:
            group_["lr"] = lr
        self.optimizer.step()
        if self.muon is not None:  # the same schedule, from its own peak
            for group_ in self.muon.param_groups:
                group_["lr"] = lr * self.config.muon_lr / self.config.lr
            self.muon.step()
        return loss_value, tokens * self.world

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.muon is not None:
            self.muon.zero_grad(set_to_none=True)

    def run(self, steps: int | None = None) -> TrainResult:
        """Train until the stage's steps are done, early stopping, a stop request, divergence, or
        ``steps`` more optimizer steps (status "paused"). Never leaves a half-done step."""
        self._stop = False
        self.model.train()
        with self._dropout():
            return self._run(steps)

    @contextlib.contextmanager
    def _dropout(self) -> Iterator[None]:
        """Sets the model's dropout rate to ``config.dropout`` for the run, then puts it back (every
        module reads the rate from the model's one config object)."""
        saved = self.model.config.dropout
        if self.config.dropout is not None:
            self.model.config.dropout = self.config.dropout
        try:
            yield
        finally:
            self.model.config.dropout = saved

    def _run(self, steps: int | None) -> TrainResult:
        started = time.perf_counter()
        run_start_step = self.step
        run_tokens = 0
        status, message = "completed", ""
        eval_every = self.config.eval_every or self.steps_per_epoch
        with self._sigint_stops():
            self._emit("start", message=f"{len(self._layout(self.epoch))} training rows, "
                                        f"{len(self.val_rows.layout(self.config.seed, 0))} validation rows, "
                                        f"precision {precision_name(self.amp_dtype)}")
            for epoch, group in self._micro_batches():
                if self.step >= self.total_steps:
                    break
                if steps is not None and self.step - run_start_step >= steps:
                    status = "paused"
                    break
                if self._agree(self._stop):
                    status, message = "interrupted", "stopped at a step boundary on request"
                    break
                outcome = self._step(group)
                if outcome is None:
                    status = "diverged"
                    message = (f"the loss became NaN or infinite at step {self.step + 1}; the weights were "
                               "left as they were before that step (try a lower learning rate)")
                    break
                loss, tokens = outcome
                self.batch_in_epoch += len(group)
                self.step += 1
                self.tokens_seen += tokens
                run_tokens += tokens
                self.last_loss = loss
                self.loss_history.append((self.step, loss))
                elapsed = time.perf_counter() - started
                rate = (self.step - run_start_step) / elapsed if elapsed > 0 else 0.0
                self._emit("step", loss=loss, lr=self.optimizer.param_groups[0]["lr"],
                           tokens_per_s=run_tokens / elapsed if elapsed > 0 else None, elapsed_s=elapsed,
                           eta_s=(self.total_steps - self.step) / rate if rate > 0 else None)
                if self.step % eval_every == 0 or self.step == self.total_steps:
                    val = self.evaluate()
                    if val is not None:
                        self.last_val = val
                        if self.best_val is None or val < self.best_val - 1e-4:
                            self.best_val, self.bad_evals = val, 0
                        else:
                            self.bad_evals += 1
                        self._emit("eval", loss=loss, val_loss=val, elapsed_s=elapsed,
                                   val_bpc=self.bits_per_char(val))
                        if self.config.patience and self.bad_evals >= self.config.patience:
                            status = "early_stopped"
                            message = f"validation loss did not improve for {self.bad_evals} evaluations"
                            break
        elapsed = time.perf_counter() - started
        result = TrainResult(status=status, stage=self.stage, steps=self.step, total_steps=self.total_steps,
                             train_loss=self.last_loss, val_loss=self.last_val, best_val_loss=self.best_val,
                             elapsed_s=elapsed, tokens=run_tokens, message=message,
                             loss_history=list(self.loss_history), val_bpc=self.bits_per_char(self.last_val),
                             best_val_bpc=self.bits_per_char(self.best_val),
                             frequency_bpc=self.val_rows.frequency_bpc)
        self._emit("end", loss=self.last_loss, val_loss=self.last_val, elapsed_s=elapsed, message=status,
                   val_bpc=result.val_bpc)
        return result

    # -- exact resume ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs, as plain data (dicts, lists, numbers, strings, tensors).

        The model weights are not included: checkpoints store them separately.
        """
        return {
            "version": STATE_VERSION,
            "stage": self.stage,
            "config": self.config.to_dict(),
            "corpus_sources": list(self.corpus_sources),
            "optimizer": self.optimizer.state_dict(),
            **({"muon": self.muon.state_dict()} if self.muon is not None else {}),
            "scheduler": {"step": self.step, "total_steps": self.total_steps, "warmup_steps": self.warmup,
                          "peak_lr": self.config.lr, "min_lr": self.config.min_lr},
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "tokens_seen": self.tokens_seen,
            "best_val_loss": self.best_val,
            "bad_evals": self.bad_evals,
            "last_loss": self.last_loss,
            "last_val_loss": self.last_val,
            "loss_history": [[s, l] for s, l in self.loss_history],
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` output (model weights must already be loaded)."""
        if state.get("version") != STATE_VERSION:
            raise TrainingError(f"不支持的训练状态版本 training state version {state.get('version')!r} is not supported")
        if state.get("stage") != self.stage:
            raise TrainingError(f"保存的训练状态属于另一个阶段 the saved state is for the {state.get('stage')!r} stage, "
                                f"not {self.stage!r}")
        if self.muon is not None and "muon" not in state:
            raise TrainingError("保存的训练状态里没有 Muon 优化器的状态 the saved state has no Muon optimizer state")
        self.optimizer.load_state_dict(state["optimizer"])
        if self.muon is not None:
            self.muon.load_state_dict(state["muon"])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.best_val = state.get("best_val_loss")
        self.bad_evals = int(state.get("bad_evals", 0))
        self.last_loss = state.get("last_loss")
        self.last_val = state.get("last_val_loss")
        self.loss_history = [(int(s), float(l)) for s, l in state.get("loss_history", [])]
        sched = state.get("scheduler", {})
        if sched.get("total_steps") == self.total_steps and "warmup_steps" in sched:
            self.warmup = int(sched["warmup_steps"])
        set_rng_state(state.get("rng", {}))

"""Save a model, load it to answer a prompt, and continue its training exactly where it stopped.

    python examples/model_persistence.py save      [--path P] [--steps 40]
    python examples/model_persistence.py load      [--path P] [--prompt 你好]
    python examples/model_persistence.py continue  [--path P] [--steps N] [--check]

``save`` builds a tokenizer and a small model, trains the chat stage for ``--steps`` optimizer steps
(part of the planned run) and writes a ``.pt`` checkpoint holding the weights, the tokenizer, the
metadata and the full training state (optimizer, schedule position, data position, RNG state).

``load`` reads the checkpoint back and answers ``--prompt``.

``continue`` loads the checkpoint and trains on from the saved step (``--steps`` more, or to the
end of the run) and saves again. With ``--check`` it also trains a second model the same way
without any interruption and reports whether the two end with bit-identical weights: an exact
resume gives exactly the model an uninterrupted run gives.

The data is the bundled corpus (``data/``) when present, else a small built-in sample.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diyapp import DIYConfig  # noqa: E402
from diyapp.chat import ChatSession  # noqa: E402
from diyapp.checkpoint import build_metadata, load_model_binary, save_model_binary  # noqa: E402
from diyapp.data import Corpus, DataError, bundled_corpus  # noqa: E402
from diyapp.generation import GenerationConfig  # noqa: E402
from diyapp.train import TrainConfig, Trainer, build_tokenizer, new_model  # noqa: E402

DEFAULT_PATH = Path("checkpoints/example_persistence.pt")
STAGE = "chat"
INIT_SEED = 1234

SAMPLE_DIALOGUES = [
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！很高兴见到你。"}],
    [{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是一个小小的语言模型。"}],
    [{"role": "user", "content": "天空为什么是蓝色的？"}, {"role": "assistant", "content": "阳光里的蓝光被空气散射得最多。"}],
    [{"role": "user", "content": "水在几度结冰？"}, {"role": "assistant", "content": "在标准大气压下是零度。"}],
    [{"role": "user", "content": "怎样睡得好？"}, {"role": "assistant", "content": "按时睡觉，睡前少看手机。"}],
    [{"role": "user", "content": "谢谢你"}, {"role": "assistant", "content": "不客气，随时可以问我。"}],
]


def load_data(use_sample: bool = False) -> Corpus:
    """The bundled corpus, or the built-in sample (the same every time, so a resume sees the same data)."""
    if not use_sample:
        try:
            return bundled_corpus()
        except DataError:
            pass
    return Corpus(texts=[], dialogues=SAMPLE_DIALOGUES * 4, sources=["built-in sample"])


def model_config(vocab_size: int) -> DIYConfig:
    return DIYConfig(vocab_size=vocab_size, num_layers=2, hidden_size=64, num_heads=4, max_seq_len=96, dropout=0.1)


def train_config() -> TrainConfig:
    return TrainConfig(epochs=20, batch_size=8, lr=3e-3, min_lr=1e-4, val_fraction=0.0, seed=7, precision="fp32")


def fresh_model(corpus: Corpus):
    tokenizer = build_tokenizer(corpus, vocab_size=1200)
    torch.manual_seed(INIT_SEED)
    return new_model(model_config(tokenizer.vocab_size), tokenizer), tokenizer


def save(path: Path, model, tokenizer, trainer: Trainer, result, *, sample: bool) -> None:
    metadata = build_metadata(model, stage=STAGE, steps=trainer.step, train_loss=result.train_loss,
                              val_loss=result.val_loss, loss_history=trainer.loss_history,
                              example="model_persistence", sample_data=sample)
    save_model_binary(path, model, tokenizer, train_state=trainer.state_dict(), metadata=metadata)
    loss = "-" if result.train_loss is None else f"{result.train_loss:.4f}"
    print(f"saved {path} at step {trainer.step}/{trainer.total_steps} "
          f"(loss {loss}, {path.stat().st_size / 1e6:.1f} MB)")


def cmd_save(args: argparse.Namespace) -> int:
    corpus = load_data(args.sample)
    model, tokenizer = fresh_model(corpus)
    trainer = Trainer(model, tokenizer, STAGE, corpus, train_config())
    print(f"training a {model.num_parameters():,}-parameter model on {len(corpus.dialogues)} dialogues "
          f"for {args.steps} of {trainer.total_steps} steps")
    result = trainer.run(steps=args.steps)
    save(args.path, model, tokenizer, trainer, result, sample=args.sample)
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    loaded = load_model_binary(args.path)
    meta = loaded.metadata
    print(f"loaded {args.path}: {meta['parameters']:,} parameters, stage {meta['stage']}, step {meta['steps']}, "
          f"loss {meta['train_loss']}, saved {meta['created_at']}")
    session = ChatSession(loaded.model, loaded.tokenizer, GenerationConfig(temperature=0.0, max_new_tokens=40))
    reply = session.reply(args.prompt)
    print(f"user: {args.prompt}\nmodel: {reply.text}")
    return 0


def cmd_continue(args: argparse.Namespace) -> int:
    loaded = load_model_binary(args.path)
    state = loaded.train_state
    if state is None:
        print(f"{args.path} holds no training state; save it with the 'save' command first", file=sys.stderr)
        return 1
    sample = bool(loaded.metadata.get("sample_data"))
    corpus = load_data(sample)
    if list(corpus.sources) != list(state.get("corpus_sources", [])):
        print("warning: the data files differ from the ones the checkpoint was trained on", file=sys.stderr)
    config = TrainConfig.from_dict(state["config"])
    trainer = Trainer(loaded.model, loaded.tokenizer, STAGE, corpus, config)
    trainer.load_state_dict(state)
    print(f"continuing from step {trainer.step} of {trainer.total_steps}")
    result = trainer.run(steps=args.steps)
    save(args.path, loaded.model, loaded.tokenizer, trainer, result, sample=sample)
    if args.check:
        if trainer.step != trainer.total_steps:
            print("--check compares finished runs: continue without --steps", file=sys.stderr)
            return 1
        model, tokenizer = fresh_model(corpus)
        Trainer(model, tokenizer, STAGE, corpus, config).run()
        resumed = {k: v.cpu() for k, v in loaded.model.state_dict().items()}
        same = all(torch.equal(v.cpu(), resumed[k]) for k, v in model.state_dict().items())
        print("exact resume: the weights are bit-identical to an uninterrupted run" if same
              else "MISMATCH: the resumed run differs from an uninterrupted run")
        return 0 if same else 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("save", "load", "continue"):
        p = sub.add_parser(name)
        p.add_argument("--path", type=Path, default=DEFAULT_PATH, help=f"checkpoint file (default {DEFAULT_PATH})")
        if name == "save":
            p.add_argument("--steps", type=int, default=40, help="optimizer steps before saving")
            p.add_argument("--sample", action="store_true", help="use the built-in sample, not data/")
        if name == "load":
            p.add_argument("--prompt", default="你好", help="what to ask the model")
        if name == "continue":
            p.add_argument("--steps", type=int, default=None, help="more steps (default: to the end of the run)")
            p.add_argument("--check", action="store_true", help="compare with an uninterrupted run")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(4, torch.get_num_threads()))
    return {"save": cmd_save, "load": cmd_load, "continue": cmd_continue}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())

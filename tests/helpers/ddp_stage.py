"""Trains a tiny model's chat stage, plainly or under torchrun: whole, a first few steps, or the
rest after a saved piece; several such runs one after another in the same processes.

    python tests/helpers/ddp_stage.py '[{"out": "A.pt"}, {"out": "B.pt", "steps": 3}, {"out": "C.pt", "resume": "B.pt"}]'

Each run saves (rank 0 only) the step reached, the status, the loss, the weights and the trainer's
state at ``out``, so a run can go on with another number of processes; every process also saves
the training rows it computed the loss on, step by step, to ``out.rank<N>.rows`` (each row as its
unpadded token ids), so a test can see how the data was split.
"""

from __future__ import annotations

import json
import sys

import torch

from diyapp import DIYConfig
from diyapp.data import Corpus
from diyapp.train import TrainConfig, Trainer, build_tokenizer, new_model
from tests.test_train import DIALOGUES, TEXTS


def setup():
    """The corpus, tokenizer, tiny model and training config every process builds alike."""
    corpus = Corpus(texts=TEXTS, dialogues=DIALOGUES, sources=["test"])
    tokenizer = build_tokenizer(corpus, vocab_size=400)
    torch.manual_seed(0)
    model = new_model(DIYConfig(vocab_size=400, num_layers=2, hidden_size=32, num_heads=4, max_seq_len=48,
                                dropout=0.0), tokenizer)
    config = TrainConfig(epochs=2, batch_size=4, lr=3e-3, val_fraction=0.0, seed=5, precision="fp32",
                         optimizer="muon")  # the recipe's optimizer
    return corpus, tokenizer, model, config


def record_rows(model) -> list[list[list[int]]]:
    """The rows of every loss call (one list per micro-batch), as the model is asked for them."""
    seen: list[list[list[int]]] = []
    real = model.compute_loss

    def recording(input_ids, *args, seq_lengths=None, **kwargs):
        lengths = seq_lengths.tolist() if seq_lengths is not None else [input_ids.shape[1]] * input_ids.shape[0]
        seen.append([row[:n] for row, n in zip(input_ids.tolist(), lengths)])
        return real(input_ids, *args, seq_lengths=seq_lengths, **kwargs)

    model.compute_loss = recording
    return seen


def run(out: str, steps: int | None = None, resume: str | None = None) -> None:
    """Train ``steps`` steps (or to the end of the stage), from scratch or from the piece saved at
    ``resume``, and save what was reached at ``out``. Called plainly in a test's own process."""
    corpus, tokenizer, model, config = setup()
    saved = torch.load(resume, weights_only=True) if resume else None
    if saved is not None:
        model.load_state_dict(saved["weights"])
    seen = record_rows(model)
    trainer = Trainer(model, tokenizer, "chat", corpus, config)
    if saved is not None:
        trainer.load_state_dict(saved["state"])
    result = trainer.run(steps=steps)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    torch.save({"rows": seen}, f"{out}.rank{rank}.rows")
    if rank == 0:
        torch.save({"steps": result.steps, "status": result.status, "loss": result.train_loss,
                    "weights": model.state_dict(), "state": trainer.state_dict()}, out)


def main(jobs: list[dict]) -> None:
    for job in jobs:
        run(job["out"], job.get("steps"), job.get("resume"))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))

"""Trains a tiny model for a few steps and saves the weights: run plainly or under torchrun."""

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
    config = TrainConfig(epochs=2, batch_size=4, lr=3e-3, val_fraction=0.0, seed=5, precision="fp32")
    return corpus, tokenizer, model, config


def main(out: str) -> None:
    corpus, tokenizer, model, config = setup()
    result = Trainer(model, tokenizer, "chat", corpus, config).run()
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        torch.save({"steps": result.steps, "loss": result.train_loss, "weights": model.state_dict()}, out)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

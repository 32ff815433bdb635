"""Trains a tiny model's chat stage in pieces: plainly or under torchrun, from scratch or from a saved piece.

    python tests/helpers/ddp_resume.py OUT [--steps N] [--resume IN]

Saves (rank 0 only) the weights, the trainer's state and the step reached, so a run can go on with
another number of processes.
"""

import argparse

import torch

from diyapp.train import Trainer
from tests.helpers.ddp_train import setup


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--resume", default=None)
    args = parser.parse_args()
    corpus, tokenizer, model, config = setup()
    saved = torch.load(args.resume, weights_only=True) if args.resume else None
    if saved is not None:
        model.load_state_dict(saved["weights"])
    trainer = Trainer(model, tokenizer, "chat", corpus, config)
    if saved is not None:
        trainer.load_state_dict(saved["state"])
    result = trainer.run(steps=args.steps)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        torch.save({"steps": result.steps, "status": result.status, "weights": model.state_dict(),
                    "state": trainer.state_dict()}, args.out)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

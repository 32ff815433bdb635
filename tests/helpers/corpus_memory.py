"""Peak memory of reading a corpus, learning its vocabulary and building its pretraining rows.

``python corpus_memory.py CORPUS`` prints one JSON line: the peak resident memory (bytes) before
and after that work, and the rows built. Run in a fresh process, so the peak is this work's.
"""

import json
import resource
import sys

from diyapp.data import load_corpus
from diyapp.train import build_tokenizer, stage_examples

import torch  # noqa: F401  (imported up front: its memory is not the corpus's)


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


if __name__ == "__main__":
    before = peak_bytes()
    corpus = load_corpus(sys.argv[1])
    tokenizer = build_tokenizer(corpus, 512)
    train, val = stage_examples(tokenizer, corpus, "pretrain", 64, 0.05, 0)
    print(json.dumps({"before": before, "after": peak_bytes(), "rows": len(train.ids) + len(val.ids)}))

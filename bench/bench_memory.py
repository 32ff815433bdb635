"""Peak memory of training on a large single-line corpus (issue 14: under 2 GB for 50 MB).

    python bench/bench_memory.py [--mb 50] [--kind varied|repeated|both] [--preset default]

Writes a corpus of ``--mb`` megabytes of UTF-8 Chinese on one line, built at run time from
../shared/corpora/songci.txt (read, never copied into the project):

- ``repeated``: songci.txt with its line breaks removed, repeated to the size (few distinct words);
- ``varied``: clauses of 3 to 8 characters taken from random places in songci.txt, each followed by
  a punctuation mark (nearly every clause distinct: the tokenizer library's worst case).

Then runs ``main.py train --data CORPUS --max-steps 1 --chat-epochs 0`` (the whole path: reading,
learning the vocabulary, building the pretraining rows, one step, saving) in a child process and
reports its peak resident memory (``wait4`` rusage) and wall time. Results also go to
``bench/results/memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SONGCI = REPO.parent / "shared" / "corpora" / "songci.txt"


def write_corpus(path: Path, kind: str, size: int) -> int:
    """A one-line corpus of about ``size`` bytes; returns its size."""
    source = SONGCI.read_text(encoding="utf-8")
    if kind == "repeated":
        text = source.replace("\n", "")
        text = (text * (size // len(text.encode("utf-8")) + 1)).encode("utf-8")[:size].decode("utf-8", "ignore")
    else:
        chars = [c for c in source if "\u4e00" <= c <= "\u9fff"]
        rng = random.Random(0)
        parts, total = [], 0
        while total < size:
            start = rng.randrange(len(chars) - 10)
            clause = "".join(chars[start:start + rng.randint(3, 8)]) + rng.choice("，。，，。！？；")
            parts.append(clause)
            total += len(clause.encode("utf-8"))
        text = "".join(parts)
    path.write_text(text + "\n", encoding="utf-8")
    return path.stat().st_size


def measure(corpus: Path, preset: str, out: Path) -> dict:
    """Peak memory and time of one training run on ``corpus`` in a child process."""
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, str(REPO / "main.py"), "train", "--data", str(corpus), "--preset", preset,
                              "--max-steps", "1", "--chat-epochs", "0", "--save", str(out), "--force"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return {"exit_code": child.returncode, "peak_rss_bytes": usage.ru_maxrss * 1024,
            "wall_s": round(time.perf_counter() - started, 1), "output": output.strip().splitlines()[-3:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=50.0, help="corpus size in MB (10^6 bytes)")
    parser.add_argument("--kind", choices=("varied", "repeated", "both"), default="both")
    parser.add_argument("--preset", default="default")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in (("varied", "repeated") if args.kind == "both" else (args.kind,)):
            corpus = Path(tmp) / f"{kind}.txt"
            size = write_corpus(corpus, kind, int(args.mb * 1e6))
            result = {"kind": kind, "corpus_bytes": size, "preset": args.preset,
                      **measure(corpus, args.preset, Path(tmp) / "model.pt")}
            results.append(result)
            print(f"{kind}: {size / 1e6:.1f} MB corpus -> peak {result['peak_rss_bytes'] / 2**30:.2f} GiB, "
                  f"{result['wall_s']} s, exit {result['exit_code']}", flush=True)
    out = REPO / "bench" / "results" / "memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, ensure_ascii=False))
    return 0 if all(r["exit_code"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Train on a text file within a time budget and score held-out text in bits per character,
against a character 5-gram Kneser-Ney model trained on the same text (issue 11).

    python bench/bench_corpus.py                                   # songci, every 10th poem held out, 10m
    python bench/bench_corpus.py --data my.txt --time-budget 3m --hold-out-every 20
    python bench/bench_corpus.py --skip-train --model /tmp/m.pt    # score a model trained before

The training is the app's own command (``python main.py train --data TRAIN --time-budget B``) run
as a subprocess on the training part only, so its wall time is what a person waits, start-up,
vocabulary and evaluations included. The machine is shared: the share of the CPUs other processes
used meanwhile is recorded from /proc/stat against the command's own CPU time. Held-out documents
that also occur in the training part are dropped (and counted), so the figure is on unseen text.
Results: ``bench/results/corpus.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_DATA = REPO.parent / "shared" / "corpora" / "songci.txt"


def split_documents(path: Path, every: int) -> tuple[list[str], list[str], int]:
    """(training documents, held-out documents, duplicates dropped): every ``every``-th document
    (line) is held out; held-out documents that also occur in training are dropped."""
    from diyapp.data import load_corpus

    docs = load_corpus(path).texts
    train = [d for i, d in enumerate(docs) if i % every != every - 1]
    held = [d for i, d in enumerate(docs) if i % every == every - 1]
    seen = set(train)
    kept = [d for d in held if d not in seen]
    assert not seen.intersection(kept)
    return train, kept, len(held) - len(kept)


def _busy_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def _plan_lines(lines: list[str]) -> list[str]:
    """The plan the train command printed before training (from its "训练计划 plan" line on)."""
    start = next((i for i, line in enumerate(lines) if line.startswith("训练计划")), None)
    if start is None:
        return []
    plan = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        plan.append(line)
        if "ETA" in line:
            break
    return plan


def train(train_docs: list[str], budget: str, folder: Path, extra: list[str]) -> dict:
    """Run the app's train command on ``train_docs``; its wall time, output and others' CPU share."""
    data = folder / "train.txt"
    data.write_text("\n".join(train_docs) + "\n", encoding="utf-8")
    model = folder / "model.pt"
    cmd = [sys.executable, str(REPO / "main.py"), "train", "--data", str(data), "--time-budget", budget,
           "--save", str(model), "--force", *extra]
    ticks = os.sysconf("SC_CLK_TCK")
    busy0, total0 = _busy_jiffies()
    child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=folder)
    wall = time.perf_counter() - started
    busy1, total1 = _busy_jiffies()
    child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    ours = (child1.ru_utime - child0.ru_utime) + (child1.ru_stime - child0.ru_stime)
    capacity = (total1 - total0) / ticks
    others = max(0.0, (busy1 - busy0) / ticks - ours)
    if run.returncode != 0:
        raise SystemExit(f"training failed ({run.returncode}):\n{run.stderr[-3000:]}")
    return {"command": " ".join(cmd), "wall_s": round(wall, 1), "cpu_s": round(ours, 1),
            "others_cpu_share": round(others / capacity, 3) if capacity else None,
            "model": str(model), "plan": _plan_lines(run.stderr.splitlines()),
            "log": run.stderr.splitlines()[-60:] + run.stdout.splitlines()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a .txt corpus, one document per line")
    parser.add_argument("--hold-out-every", type=int, default=10, help="hold out every N-th document (default 10)")
    parser.add_argument("--time-budget", default="10m", help="the training budget (default 10m)")
    parser.add_argument("--order", type=int, default=5, help="the n-gram baseline's order (default 5)")
    parser.add_argument("--skip-train", action="store_true", help="score --model without training")
    parser.add_argument("--model", type=Path, help="with --skip-train: the model to score")
    parser.add_argument("--train-args", default="", help="extra flags for `main.py train` (quoted)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "corpus.json")
    args = parser.parse_args()

    from diyapp.completion import samples, sample_prompts
    from diyapp.ngram import KneserNey
    from diyapp.plan import parse_duration
    from diyapp.quality import held_out_bits_per_char
    from diyapp.workflow import open_model

    train_docs, held, dropped = split_documents(args.data, args.hold_out_every)
    print(f"{args.data}: {len(train_docs)} training documents ({sum(map(len, train_docs)):,} characters), "
          f"{len(held)} held out ({sum(map(len, held)):,} characters; {dropped} duplicates of training "
          "documents dropped)", flush=True)
    result: dict = {"data": str(args.data), "hold_out_every": args.hold_out_every, "train_docs": len(train_docs),
                    "held_out_docs": len(held), "held_out_dropped_duplicates": dropped,
                    "held_out_chars": sum(map(len, held))}
    with tempfile.TemporaryDirectory() as tmp:
        if args.skip_train:
            if args.model is None:
                raise SystemExit("--skip-train needs --model")
            model_path = args.model
        else:
            budget_s = parse_duration(args.time_budget)
            print(f"training with --time-budget {args.time_budget} …", flush=True)
            run = train(train_docs, args.time_budget, Path(tmp), args.train_args.split())
            model_path = Path(run["model"])
            run.update(budget_s=budget_s, wall_vs_budget=round(run["wall_s"] / budget_s, 3))
            result["train"] = run
            print("\n".join(run["plan"] + [line for line in run["log"] if "trained:" in line or "held-out" in line]))
            print(f"wall time {run['wall_s']} s for a budget of {budget_s:.0f} s ({run['wall_vs_budget']:.1%}); "
                  f"others' CPU share meanwhile {run['others_cpu_share']:.0%}", flush=True)
        loaded = open_model(model_path, device=None)
        started = time.perf_counter()
        ours = held_out_bits_per_char(loaded.model, loaded.tokenizer, held)
        result["model"] = {"config": loaded.config.to_dict(), "parameters": loaded.model.num_parameters(),
                           "bits_per_char": round(ours, 4), "score_s": round(time.perf_counter() - started, 1),
                           "metadata_stage_results": (loaded.metadata or {}).get("stage_results")}
        completions = samples(loaded.model, loaded.tokenizer, sample_prompts(held, 3), max_new_tokens=64)
        result["samples"] = [c.prompt + c.text for c in completions]
    started = time.perf_counter()
    ngram = KneserNey(train_docs, order=args.order)
    baseline = ngram.bits_per_char(held)
    result["kneser_ney"] = {"order": args.order, "bits_per_char": round(baseline, 4),
                            "seconds": round(time.perf_counter() - started, 1)}
    result["ratio"] = round(ours / baseline, 4)
    print(f"held-out bits/char: ours {ours:.3f}, {args.order}-gram Kneser-Ney {baseline:.3f} "
          f"({ours / baseline - 1:+.1%})")
    for text in result["samples"]:
        print("  sample:", text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Training under torchrun (gloo, CPU): two processes train what one does, each on its own share of
every batch; and a run saved under torchrun goes on with another number of processes: 2 -> 1 and 1 -> 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .helpers import ddp_stage

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "helpers" / "ddp_stage.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
HALF = 3  # steps of the first piece


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Every run the tests compare, made once. In this process (one process needs no start-up of
    Python and PyTorch): the whole stage, its first steps, and the rest after the two processes'
    first steps. In one torchrun launch of two processes (on a rendezvous port it picks free at run
    time), one run after another: the rest after this process's first steps, the first steps, and
    the whole stage."""
    folder = tmp_path_factory.mktemp("ddp")
    ddp_stage.run(str(folder / "whole.1.pt"))
    ddp_stage.run(str(folder / "half.1.pt"), steps=HALF)
    jobs = [{"out": str(folder / "rest.2.pt"), "resume": str(folder / "half.1.pt")},
            {"out": str(folder / "half.2.pt"), "steps": HALF}, {"out": str(folder / "whole.2.pt")}]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(SCRIPT), json.dumps(jobs)], env=ENV, timeout=180, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp_stage.run(str(folder / "rest.1.pt"), resume=str(folder / "half.2.pt"))
    return folder


def saved(runs: Path, name: str) -> dict:
    return torch.load(runs / name, weights_only=True)


def test_two_process_ddp_matches_one_process_and_splits_the_rows(runs):
    """Two processes train what one does, and each step's rows are shared out: each rank computes
    a disjoint part, together all of them."""
    a, b = saved(runs, "whole.1.pt"), saved(runs, "whole.2.pt")
    assert a["steps"] == b["steps"] > 0
    for name in a["weights"]:
        assert torch.allclose(a["weights"][name], b["weights"][name], atol=1e-5), name
    assert abs(a["loss"] - b["loss"]) < 1e-4

    def rows(run, rank):
        return torch.load(runs / f"{run}.rank{rank}.rows", weights_only=True)["rows"]

    alone, rank0, rank1 = rows("whole.1.pt", 0), rows("whole.2.pt", 0), rows("whole.2.pt", 1)
    assert len(alone) == len(rank0) == len(rank1) == a["steps"]  # one micro-batch a step here
    key = lambda rows: sorted(map(tuple, rows))  # noqa: E731
    for step, (whole, mine, theirs) in enumerate(zip(alone, rank0, rank1)):
        assert mine and theirs, step
        assert not set(map(tuple, mine)) & set(map(tuple, theirs)), step
        assert key(mine + theirs) == key(whole), step


@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_resume_with_another_number_of_processes_matches_a_straight_run(runs, first, then):
    straight = saved(runs, "whole.1.pt")
    half = saved(runs, f"half.{first}.pt")
    assert half["status"] == "paused" and half["steps"] == HALF < straight["steps"]
    rest = saved(runs, f"rest.{then}.pt")
    assert rest["status"] == "completed" and rest["steps"] == straight["steps"]
    for name, weight in straight["weights"].items():
        assert torch.allclose(rest["weights"][name], weight, atol=1e-5), name
    assert not torch.allclose(half["weights"]["lm_head.weight"], straight["weights"]["lm_head.weight"], atol=1e-5)

"""A run saved under torchrun goes on with another number of processes: 2 -> 1 and 1 -> 2 (gloo, CPU)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "helpers" / "ddp_resume.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(out: Path, processes: int, steps: int | None = None, resume: Path | None = None) -> dict:
    args = [str(SCRIPT), str(out)] + (["--steps", str(steps)] if steps else []) + (["--resume", str(resume)] if resume else [])
    if processes > 1:
        args = ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(processes),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    subprocess.run([sys.executable, *args], check=True, env=ENV, timeout=180,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    """The whole stage in one process, never interrupted."""
    return train(tmp_path_factory.mktemp("straight") / "whole.pt", 1)


@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_resume_with_another_number_of_processes_matches_a_straight_run(tmp_path, straight, first, then):
    half = train(tmp_path / "half.pt", first, steps=3)
    assert half["status"] == "paused" and half["steps"] == 3 < straight["steps"]
    rest = train(tmp_path / "rest.pt", then, resume=tmp_path / "half.pt")
    assert rest["status"] == "completed" and rest["steps"] == straight["steps"]
    for name, weight in straight["weights"].items():
        assert torch.allclose(rest["weights"][name], weight, atol=1e-5), name
    assert not torch.allclose(half["weights"]["lm_head.weight"], straight["weights"]["lm_head.weight"], atol=1e-5)

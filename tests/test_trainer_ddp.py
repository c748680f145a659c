"""The trainer under real DDP (2 CPU processes, gloo), without Ray."""
from __future__ import annotations

import socket

import torch
import torch.multiprocessing as mp

from tests import ddp_worker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, poison: bool):
    mp.start_processes(ddp_worker.run, args=(2, free_port(), poison, str(tmp_path)), nprocs=2,
                       start_method="spawn", join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_ranks_stay_in_sync(tmp_path):
    a, b = launch(tmp_path, poison=False)
    assert a["status"] == b["status"] == "ok" and a["steps"] == b["steps"] == 8
    assert torch.equal(a["weights"], b["weights"])  # DDP averaged the same gradients everywhere


def test_divergence_on_one_rank_stops_every_rank_without_hanging(tmp_path):
    a, b = launch(tmp_path, poison=True)
    assert a["status"] == b["status"] == "diverged"
    # rank 1's loss is NaN from step 3; the third bad step in a row (5) trips it, the read after
    # step 6 sees it on both ranks
    assert a["steps"] == b["steps"] == 6
    # rank 0's own loss stayed finite; it stopped on the averaged NaN gradients (or on rank 1's flag)
    assert "gradients" in a["reason"] or "another worker" in a["reason"]
    assert torch.isfinite(a["weights"]).all()  # the NaN update was never applied

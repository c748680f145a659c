"""The job board the training servers share (``orchestrator.service``), as a real Ray actor: jobs
go to servers in order, a restarted server gets back the job it held, a repeated post waits for
the same answer, and a server that fails for good fails its job (and, when it was the last, every
waiting one) instead of leaving a trial waiting forever."""
from __future__ import annotations

import pytest
import ray

from orchestrator.service import JobBoard


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=1, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def job(name: str) -> dict:
    return {"id": name, "setting": None, "seeds": [0], "rung_bands": {}}


def test_jobs_go_to_servers_in_order_and_a_restarted_server_continues_its_own(local_ray):
    board = JobBoard.remote(2)
    for name in ("a", "b", "c"):
        ray.get(board.post.remote(job(name)))
    ray.get(board.post.remote(job("a")))  # posted again (a restarted trial): still one job
    assert ray.get(board.take.remote("s0"))["id"] == "a"
    assert ray.get(board.take.remote("s1"))["id"] == "b"
    assert ray.get(board.take.remote("s0"))["id"] == "a"  # s0 restarted before finishing "a"
    ray.get(board.done.remote("s0", "a", {"0": {"status": "ok"}}, b"png"))
    assert ray.get(board.answer.remote("a")) == {"finished": {"0": {"status": "ok"}}, "picture": b"png"}
    assert ray.get(board.take.remote("s0"))["id"] == "c"
    ray.get(board.done.remote("s0", "c", {}, None))
    ray.get(board.done.remote("s1", "b", {}, None, error="ValueError: a bug in the model"))
    assert ray.get(board.answer.remote("b")) == {"error": "ValueError: a bug in the model"}
    waiting = board.take.remote("s0")  # nothing left: waits for a job or for the close
    assert ray.wait([waiting], timeout=0.5)[1] == [waiting]
    ray.get(board.close.remote())
    assert ray.get(waiting) is None


def test_a_failed_server_fails_its_job_and_the_last_one_fails_the_waiting_ones(local_ray):
    board = JobBoard.remote(2)
    for name in ("a", "b", "c"):
        ray.get(board.post.remote(job(name)))
    ray.get(board.take.remote("s0"))
    ray.get(board.failed.remote("s0", "RuntimeError: lost the node"))
    assert ray.get(board.answer.remote("a")) == {"error": "RuntimeError: lost the node"}
    assert ray.get(board.take.remote("s1"))["id"] == "b"  # the other server goes on
    ray.get(board.failed.remote("s1", "RuntimeError: out of retries"))
    assert ray.get(board.answer.remote("b"))["error"] == "RuntimeError: out of retries"
    assert ray.get(board.answer.remote("c"))["error"] == "RuntimeError: out of retries"
    ray.get(board.post.remote(job("d")))  # no server left: answered at once, never left waiting
    assert "no training server is left" in ray.get(board.answer.remote("d"))["error"]

"""Training servers: long-lived Ray Train worker groups that train job after job.

Starting a ``TorchTrainer`` (controller, placement group, worker processes, process group) costs
seconds to tens of seconds; a study that starts one per trained setting spends much of its time
there. Instead the references and stage 2 hand their work to a ``JobBoard`` (a Ray actor) and a
few servers (``workers.serve_loop``, one Ray Train run each, as many as trials may run at once)
take jobs from it until the board closes. Ray Tune still drives the search and records one trial
per setting: a trial posts its setting and waits for the answer, holding almost no resources.

Faults stay per job: a server's checkpoints name the job they belong to, and when Ray Train
restarts a lost worker group the board hands it back the job it held. A server whose run fails
for good fails the job it held (and, when no server is left, every waiting job) with the error,
so the trial waiting on it is recorded as failed and the study goes on or ends with that error.
"""
from __future__ import annotations

import asyncio
import os
import threading
from collections import deque
from pathlib import Path
from typing import Any

import ray


from orchestrator.config import StudyConfig
from orchestrator.recommend import Band
from orchestrator.settings import Setting

SAMPLES_FILE = "samples.png"  # a trained setting's sample grid, as MLflow shows it



class TrainingFailed(RuntimeError):
    """A job raised on its server, or the server that held it failed for good (after Ray
    Train's restarts)."""


@ray.remote(num_cpus=0, max_concurrency=1000)
class JobBoard:
    """Jobs waiting for a server, the job each server holds, and finished answers."""

    def __init__(self, servers: int):
        self.waiting: deque[dict] = deque()
        self.held: dict[str, dict] = {}  # server -> the job it trains
        self.answers: dict[str, dict] = {}  # job id -> {"finished", "picture"} or {"error"}
        self.servers_left = servers
        self.started: set[str] = set()  # servers whose worker group is up (they asked for a job)
        self.closed = False
        self.changed = asyncio.Condition()

    async def post(self, job: dict) -> None:
        async with self.changed:
            if job["id"] in self.answers or any(j["id"] == job["id"] for j in self.waiting) \
                    or any(j["id"] == job["id"] for j in self.held.values()):
                return  # a repeated post (a restarted Tune trial) waits for the same answer
            if self.servers_left <= 0:
                self.answers[job["id"]] = {"error": "no training server is left (see the errors above)"}
            else:
                self.waiting.append(job)
            self.changed.notify_all()

    async def take(self, server: str) -> dict | None:
        """The job ``server`` holds (a restarted server continues it), else the next waiting one;
        None once the board is closed and nothing is left."""
        async with self.changed:
            self.started.add(server)
            while True:
                if server in self.held:
                    return self.held[server]
                if self.waiting:
                    self.held[server] = self.waiting.popleft()
                    return self.held[server]
                if self.closed:
                    return None
                await self.changed.wait()

    async def done(self, server: str, job_id: str, finished: dict, picture: bytes | None,
                   error: str | None = None) -> None:
        """``server`` finished ``job_id``: its results (or the error the job alone raised)."""
        async with self.changed:
            if self.held.get(server, {}).get("id") == job_id:
                del self.held[server]
            self.answers.setdefault(job_id, {"error": error} if error else {"finished": finished, "picture": picture})
            self.changed.notify_all()

    async def failed(self, server: str, error: str) -> None:
        """``server``'s run ended with ``error``: its job fails, and with no server left so does
        every waiting job."""
        async with self.changed:
            self.servers_left -= 1
            job = self.held.pop(server, None)
            if job is not None:
                self.answers.setdefault(job["id"], {"error": error})
            if self.servers_left <= 0:
                while self.waiting:
                    self.answers.setdefault(self.waiting.popleft()["id"], {"error": error})
            self.changed.notify_all()

    async def answer(self, job_id: str) -> dict:
        async with self.changed:
            while job_id not in self.answers:
                await self.changed.wait()
            return self.answers[job_id]

    async def close(self) -> set[str]:
        """No more jobs: servers end once the waiting ones are done. Returns the servers whose
        worker group ever came up (one still waiting for nodes will end as soon as it does)."""
        async with self.changed:
            self.closed = True
            self.changed.notify_all()
            return set(self.started)


class Trainers:
    """What a Tune trial (or the driver) uses to get a setting trained by a server; picklable."""

    def __init__(self, board, storage: Path):
        self.board, self.storage = board, Path(storage)

    def train(self, setting: Setting, seeds: list[int], rung_bands: dict[int, Band] | None = None,
              ) -> tuple[dict[str, Any], Path | None]:
        """({seed: result}, sample grid path) of ``setting`` trained with ``seeds``."""
        job_id = f"{setting.key()}:{','.join(map(str, seeds))}"
        ray.get(self.board.post.remote({"id": job_id, "setting": setting, "seeds": list(seeds),
                                        "rung_bands": rung_bands or {}}))
        answer = ray.get(self.board.answer.remote(job_id))
        if "error" in answer:
            raise TrainingFailed(f"training {setting.label()} failed: {answer['error']}")
        grid = None
        if answer.get("picture"):
            grid = self.storage / "samples" / job_id.replace(":", "-").replace(",", "-") / SAMPLES_FILE
            grid.parent.mkdir(parents=True, exist_ok=True)
            grid.write_bytes(answer["picture"])
        return answer["finished"], grid


class TrainingService:
    """``servers`` training servers for one study, from ``start()`` until ``close()`` (or
    ``abandon()`` when the study ends early). Server runs have fixed names (``<name>-<i>``): an interrupted study's
    servers resume from their latest checkpoints when it is resumed."""

    def __init__(self, study: StudyConfig, storage: Path, servers: int | None = None, name: str = "trainer",
                 log=print):
        self.study, self.storage, self.name, self.log = study, Path(storage), name, log
        self.servers = servers or study.resources.max_concurrent_trials
        self.board = None
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def start(self) -> Trainers:
        from orchestrator import search
        from orchestrator.workers import serve_loop

        from orchestrator import capacity

        if self.servers > 1:
            nodes = capacity.live_nodes() + capacity.autoscaler_nodes(
                os.environ.get("AMP_AUTOSCALER_CONFIG", capacity.DEFAULT_AUTOSCALER_CONFIG))
            fit = capacity.servers_that_fit(self.study.resources, nodes)
            if fit < self.servers:
                self.log(f"resources.max_concurrent_trials is {self.servers} but only {fit} training server(s) fit "
                         f"on the cluster with room left for their trials: starting {fit}")
                self.servers = fit
        self.board = JobBoard.remote(self.servers)
        for i in range(self.servers):
            server = f"{self.name}-{i}"

            def serve(server=server) -> None:
                try:
                    search.fit(serve_loop, {"study": self.study, "board": self.board, "server": server},
                               self.study, self.storage, server, interruptible=False)
                except BaseException as error:  # noqa: BLE001 - handed to the jobs and to close()
                    self.errors.append(error)
                    try:
                        ray.get(self.board.failed.remote(server, f"{type(error).__name__}: {error}"))
                    except Exception:  # noqa: BLE001 - Ray is going down with it
                        pass

            thread = threading.Thread(target=serve, name=f"server-{server}", daemon=True)
            thread.start()
            self.threads.append(thread)
        return Trainers(self.board, self.storage)

    def close(self) -> None:
        """Let the servers finish their jobs and end. A server that failed for good already
        failed its jobs (their trials are recorded as failed): it is reported, not raised."""
        started = {thread.name.removeprefix("server-") for thread in self.threads}
        if self.board is not None:
            try:
                started = ray.get(self.board.close.remote())
            except Exception:  # noqa: BLE001 - the board (and Ray) is gone: nothing left to end
                pass
        for thread in self.threads:
            if thread.name.removeprefix("server-") in started:
                thread.join()
        for error in self.errors:
            self.log(f"warning: a training server ended with {type(error).__name__}: {str(error)[:500]}")

    def abandon(self) -> None:
        """The study is ending with an error of its own (or Ctrl-C): don't wait for the servers.
        Their runs keep their checkpoints for ``--resume``."""
        if self.board is not None:
            try:
                ray.kill(self.board)
            except Exception:  # noqa: BLE001 - Ray is already gone
                pass

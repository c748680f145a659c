"""Faults a long cluster study meets (issue 6), each on a real local Ray, real MLflow, real Parquet:
a training worker killed mid-trial, the driver interrupted, the MLflow server unreachable, and
trials that diverge or run out of memory."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
FAULTY = f"{ROOT / 'tests' / 'fault_models.py'}:FaultyColorizer"

pytestmark = pytest.mark.slow


def study_yaml(tmp_path: Path, **changes) -> Path:
    study = {
        "experiment": "faults",
        "model": {"name": FAULTY, "preset": "tiny"},
        "data": {"height": 16, "width": 16, "train_samples": 16, "val_samples": 8},
        "search": {"opt_level": ["O0", "O1"], "dtype": ["bf16"], "batch_size": [2]},
        "budget": {"profile_warmup": 1, "profile_steps": 2, "profile_rounds": 2, "profile_max_rounds": 2, "train_samples": 16,
                   "reference_seeds": 2, "max_trials": 1, "checkpoint_every": 4,
                   # train the O1 setting even when timing noise profiles it as slower than fp32
                   "keep_slower": True},
    }
    for dotted, value in changes.items():
        node = study
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node[part]
        node[leaf] = value
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def start(space: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "run_experiment.py", "--search-space", str(space), "--output", str(out),
                             *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output[-4000:]
    return output


def profiled_settings(output: str) -> list[str]:
    """The study's "[profile] k/n <setting>: ..." lines (one per setting profiled)."""
    return re.findall(r"\[profile\] \d+/\d+ .*", output)


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the study ended while waiting for {what}:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def runs_by_row(uri: str, experiment: str) -> dict[str, int]:
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    counts: dict[str, int] = {}
    for run in client.search_runs([found.experiment_id], max_results=1000):
        row = run.data.tags.get("amp.row_id")
        if row:
            counts[row] = counts.get(row, 0) + 1
    return counts


def latest_checkpoint_step(run_dir: Path) -> int:
    """The step of the checkpoint Ray Train would restore ``run_dir`` from (0 when none yet)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not written yet, or mid-write
        return 0
    latest = snapshot.get("latest_checkpoint_result") or {}
    return int((latest.get("metrics") or {}).get("step", 0))


def test_killed_worker_resumes_from_its_checkpoint(tmp_path):
    """SIGKILL the Ray Train worker training a stage-2 setting after its checkpoints at steps 10 and
    20: Ray Train restarts the training server's worker group, the server takes back the job it
    held and resumes it from the checkpoint, the trial ends with the right number of steps and
    exactly one result."""
    pause = tmp_path / "paused.pid"
    space = study_yaml(tmp_path, budget__train_samples=80, budget__checkpoint_every=10)
    text = yaml.safe_load(space.read_text())
    # the O1 worker stops in its 25th step and waits to be killed
    text["model"]["options"] = {"pause_file": str(pause), "pause_at_call": 25}
    space.write_text(yaml.safe_dump(text))
    out = tmp_path / "out"
    proc = start(space, out)
    try:
        wait_for(pause.exists, 600, "the quality trial to reach step 25", proc)
        # the study's training server (the references trained there first; their last checkpoint
        # is a finished seed, with no step)
        runs = lambda: list((out / "ray").glob("trainer-*"))  # noqa: E731
        wait_for(lambda: any(latest_checkpoint_step(r) >= 20 for r in runs()), 120,
                 "Ray Train to register the checkpoint of step 20", proc)
        worker = psutil.Process(int(pause.read_text()))
        assert "RayTrainWorker" in " ".join(worker.cmdline()), worker.cmdline()
        worker.kill()
        output = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "resumed from the checkpoint at step 20" in output
    table = pd.read_parquet(out / "results.parquet")
    trained = table[(table["kind"] == "candidate") & (table["trial_done"] == 1)]
    assert len(trained) == 1
    row = trained.iloc[0]
    assert row["status"] == "ok", row["reason"]
    assert int(row["steps"]) == 80 // 2  # the full budget, not restarted from zero and not doubled
    assert int(row["resumed_from_step"]) == 20
    counts = runs_by_row(f"sqlite:///{out / 'mlflow.db'}", "faults")
    assert counts and all(n == 1 for n in counts.values()), counts


PHASES = ["ray-start", "stage1", "between-stages", "references", "stage2", "report"]


def study_processes(session_dir: str) -> list[psutil.Process]:
    """Live processes of one Ray session (every one names the session directory)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if session_dir and any(session_dir in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def study_session(out: Path) -> str | None:
    """The Ray session directory of the latest run of the study in ``out`` (None before Ray started)."""
    if not (out / "results.parquet").exists():
        return None
    session = pd.read_parquet(out / "results.parquet").set_index("row_id").get("ray_session_dir", {}).get("study")
    return session if isinstance(session, str) and session else None


def profiled_in_session(session: str | None) -> list[str]:
    """The "[profile]" lines the workers of one Ray session printed, read from the session's worker
    logs: a study interrupted right after a line may end before Ray streams it to the terminal."""
    if not session:
        return []
    return [line for log in sorted(Path(session, "logs").glob("worker-*.out"))
            for line in profiled_settings(log.read_text(errors="replace"))]


def test_ctrl_c_in_every_phase_stops_at_once_and_resume_repeats_nothing(tmp_path):
    """One study interrupted in each phase in turn (reached with a pause point, never by timing),
    resumed each time: exit 130 with the --resume command and no traceback, none of that Ray
    session's processes left behind, and at the end every row once and every MLflow run once."""
    space = study_yaml(tmp_path, budget__train_samples=32)
    out = tmp_path / "out"
    seen_profile_lines: list[str] = []
    for i, phase in enumerate(PHASES):
        pause = tmp_path / f"pause-{phase}"
        extra = ["--resume"] if i else []
        proc = subprocess.Popen([sys.executable, "run_experiment.py", "--search-space", str(space), "--output", str(out),
                                 *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "AMP_STUDY_PAUSE_AT": phase, "AMP_STUDY_PAUSE_FILE": str(pause)})
        try:
            wait_for(pause.exists, 600, f"phase {phase}", proc)
            proc.send_signal(signal.SIGINT)  # Ctrl-C
            output, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 130, f"{phase}:\n{output[-4000:]}"
        assert "--resume" in output and "Traceback" not in output, f"{phase}:\n{output[-4000:]}"
        session = study_session(out)
        if session:
            wait_for(lambda s=session: not study_processes(s), 60, f"the Ray processes of {session} to end")
            seen_profile_lines += profiled_in_session(session)

    output = finish(start(space, out, "--resume"))
    assert "Traceback" not in output
    seen_profile_lines += profiled_in_session(study_session(out))
    table = pd.read_parquet(out / "results.parquet")
    candidates = table[table["kind"] == "candidate"]
    # every setting profiled exactly once over all the runs
    assert len(seen_profile_lines) == len(candidates), seen_profile_lines
    assert sorted(table[table["kind"] == "reference"]["seed"].astype(int)) == [0, 1]
    assert candidates["trial_done"].fillna(0).sum() == 1
    assert (out / "report.md").exists()
    counts = runs_by_row(f"sqlite:///{out / 'mlflow.db'}", "faults")
    assert set(counts) == set(table[table["kind"].isin(["candidate", "reference"])]["row_id"])
    assert all(n == 1 for n in counts.values()), counts  # no MLflow run duplicated


def test_two_studies_at_once_each_with_its_own_ray(tmp_path):
    """Two studies on one machine at the same time, each starting its own local Ray: both finish,
    and neither terminal nor log shows a traceback (Ray Train's cleaner used to find "multiple
    active Ray instances")."""
    outs, procs = [tmp_path / "a", tmp_path / "b"], []
    for out in outs:
        space_dir = tmp_path / f"space-{out.name}"
        space_dir.mkdir()
        procs.append(start(study_yaml(space_dir), out))
    outputs = [finish(p) for p in procs]
    for out, output in zip(outs, outputs):
        assert "Traceback" not in output, output[-3000:]
        log = (out / "study.log").read_text()
        assert "multiple active Ray instances" not in log and "PlacementGroupCleaner" not in log, out
        assert (out / "report.md").exists()


def test_unreachable_mlflow_loses_nothing_and_sync_catches_up(tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    space = study_yaml(tmp_path)
    out = tmp_path / "out"
    output = finish(start(space, out, "--tracking-uri", uri))
    assert "unreachable" in output
    table = pd.read_parquet(out / "results.parquet")
    rows = table[table["kind"].isin(["candidate", "reference"])]
    assert len(rows) == 3 and rows["mlflow_pending"].eq(1).all()  # all measured, none logged yet
    assert (out / "recommendations" / "faultycolorizer.yaml").exists()

    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--default-artifact-root", str(tmp_path / "artifacts")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**__import__("os").environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        def answering() -> bool:
            try:
                return __import__("urllib.request").request.urlopen(f"{uri}/health", timeout=2).status == 200
            except OSError:
                return False

        wait_for(answering, 120, "the MLflow server")
        synced = subprocess.run([sys.executable, "-m", "orchestrator", "sync", "--output", str(out)], cwd=ROOT,
                                capture_output=True, text=True, timeout=300)
        assert synced.returncode == 0, synced.stdout + synced.stderr
        assert "3 still pending" not in synced.stdout and "0 still pending" in synced.stdout
        counts = runs_by_row(uri, "faults")
        assert set(counts) == set(rows["row_id"]) and all(n == 1 for n in counts.values())
        assert pd.read_parquet(out / "results.parquet")["mlflow_pending"].fillna(0).eq(0).all()
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_diverged_and_out_of_memory_trials_are_recorded_and_the_study_goes_on(tmp_path):
    space = study_yaml(tmp_path, search__opt_level=["O0", "O2"], search__batch_size=[2, 8, "auto"],
                       budget__train_samples=64, budget__max_trials=3)
    text = yaml.safe_load(space.read_text())
    text["resources"] = {"memory_budget_mib": 100000}  # the planted OOM, not the budget, limits the batch
    space.write_text(yaml.safe_dump(text))
    out = tmp_path / "out"
    finish(start(space, out))
    table = pd.read_parquet(out / "results.parquet").set_index("label")
    assert table.loc["fp32-b8", "status"] == "oom" and table.loc["O2-bf16-b8", "status"] == "oom"
    # batch_size auto found the planted ceiling (4) for each precision setting, OOM probes recorded
    for label in ("fp32-b4", "O2-bf16-b4"):
        assert table.loc[label, "batch_auto"] == 1
        probes = json.loads(table.loc[label, "batch_search"])["probes"]
        assert any(p["batch_size"] > 4 and p["status"] == "oom" for p in probes)
    diverged = table.loc["O2-bf16-b2"]
    # fine for a few profiling steps (its speed vs fp32 is timing noise here: keep_slower trains it anyway)
    assert diverged["profile_status"] in ("ok", "slower")
    assert diverged["status"] == "diverged" and "non-finite" in diverged["reason"]
    # Optuna was told with finite numbers
    cached = json.loads(next((out / "ray" / "trial-cache").glob("*.json")).read_text())
    assert cached["status"] == "diverged" and cached["drift_in_margins"] == 1000.0 and cached["speedup"] == 0.0
    rec = yaml.safe_load((out / "recommendations" / "faultycolorizer.yaml").read_text())
    assert rec["recommended"]["label"] == "fp32-b2"  # nothing usable: keep fp32, and say why

"""A study on a real multi-node Ray cluster, on one machine, logging to an MLflow server started the
way the cluster head starts it; and the cluster-launcher path end to end.

``ray.cluster_utils.Cluster`` runs a head and two worker nodes as separate raylets, each with its own
CPU and a custom resource naming it. The study asks for 2 DDP workers per run with placement
STRICT_SPREAD, so every Ray Train worker group (profile, references, quality trial) must span two
nodes. The MLflow server comes from ``scripts/start_mlflow_server.sh`` (what ``cluster.yaml``'s head
commands run), bound to 127.0.0.1, and the study finds it through ``search.cluster_tracking_uri``.

The launcher test drives ``scripts/launcher_e2e.sh``: an sshd on 127.0.0.1, ``ray up``, ``ray submit``,
``ray rsync-down``, ``ray down``.
"""
from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.model_contract import study_runs

ROOT = Path(__file__).resolve().parents[1]

# One candidate (O1-bf16-b2) beside the fp32 reference, 16x16 images, 2 reference seeds, 1 trial.
STUDY = {
    "experiment": "multinode",
    "model": {"name": "pix2pixhd", "preset": "tiny"},
    "data": {"height": 16, "width": 16, "train_samples": 16, "val_samples": 8},
    "search": {"opt_level": ["O1"], "dtype": ["bf16"], "batch_size": [2]},
    "reference_batch_size": 2,
    "budget": {"profile_warmup": 1, "profile_steps": 2, "profile_rounds": 2, "profile_max_rounds": 2, "train_samples": 16,
               "reference_seeds": 2, "max_trials": 1, "checkpoint_every": 2,
               # on a CPU bf16 may time as slower than fp32: train it anyway, the trial is the point
               "keep_slower": True},
    "resources": {"workers": 2, "cpus_per_worker": 1, "placement": "STRICT_SPREAD"},
}
WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """The head's MLflow server, as cluster.yaml starts it, on 127.0.0.1 and a free port."""
    base = tmp_path_factory.mktemp("mlflow-server")
    bashrc = base / "bashrc"
    bashrc.write_text("# a user's own line\n")
    command = ["bash", str(ROOT / "scripts" / "start_mlflow_server.sh"), "--host", "127.0.0.1",
               "--port", str(_free_port()), "--dir", str(base / "mlflow"), "--bashrc", str(bashrc)]
    env = {**os.environ, "PYTHON": sys.executable, "AMP_MLFLOW_WORKERS": "1"}
    started = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield {"dir": base / "mlflow", "bashrc": bashrc, "stdout": started.stdout}
    finally:
        subprocess.run(["bash", str(ROOT / "scripts" / "start_mlflow_server.sh"), "--stop",
                        "--dir", str(base / "mlflow")], capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture(scope="module")
def three_node_cluster():
    """Head + node_a + node_b, one CPU each: a trial (1 CPU) plus 2 workers (1 CPU each) fit
    exactly, and STRICT_SPREAD puts the two workers on two different nodes."""
    import ray
    import ray._common.utils
    import ray._private.utils
    import ray.util
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as patch:
        # Cluster advertises itself in /tmp/ray/ray_current_cluster (and deletes that file at
        # shutdown), where every `ray.init()` without an address on this machine would find it:
        # keep other processes' Ray sessions their own
        patch.setattr(ray._private.utils, "write_ray_address", lambda *args, **kwargs: None)
        patch.setattr(ray._common.utils, "reset_ray_address", lambda *args, **kwargs: None)
        # fixed free ports (other Ray instances may hold the defaults); every node's processes get
        # RAY_ADDRESS, so what looks the cluster up from inside (Ray Train's placement-group
        # cleaner, the state API) finds this one among the machine's several
        port = _free_port()
        common = {"num_cpus": 1, "env_vars": {"RAY_ADDRESS": f"{ray.util.get_node_ip_address()}:{port}"}}
        cluster = Cluster(initialize_head=True, head_node_args={
            **common, "resources": {"head": 1}, "gcs_server_port": port,
            "dashboard_port": _free_port(), "dashboard_agent_listen_port": _free_port()})
        try:
            nodes = {"node_a": cluster.add_node(**common, resources={"node_a": 1}),
                     "node_b": cluster.add_node(**common, resources={"node_b": 1})}
            cluster.wait_for_nodes()
            yield cluster, nodes
        finally:
            ray.shutdown()
            cluster.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_study_trains_ddp_across_two_nodes(three_node_cluster, mlflow_server, tmp_path):
    import ray
    from mlflow.tracking import MlflowClient
    from ray.util.state import list_actors

    from orchestrator import capacity, search
    from orchestrator.config import parse_config
    from orchestrator.study import Study

    cluster, nodes = three_node_cluster

    # the MLflow server script: URI file and ~/.bashrc export (kept once, after the user's lines)
    uri = search.cluster_tracking_uri(mlflow_server["dir"] / "tracking_uri")
    assert uri and uri.startswith("http://127.0.0.1:"), uri
    bashrc = mlflow_server["bashrc"].read_text()
    assert bashrc.startswith("# a user's own line\n") and bashrc.count(f"export MLFLOW_TRACKING_URI={uri}\n") == 1

    config = parse_config(STUDY, "multinode study")
    search.connect(cluster.address)
    assert len([n for n in ray.nodes() if n["Alive"]]) == 3
    assert ray.cluster_resources().get("node_a") == 1 and ray.cluster_resources().get("node_b") == 1
    capacity.check_resources(config.resources)  # 1 + 2 x 1 CPUs: fits exactly

    out = tmp_path / "out"
    result = Study(config, out, uri).run()
    assert result["model"] == "pix2pixhd"

    # the table: 2 fp32 references and the one candidate, all trained with 2 DDP ranks
    table = pd.read_parquet(out / "results.parquet")
    refs = table[table["kind"] == "reference"]
    cands = table[table["kind"] == "candidate"]
    assert sorted(refs["seed"].astype(int)) == [0, 1]
    assert list(cands["label"]) == ["O1-bf16-b2"]
    assert (refs["status"] == "ok").all(), refs[["status", "reason"]]
    assert "trial_done" in cands and (cands["trial_done"] == 1).all(), cands.T
    trained = pd.concat([refs, cands])
    assert trained["quality_ssim"].notna().all()
    # world size: each rank steps through train_samples / (batch x world size) batches, and the
    # row's sample count is steps x batch x world size (trainer.samples_seen)
    steps = math.ceil(STUDY["budget"]["train_samples"] / (2 * WORLD_SIZE))
    assert (trained["steps"].astype(int) == steps).all(), trained[["label", "steps"]]
    assert (trained["samples"].astype(int) == steps * 2 * WORLD_SIZE).all(), trained[["label", "samples"]]

    # placement: every Ray Train worker group (one placement group each) spanned two nodes
    workers = list_actors(address=cluster.address, filters=[("class_name", "=", "RayTrainWorker")], detail=True,
                          limit=1000, raise_on_missing_output=False)
    groups: dict[str, set[str]] = {}
    for actor in workers:
        groups.setdefault(actor.placement_group_id, set()).add(actor.node_id)
    assert len(groups) == 2, groups  # profile, and the training server (references and the quality trial)
    assert all(len(node_ids) == WORLD_SIZE for node_ids in groups.values()), groups
    # ... and each trained row says so itself
    assert (trained["worker_nodes"].str.split(",").map(len) == WORLD_SIZE).all(), trained["worker_nodes"]
    worker_nodes = set().union(*groups.values())
    assert {nodes["node_a"].node_id, nodes["node_b"].node_id} & worker_nodes

    # MLflow, through the server: one parent run, one child per row
    study_runs(MlflowClient(tracking_uri=uri), "multinode", len(refs) + len(cands))
    if "mlflow_pending" in table:
        assert not table["mlflow_pending"].fillna(0).astype(int).any()
    # artifacts went through the server onto its disk (the head's, on a real cluster)
    assert any((mlflow_server["dir"] / "artifacts").rglob("report.md"))


LAUNCHER_TOOLS = ("sshd", "ssh", "ssh-keygen", "rsync", "nc")


def missing_launcher_tools() -> list[str]:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])  # sshd lives in sbin
    return [tool for tool in LAUNCHER_TOOLS if shutil.which(tool, path=path) is None]


@pytest.mark.slow
@pytest.mark.launcher
@pytest.mark.timeout(1800)
def test_launcher_end_to_end(tmp_path):
    """`ray up` / `ray submit run_experiment.py` / `ray rsync-down` / `ray down` against an sshd on
    127.0.0.1 (scripts/launcher_e2e.sh, ~2 min). CI (.ci/run) installs the tools and sets
    AMP_REQUIRE_LAUNCHER_TOOLS=1, so there a missing tool fails the test; elsewhere it skips, saying
    how to install them."""
    missing = missing_launcher_tools()
    if missing:
        message = (f"the launcher end-to-end test needs {', '.join(missing)}: run `bash scripts/install_launcher_tools.sh` "
                   "as root (apt-get install openssh-server openssh-client rsync netcat-openbsd)")
        if os.environ.get("AMP_REQUIRE_LAUNCHER_TOOLS") == "1":
            pytest.fail(message + " [AMP_REQUIRE_LAUNCHER_TOOLS=1: required here]", pytrace=False)
        pytest.skip(message)
    report = tmp_path / "report.yaml"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "launcher_e2e.sh")], cwd=ROOT, capture_output=True,
                          text=True, timeout=1700, env={**os.environ, "AMP_E2E_REPORT": str(report)})
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    summary = yaml.safe_load(report.read_text())
    assert summary["project_imported_from"].endswith("/amp-study/orchestrator/__init__.py")
    assert summary["tracking_uri"].startswith("http://127.0.0.1:")
    assert summary["rows"] >= 3 and summary["mlflow_children"] == summary["rows"]
    assert summary["recommendation"]
    assert summary["left_running"] == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_trial_that_needs_autoscaled_nodes_waits_for_them(three_node_cluster, tmp_path):
    """On a launched cluster the autoscaler's node types count: a trial that fits only on a node
    type not up yet waits for it (here the test plays the autoscaler and adds the node), one that
    would never fit fails at once, and a wait that runs out fails naming the field."""
    import threading

    from orchestrator import capacity, search
    from orchestrator.config import ResourcesConfig

    cluster, _ = three_node_cluster
    search.connect(cluster.address)
    bootstrap = tmp_path / "ray_bootstrap_config.yaml"
    bootstrap.write_text(yaml.safe_dump({
        "max_workers": 4, "head_node_type": "head",
        "available_node_types": {"head": {"resources": {"CPU": 1}, "max_workers": 0},
                                 "big": {"resources": {"CPU": 2}, "max_workers": 1}}}))
    needs_big = ResourcesConfig(workers=1, cpus_per_worker=2)
    with pytest.raises(capacity.ResourceError, match="no node has 2 CPUs"):
        capacity.check_resources(needs_big)  # no autoscaler: rejected, as before

    # the check waits in a thread while the main thread plays the autoscaler (Ray adds nodes only
    # from the main thread)
    notes: list[str] = []
    outcome: dict = {}

    def check() -> None:
        try:
            capacity.check_resources(needs_big, bootstrap, wait_seconds=120, log=notes.append, poll_seconds=0.5)
        except Exception as error:  # noqa: BLE001 - asserted below
            outcome["error"] = error

    waiter = threading.Thread(target=check, daemon=True)
    waiter.start()
    deadline = time.time() + 60
    while not notes and time.time() < deadline:
        time.sleep(0.1)
    assert notes and "waiting up to 120 s" in notes[0] and "big (up to 1)" in notes[0], notes
    added = [cluster.add_node(num_cpus=2, env_vars={"RAY_ADDRESS": cluster.address})]
    waiter.join(120)
    assert not waiter.is_alive() and "error" not in outcome, outcome
    assert notes[-1] == "the nodes have joined"
    cluster.remove_node(added[0])

    with pytest.raises(capacity.ResourceError, match="can never run a trial.*autoscaler may add"):
        capacity.check_resources(ResourcesConfig(workers=1, cpus_per_worker=8), bootstrap, wait_seconds=60)
    with pytest.raises(capacity.ResourceError, match="did not start nodes.*node_wait_seconds"):
        capacity.check_resources(needs_big, bootstrap, wait_seconds=1, log=notes.append, poll_seconds=0.2)

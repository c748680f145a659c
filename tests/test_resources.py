"""A resource request the cluster can never satisfy fails within seconds, naming the fields."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_STUDY

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("resources,expected", [
    ({"workers": 64}, "64.01 CPUs per trial"),
    ({"gpus_per_worker": 1}, "GPUs per trial"),
    ({"cpus_per_worker": 64}, "no node has 64 CPUs"),
])
def test_impossible_request_fails_fast_with_a_clear_error(tmp_path, resources, expected):
    space = tmp_path / "s.yaml"
    space.write_text(yaml.safe_dump({**TINY_STUDY, "resources": resources}))
    # an endless wait would end in the subprocess timeout: the error must come without waiting for nodes
    done = subprocess.run([sys.executable, "run_experiment.py", "--search-space", str(space),
                           "--output", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert expected in done.stderr and "resources" in done.stderr
    assert not (tmp_path / "out" / "results.parquet").exists()
    assert "waiting" not in (done.stdout + done.stderr).lower()


# ----------------------------------------------------------------------------- the placement rules


def test_placement_rules_per_node():
    from orchestrator.capacity import NodeShape, problems
    from orchestrator.config import ResourcesConfig

    four_by_one = [NodeShape(8, 1, count=4)]
    gpu_workers = dict(cpus_per_worker=4, gpus_per_worker=1)
    assert problems(ResourcesConfig(workers=4, **gpu_workers), four_by_one) == []
    # 7 CPUs in all, but a 2-CPU worker fits once on each 3-CPU node and never on the 1-CPU one
    assert "2 worker bundles" in problems(ResourcesConfig(workers=3, cpus_per_worker=2),
                                          [NodeShape(3, 0, count=2), NodeShape(1, 0)])[0]
    assert "STRICT_PACK" in problems(ResourcesConfig(workers=2, placement="STRICT_PACK", **gpu_workers), four_by_one)[0]
    assert problems(ResourcesConfig(workers=2, placement="STRICT_PACK", **gpu_workers), [NodeShape(48, 4)]) == []
    spread = ResourcesConfig(workers=3, placement="STRICT_SPREAD", **gpu_workers)
    assert "STRICT_SPREAD" in problems(spread, [NodeShape(48, 4, count=2)])[0]
    assert problems(spread, [NodeShape(48, 4, count=3)]) == []
    # totals include the Tune trial's share: two 1-CPU workers fill two 1-CPU nodes, leaving it none
    assert "2.01 CPUs per trial" in problems(ResourcesConfig(workers=2), [NodeShape(1, 0, count=2)])[0]


def test_autoscaler_node_types_come_from_the_launcher_config():
    from orchestrator.capacity import NodeShape, autoscaler_nodes, problems
    from orchestrator.config import ResourcesConfig

    nodes = {n.name: n for n in autoscaler_nodes(ROOT / "cluster.yaml")}
    assert set(nodes) == {"gpu_4x", "gpu_1x"}  # the head is a live node, not a scalable one
    assert (nodes["gpu_4x"].gpus, nodes["gpu_4x"].count) == (4, 2)
    head_only = [NodeShape(8, 0)]
    two_gpus = ResourcesConfig(workers=2, cpus_per_worker=4, gpus_per_worker=1)
    assert problems(two_gpus, head_only) and not problems(two_gpus, head_only + list(nodes.values()))
    assert autoscaler_nodes(ROOT / "no-such-file.yaml") == []


def test_training_servers_leave_room_for_the_trials_that_feed_them():
    from orchestrator.capacity import NodeShape, servers_that_fit
    from orchestrator.config import ResourcesConfig

    # two 1-CPU servers would take both CPUs of a 2-CPU machine and no trial could ever start
    assert servers_that_fit(ResourcesConfig(max_concurrent_trials=2), [NodeShape(2, 0)]) == 1
    assert servers_that_fit(ResourcesConfig(max_concurrent_trials=2), [NodeShape(3, 0)]) == 2
    gpu = ResourcesConfig(max_concurrent_trials=4, workers=2, cpus_per_worker=4, gpus_per_worker=1)
    # 2 GPU nodes with room for two 4-CPU workers each: two 2-worker servers, not four
    assert servers_that_fit(gpu, [NodeShape(8, 0), NodeShape(8, 4, count=2)]) == 2
    assert servers_that_fit(ResourcesConfig(), [NodeShape(1, 0)]) == 1  # never fewer than one

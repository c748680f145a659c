"""CPU affinity: the share policy (pure), NVML mask decoding, topology order, GPU-local cores from a
fake sysfs PCI tree (a faked device's bus id), and the real thing in subprocesses: the CPU set
changes, never widens, is restored by ``pinned`` and by the trainer."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import types

import pytest
import torch

from orchestrator import affinity
from orchestrator.affinity import choose_share, gpu_bus_id, mask_to_cpus, parse_cpulist, plan_affinity, topology_order

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = sorted(os.sched_getaffinity(0))
needs_two_cpus = pytest.mark.skipif(len(ALLOWED) < 2, reason="needs at least 2 allowed CPUs to pin to a subset")


def run_child(code: str, tmp_path: Path, **env: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "AMP_STUDY_CPU_CLAIMS": str(tmp_path / "claims.json")}
    for key in ("OMP_NUM_THREADS", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        full_env.pop(key, None)
    full_env.update(env)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- pure policy


def test_share_is_the_local_ranks_slice():
    cores = list(range(8))
    assert choose_share(cores, 4, 0, 2)[0] == [0, 1, 2, 3]
    assert choose_share(cores, 4, 1, 2)[0] == [4, 5, 6, 7]
    assert choose_share(cores, 2, 3, 4)[0] == [6, 7]


def test_share_never_exceeds_the_candidates():
    assert choose_share([5], 4, 1, 2) == ([5], "allowed set is this worker's own already")
    share, note = choose_share([0, 1, 2], 2, 1, 2)  # 2 workers x 2 threads on 3 cores
    assert set(share) <= {0, 1, 2} and len(share) == 2 and "overlap" in note


def test_share_moves_off_cores_another_process_claimed():
    assert choose_share(list(range(4)), 2, 0, 1, claimed={0}) == ([1, 2], "moved off cores claimed by another process")
    share, note = choose_share([0, 1], 2, 0, 1, claimed={0})  # not enough free: keep, and say so
    assert share == [0, 1] and "shared with another process" in note


def test_nvml_mask_decoding():
    assert mask_to_cpus([0b1011, 1]) == {0, 1, 3, 64}
    assert mask_to_cpus([0, 0]) == set()


def test_topology_order_spreads_over_physical_cores_of_one_socket(tmp_path):
    # 2 sockets x 2 cores x 2 threads; Linux numbering: cpu = thread*4 + socket*2 + core
    for cpu in range(8):
        topo = tmp_path / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text(str((cpu // 2) % 2))
        (topo / "core_id").write_text(str(cpu % 2))
    order = topology_order(range(8), tmp_path)
    assert order == [0, 1, 4, 5, 2, 3, 6, 7]  # socket 0: one thread per core, then siblings
    assert topology_order([3, 1], tmp_path / "missing") == [1, 3]


# ----------------------------------------------------------------------------- GPU-local cores (sysfs, NVML)

BUS = "0000:17:00.0"  # the sysfs name of the faked GPU below


@pytest.fixture
def fake_gpu(monkeypatch):
    """CUDA device 0 reports PCI 0000:17:00.0; NVML must not be asked unless a test allows it;
    no claims file and no Ray/torchrun environment."""
    props = types.SimpleNamespace(name="fake", pci_domain_id=0, pci_bus_id=0x17, pci_device_id=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)

    def no_nvml(bus_id, index):
        raise AssertionError("NVML asked although sysfs had the answer")

    monkeypatch.setattr(affinity, "_nvml_gpu_cpus", no_nvml)
    monkeypatch.setenv("AMP_STUDY_CPU_CLAIMS", "off")
    for key in ("OMP_NUM_THREADS", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    return props


def gpu_plan(tmp_path: Path, cpulist: str | None, **kwargs):
    """plan_affinity for the faked GPU, with ``cpulist`` as its sysfs local_cpulist (None: no file)."""
    pci = tmp_path / "pci"
    (pci / BUS).mkdir(parents=True, exist_ok=True)
    if cpulist is not None:
        (pci / BUS / "local_cpulist").write_text(cpulist)
    return plan_affinity("cuda:0", pci_sysfs=pci, sysfs=tmp_path / "no-topology", **kwargs)


def test_cpulist_parsing():
    assert parse_cpulist("0-15,32-47\n") == set(range(16)) | set(range(32, 48))
    assert parse_cpulist("3") == {3} and parse_cpulist("0,2-3") == {0, 2, 3}
    assert parse_cpulist("\n") == set()
    for bad in ("a-b", "5-2", "0-15:2/4", "-1"):
        with pytest.raises(ValueError):
            parse_cpulist(bad)


def test_bus_id_is_the_sysfs_name(fake_gpu):
    assert gpu_bus_id(0) == BUS
    fake_gpu.pci_bus_id, fake_gpu.pci_device_id, fake_gpu.pci_domain_id = 0xAB, 0x1F, 1
    assert gpu_bus_id(0) == "0001:ab:1f.0"  # lower-case hex, 4-digit domain, function 0


@needs_two_cpus
def test_gpu_local_cores_come_from_sysfs_intersected_never_widened(tmp_path, fake_gpu):
    # the GPU's NUMA node: every allowed core but the first, plus cores this process may not use
    local = ALLOWED[1:]
    plan = gpu_plan(tmp_path, f"{affinity._ranges(local)},{max(ALLOWED) + 100}-{max(ALLOWED) + 115}\n",
                    cpus=len(ALLOWED) + 8)
    assert plan.source == "sysfs", plan.describe()
    assert plan.cpus == local and plan.threads == len(local)  # capped at the GPU-local allowed cores
    assert set(plan.cpus) <= set(plan.cpus_before) == set(ALLOWED)
    assert plan.describe().startswith("sysfs: cpus")
    assert any(f"GPU {BUS} local cpus" in note and "from sysfs" in note for note in plan.notes)


def test_gpu_local_cores_outside_the_allowed_set_are_ignored(tmp_path, fake_gpu):
    plan = gpu_plan(tmp_path, f"{max(ALLOWED) + 100}-{max(ALLOWED) + 103}", cpus=1)
    assert plan.source in ("share", "unchanged") and set(plan.cpus) <= set(ALLOWED)
    assert any("outside the allowed set" in note for note in plan.notes), plan.notes


def test_missing_sysfs_file_falls_back_and_says_why(tmp_path, fake_gpu, monkeypatch):
    monkeypatch.setattr(affinity, "_nvml_gpu_cpus", lambda bus_id, index: (None, "NVML: pynvml not installed"))
    plan = gpu_plan(tmp_path, None, cpus=1)
    assert plan.source in ("share", "unchanged") and len(plan.cpus) == 1
    text = plan.describe()
    assert f"sysfs: no {tmp_path / 'pci' / BUS / 'local_cpulist'}" in text, text
    assert "pynvml not installed" in text and "share" in text
    # an unparsable or empty file is no answer either
    assert "cannot parse" in gpu_plan(tmp_path, "0-3:x", cpus=1).describe()
    assert "lists no cores" in gpu_plan(tmp_path, "\n", cpus=1).describe()


@needs_two_cpus
def test_nvml_answers_only_when_sysfs_cannot(tmp_path, fake_gpu, monkeypatch):
    asked = []

    def nvml(bus_id, index):
        asked.append((bus_id, index))
        return {ALLOWED[-1], max(ALLOWED) + 64}, "GPU local cpus from NVML"

    monkeypatch.setattr(affinity, "_nvml_gpu_cpus", nvml)
    plan = gpu_plan(tmp_path, None, cpus=len(ALLOWED))
    assert asked == [(BUS, 0)]
    assert plan.source == "nvml" and plan.cpus == [ALLOWED[-1]], plan.describe()
    assert "sysfs: no" in plan.describe()


# ----------------------------------------------------------------------------- the real thing

APPLY = """
import json, os, torch
from orchestrator.affinity import apply_affinity
{setup}
before = sorted(os.sched_getaffinity(0))
plan = apply_affinity()
print(json.dumps({{"before": before, "after": sorted(os.sched_getaffinity(0)), "threads": torch.get_num_threads(),
                  "plan": plan.describe()}}))
"""


@needs_two_cpus
def test_affinity_really_changes_the_cpu_set(tmp_path):
    out = run_child(APPLY.format(setup=""), tmp_path, OMP_NUM_THREADS="1", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2")
    assert out["before"] == ALLOWED
    assert set(out["after"]) < set(out["before"]), out["plan"]  # a strict subset: changed, not widened
    assert len(out["after"]) == 1 and out["threads"] == 1
    assert out["after"] == [topology_order(ALLOWED)[1]]  # local rank 1 takes the second core


def test_affinity_never_widens_a_restricted_set(tmp_path):
    only = ALLOWED[-1]
    setup = f"os.sched_setaffinity(0, {{{only}}})"
    out = run_child(APPLY.format(setup=setup), tmp_path, OMP_NUM_THREADS="4", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2")
    assert out["before"] == [only]
    assert out["after"] == [only] and out["threads"] == 1, out["plan"]


@needs_two_cpus
def test_a_claimed_core_is_left_to_its_owner(tmp_path):
    first = topology_order(ALLOWED)[0]
    # this test process is alive: its claim on the first core counts
    (tmp_path / "claims.json").write_text(json.dumps({str(os.getpid()): [first]}))
    out = run_child(APPLY.format(setup=""), tmp_path, OMP_NUM_THREADS="1")
    assert len(out["after"]) == 1 and out["after"] != [first], out["plan"]
    claims = json.loads((tmp_path / "claims.json").read_text())
    assert claims.pop(str(os.getpid())) == [first]
    assert list(claims.values()) == [out["after"]]  # the child claimed what it took (stale once it exits)


@needs_two_cpus
def test_pinned_restores_the_cpu_set_and_threads(tmp_path):
    code = """
    import json, os, torch
    from orchestrator.affinity import pinned, plan_affinity
    before, threads = sorted(os.sched_getaffinity(0)), torch.get_num_threads()
    plan = plan_affinity(cpus=1)
    with pinned(plan):
        inside = sorted(os.sched_getaffinity(0)), torch.get_num_threads()
        claims = json.load(open(os.environ["AMP_STUDY_CPU_CLAIMS"]))
    after = sorted(os.sched_getaffinity(0)), torch.get_num_threads()
    claims_after = json.load(open(os.environ["AMP_STUDY_CPU_CLAIMS"]))
    print(json.dumps({"before": [before, threads], "inside": inside, "after": after, "pid": os.getpid(),
                      "claims": claims, "claims_after": claims_after}))
    """
    out = run_child(code, tmp_path)
    assert len(out["inside"][0]) == 1 and out["inside"][1] == 1
    assert out["after"] == out["before"]
    assert out["claims"] == {str(out["pid"]): out["inside"][0]} and out["claims_after"] == {}


@needs_two_cpus
def test_trainer_pins_only_while_it_runs(tmp_path):
    code = """
    import json, os, torch
    from models.base import load_model
    from orchestrator.config import DataConfig
    from orchestrator.settings import Setting, SpeedFlags
    from orchestrator.trainer import Trainer
    before = sorted(os.sched_getaffinity(0))
    trainer = Trainer(load_model("pix2pixhd"), Setting(batch_size=1, flags=SpeedFlags(affinity=True)),
                      preset="tiny", data=DataConfig(height=32, width=32, train_samples=2), device="cpu")
    seen = []
    trainer.run(1, on_step=lambda step, logs: seen.append(sorted(os.sched_getaffinity(0))))
    print(json.dumps({"before": before, "during": seen[0], "after": sorted(os.sched_getaffinity(0)),
                      "info": trainer.speed_info["affinity"]}))
    """
    out = run_child(code, tmp_path, OMP_NUM_THREADS="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2")
    assert len(out["during"]) == 1 and set(out["during"]) < set(out["before"])
    assert out["after"] == out["before"]
    assert out["info"].startswith("share: cpus") and "OMP_NUM_THREADS=1" in out["info"]

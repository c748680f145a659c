"""Can the cluster ever run one trial? Answered before anything is written, because Ray Tune
waits forever for resources that never come.

A trial holds one bundle per Train worker (its training server's) plus a hundredth of a CPU for
its Tune trial, which only waits for the server. The answer comes from the
live nodes, and on an autoscaling cluster (``ray up`` writes ``~/ray_bootstrap_config.yaml`` on the
head) also from the node types the autoscaler may still start: a GPU study submitted while the GPU
nodes are still booting asks the autoscaler for them and waits, with a deadline, instead of being
rejected (or waiting forever).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from orchestrator.config import ResourcesConfig

DEFAULT_AUTOSCALER_CONFIG = "~/ray_bootstrap_config.yaml"
TRIAL_CPUS = 0.01  # what a stage-2 Tune trial holds while it waits for a training server (Tune needs > 0)


class ResourceError(RuntimeError):
    """The cluster can never satisfy the requested resources (or did not within the wait)."""


@dataclass(frozen=True)
class NodeShape:
    """CPUs and GPUs of a node; ``count`` nodes like it (live, or the autoscaler's maximum)."""

    cpus: float
    gpus: float
    count: int = 1
    name: str = ""


def workers_per_node(node: NodeShape, resources: ResourcesConfig) -> int:
    """How many Train worker bundles fit on one such node."""
    fits = [math.floor(node.cpus / resources.cpus_per_worker + 1e-9)]
    if resources.gpus_per_worker:
        fits.append(math.floor(node.gpus / resources.gpus_per_worker + 1e-9))
    return max(0, min(fits))


def problems(resources: ResourcesConfig, nodes: list[NodeShape]) -> list[str]:
    """Why one trial cannot be placed on ``nodes`` (empty when it can)."""
    out = []
    cpus = sum(n.cpus * n.count for n in nodes)
    gpus = sum(n.gpus * n.count for n in nodes)
    need_cpu = TRIAL_CPUS + resources.workers * resources.cpus_per_worker
    need_gpu = resources.workers * resources.gpus_per_worker
    if need_cpu > cpus + 1e-9:
        out.append(f"{need_cpu:g} CPUs per trial ({resources.workers} workers x {resources.cpus_per_worker:g} "
                   f"+ {TRIAL_CPUS:g} for the Tune trial) but the cluster has {cpus:g}")
    if need_gpu > gpus + 1e-9:
        out.append(f"{need_gpu:g} GPUs per trial ({resources.workers} workers x "
                   f"{resources.gpus_per_worker:g}) but the cluster has {gpus:g}")
    per_node = [(workers_per_node(n, resources), n.count) for n in nodes]
    if nodes and not any(k for k, _ in per_node):
        out.append(f"no node has {resources.cpus_per_worker:g} CPUs and {resources.gpus_per_worker:g} GPUs "
                   "for one worker")
    elif not out:
        # one bundle per worker, placed as resources.placement demands
        if resources.placement == "STRICT_PACK" and not any(k >= resources.workers for k, _ in per_node):
            out.append(f"placement STRICT_PACK needs one node for all {resources.workers} workers; none is that big")
        elif resources.placement == "STRICT_SPREAD" and sum(c for k, c in per_node if k) < resources.workers:
            out.append(f"placement STRICT_SPREAD needs {resources.workers} nodes that each fit a worker; "
                       f"there are {sum(c for k, c in per_node if k)}")
        elif sum(k * c for k, c in per_node) < resources.workers:
            out.append(f"only {sum(k * c for k, c in per_node)} worker bundles of {resources.cpus_per_worker:g} CPUs "
                       f"/ {resources.gpus_per_worker:g} GPUs fit on the nodes; a trial needs {resources.workers}")
    return out


def servers_that_fit(resources: ResourcesConfig, nodes: list[NodeShape]) -> int:
    """How many training servers (one worker group each, ``orchestrator.service``) to start: up to
    ``max_concurrent_trials``, as many as fit on ``nodes`` with a Tune trial's share left for each
    (servers hold their CPUs for the whole study: one too many and the trials that feed them could
    never start). At least one: ``problems`` already said whether one fits at all."""
    bundles = sum(workers_per_node(n, resources) * n.count for n in nodes)
    cpus = sum(n.cpus * n.count for n in nodes)
    servers = min(resources.max_concurrent_trials, bundles // resources.workers)
    while servers > 1 and servers * (resources.workers * resources.cpus_per_worker + TRIAL_CPUS) > cpus + 1e-9:
        servers -= 1
    return max(1, servers)


def live_nodes() -> list[NodeShape]:
    import ray

    return [NodeShape(n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0),
                      name=n.get("NodeManagerAddress", ""))
            for n in ray.nodes() if n.get("Alive")]


def autoscaler_nodes(config_path: str | os.PathLike) -> list[NodeShape]:
    """Worker node types the autoscaler may start (``available_node_types`` with their declared
    ``resources`` and ``max_workers``, capped by the cluster's ``max_workers``); [] when the file
    does not exist (no autoscaler) or declares no types."""
    path = Path(config_path).expanduser()
    if not path.is_file():
        return []
    config = yaml.safe_load(path.read_text()) or {}
    head = config.get("head_node_type")
    cap = int(config.get("max_workers", 0) or 0)
    out = []
    for name, node_type in (config.get("available_node_types") or {}).items():
        if name == head:
            continue  # the head is already a live node
        declared = node_type.get("resources") or {}
        count = int(node_type.get("max_workers", cap) or 0)
        if cap:
            count = min(count, cap)
        if count > 0:
            out.append(NodeShape(float(declared.get("CPU", 0)), float(declared.get("GPU", 0)), count, name))
    return out


def _bundles(resources: ResourcesConfig) -> list[dict[str, float]]:
    worker = {"CPU": resources.cpus_per_worker}
    if resources.gpus_per_worker:
        worker["GPU"] = resources.gpus_per_worker
    return [{"CPU": TRIAL_CPUS}] + [dict(worker) for _ in range(resources.workers)]


def check_resources(resources: ResourcesConfig, autoscaler_config: str | os.PathLike | None = None,
                    wait_seconds: float | None = None, log: Callable[[str], None] = print,
                    poll_seconds: float = 5.0) -> None:
    """Return when one trial fits on the live nodes; raise :class:`ResourceError` when it never can.

    When only nodes the autoscaler may still start would fit it, ask the autoscaler for them and wait
    up to ``wait_seconds`` (default ``resources.node_wait_seconds``)."""
    live = live_nodes()
    now = problems(resources, live)
    if not now:
        return
    scalable = autoscaler_nodes(autoscaler_config) if autoscaler_config else []
    if not scalable or problems(resources, live + scalable):
        raise ResourceError("resources: the cluster can never run a trial: " + "; ".join(now)
                            + (" (counting the nodes the autoscaler may add)" if scalable else "")
                            + ". Lower resources.workers / cpus_per_worker / gpus_per_worker or add nodes.")
    from ray.autoscaler.sdk import request_resources

    wait = resources.node_wait_seconds if wait_seconds is None else wait_seconds
    types = ", ".join(f"{n.name} (up to {n.count})" for n in scalable)
    log(f"waiting up to {wait:g} s for the autoscaler to start nodes for one trial ({types}): "
        + "; ".join(now))
    request_resources(bundles=_bundles(resources))
    deadline = time.time() + wait
    next_note = time.time() + 60
    try:
        while time.time() < deadline:
            time.sleep(poll_seconds)
            now = problems(resources, live_nodes())
            if not now:
                log("the nodes have joined")
                return
            if time.time() >= next_note:
                log(f"  still waiting ({deadline - time.time():.0f} s left): " + "; ".join(now))
                next_note += 60
    finally:
        request_resources(bundles=[])  # the trials' own requests keep what they use
    raise ResourceError(f"resources: the autoscaler did not start nodes for one trial within {wait:g} s "
                        f"(resources.node_wait_seconds): " + "; ".join(now)
                        + ". Check `ray status` / `ray monitor cluster.yaml` (cloud quota, instance availability).")

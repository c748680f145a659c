#!/usr/bin/env python
"""Wall time of a study and where it goes: training steps, other worker work (building networks,
memory probes, evaluation), MLflow logging, and Ray (start-up, worker groups, scheduling,
checkpoint reporting).

Runs the study in this process on a local Ray and prints one table from that run.

    python benchmarks/study_overhead.py [--search-space search_spaces/pix2pixhd.yaml] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from orchestrator import search
from orchestrator.config import load_config
from orchestrator.study import Study, machine_description


OVERHEAD = "Ray worker groups, scheduling, reporting"


def breakdown(rows: pd.DataFrame, wall: float, ray_init: float, mlflow: float = 0.0) -> list[tuple[str, float]]:
    """[(part, seconds)] of a study's wall time, from its trained/profiled rows' own timings and the
    driver's MLflow logging time: what is left after steps, other worker work, ray.init and MLflow
    is Ray's overhead."""
    col = lambda name: float(rows[name].fillna(0).sum()) if name in rows else 0.0  # noqa: E731
    steps = col("profile_step_seconds") + col("step_seconds")  # a trained row has both
    other = col("build_seconds") + col("run_build_seconds") + col("memory_seconds") + col("eval_seconds")
    return [("training steps (profile blocks + quality training)", steps),
            ("other worker work (build, memory probe, eval)", other),
            ("ray.init", ray_init),
            ("MLflow logging (driver)", mlflow),
            (OVERHEAD, wall - ray_init - steps - other - mlflow)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--search-space", type=Path, default=Path(__file__).resolve().parents[1] / "search_spaces" / "pix2pixhd.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    overrides = {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in args.set)}
    config = load_config(args.search_space, overrides)
    output = args.output or Path(tempfile.mkdtemp(prefix="study-overhead-"))

    started = time.perf_counter()
    search.connect(None)
    ray_init = time.perf_counter() - started
    study = Study(config, output, f"sqlite:///{output / 'mlflow.db'}", log=lambda *_: None)
    try:
        result = study.run()
    finally:
        import ray

        ray.shutdown()
    wall = time.perf_counter() - started

    frame = pd.read_parquet(output / "results.parquet")
    rows = frame[frame["kind"].isin(["candidate", "reference"])]
    print(f"machine: {machine_description()}")
    print(f"study: {config.experiment} ({len(rows[rows['kind'] == 'candidate'])} settings profiled, "
          f"{int(frame.get('trial_done', pd.Series(dtype=float)).fillna(0).sum())} trained, "
          f"{config.budget.reference_seeds} reference seeds)")
    print(f"{'part':<44}{'seconds':>10}{'share':>8}")
    for name, seconds in breakdown(rows, wall, ray_init, result["study"]["stage_seconds"].get("mlflow", 0.0)):
        print(f"{name:<44}{seconds:>10.1f}{seconds / wall:>8.0%}")
    print(f"{'total wall time':<44}{wall:>10.1f}{1:>8.0%}")
    print(f"stage wall times: { {k: round(v, 1) for k, v in result['study']['stage_seconds'].items()} }")
    print(f"recommended: {result['recommended']['label']} ({result['recommended']['verdict']})")


if __name__ == "__main__":
    main()

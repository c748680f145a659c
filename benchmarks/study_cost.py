#!/usr/bin/env python
"""What the two-stage study saves: the study (stage 1 profiles every candidate in one worker group,
stage 2 trains only what survives, with early stopping) against an exhaustive Tune grid that trains
every candidate for the full quality budget as its own TorchTrainer trial, on the same search space
and the same fp32 references. Prints one side-by-side table from one run: wall time and its ratio
(goal <= 0.25), TorchTrainer runs, the recommendation of each and whether they agree, and each
approach's Ray overhead share (wall time not spent in training steps or other worker work); then
``search_efficiency`` on the same answers (stage 2's search against training survivors fastest first).

    python benchmarks/study_cost.py [--model pix2pixhd] [--set search.dtype=[bf16]] [--output DIR]

The grid's speedup per setting is unpaired (its throughput over the references' mean throughput,
each run timed alone), the way a plain grid would measure it; the study's is paired (stage 1).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import search_efficiency  # noqa: E402
from study_overhead import OVERHEAD, breakdown  # noqa: E402  (the study's own time breakdown)

from orchestrator import search  # noqa: E402
from orchestrator.config import StudyConfig, load_config  # noqa: E402
from orchestrator.recommend import recommend  # noqa: E402
from orchestrator.results import combine_seed_results  # noqa: E402
from orchestrator.settings import Setting  # noqa: E402
from orchestrator.study import Study, machine_description  # noqa: E402
from search_spaces import default_path  # noqa: E402


def grid_trial(params: dict[str, Any], *, study: StudyConfig, settings: dict[str, Setting], storage: str) -> None:
    """One exhaustive-grid trial: train one candidate for the full quality budget, with the same
    paired seeds the study uses (so both answers rest on the same verdict rule)."""
    import ray.tune

    setting = settings[params["key"]]
    finished, _ = search.run_training(study, setting, study.budget.candidate_seed_list(study.seed), Path(storage),
                                      name=f"grid-{params['key']}")
    outcome = combine_seed_results(finished)
    ray.tune.report({"key": params["key"], "row": json.dumps(
        {k: v for k, v in outcome.items() if isinstance(v, (int, float, str))})})


def run_grid(config: StudyConfig, candidates: list[Setting], output: Path) -> tuple[pd.DataFrame, float]:
    """The exhaustive baseline: references, then every candidate as a Tune trial. (rows, wall)."""
    import ray.tune

    # a plain grid: no early stopping, no rung evaluations
    config = config.model_copy(update={"budget": config.budget.model_copy(update={"early_stop_at": []})})
    storage = output / "ray"
    started = time.perf_counter()
    seeds = [config.seed + i for i in range(config.budget.reference_seeds)]
    refs, _ = search.run_training(config, config.reference, seeds, storage, name="grid-reference")
    settings = {s.key(): s for s in candidates}
    trainable = ray.tune.with_parameters(grid_trial, study=config, settings=settings, storage=str(storage))
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(trainable, {"CPU": 1}),
        param_space={"key": ray.tune.grid_search(list(settings))},
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=config.resources.max_concurrent_trials),
        run_config=ray.tune.RunConfig(name="grid", storage_path=str(storage), verbose=0),
    )
    grid = search.run_interruptibly(tuner.fit)
    wall = time.perf_counter() - started

    ref_throughput = sum(r["throughput"] for r in refs.values()) / len(refs)
    rows = [{"row_id": f"reference:{seed}", "kind": "reference", "seed": int(seed), "speedup": 1.0, "trained": 1,
             **config.reference.flat(), **{k: v for k, v in r.items() if isinstance(v, (int, float, str))}}
            for seed, r in refs.items()]
    for result in grid:
        metrics = result.metrics or {}
        outcome = json.loads(metrics.get("row", "{}"))
        setting = settings[metrics.get("key", result.config["key"])]
        speedup = float(outcome.get("throughput", math.nan)) / ref_throughput
        rows.append({**{k: v for k, v in outcome.items() if k.startswith(("quality_", "status", "reason", "seed",
                                                                            "step_seconds", "eval_seconds"))},
                     "row_id": setting.key(), "setting_key": setting.key(), "setting_json": setting.model_dump_json(),
                     "kind": "candidate", "label": setting.label(), "trained": 1,
                     "status": outcome.get("status", "error" if result.error else "ok"),
                     "speedup": speedup, "speedup_low": speedup, "speedup_high": speedup, **setting.flat()})
    return pd.DataFrame(rows), wall


def train_runs(storage: Path) -> list[Path]:
    """The Ray Train runs (worker-group runs) under a study's Ray storage."""
    return [p for p in storage.iterdir() if (p / "checkpoint_manager_snapshot.json").exists()]


def recommended(frame: pd.DataFrame, config: StudyConfig, model_name: str) -> str:
    rec = recommend(frame, model=model_name, preset=config.model.preset, quality=config.quality,
                    reference=config.reference, torch_default=config.torch_default)
    return rec["recommended"]["label"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pix2pixhd")
    parser.add_argument("--search-space", type=Path, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    overrides = {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in args.set)}
    config = load_config(args.search_space or default_path(args.model), overrides)
    output = (args.output or Path(tempfile.mkdtemp(prefix="study-cost-"))).resolve()

    started = time.perf_counter()
    search.connect(None)
    ray_init = time.perf_counter() - started
    try:
        study = Study(config, output / "two-stage", f"sqlite:///{output / 'two-stage' / 'mlflow.db'}",
                      log=lambda message: print(f"  [two-stage] {message}", flush=True))
        print("two-stage study ...", flush=True)
        begun = time.perf_counter()
        study_rec = study.run()
        study_wall = time.perf_counter() - begun
        study_rows = pd.read_parquet(output / "two-stage" / "results.parquet")
        candidates = study.candidates()
        print(f"exhaustive grid: {len(candidates)} TorchTrainer trials ...", flush=True)
        grid_rows, grid_wall = run_grid(config, candidates, output / "grid")
    finally:
        import ray

        ray.shutdown()

    grid_rows.to_parquet(output / "grid" / "results.parquet")
    study_label = study_rec["recommended"]["label"]
    grid_label = recommended(grid_rows, config, study.model_name)
    trained = int(study_rows.get("trial_done", pd.Series(dtype=float)).fillna(0).sum())
    stopped = int((study_rows.get("status") == "stopped").sum())
    study_parts = dict(breakdown(study_rows[study_rows["kind"].isin(["candidate", "reference"])], study_wall, 0.0,
                                 study_rec["study"]["stage_seconds"].get("mlflow", 0.0)))
    grid_parts = dict(breakdown(grid_rows, grid_wall, 0.0))  # the grid logs nothing to MLflow
    overhead = OVERHEAD

    print()
    print(f"machine: {machine_description()}; ray.init {ray_init:.1f} s (shared, not counted)")
    print(f"search space: {config.experiment}, {len(candidates)} candidate settings, "
          f"{config.budget.reference_seeds} reference seeds, {config.budget.train_samples} samples per trial")
    rows = [
        ("wall time (s)", f"{study_wall:.0f}", f"{grid_wall:.0f}"),
        ("TorchTrainer runs", f"{len(train_runs(output / 'two-stage' / 'ray'))} (profile; one server for references "
         "and trials)", f"1 + {len(candidates)}"),
        ("fresh processes for memory", "1 (every setting in sequence)", "0"),
        ("settings trained for quality", f"{trained} ({stopped} stopped early)", f"{len(candidates)}"),
        ("training steps (s)", f"{study_parts['training steps (profile blocks + quality training)']:.0f}",
         f"{grid_parts['training steps (profile blocks + quality training)']:.0f}"),
        ("Ray overhead share", f"{study_parts[overhead] / study_wall:.0%}", f"{grid_parts[overhead] / grid_wall:.0%}"),
        ("recommended", study_label, grid_label),
    ]
    width = max(len(r[1]) for r in rows) + 2
    print(f"{'':<30}{'two-stage study':<{width}}exhaustive grid")
    for name, a, b in rows:
        print(f"{name:<30}{a:<{width}}{b}")
    ratio = study_wall / grid_wall
    print(f"\nwall time ratio two-stage / grid: {ratio:.2f} (goal <= 0.25: {'met' if ratio <= 0.25 else 'NOT met'})")
    print(f"same recommendation: {'yes' if study_label == grid_label else 'no'}")
    (output / "study_cost.json").write_text(json.dumps({"study_wall": study_wall, "grid_wall": grid_wall,
                                                        "ratio": ratio, "study": study_label, "grid": grid_label}))
    print(f"outputs: {output}")
    print("\nstage 2's search against training the survivors fastest first, on these answers "
          "(benchmarks/search_efficiency.py):", flush=True)
    search_efficiency.report(output)


if __name__ == "__main__":
    main()

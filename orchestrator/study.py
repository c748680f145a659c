"""A whole study, start to finish (DESIGN.md §3):

  stage 1 "profile"   every candidate setting timed against fp32 in one worker group
  references          the fp32 reference trained with several seeds: the noise band
  stage 2 "quality"   Ray Tune + Optuna over the settings that survived stage 1
  recommend           results.parquet -> recommendations/<model>.yaml, report.md, MLflow

Each finished unit of work becomes a row of ``results.parquet`` (and an MLflow child run) the
moment it finishes. ``resume=True`` picks a study up from its table: done rows are not re-run and
their MLflow runs are reused.
"""
from __future__ import annotations

import functools
import math
import platform
import random
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from orchestrator import recommend as rec_mod
from orchestrator import search
from orchestrator.config import StudyConfig
from orchestrator.results import ResultsTable
from orchestrator.settings import Setting
from orchestrator.tracking import Tracker

FINAL_PROFILE = ("ok", "slower", "diverged", "oom", "error")


def machine_description() -> str:
    if torch.cuda.is_available():
        device = f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    else:
        device = f"CPU only ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads)"
    return f"{platform.node()}: {device}; torch {torch.__version__}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Study:
    def __init__(self, config: StudyConfig, output: Path, tracking_uri: str, resume: bool = False,
                 log=print):
        self.config, self.output, self.tracking_uri, self.log = config, output.resolve(), tracking_uri, log
        results = self.output / "results.parquet"
        if results.exists() and not resume:
            raise FileExistsError(f"{results} already exists: pass --resume to continue that study, "
                                  "or choose another --output")
        self.output.mkdir(parents=True, exist_ok=True)
        self.table = ResultsTable(results)
        self.storage = self.output / "ray"
        self.tracker = Tracker(tracking_uri, config.tracking.experiment or config.experiment)
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ rows

    def _record(self, row_id: str, values: dict[str, Any], name: str, params: dict[str, Any],
                artifacts: list[Path] = ()) -> dict[str, Any]:
        """Write a row to the table first (source of truth), then to MLflow."""
        row = self.table.upsert(row_id, {**values, "updated_at": _now()})
        try:
            run_id = self.tracker.log_row(row, name, params, artifacts)
            row = self.table.upsert(row_id, {"mlflow_run_id": run_id})
        except Exception as error:  # noqa: BLE001 - tracking trouble must not lose the measurement
            self.log(f"warning: MLflow logging of {name!r} failed ({error}); the row is kept in results.parquet")
        return row

    def _candidate_row(self, setting: Setting, values: dict[str, Any], artifacts: list[Path] = ()) -> dict[str, Any]:
        base = {"kind": "candidate", "setting_key": setting.key(), "label": setting.label(), **setting.flat()}
        return self._record(setting.key(), {**base, **values}, setting.label(), setting.flat(), artifacts)

    # ------------------------------------------------------------------ stages

    def candidates(self) -> list[Setting]:
        """The grid, with eps values equal to the model's defaults dropped (so the default-eps fp32
        setting *is* the reference, not a copy of it), minus the reference itself."""
        from models.base import load_model

        defaults = load_model(self.config.model.name, **self.config.model.options).eps_sites
        reference = self.config.reference.key()
        unique: dict[str, Setting] = {}
        for setting in self.config.search.candidates():
            eps = {k: v for k, v in setting.eps.items() if defaults.get(k) != v}
            setting = setting.model_copy(update={"eps": eps})
            unique.setdefault(setting.key(), setting)
        grid = [s for s in unique.values() if s.key() != reference]
        limit = self.config.budget.max_profiled
        if len(grid) > limit:
            self.log(f"the grid has {len(grid)} settings; profiling a random sample of {limit}")
            grid = random.Random(self.config.seed).sample(grid, limit)
        return grid

    def profile(self, settings: list[Setting]) -> dict[str, dict]:
        todo = [s for s in settings if (self.table.get(s.key()) or {}).get("profile_status") not in FINAL_PROFILE]
        known = {s.key(): self._profile_of(s.key()) for s in settings if s not in todo}
        if todo:
            self.log(f"stage 1: profiling {len(todo)} settings against fp32 "
                     f"({self.config.budget.profile_rounds} interleaved rounds of {self.config.budget.profile_steps} steps)")
            started = time.time()
            done = search.run_profile(self.config, todo, self.storage, name=f"profile-{len(self.table.rows)}")
            self.timings["profile"] = time.time() - started
            reference = done.pop("reference", {})
            self.table.upsert("study", {f"reference_{k}": v for k, v in reference.items()})
            for setting in todo:
                result = done.get(setting.key(), {"status": "error", "reason": "not profiled"})
                values = {**result, "profile_status": result.get("status"), "status": result.get("status"),
                          "profiled_at": _now()}
                self._candidate_row(setting, values)
                known[setting.key()] = values
        return known

    def _profile_of(self, key: str) -> dict[str, Any]:
        row = self.table.get(key) or {}
        return {k: row[k] for k in row if k in ("status", "speedup", "speedup_low", "speedup_high", "profile_status")} | {
            "status": row.get("profile_status", row.get("status"))}

    def references(self) -> rec_mod.Band:
        seeds = [self.config.seed + i for i in range(self.config.budget.reference_seeds)]
        todo = [s for s in seeds if (self.table.get(f"reference:{s}") or {}).get("status") is None]
        reference = self.config.reference
        if todo:
            self.log(f"references: training fp32 with seeds {todo} for {self.config.budget.train_samples} samples each")
            started = time.time()
            finished, grid = search.run_training(self.config, reference, todo, self.storage,
                                                 name=f"reference-{'-'.join(map(str, todo))}")
            self.timings["references"] = time.time() - started
            study_row = self.table.get("study") or {}
            memory = {k[len("reference_"):]: v for k, v in study_row.items() if k.startswith("reference_")}
            for seed in todo:
                result = finished[str(seed)]
                self._record(f"reference:{seed}",
                             {"kind": "reference", "seed": seed, "label": f"fp32 reference seed {seed}",
                              **reference.flat(), **result, **memory, "speedup": 1.0, "trained": 1},
                             f"fp32 reference seed {seed}", {**reference.flat(), "seed": seed},
                             [grid] if grid and seed == todo[0] else [])
        frame = self.table.frame()
        band = rec_mod.reference_band(frame, self.config.quality.metric, self.config.quality.band_multiplier)
        self.log(f"noise band of {band.metric}: {band.mean:.4f} ± {band.tolerance:.4f} over {len(band.values)} seeds")
        return band

    def quality_search(self, settings: list[Setting], known: dict[str, dict], band: rec_mod.Band) -> None:
        budget = self.config.budget
        allowed = ("ok", "slower") if budget.keep_slower else ("ok",)
        survivors = [s for s in settings if known.get(s.key(), {}).get("status") in allowed]
        trained = [r for r in self.table.rows.values() if r.get("kind") == "candidate" and r.get("trial_done")]
        remaining = budget.max_trials - len(trained)
        self.log(f"stage 2: {len(survivors)} of {len(settings)} settings survived profiling; "
                 f"{max(remaining, 0)} Optuna trials to run")
        if not survivors or remaining <= 0:
            return
        by_key = {s.key(): s for s in settings}
        previous = {r["row_id"]: [float(r.get("speedup") or 0.0), float(r.get("drift_in_bands", search.PENALTY_DRIFT))]
                    for r in trained if r["row_id"] in by_key and by_key[r["row_id"]] in survivors}

        def on_result(metrics: dict[str, Any]) -> None:
            key = metrics.get("setting_key")
            if key not in by_key or not metrics.get("trained"):
                return
            values = {k: v for k, v in metrics.items() if k not in ("config", "setting_key", "label", "samples_grid")
                      and not k.startswith(("time_", "timestamp", "date", "hostname", "node_ip", "pid",
                                            "training_iteration", "iterations_since", "checkpoint_dir", "done",
                                            "experiment_tag", "trial_id"))}
            values.update({"trial_done": 1, "trained_at": _now(), "status": metrics.get("status", "ok")})
            grid = Path(metrics["samples_grid"]) if metrics.get("samples_grid") else None
            self._candidate_row(by_key[key], values, [grid] if grid else [])
            self.log(f"[stage 2] {by_key[key].label()}: {values['status']}, speedup {metrics.get('speedup', math.nan):.2f}, "
                     f"drift {metrics.get('drift', math.nan):+.4f} ({'inside' if metrics.get('inside_band') else 'outside'} band)")

        started = time.time()
        search.run_search(self.config, survivors, known, self.storage,
                          evaluate=functools.partial(rec_mod.score_outcome, band=band),
                          on_result=on_result, previous=previous, num_trials=remaining)
        self.timings["search"] = time.time() - started

    # ------------------------------------------------------------------ all of it

    def run(self) -> dict[str, Any]:
        cfg = self.config
        parent = next((r.get("study_run_id") for r in [self.table.get("study") or {}]), None)
        parent_id = self.tracker.start_study(cfg.experiment, {
            "model": cfg.model.name, "preset": cfg.model.preset, "metric": cfg.quality.metric,
            "reference": cfg.reference.label(), "workers": cfg.resources.workers}, run_id=parent)
        self.table.upsert("study", {"kind": "study", "study_run_id": parent_id, "started_at": _now()})
        started = time.time()
        try:
            settings = self.candidates()
            known = self.profile(settings)
            band = self.references()
            self.quality_search(settings, known, band)
            result = self.finish(time.time() - started)
        except BaseException:
            self.tracker.finish("FAILED")
            raise
        self.tracker.finish("FINISHED")
        return result

    def finish(self, wall_seconds: float) -> dict[str, Any]:
        cfg = self.config
        frame = self.table.frame()
        rec = rec_mod.recommend(frame, model=Path(cfg.model.name).stem.split(":")[0] if ".py" in cfg.model.name
                                else cfg.model.name, preset=cfg.model.preset, metric=cfg.quality.metric,
                                band_multiplier=cfg.quality.band_multiplier, reference=cfg.reference)
        rec["study"] = {"experiment": cfg.experiment, "machine": machine_description(),
                        "wall_seconds": wall_seconds, "stage_seconds": self.timings,
                        "mlflow_parent_run": self.tracker.parent_id, "tracking_uri": self.tracking_uri}
        rec_path = rec_mod.write_recommendation(rec, self.output)
        report = rec_mod.write_report(rec, frame, self.output, tracking_uri=self.tracking_uri,
                                      machine=machine_description())
        try:
            self.tracker.log_study_artifacts([rec_path, report, self.table.path],
                                             {"wall_seconds": wall_seconds,
                                              "recommended_speedup": float(rec["recommended"]["speedup"])})
        except Exception as error:  # noqa: BLE001
            self.log(f"warning: MLflow artifact logging failed ({error})")
        rec["paths"] = {"recommendation": str(rec_path), "report": str(report), "results": str(self.table.path)}
        rec["table"] = rec_mod.results_table_text(frame, rec_mod.Band(**rec["noise_band"]))
        return rec

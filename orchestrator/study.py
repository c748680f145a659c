"""A whole study, start to finish (README.md, "How a study works"):

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
import hashlib
import json
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from orchestrator import interrupts, plan
from orchestrator import recommend as rec_mod
from orchestrator import report as report_mod
from orchestrator import search
from orchestrator.config import StudyConfig
from orchestrator.devices import DeviceInfo, describe_device
from orchestrator.results import ResultsTable
from orchestrator.service import Trainers, TrainingService
from orchestrator.settings import Setting, SpeedFlags
from orchestrator.tracking import Tracker

CONFIG_FILE = "study.yaml"
OPTUNA_FILE = "optuna.db"  # stage 2's Optuna studies: optuna-dashboard sqlite:///<output>/optuna.db
FINAL_PROFILE = ("ok", "slower", "diverged", "oom", "error")


def machine_description() -> str:
    """This process's machine (benchmarks); a study describes its workers' device instead."""
    return describe_device().describe()


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
        # the study's own copy of its configuration: `python -m orchestrator sync/report` read it
        (self.output / CONFIG_FILE).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        self._tracker: Tracker | None = None
        self._auto_info: dict[str, dict] = {}  # setting key -> how batch_size auto chose its batch
        self._tracking_retry_at = 0.0
        self.timings: dict[str, float] = {}

    @classmethod
    def reopen(cls, output: Path, tracking_uri: str | None = None, log=print) -> "Study":
        """The study in ``output`` (for sync/report), without Ray."""
        from orchestrator.config import parse_config
        from orchestrator.tracking import resolve_tracking_uri

        config = parse_config(yaml.safe_load((output / CONFIG_FILE).read_text()), str(output / CONFIG_FILE))
        recorded = (ResultsTable(output / "results.parquet").get("study") or {}).get("tracking_uri")
        # an explicit URI wins; else the one the study logged to (the server may be back now)
        uri = (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or recorded
               or resolve_tracking_uri(None, config.tracking.uri, output))
        return cls(config, output, uri, resume=True, log=log)

    # ------------------------------------------------------------------ MLflow (never loses a row)

    @property
    def experiment_name(self) -> str:
        return self.config.tracking.experiment or self.config.experiment

    def tracker(self) -> Tracker:
        """Connected tracker with the study's parent run (created once, reused on resume)."""
        if self._tracker is None:
            # a local store keeps artifacts beside the study, not in whatever directory we run from
            local = self.tracking_uri.startswith("sqlite:")
            self._tracker = Tracker(self.tracking_uri, self.experiment_name,
                                    artifact_location=(self.output / "mlartifacts").as_uri() if local else None)
        if self._tracker.parent_id is None:
            parent = (self.table.get("study") or {}).get("study_run_id")
            cfg = self.config
            parent_id = self._tracker.start_study(cfg.experiment, {
                "model": cfg.model.name, "preset": cfg.model.preset, "metric": cfg.quality.metric,
                "reference": cfg.reference.label(), "workers": cfg.resources.workers}, run_id=parent)
            if parent is None:
                self._tracker.log_study_config(cfg.model_dump(mode="json"))
            self.table.upsert("study", {"kind": "study", "study_run_id": parent_id})
        return self._tracker

    def _log_row(self, row_id: str) -> bool:
        """Log one table row to MLflow; on failure mark it pending (``sync`` logs it later)."""
        if time.time() < self._tracking_retry_at:
            self.table.upsert(row_id, {"mlflow_pending": 1})
            return False
        row = self.table.get(row_id)
        params = {k: v for k, v in row.items() if k in Setting.model_fields or k.startswith("eps.")
                  or k in SpeedFlags.model_fields or k == "seed"}
        started = time.time()
        try:
            tracker = self.tracker()
            run_id = tracker.ensure_run(row, row.get("label", row_id), params)
            row = self.table.upsert(row_id, {"mlflow_run_id": run_id})
            grid = row.get("samples_grid")
            tracker.update_run(run_id, row, [Path(grid)] if grid else [])
            self.table.upsert(row_id, {"mlflow_pending": 0})
            self.timings["mlflow"] = self.timings.get("mlflow", 0.0) + time.time() - started
            return True
        except Exception as error:  # noqa: BLE001 - tracking trouble must not lose the measurement
            self._tracking_retry_at = time.time() + 60
            self.table.upsert(row_id, {"mlflow_pending": 1})
            self.log(f"warning: MLflow at {self.tracking_uri} is unreachable ({type(error).__name__}: "
                     f"{str(error)[:200]}); results stay in results.parquet and are logged when it is back "
                     "(or by `python -m orchestrator sync`)")
            return False

    def sync(self) -> tuple[int, int]:
        """Log every row MLflow is missing; returns (logged, still pending)."""
        self._tracking_retry_at = 0.0
        todo = [row_id for row_id, row in self.table.rows.items()
                if row.get("kind") in ("candidate", "reference")
                and (row.get("mlflow_pending") or not row.get("mlflow_run_id"))]
        logged = 0
        for row_id in todo:
            if not self._log_row(row_id):
                break
            logged += 1
        return logged, len(todo) - logged

    # ------------------------------------------------------------------ rows

    def _record(self, row_id: str, values: dict[str, Any]) -> dict[str, Any]:
        """Write a row to the table first (the source of truth), then to MLflow."""
        self.table.upsert(row_id, {**values, "updated_at": _now()})
        self._log_row(row_id)
        return self.table.get(row_id)

    def _candidate_row(self, setting: Setting, values: dict[str, Any]) -> dict[str, Any]:
        base = {"kind": "candidate", "setting_key": setting.key(), "label": setting.label(),
                "setting_json": setting.model_dump_json(), **setting.flat()}
        if setting == self.config.torch_default:
            base["baseline"] = "torch_default"
        return self._record(setting.key(), {**base, **values})

    # ------------------------------------------------------------------ stages

    @property
    def model_name(self) -> str:
        from models.base import load_model

        return load_model(self.config.model.name, **self.config.model.options).name

    def device(self) -> DeviceInfo:
        """The training device, probed once on a worker with a trial's resources (cached for --resume)."""
        cached = (self.table.get("study") or {}).get("device_info")
        if cached:
            return DeviceInfo.from_dict(json.loads(cached))
        info = DeviceInfo.from_dict(search.probe_device(self.config))
        self.table.upsert("study", {"device_info": json.dumps(info.as_dict()), "machine": info.describe()})
        self.log(f"training device: {info.describe()}")
        if info.torch_default_differs:
            self.log(f"  TF32: searching tf32 off/on{' (search.tf32 is set: as given)' if 'tf32' in self.config.search.model_fields_set else ''}"
                     f"; PyTorch's default fp32 (TF32 {info.torch_default_tf32_text()}) is timed as a row of its own")
        return info

    def candidates(self) -> list[Setting]:
        """The settings stage 1 profiles on the training device (``plan.candidate_grid``), with the
        ``batch_size: auto`` settings probed on a worker."""
        device = self.device()
        auto = []
        if self.config.search.auto_batch:
            auto = self._auto_batch_settings(plan.candidate_grid(self.config, device))
        grid = plan.candidate_grid(self.config, device, auto)
        full = len(plan.candidate_grid(self.config, device, auto, sample=False))
        if len(grid) < full:
            self.log(f"the grid has {full} settings; profiling a random sample of {len(grid)} (budget.max_profiled)")
        return grid

    def _auto_batch_settings(self, grid: list[Setting]) -> list[Setting]:
        """For each precision/flag combination, the largest batch that fits in memory (probed once
        per combination on a worker, cached in the table for --resume)."""
        study_row = self.table.get("study") or {}
        cached: dict[str, dict] = json.loads(study_row.get("auto_batches", "{}"))
        shapes: dict[str, Setting] = {}
        for setting in grid:
            shape = setting.model_copy(update={"eps": {}, "batch_size": 1})
            shapes.setdefault(shape.key(), shape)
        todo = [shape for key, shape in shapes.items() if key not in cached]
        if todo:
            self.log(f"batch_size auto: probing the largest batch of {len(todo)} precision settings "
                     f"(budget {self.config.resources.memory_budget_mib or 'free GPU memory'} MiB)")
            for shape, found in zip(todo, search.find_batches(self.config, todo)):
                cached[shape.key()] = found
                self.log(f"  {shape.label().replace('-b1', '')}: batch {found['batch_size']}")
            self.table.upsert("study", {"auto_batches": json.dumps(cached)})
        out = []
        for setting in grid:
            found = cached[setting.model_copy(update={"eps": {}, "batch_size": 1}).key()]
            if found["batch_size"] > 0:
                auto = setting.model_copy(update={"batch_size": int(found["batch_size"])})
                self._auto_info[auto.key()] = {"batch_auto": 1, "batch_search": json.dumps(found)}
                out.append(auto)
        return out

    def profile(self, settings: list[Setting]) -> dict[str, dict]:
        todo = [s for s in settings if (self.table.get(s.key()) or {}).get("profile_status") not in FINAL_PROFILE]
        known = {s.key(): self._profile_of(s.key()) for s in settings if s not in todo}
        if todo:
            self.log(f"stage 1: profiling {len(todo)} settings against fp32 "
                     f"({self.config.budget.profile_rounds} interleaved rounds of {self.config.budget.profile_steps} steps)")
            started = time.time()
            # a deterministic name: an interrupted study resumes the same Ray Train run from its
            # latest checkpoint, so settings profiled before the interruption are not profiled again
            digest = hashlib.sha1("".join(sorted(s.key() for s in todo)).encode()).hexdigest()[:10]
            done = search.run_profile(self.config, todo, self.storage, name=f"profile-{digest}")
            self.timings["profile"] = time.time() - started
            reference = done.pop("reference", {})
            self.table.upsert("study", {f"reference_{k}": v for k, v in reference.items()})
            for setting in todo:
                result = done.get(setting.key(), {"status": "error", "reason": "not profiled"})
                values = {**result, "profile_status": result.get("status"), "status": result.get("status"),
                          "profiled_at": _now(), **self._auto_info.get(setting.key(), {})}
                self._candidate_row(setting, values)
                known[setting.key()] = values
        return known

    def _profile_of(self, key: str) -> dict[str, Any]:
        row = self.table.get(key) or {}
        return {k: row[k] for k in row if k in ("status", "speedup", "speedup_low", "speedup_high", "profile_status")} | {
            "status": row.get("profile_status", row.get("status"))}

    def references_todo(self) -> list[int]:
        seeds = self.config.budget.reference_seed_list(self.config.seed)
        return [s for s in seeds if (self.table.get(f"reference:{s}") or {}).get("status") is None]

    def survivors(self, settings: list[Setting], known: dict[str, dict]) -> list[Setting]:
        """The settings stage 2 may train: those stage 1 found faster (or any that ran, with
        ``budget.keep_slower``)."""
        allowed = ("ok", "slower") if self.config.budget.keep_slower else ("ok",)
        return [s for s in settings if known.get(s.key(), {}).get("status") in allowed]

    def trials_todo(self) -> int:
        trained = [r for r in self.table.rows.values() if r.get("kind") == "candidate" and r.get("trial_done")]
        return self.config.budget.max_trials - len(trained)

    def references(self, trainers: Trainers | None) -> rec_mod.QualityBasis:
        todo = self.references_todo()
        reference = self.config.reference
        if todo:
            self.log(f"references: training fp32 with seeds {todo} for {self.config.budget.train_samples} samples each")
            started = time.time()
            finished, grid = search.run_interruptibly(lambda: trainers.train(reference, todo))
            self.timings["references"] = time.time() - started
            study_row = self.table.get("study") or {}
            memory = {k[len("reference_"):]: v for k, v in study_row.items() if k.startswith("reference_")}
            for seed in todo:
                result = finished[str(seed)]
                self._record(f"reference:{seed}",
                             {"kind": "reference", "seed": seed, "label": f"fp32 reference seed {seed}",
                              "setting_key": reference.key(), "setting_json": reference.model_dump_json(),
                              **reference.flat(), **result, **memory, "speedup": 1.0, "trained": 1,
                              "samples_grid": str(grid) if grid and seed == todo[0] else None})
        basis = rec_mod.quality_basis(self.table.frame(), self.config.quality)
        metric = basis.column.removeprefix("quality_")
        self.log(f"fp32 {metric} over {len(basis.references)} seeds: {basis.mean:.4f} ± {basis.sd:.4f} (sd); "
                 f"equivalence margin {basis.margin.value:.4g} ({basis.margin.source})")
        if basis.relative_spread > self.config.quality.max_relative_band:
            self.log(f"warning: the fp32 seeds spread {basis.relative_spread:.0%} of their mean {metric}, more than "
                     f"quality.max_relative_band ({self.config.quality.max_relative_band:.0%}): at this budget only large "
                     f"quality losses are visible. Raise budget.train_samples (now {self.config.budget.train_samples}) "
                     f"so training settles, or budget.reference_seeds/candidate_seeds for more pairs")
        return basis

    def quality_search(self, settings: list[Setting], known: dict[str, dict], basis: rec_mod.QualityBasis,
                       trainers: Trainers | None) -> None:
        budget = self.config.budget
        survivors = self.survivors(settings, known)
        trained = [r for r in self.table.rows.values() if r.get("kind") == "candidate" and r.get("trial_done")]
        remaining = self.trials_todo()
        self.log(f"stage 2: {len(survivors)} of {len(settings)} settings survived profiling; "
                 f"{max(remaining, 0)} Optuna trials to run")
        if not survivors or remaining <= 0:
            return
        by_key = {s.key(): s for s in settings}
        previous = {r["row_id"]: [float(r.get("speedup") or 0.0), float(r.get("drift_in_margins", search.PENALTY_DRIFT))]
                    for r in trained if r["row_id"] in by_key and by_key[r["row_id"]] in survivors}

        done_before = len(trained)
        counter = {"started": 0, "trained": 0}
        trial_budget = min(budget.max_trials, done_before + len(survivors))

        def on_start(key: str) -> None:
            if key in by_key and not (self.table.get(key) or {}).get("trial_done"):
                counter["started"] += 1
                self.log(f"[stage 2] trial {done_before + counter['started']} of at most {trial_budget}: "
                         f"training {by_key[key].label()} with {budget.candidate_seeds} seed(s)")

        def on_result(metrics: dict[str, Any]) -> None:
            key = metrics.get("setting_key")
            if key not in by_key or not metrics.get("trained"):
                return
            # the trial's row travels whole as JSON; "speedup" there is Optuna's objective (0 for a
            # diverged trial): the table keeps the speedup stage 1 measured
            row = json.loads(metrics["row"])
            values = {k: v for k, v in row.items() if k not in ("setting_key", "label", "speedup", "repeat")}
            values.update({"trial_done": 1, "trained_at": _now(), "samples_grid": row.get("samples_grid") or None})
            self._candidate_row(by_key[key], values)
            counter["trained"] += 1
            self.log(f"[stage 2] trial {done_before + counter['trained']} of at most {trial_budget} done: "
                     f"{by_key[key].label()}: {values.get('status')}, speedup {known[key].get('speedup', math.nan):.2f}, "
                     f"mean paired drift {row.get('drift', math.nan):+.4f} over {len(json.loads(row.get('seeds', '[]')))} "
                     f"seed(s) ({row.get('drift_in_margins', math.nan):.2f} margins of loss)")

        band = basis.band
        rungs = rec_mod.rung_bands(self.table.frame(), band)
        if self.config.budget.early_stop_at:
            self.log("early stop: " + (", ".join(f"after {n} samples {b.metric} {b.mean:.4f} ± {b.tolerance:.4f}"
                                                 for n, b in rungs.items())
                                       or "no reference quality measured part-way (references from an older run)")
                     + f"; a trial more than {self.config.budget.early_stop_bands:g} bands worse stops there")
        started = time.time()
        from models.base import load_model

        eps_defaults = load_model(self.config.model.name, **self.config.model.options).eps_sites
        search.run_search(self.config, settings, known, survivors, self.storage, eps_defaults=eps_defaults,
                          evaluate=functools.partial(rec_mod.score_trial, basis=basis),
                          on_result=on_result, on_start=on_start, previous=previous, num_trials=remaining,
                          rung_bands=rungs, optuna_storage=f"sqlite:///{self.output / OPTUNA_FILE}",
                          trainers=trainers)
        self.timings["search"] = time.time() - started

    # ------------------------------------------------------------------ all of it

    def run(self) -> dict[str, Any]:
        # the URI the study logs to: `sync` must reach the same server later
        self.table.upsert("study", {"kind": "study", "started_at": _now(), "tracking_uri": self.tracking_uri,
                                    "ray_session_dir": search.session_dir()})
        started = time.time()
        try:
            self.sync()  # a resumed study first logs what an unreachable server missed
            settings = self.candidates()
            known = self.profile(settings)
            interrupts.pause_point("between-stages")
            interrupts.check()
            # the references and every stage-2 setting train on the same servers: one worker-group
            # start for them all (started only when something is left to train)
            service = TrainingService(self.config, self.storage, log=self.log)
            train = self.references_todo() or (self.trials_todo() > 0 and self.survivors(settings, known))
            trainers = service.start() if train else None
            try:
                basis = self.references(trainers)
                interrupts.check()
                self.quality_search(settings, known, basis, trainers)
            except BaseException:
                service.abandon()
                raise
            service.close()
            interrupts.check()
            result = self.finish(time.time() - started)
        except BaseException:
            self._finish_parent("FAILED")
            raise
        self._finish_parent("FINISHED")
        return result

    def _finish_parent(self, status: str) -> None:
        try:
            if self._tracker is not None and self._tracker.parent_id:
                self._tracker.finish(status)
        except Exception:  # noqa: BLE001 - the parent's status is cosmetic
            pass

    def finish(self, wall_seconds: float) -> dict[str, Any]:
        cfg = self.config
        logged, pending = self.sync()
        if pending:
            self.log(f"warning: {pending} rows are not in MLflow yet: run `python -m orchestrator sync "
                     f"--output {self.output}` when {self.tracking_uri} answers")
        frame = self.table.frame()
        rec = rec_mod.recommend(frame, model=self.model_name, preset=cfg.model.preset, quality=cfg.quality,
                                reference=cfg.reference, torch_default=cfg.torch_default)
        machine = (self.table.get("study") or {}).get("machine") or machine_description()
        rec["study"] = {"experiment": cfg.experiment, "machine": machine,
                        "resolution": f"{cfg.data.height}x{cfg.data.width}",
                        "reference_batch_size": cfg.reference.batch_size,
                        "wall_seconds": wall_seconds, "stage_seconds": self.timings,
                        "mlflow_parent_run": (self.table.get("study") or {}).get("study_run_id"),
                        "tracking_uri": self.tracking_uri}
        rec_path = rec_mod.write_recommendation(rec, self.output)
        interrupts.pause_point("report")
        report = report_mod.write_report(rec, frame, self.output, tracking_uri=self.tracking_uri,
                                         machine=machine)
        try:
            tracker = self.tracker()
            tracker.log_study_artifacts([rec_path, report, self.table.path, self.output / "report_images"],
                                        {"time/wall_seconds": wall_seconds,
                                         "recommended_speedup": float(rec["recommended"]["speedup"])})
            tracker.log_figures({p.stem: p for p in sorted((self.output / "report_images").glob("*.png"))})
        except Exception as error:  # noqa: BLE001
            self.log(f"warning: MLflow artifact logging failed ({error})")
        rec["paths"] = {"recommendation": str(rec_path), "report": str(report), "results": str(self.table.path)}
        rec["table"] = report_mod.results_table_text(frame, rec)
        return rec

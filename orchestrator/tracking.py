"""MLflow logging: a parent run per study, a nested child run per measured setting.

Everything is logged from the driver (many Ray workers writing one sqlite file would lock it), via
``MlflowClient`` so no global "active run" state leaks between studies. A row's MLflow run id is
kept in the results table: logging the same row again updates its run instead of duplicating it.
"""
from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

PARENT_TAG = "mlflow.parentRunId"


def default_tracking_uri(output: Path) -> str:
    """sqlite file in the output folder, absolute (Ray workers run in other directories)."""
    return f"sqlite:///{(output / 'mlflow.db').resolve()}"


def resolve_tracking_uri(cli_value: str | None, config_value: str | None, output: Path) -> str:
    uri = cli_value or os.environ.get("MLFLOW_TRACKING_URI") or config_value or default_tracking_uri(output)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # relative sqlite path: make it absolute now, while we know the working directory
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


class Tracker:
    def __init__(self, uri: str, experiment: str):
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.experiment = experiment
        self.parent_id: str | None = None

    def start_study(self, name: str, params: dict[str, Any], run_id: str | None = None) -> str:
        """Create the study's parent run, or reopen ``run_id`` when resuming."""
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            self.parent_id = run_id
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags={"amp.kind": "study"})
        self.parent_id = run.info.run_id
        self._log_params(self.parent_id, params)
        return self.parent_id

    def log_row(self, row: dict[str, Any], name: str, params: dict[str, Any],
                artifacts: list[Path] = ()) -> str:
        """Create (or update) the child run of one results-table row; returns its run id."""
        run_id = row.get("mlflow_run_id")
        if not run_id:
            run = self.client.create_run(self.experiment_id, run_name=name,
                                         tags={PARENT_TAG: self.parent_id, "amp.kind": row.get("kind", "")})
            run_id = run.info.run_id
            self._log_params(run_id, params)
        self.client.set_tag(run_id, "status", str(row.get("status", "")))
        metrics = {k: float(v) for k, v in row.items()
                   if isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)}
        self._log_metrics(run_id, metrics)
        for path in artifacts:
            if Path(path).exists():
                self.client.log_artifact(run_id, str(path))
        terminal = "FAILED" if row.get("status") in ("error",) else "FINISHED"
        self.client.set_terminated(run_id, status=terminal)
        return run_id

    def log_study_artifacts(self, paths: list[Path], metrics: dict[str, float] | None = None) -> None:
        for path in paths:
            path = Path(path)
            if path.is_dir():
                self.client.log_artifacts(self.parent_id, str(path), artifact_path=path.name)
            elif path.exists():
                self.client.log_artifact(self.parent_id, str(path))
        if metrics:
            self._log_metrics(self.parent_id, {k: v for k, v in metrics.items() if math.isfinite(v)})

    def finish(self, status: str = "FINISHED") -> None:
        if self.parent_id:
            self.client.set_terminated(self.parent_id, status=status)

    def child_runs(self) -> list:
        return self.client.search_runs([self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_id}'",
                                       max_results=10000)

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        batch = [mlflow.entities.Param(str(k), str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(batch), 100):
            self.client.log_batch(run_id, params=batch[i:i + 100])

    def _log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        import time

        now = int(time.time() * 1000)
        batch = [mlflow.entities.Metric(k, v, now, 0) for k, v in metrics.items()]
        for i in range(0, len(batch), 500):
            self.client.log_batch(run_id, metrics=batch[i:i + 500])

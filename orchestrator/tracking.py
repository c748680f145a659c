"""MLflow logging: a parent run per study, a nested child run per measured setting.

Everything is logged from the driver (many Ray workers writing one sqlite file would lock it), via
``MlflowClient`` so no global "active run" state leaks between studies. A row's MLflow run id is
kept in the results table: logging the same row again updates its run instead of duplicating it.

What people look at: runs carry their real start and end times (from the row, not from when the
driver logged them); the quality metric is a step metric (step = training samples seen, timestamp
= when it was measured), so MLflow's chart view overlays fp32 and AMP curves; bookkeeping
(``*_seconds``) and precision counters are grouped under ``time/`` and ``precision/`` apart from the
results; the study's plots and sample grids are images on the parent run.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

PARENT_TAG = "mlflow.parentRunId"

# fail fast when a tracking server is down (the default retries take minutes per call); the study
# keeps every row in results.parquet and logs it once the server answers again
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


def browse_hint(uri: str) -> str:
    """How a user opens the MLflow UI for ``uri``."""
    if uri.startswith(("http://", "https://")):
        return (f"open {uri} (a cluster head's server: `ray attach cluster.yaml -p 5000`, "
                "then http://localhost:5000)")
    return f"mlflow ui --backend-store-uri {uri}"


def default_tracking_uri(output: Path) -> str:
    """sqlite file in the output folder, absolute (Ray workers run in other directories)."""
    return f"sqlite:///{(output / 'mlflow.db').resolve()}"


def resolve_tracking_uri(cli_value: str | None, config_value: str | None, output: Path,
                         discovered: str | None = None) -> str:
    """Where the study logs: ``--tracking-uri``, ``$MLFLOW_TRACKING_URI``, the config's
    ``tracking.uri``, the cluster head's MLflow server (``discovered``), a sqlite file in ``output``;
    the first one set wins (the explicit before the found)."""
    uri = (cli_value or os.environ.get("MLFLOW_TRACKING_URI") or config_value or discovered
           or default_tracking_uri(output))
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # relative sqlite path: make it absolute now, while we know the working directory
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


def _ms(epoch_seconds: Any) -> int:
    """Milliseconds since the epoch, for MLflow (now when not known)."""
    if isinstance(epoch_seconds, (int, float)) and math.isfinite(epoch_seconds) and epoch_seconds > 0:
        return int(epoch_seconds * 1000)
    return int(time.time() * 1000)


def metric_name(column: str) -> str:
    """Results first, bookkeeping apart: ``*_seconds`` under ``time/``, precision counters under
    ``precision/``."""
    if column.endswith("_seconds"):
        return f"time/{column}"
    if column.startswith("precision_"):
        return f"precision/{column.removeprefix('precision_')}"
    return column


class Tracker:
    def __init__(self, uri: str, experiment: str, artifact_location: str | None = None):
        """``artifact_location``: where a new experiment keeps its artifacts (for a local sqlite
        store, the study's folder; a tracking server decides for itself when None)."""
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(
            experiment, artifact_location=artifact_location)
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

    def ensure_run(self, row: dict[str, Any], name: str, params: dict[str, Any]) -> str:
        """The row's child run id, creating the run (with its params) if the row has none yet.
        Callers store the id at once, so a later failure can never lead to a duplicate run."""
        run_id = row.get("mlflow_run_id")
        if run_id:
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=name, start_time=_ms(row.get("start_time")),
                                     tags={PARENT_TAG: self.parent_id, "amp.kind": str(row.get("kind", "")),
                                           "amp.row_id": str(row["row_id"])})
        self._log_params(run.info.run_id, params)
        return run.info.run_id

    def update_run(self, run_id: str, row: dict[str, Any], artifacts: list[Path] = ()) -> None:
        """Metrics, status tag, the row itself (``row.json``: what ``report`` rebuilds from) and
        artifacts; then mark the run finished."""
        self.client.set_tag(run_id, "status", str(row.get("status", "")))
        curve = self._log_curve(run_id, row)
        metrics = {metric_name(k): float(v) for k, v in row.items()
                   if isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                   and k not in ("start_time", "end_time") and k not in curve}
        self._log_metrics(run_id, metrics)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "row.json"
            path.write_text(json.dumps(row, default=str))
            self.client.log_artifact(run_id, str(path))
        for path in artifacts:
            if path and Path(path).exists():
                self.client.log_artifact(run_id, str(path))
        self.client.set_terminated(run_id, status="FAILED" if row.get("status") == "error" else "FINISHED",
                                   end_time=_ms(row.get("end_time")))

    def _log_curve(self, run_id: str, row: dict[str, Any]) -> set[str]:
        """Quality at every measured point as a step metric (step = samples, timestamp = measured);
        returns the metric names logged this way."""
        curve: dict[tuple[str, int], list[tuple[float, float]]] = {}
        results = row.get("seed_results")
        per_seed = list(json.loads(results).values()) if isinstance(results, str) and results else [row]
        samples_final = row.get("samples")
        for result in per_seed:
            if result.get("status", "ok") != "ok":
                continue
            rungs = result.get("rung_quality")
            rungs = json.loads(rungs) if isinstance(rungs, str) and rungs else (rungs or {})
            for samples, metrics in rungs.items():
                for key, value in metrics.items():
                    if key.startswith("quality_") and isinstance(value, (int, float)) and math.isfinite(value):
                        curve.setdefault((key, int(samples)), []).append((float(value), float(metrics.get("at", 0))))
            if isinstance(samples_final, (int, float)):
                for key, value in result.items():
                    if key.startswith("quality_") and isinstance(value, (int, float)) and math.isfinite(value):
                        at = float(result.get("end_time") or 0)
                        curve.setdefault((key, int(samples_final)), []).append((float(value), at))
        batch = [mlflow.entities.Metric(key, sum(v for v, _ in values) / len(values),
                                        _ms(max(at for _, at in values)) or _ms(None), step)
                 for (key, step), values in sorted(curve.items(), key=lambda item: item[0][1])]
        for i in range(0, len(batch), 500):
            self.client.log_batch(run_id, metrics=batch[i:i + 500])
        return {key for key, _ in curve}

    def log_figures(self, images: dict[str, Path]) -> None:
        """The report's plots and sample grids as images of the parent run (the UI shows them as
        pictures; inside report.md's preview they are only links)."""
        from PIL import Image

        for name, path in images.items():
            if path and Path(path).exists():
                with Image.open(path) as image:
                    self.client.log_image(self.parent_id, image.convert("RGB"), artifact_file=f"figures/{name}.png")

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

    def log_study_config(self, config: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "study.json"
            path.write_text(json.dumps(config))
            self.client.log_artifact(self.parent_id, str(path))

    def child_runs(self) -> list:
        return self.client.search_runs([self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_id}'",
                                       max_results=10000)

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        batch = [mlflow.entities.Param(str(k), str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(batch), 100):
            self.client.log_batch(run_id, params=batch[i:i + 100])

    def _log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        now = _ms(None)
        batch = [mlflow.entities.Metric(k, v, now, 0) for k, v in metrics.items()]
        for i in range(0, len(batch), 500):
            self.client.log_batch(run_id, metrics=batch[i:i + 500])


def log_standalone_run(uri: str, experiment: str, name: str, params: dict[str, Any], metrics: dict[str, float],
                       artifacts: list[Path] = (), tags: dict[str, str] | None = None) -> str:
    """One finished run outside any study (e.g. ``python -m orchestrator doctor``); returns its id."""
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=name, tags=dict(tags or {}))
    run_id = run.info.run_id
    import time

    batch = [mlflow.entities.Param(str(k), str(v)[:6000]) for k, v in params.items()]
    now = int(time.time() * 1000)
    finite = [mlflow.entities.Metric(k, float(v), now, 0) for k, v in metrics.items() if math.isfinite(float(v))]
    client.log_batch(run_id, params=batch, metrics=finite)
    for path in artifacts:
        if path and Path(path).exists():
            client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, status="FINISHED")
    return run_id

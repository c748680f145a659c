"""The results table: one row per measured setting (and per fp32 reference seed), stored as
Parquet. It is the study's source of truth: MLflow, the report and the recommendation are all
rebuilt from it, and it is rewritten atomically after every row so a crash loses nothing.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

LIST_COLUMNS = ("speedup_ratios", "curve")  # stored as JSON text: Parquet wants one type a column


def _cell(value: Any) -> Any:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    if isinstance(value, float) and math.isinf(value):
        return value
    return value


class ResultsTable:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.rows: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            frame = pd.read_parquet(self.path)
            for record in frame.to_dict(orient="records"):
                clean = {k: v for k, v in record.items() if not is_missing(v)}
                self.rows[clean["row_id"]] = clean

    def get(self, row_id: str) -> dict[str, Any] | None:
        return self.rows.get(row_id)

    def upsert(self, row_id: str, values: dict[str, Any]) -> dict[str, Any]:
        """Merge ``values`` into the row and rewrite the file atomically."""
        row = {**self.rows.get(row_id, {}), **{k: _cell(v) for k, v in values.items()}, "row_id": row_id}
        self.rows[row_id] = row
        self.save()
        return row

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(list(self.rows.values()))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".parquet.tmp")
        frame = self.frame()
        try:
            frame.to_parquet(tmp, engine="pyarrow", index=False)
        except (pa.ArrowTypeError, pa.ArrowInvalid):
            # a column holding text in one row and numbers in another: store that column as text
            # rather than lose the row (Parquet wants one type per column)
            for column in frame.columns[frame.dtypes.map(lambda d: d.kind == 'O')]:
                kinds = {type(v) for v in frame[column] if not is_missing(v)}
                if len(kinds) > 1:
                    frame[column] = [v if is_missing(v) or isinstance(v, str) else json.dumps(v) for v in frame[column]]
            frame.to_parquet(tmp, engine="pyarrow", index=False)
        tmp.replace(self.path)


def is_missing(value: Any) -> bool:
    """None or NaN: a cell with nothing in it (the one test for it)."""
    try:
        return value is None or (isinstance(value, float) and math.isnan(value))
    except TypeError:
        return False


def load_json_cell(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


# ----------------------------------------------------------------------------- one setting, several seeds

_WORST_FIRST = ("error", "oom", "diverged", "stopped", "ok")
PER_SEED_KEYS = ("status", "reason", "train_seconds", "start_time", "end_time", "rung_quality")


def combine_seed_results(finished: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One row from a setting's per-seed training results.

    The status is the worst seed's (a setting that diverged with one seed diverged); quality is the
    mean over the seeds that finished; times add up; the seeds' own quality, curve points and
    statuses stay in ``seed_results`` (JSON), which paired verdicts read."""
    seeds = sorted(finished, key=int)
    results = [finished[s] for s in seeds]
    worst = min(results, key=lambda r: _WORST_FIRST.index(r.get("status", "error"))
                if r.get("status", "error") in _WORST_FIRST else 0)
    out: dict[str, Any] = {k: v for k, v in results[0].items() if not k.startswith("quality_")}
    out.update(status=worst.get("status", "error"), reason=worst.get("reason", ""),
               seeds=json.dumps([int(s) for s in seeds]))
    for key in ("train_seconds", "step_seconds", "eval_seconds", "run_build_seconds", "skipped_steps"):
        values = [r[key] for r in results if isinstance(r.get(key), (int, float))]
        if values:
            out[key] = float(sum(values))
    throughputs = [r["throughput"] for r in results if isinstance(r.get("throughput"), float) and math.isfinite(r["throughput"])]
    out["throughput"] = sum(throughputs) / len(throughputs) if throughputs else math.nan
    out["start_time"] = min((r["start_time"] for r in results if "start_time" in r), default=None)
    out["end_time"] = max((r["end_time"] for r in results if "end_time" in r), default=None)
    out["resumed_from_step"] = max(int(r.get("resumed_from_step", 0)) for r in results)
    if worst.get("status") == "stopped":  # the quality it stopped with decides
        out.update({k: v for k, v in worst.items() if k.startswith("quality_") or k in ("drift", "drift_in_bands",
                                                                                          "stopped_at_samples")})
    else:
        metrics = sorted({k for r in results for k in r if k.startswith("quality_")})
        for key in metrics:
            values = [r[key] for r in results if r.get("status") == "ok" and isinstance(r.get(key), (int, float))]
            out[key] = sum(values) / len(values) if values else math.nan
    out["seed_results"] = json.dumps({s: {**{k: r.get(k) for k in PER_SEED_KEYS if k in r},
                                          **{k: v for k, v in r.items() if k.startswith("quality_")}}
                                      for s, r in zip(seeds, results)}, default=str)
    return out

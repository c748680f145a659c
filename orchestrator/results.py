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
                clean = {k: v for k, v in record.items() if not _is_missing(v)}
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
        self.frame().to_parquet(tmp, engine="pyarrow", index=False)
        tmp.replace(self.path)


def _is_missing(value: Any) -> bool:
    try:
        return value is None or (isinstance(value, float) and math.isnan(value))
    except TypeError:
        return False


def load_json_cell(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value

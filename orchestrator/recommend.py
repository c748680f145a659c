"""From the results table to a recommendation: the fastest setting whose quality drift stays
inside the fp32 noise band and that did not diverge, with the evidence behind it.

Pure pandas/numpy (no Ray, no MLflow), so the same answer can be rebuilt from ``results.parquet``
anywhere.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from orchestrator.measure import SpeedEstimate, ratio_of
from orchestrator.quality import metric_direction
from orchestrator.settings import Setting


def metric_column(columns: list[str] | pd.Index, metric: str) -> str:
    """Column holding ``metric`` ('fd' matches whichever ``quality_fd_<network>`` was measured)."""
    if metric == "fd":
        matches = sorted(c for c in columns if str(c).startswith("quality_fd_"))
        if not matches:
            raise ValueError("no Fréchet distance column in the results")
        return matches[0]
    return f"quality_{metric}"


@dataclass
class Band:
    """The fp32 noise band of one quality metric: the reference seeds' spread around their mean."""

    metric: str
    mean: float
    halfwidth: float  # largest distance of a reference seed from the mean
    values: list[float]
    direction: int  # +1 higher is better
    multiplier: float = 1.0

    @property
    def tolerance(self) -> float:
        return self.multiplier * self.halfwidth

    @classmethod
    def from_values(cls, metric: str, values: list[float], multiplier: float = 1.0) -> "Band":
        vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        if len(vals) < 2:
            raise ValueError(f"the noise band of {metric!r} needs at least 2 finite reference results, got {len(vals)}")
        mean = float(np.mean(vals))
        return cls(metric, mean, float(max(abs(v - mean) for v in vals)), vals,
                   metric_direction(metric.removeprefix("quality_")), multiplier)


def score_outcome(outcome: dict[str, Any], band: Band) -> dict[str, float]:
    """Drift of one trained setting against the band. ``drift_in_bands`` counts only harm (a drift
    in the better direction is 0) in units of the band's tolerance; it is what Optuna minimises. A
    trial stopped early keeps the scores it was stopped with (its quality is from part-way through
    training, so comparing it with the final band would mean nothing)."""
    if outcome.get("status") == "stopped" and not _missing(outcome.get("drift_in_bands")):
        return {"drift": float(outcome["drift"]), "drift_in_bands": float(outcome["drift_in_bands"]),
                "inside_band": 0.0}
    value = outcome.get(band.metric)
    if outcome.get("status", "ok") != "ok" or value is None or not math.isfinite(float(value)):
        return {"drift": math.nan, "drift_in_bands": math.inf, "inside_band": 0.0}
    drift = float(value) - band.mean
    harm = max(0.0, -band.direction * drift)
    scale = band.tolerance if band.tolerance > 0 else 1e-12
    return {"drift": drift, "drift_in_bands": harm / scale, "inside_band": float(harm <= band.tolerance)}


def reference_band(frame: pd.DataFrame, metric: str, multiplier: float = 1.0) -> Band:
    refs = frame[frame["kind"] == "reference"]
    column = metric_column(frame.columns, metric)
    return Band.from_values(column, refs[column].tolist() if column in refs else [], multiplier)


def rung_bands(frame: pd.DataFrame, final: Band) -> dict[int, Band]:
    """{samples: band} of the references' quality measured part-way through training (their
    ``rung_quality`` column). Each band is at least as wide as ``final``: two or three seeds can
    agree closely by chance early on, and a trial must not stop on a band that narrow."""
    refs = frame[frame["kind"] == "reference"]
    if "rung_quality" not in refs:
        return {}
    values: dict[int, list[float]] = {}
    for text in refs["rung_quality"].dropna():
        for samples, metrics in json.loads(text).items():
            if final.metric in metrics:
                values.setdefault(int(samples), []).append(metrics[final.metric])
    out = {}
    for samples, vals in sorted(values.items()):
        try:
            band = Band.from_values(final.metric, vals, final.multiplier)
        except ValueError:  # fewer than 2 finite values at this rung
            continue
        band.halfwidth = max(band.halfwidth, final.halfwidth)
        out[samples] = band
    return out


def stops_early(metrics: dict[str, float], band: Band, bands: float) -> dict[str, float] | None:
    """The rung's scores when a trial's quality there is more than ``bands`` tolerances on the
    harmful side of ``band`` (or not finite: a trial diverging in quality stops too); else None."""
    scores = score_outcome({"status": "ok", **metrics}, band)
    return scores if scores["drift_in_bands"] > bands else None


DEFAULT_COLUMNS = ("speedup_vs_default", "speedup_vs_default_low", "speedup_vs_default_high",
                   "speedup_vs_default_coverage")


def _estimate(row: pd.Series | dict) -> SpeedEstimate:
    return SpeedEstimate(_num(row, "speedup"), _num(row, "speedup_low"), _num(row, "speedup_high"),
                         _num(row, "speedup_spread"), coverage=_num(row, "speedup_coverage"))


def with_default_speedups(frame: pd.DataFrame, torch_default: Setting) -> pd.DataFrame:
    """Add each candidate's speedup over PyTorch's default fp32 (``speedup_vs_default*``).

    Where the study timed PyTorch's default as a row of its own (a TF32 GPU), a setting's speedup
    over it is its speedup over strict fp32 divided by the default's (``measure.ratio_of``); where
    it did not (CPUs, pre-Ampere GPUs: the default *is* strict fp32), the two are the same."""
    frame = frame.copy()
    key = torch_default.key()
    default = None
    if "setting_key" in frame:
        rows = frame[(frame["setting_key"] == key) & (frame["kind"] == "candidate")]
        if len(rows) and math.isfinite(_num(rows.iloc[0], "speedup")):
            default = _estimate(rows.iloc[0])
    values = []
    for _, row in frame.iterrows():
        mine = _estimate(row)
        if default is not None and row.get("kind") == "candidate" and math.isfinite(mine.speedup):
            vs = ratio_of(mine, default) if row.get("setting_key") != key else SpeedEstimate(1.0, 1.0, 1.0, 0.0, coverage=1.0)
        else:
            vs = mine
        values.append([vs.speedup, vs.low, vs.high, vs.coverage])
    for i, column in enumerate(DEFAULT_COLUMNS):
        frame[column] = [v[i] for v in values] if values else []
    frame.attrs["torch_default_timed"] = default is not None
    return frame


def _setting(row: pd.Series) -> Setting:
    text = row.get("setting_json")
    if isinstance(text, str) and text:
        return Setting.model_validate_json(text)
    flat = {k: row[k] for k in row.index if k in Setting.model_fields or k.startswith("eps.")
            or k in ("checkpointing", "fused_optimizer", "fusion", "affinity", "channels_last", "tf32")}
    flat = {k: (v.item() if hasattr(v, "item") else v) for k, v in flat.items() if not _missing(v)}
    return Setting.from_flat(flat)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _num(row: pd.Series, key: str) -> float:
    value = row.get(key)
    return float(value) if value is not None and not _missing(value) else math.nan


def pareto_front(candidates: pd.DataFrame) -> pd.DataFrame:
    """Rows no other row beats on both speedup (higher) and drift_in_bands (lower)."""
    keep = []
    for i, row in candidates.iterrows():
        dominated = ((candidates["speedup"] >= row["speedup"]) & (candidates["drift_in_bands"] <= row["drift_in_bands"])
                     & ((candidates["speedup"] > row["speedup"]) | (candidates["drift_in_bands"] < row["drift_in_bands"])))
        if not dominated.any():
            keep.append(i)
    return candidates.loc[keep].sort_values("speedup", ascending=False)


def recommend(frame: pd.DataFrame, *, model: str, preset: str, metric: str, band_multiplier: float = 1.0,
              reference: Setting, torch_default: Setting | None = None) -> dict[str, Any]:
    """The recommendation as a plain dict (what ``recommendations/<model>.yaml`` holds). A setting
    is called faster only when its speedup interval over PyTorch's default fp32 (what the user runs
    today; strict fp32 where the two are the same) lies above 1."""
    band = reference_band(frame, metric, band_multiplier)
    torch_default = torch_default or reference.model_copy(update={"flags": reference.flags.model_copy(update={"tf32": "default"})})
    frame = with_default_speedups(frame, torch_default)
    default_timed = frame.attrs["torch_default_timed"]
    cands = frame[frame["kind"] == "candidate"].copy()
    trained = cands[cands.get("trained", pd.Series(0, index=cands.index)).fillna(0).astype(float) > 0].copy()
    if len(trained):
        scores = trained.apply(lambda r: pd.Series(score_outcome(r.to_dict(), band)), axis=1)
        trained[["drift", "drift_in_bands", "inside_band"]] = scores[["drift", "drift_in_bands", "inside_band"]]
    eligible = trained[(trained.get("status") == "ok") & (trained.get("inside_band", 0) > 0)] if len(trained) else trained
    eligible = eligible[eligible["speedup"].notna()] if len(eligible) else eligible

    ref_memory = _reference_memory(frame)
    faster = eligible[eligible["speedup_vs_default_low"] > 1.0] if len(eligible) else eligible
    best = _fastest(faster)
    yardstick = "PyTorch's default fp32" if default_timed else "fp32"
    if best is not None:
        choice = {**_describe(best, reference, ref_memory), "verdict": "faster with no measurable quality effect"}
    else:
        fastest = _fastest(eligible)
        why = (f"no setting both stayed inside the noise band and was measurably faster than {yardstick} "
               f"(speedup interval above 1)" if len(trained) else "no candidate setting reached quality training")
        if fastest is not None:
            why += f"; the fastest inside the band was {fastest.get('label')} at " \
                   f"{_num(fastest, 'speedup_vs_default'):.2f}x [{_num(fastest, 'speedup_vs_default_low'):.2f}, " \
                   f"{_num(fastest, 'speedup_vs_default_high'):.2f}] over {yardstick}"
        keep = torch_default if default_timed else reference
        default_row = frame[(frame.get("setting_key") == keep.key())] if default_timed else frame.iloc[:0]
        speed = _estimate(default_row.iloc[0]) if len(default_row) else SpeedEstimate(1.0, 1.0, 1.0, 0.0)
        choice = {"setting": keep.model_dump(mode="json"), "label": keep.label(), "speedup": speed.speedup,
                  "speedup_interval": [speed.low, speed.high], "speedup_vs_default": 1.0,
                  "speedup_vs_default_interval": [1.0, 1.0], "peak_memory_mib": ref_memory, "memory_saving": 0.0,
                  "drift": 0.0, "differs_from_default": {},
                  "verdict": f"keep {'your current training (PyTorch default fp32)' if default_timed else 'fp32'}: {why}"}
    # the seed reports give both: the gain at the reference batch, and with the batch a setting allows
    by_batch = {}
    for name, subset in (("same_batch", eligible[eligible["batch_size"] == reference.batch_size] if len(eligible) else eligible),
                         ("larger_batch", eligible[eligible["batch_size"] > reference.batch_size] if len(eligible) else eligible)):
        row = _fastest(subset)
        by_batch[name] = _describe(row, reference, ref_memory) if row is not None else None

    front = pareto_front(trained[trained["status"] == "ok"]) if len(trained) else trained
    statuses = cands["status"].value_counts().to_dict() if len(cands) else {}
    return {
        "model": model,
        "preset": preset,
        "recommended": choice,
        "noise_band": {k: v for k, v in asdict(band).items()},
        "alternatives": [
            {"label": r.get("label"), "setting": _setting(r).model_dump(mode="json"), "speedup": _num(r, "speedup"),
             "speedup_interval": [_num(r, "speedup_low"), _num(r, "speedup_high")], "drift": _num(r, "drift"),
             "inside_band": bool(r.get("inside_band", 0))}
            for _, r in front.iterrows()
        ] if len(front) else [],
        "best_same_batch": by_batch["same_batch"],
        "best_larger_batch": by_batch["larger_batch"],
        "settings_by_status": {str(k): int(v) for k, v in statuses.items()},
    }


def _fastest(rows: pd.DataFrame) -> pd.Series | None:
    return rows.sort_values("speedup", ascending=False).iloc[0] if len(rows) else None


def _describe(row: pd.Series, reference: Setting, ref_memory: float) -> dict[str, Any]:
    setting = _setting(row)
    memory = _num(row, "peak_memory_mib")
    return {
        "setting": setting.model_dump(mode="json"),
        "label": setting.label(),
        "speedup": _num(row, "speedup"),
        "speedup_interval": [_num(row, "speedup_low"), _num(row, "speedup_high")],
        "speedup_coverage": _num(row, "speedup_coverage"),
        "speedup_vs_default": _num(row, "speedup_vs_default"),
        "speedup_vs_default_interval": [_num(row, "speedup_vs_default_low"), _num(row, "speedup_vs_default_high")],
        "peak_memory_mib": memory,
        "memory_saving": 1 - memory / ref_memory if ref_memory and math.isfinite(ref_memory) else math.nan,
        "drift": _num(row, "drift"),
        "differs_from_default": _differences(setting, reference),
    }


def _reference_memory(frame: pd.DataFrame) -> float:
    refs = frame[frame["kind"] == "reference"]
    if "peak_memory_mib" in refs and refs["peak_memory_mib"].notna().any():
        return float(refs["peak_memory_mib"].dropna().iloc[0])
    return math.nan


def _differences(setting: Setting, reference: Setting) -> dict[str, Any]:
    ours, theirs = setting.flat(), reference.flat()
    return {k: v for k, v in ours.items() if theirs.get(k) != v}


# ----------------------------------------------------------------------------- outputs


def _clean(obj: Any) -> Any:
    """YAML-safe: numpy scalars to Python, NaN to None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item"):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_recommendation(rec: dict[str, Any], directory: Path) -> Path:
    path = directory / "recommendations" / f"{rec['model']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(_clean(rec), sort_keys=False))
    return path


def load_recommended_setting(path: str | Path) -> Setting:
    """The recommended ``Setting`` from a recommendation file, ready for ``Trainer``."""
    data = yaml.safe_load(Path(path).read_text())
    return Setting.model_validate(data["recommended"]["setting"])

"""From the results table to a recommendation: the fastest setting whose quality is equivalent to
fp32's (``orchestrator.verdict``: paired drift, margin, verdict) and that is measurably faster than
what the user runs today (PyTorch's default fp32), with the evidence behind it: each trained
setting's verdict and interval, the smallest drift the study could have detected, ties, and
time-to-quality.

Pure pandas/numpy (no Ray, no MLflow), so the same answer can be rebuilt from ``results.parquet``
anywhere. The fp32 noise band (``Band``) remains the yardstick of early stopping at rungs.
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

from orchestrator.config import QualityConfig
from orchestrator.measure import SpeedEstimate, ratio_of
from orchestrator.quality import metric_direction
from orchestrator.results import is_missing as _missing
from orchestrator.settings import Setting, SpeedFlags
from orchestrator.usage import framework_settings
from orchestrator.verdict import (Margin, choose_margin, detectable_drift, judge, paired_differences, paired_drift,
                                  pooled_sd, reference_spread)


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
    """The row's setting, losslessly from ``setting_json`` (tables before it: from the flat columns)."""
    text = row.get("setting_json")
    if isinstance(text, str) and text:
        return Setting.model_validate_json(text)
    flat = {k: row[k] for k in row.index if k in Setting.model_fields or k.startswith("eps.")
            or k in SpeedFlags.model_fields}
    flat = {k: (v.item() if hasattr(v, "item") else v) for k, v in flat.items() if not _missing(v)}
    return Setting.from_flat(flat)


def _num(row: pd.Series, key: str) -> float:
    value = row.get(key)
    return float(value) if value is not None and not _missing(value) else math.nan


def pareto_front(candidates: pd.DataFrame, loss: str = "drift_in_margins") -> pd.DataFrame:
    """Rows no other row beats on both speedup (higher) and quality loss ``loss`` (lower)."""
    keep = []
    for i, row in candidates.iterrows():
        dominated = ((candidates["speedup"] >= row["speedup"]) & (candidates[loss] <= row[loss])
                     & ((candidates["speedup"] > row["speedup"]) | (candidates[loss] < row[loss])))
        if not dominated.any():
            keep.append(i)
    return candidates.loc[keep].sort_values("speedup", ascending=False)


# ----------------------------------------------------------------------------- quality verdicts


@dataclass
class QualityBasis:
    """The fp32 references' quality: per seed, its spread, the margin and the early-stop band."""

    column: str  # e.g. quality_ssim
    direction: int
    references: dict[int, float]
    mean: float
    sd: float
    margin: Margin
    band: Band

    @property
    def relative_spread(self) -> float:
        return self.sd / abs(self.mean) if self.mean else math.inf


def quality_basis(frame: pd.DataFrame, quality: QualityConfig) -> QualityBasis:
    refs = frame[frame["kind"] == "reference"]
    column = metric_column(frame.columns, quality.metric)
    values = {int(r["seed"]): float(r[column]) for _, r in refs.iterrows()
              if column in r and not _missing(r[column]) and math.isfinite(float(r[column]))}
    mean, sd, _ = reference_spread(list(values.values()))
    margin = choose_margin(list(values.values()), margin=quality.margin, multiplier=quality.band_multiplier,
                           min_relative=quality.min_relative_margin, max_relative=quality.max_relative_band)
    band = Band.from_values(column, list(values.values()), quality.band_multiplier)
    return QualityBasis(column, metric_direction(column.removeprefix("quality_")), values, mean, sd, margin, band)


def seed_values(row: pd.Series | dict, column: str) -> dict[int, float]:
    """A trained setting's final quality by seed (``seed_results``; one seed in older tables)."""
    text = row.get("seed_results")
    if isinstance(text, str) and text:
        out = {}
        for seed, result in json.loads(text).items():
            value = result.get(column)
            if result.get("status", "ok") == "ok" and value is not None and math.isfinite(float(value)):
                out[int(seed)] = float(value)
        return out
    value = _num(row, column)
    return {int(_num(row, "seed")) if math.isfinite(_num(row, "seed")) else 0: value} if math.isfinite(value) else {}


def score_trial(outcome: dict[str, Any], basis: QualityBasis) -> dict[str, float]:
    """What stage 2's search minimises for one trained setting: its mean paired quality loss in
    margins (a gain counts 0). A trial stopped early keeps the band score it stopped with."""
    if outcome.get("status") == "stopped" and not _missing(outcome.get("drift_in_bands")):
        return {"drift": float(outcome["drift"]), "drift_in_margins": max(float(outcome["drift_in_bands"]), 1.0)}
    diffs = paired_differences(seed_values(outcome, basis.column), basis.references)
    if outcome.get("status", "ok") != "ok" or not diffs:
        return {"drift": math.nan, "drift_in_margins": math.inf}
    drift = float(np.mean(list(diffs.values())))
    harm = max(0.0, -basis.direction * drift)
    return {"drift": drift, "drift_in_margins": harm / basis.margin.value if basis.margin.value > 0 else math.inf}


def assess(frame: pd.DataFrame, basis: QualityBasis) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Every trained candidate with its drift interval and verdict; and the design's power."""
    cands = frame[frame["kind"] == "candidate"].copy()
    trained = cands[cands.get("trained", pd.Series(0, index=cands.index)).fillna(0).astype(float) > 0].copy()
    ok = trained[trained["status"] == "ok"] if len(trained) else trained
    pool = pooled_sd([list(paired_differences(seed_values(r, basis.column), basis.references).values())
                      for _, r in ok.iterrows()])
    columns = {k: [] for k in ("drift", "drift_low", "drift_high", "drift_n", "drift_method", "verdict",
                               "verdict_reason", "seeds_needed")}
    for _, row in trained.iterrows():
        if row.get("status") == "ok":
            drift = paired_drift(seed_values(row, basis.column), basis.references, pooled=pool)
            verdict = judge(drift, basis.margin, basis.direction)
        else:
            drift, verdict = None, None
        columns["drift"].append(drift.mean if drift else _num(row, "drift"))
        columns["drift_low"].append(drift.low if drift else math.nan)
        columns["drift_high"].append(drift.high if drift else math.nan)
        columns["drift_n"].append(drift.n if drift else 0)
        columns["drift_method"].append(drift.method if drift else "")
        columns["verdict"].append(verdict.status if verdict else str(row.get("status")))
        columns["verdict_reason"].append(verdict.reason if verdict else str(row.get("reason") or ""))
        columns["seeds_needed"].append(verdict.seeds_needed if verdict else None)
    for key, values in columns.items():
        trained[key] = values
    n = max((int(v) for v in trained["drift_n"]), default=0) if len(trained) else 0
    if pool[1] > 0:
        detectable = detectable_drift(pool[0], max(n, 1), pool[1], "paired")
        design = (f"paired: {max(n, 1)} seeds per setting, the paired differences' spread pooled over "
                  f"{len(ok)} settings ({pool[1]} degrees of freedom)")
    else:
        detectable = detectable_drift(basis.sd, max(n, 1), len(basis.references) - 1, "unpaired",
                                      n_ref=len(basis.references))
        design = (f"unpaired: {max(n, 1)} seed(s) per setting against the mean of {len(basis.references)} "
                  f"fp32 seeds (nothing to pool: set budget.candidate_seeds >= 2 for paired seeds)")
    power = {"detectable_drift": detectable, "design": design, "margin": basis.margin.value,
             "margin_source": basis.margin.source, "pooled_sd": pool[0], "pooled_df": pool[1],
             "can_detect_margin": bool(detectable <= basis.margin.value)}
    return trained, power


def time_to_quality(points: list[tuple[float, float]], target: float, direction: int) -> float | None:
    """Training seconds at which a quality curve [(seconds, quality), ...] first reaches ``target``
    (MLPerf's time-to-quality), interpolating linearly between measured points; NaN if it never
    does, None when there is no curve."""
    if not points:
        return None
    previous = None
    for seconds, value in sorted(points):
        if not (math.isfinite(seconds) and math.isfinite(value)):
            continue
        if direction * (value - target) >= 0:
            if previous is None:
                return seconds
            (s0, v0) = previous
            fraction = (target - v0) / (value - v0) if value != v0 else 1.0
            return s0 + fraction * (seconds - s0)
        previous = (seconds, value)
    return math.nan


def quality_curve(row: pd.Series | dict, column: str) -> list[tuple[float, float, float]]:
    """(samples, training seconds, quality) over the run, averaged over the setting's seeds:
    the curve points measured part-way and the final evaluation."""
    per_seed: list[dict] = []
    text = row.get("seed_results")
    if isinstance(text, str) and text:
        per_seed = [r for r in json.loads(text).values() if r.get("status", "ok") == "ok"]
    elif row.get("status", "ok") == "ok":
        per_seed = [{"rung_quality": row.get("rung_quality"), "train_seconds": _num(row, "train_seconds"),
                     column: _num(row, column)}]
    points: dict[int, list[tuple[float, float]]] = {}
    final_samples = _num(row, "samples")
    for result in per_seed:
        rungs = result.get("rung_quality")
        rungs = json.loads(rungs) if isinstance(rungs, str) and rungs else (rungs or {})
        for samples, metrics in rungs.items():
            if column in metrics:
                points.setdefault(int(samples), []).append((float(metrics.get("train_seconds", math.nan)),
                                                            float(metrics[column])))
        value, seconds = result.get(column), result.get("train_seconds")
        if value is not None and seconds is not None and math.isfinite(final_samples):
            points.setdefault(int(final_samples), []).append((float(seconds), float(value)))
    return [(float(samples), float(np.mean([p[0] for p in vals])), float(np.mean([p[1] for p in vals])))
            for samples, vals in sorted(points.items())]


def reference_curve(frame: pd.DataFrame, column: str) -> list[tuple[float, float, float]]:
    """The fp32 references' mean quality curve (each reference row is one seed)."""
    refs = frame[frame["kind"] == "reference"]
    rows = [quality_curve(r, column) for _, r in refs.iterrows()]
    merged: dict[float, list[tuple[float, float]]] = {}
    for curve in rows:
        for samples, seconds, value in curve:
            merged.setdefault(samples, []).append((seconds, value))
    return [(s, float(np.mean([p[0] for p in v])), float(np.mean([p[1] for p in v]))) for s, v in sorted(merged.items())]


# ----------------------------------------------------------------------------- the recommendation


def _pick(eligible: pd.DataFrame, reference: Setting) -> tuple[pd.Series | None, list[str], str]:
    """The fastest equivalent setting, or, when several tie on speed (their intervals over PyTorch's
    default overlap the fastest's), the simplest of them: fewest differences from fp32, then the
    highest median, then the setting key. (row, tied labels, rule)."""
    if not len(eligible):
        return None, [], ""
    ordered = eligible.sort_values(["speedup_vs_default", "setting_key"], ascending=[False, True])
    fastest = ordered.iloc[0]
    tied = ordered[ordered["speedup_vs_default_high"] >= fastest["speedup_vs_default_low"]]
    if len(tied) == 1:
        return fastest, [], ""
    ranked = sorted(tied.iterrows(), key=lambda item: (len(_differences(_setting(item[1]), reference)),
                                                       -float(item[1]["speedup_vs_default"]),
                                                       str(item[1]["setting_key"])))
    rule = "tied on speed (overlapping intervals): the one with the fewest changes from fp32, then the higher median"
    return ranked[0][1], [str(r["label"]) for _, r in ranked[1:]], rule


def recommend(frame: pd.DataFrame, *, model: str, preset: str, quality: QualityConfig, reference: Setting,
              torch_default: Setting | None = None) -> dict[str, Any]:
    """The recommendation as a plain dict (what ``recommendations/<model>.yaml`` holds).

    Recommendable: trained, status ok, verdict ``equivalent`` and a speedup interval over PyTorch's
    default fp32 (what the user runs today; strict fp32 where the two are the same) above 1."""
    frame = frame.reset_index(drop=True)
    basis = quality_basis(frame, quality)
    torch_default = torch_default or reference.model_copy(update={"flags": reference.flags.model_copy(update={"tf32": "default"})})
    frame = with_default_speedups(frame, torch_default)
    default_timed = frame.attrs["torch_default_timed"]
    trained, power = assess(frame, basis)
    cands = frame[frame["kind"] == "candidate"]
    for column in DEFAULT_COLUMNS:
        if len(trained):
            trained[column] = frame.loc[trained.index, column]
    equivalent = trained[(trained["status"] == "ok") & (trained["verdict"] == "equivalent")] if len(trained) else trained
    eligible = equivalent[equivalent["speedup_vs_default_low"] > 1.0] if len(equivalent) else equivalent
    yardstick = "PyTorch's default fp32" if default_timed else "fp32"

    target = basis.mean
    ref_curve = reference_curve(frame, basis.column)
    ref_ttq = time_to_quality([(sec, q) for _, sec, q in ref_curve], target, basis.direction)
    ttq = {str(r["setting_key"]): time_to_quality([(sec, q) for _, sec, q in quality_curve(r, basis.column)],
                                                  target, basis.direction)
           for _, r in trained.iterrows()} if len(trained) else {}

    ref_memory = _reference_memory(frame)
    best, tied, rule = _pick(eligible, reference)
    quality_text = f"{basis.column.removeprefix('quality_')} loss within the margin {basis.margin.value:.4g}"
    if best is not None:
        choice = {**_describe(best, reference, ref_memory, ttq),
                  "verdict": f"faster than {yardstick} and equivalent to fp32 in quality: {best['verdict_reason']}",
                  "tied_with": tied, "tie_rule": rule}
    else:
        fastest = _fastest(equivalent)
        if not len(trained):
            why = "no candidate setting reached quality training"
        else:
            why = f"no setting was both equivalent to fp32 ({quality_text}) and measurably faster than {yardstick}"
        if fastest is not None:
            why += (f"; the fastest equivalent one, {fastest.get('label')}, runs at "
                    f"{_num(fastest, 'speedup_vs_default'):.2f}x [{_num(fastest, 'speedup_vs_default_low'):.2f}, "
                    f"{_num(fastest, 'speedup_vs_default_high'):.2f}] of {yardstick}")
        undecided = trained[trained["verdict"] == "undecided"] if len(trained) else trained
        if len(undecided):
            why += f"; {len(undecided)} setting(s) undecided at this budget"
        keep = torch_default if default_timed else reference
        default_row = frame[frame.get("setting_key") == keep.key()] if default_timed else frame.iloc[:0]
        speed = _estimate(default_row.iloc[0]) if len(default_row) else SpeedEstimate(1.0, 1.0, 1.0, 0.0, coverage=1.0)
        choice = {"setting": keep.model_dump(mode="json"), "setting_key": keep.key(), "label": keep.label(),
                  "speedup": speed.speedup,
                  "speedup_interval": [speed.low, speed.high], "speedup_coverage": speed.coverage,
                  "speedup_vs_default": 1.0, "speedup_vs_default_interval": [1.0, 1.0],
                  "peak_memory_mib": ref_memory, "memory_saving": 0.0, "drift": 0.0, "drift_interval": [0.0, 0.0],
                  "quality_verdict": "reference", "time_to_quality_seconds": ref_ttq, "differs_from_default": {},
                  "tied_with": [], "tie_rule": "",
                  "verdict": f"keep {'your current training (PyTorch default fp32)' if default_timed else 'fp32'}: {why}"}
    choice["apply"] = framework_settings(Setting.model_validate(choice["setting"]))
    if not power["can_detect_margin"]:
        choice["verdict"] += (f" (caution: this budget detects a quality loss only from {power['detectable_drift']:.4g}, "
                              f"more than the margin {basis.margin.value:.4g})")

    by_batch = {}
    for name, subset in (("same_batch", eligible[eligible["batch_size"] == reference.batch_size] if len(eligible) else eligible),
                         ("larger_batch", eligible[eligible["batch_size"] > reference.batch_size] if len(eligible) else eligible)):
        row = _fastest(subset)
        by_batch[name] = _describe(row, reference, ref_memory, ttq) if row is not None else None

    front = pareto_front(trained[trained["status"] == "ok"].assign(
        drift_in_margins=[max(0.0, -basis.direction * d) / basis.margin.value if math.isfinite(d) else math.inf
                          for d in trained[trained["status"] == "ok"]["drift"]])) if len(trained) else trained
    statuses = cands["status"].value_counts().to_dict() if len(cands) else {}
    return {
        "model": model,
        "preset": preset,
        "recommended": choice,
        "quality": {"metric": basis.column, "direction": basis.direction, "fp32_mean": basis.mean,
                    "fp32_sd": basis.sd, "fp32_seeds": {str(k): v for k, v in basis.references.items()},
                    "relative_spread": basis.relative_spread, "max_relative_band": quality.max_relative_band,
                    "fp32_time_to_quality_seconds": ref_ttq, **power},
        "noise_band": {k: v for k, v in asdict(basis.band).items()},
        "verdicts": [
            {"label": r.get("label"), "setting_key": r.get("setting_key"), "status": r.get("status"),
             "verdict": r.get("verdict"), "reason": r.get("verdict_reason"), "drift": _num(r, "drift"),
             "drift_interval": [_num(r, "drift_low"), _num(r, "drift_high")], "seeds": int(r.get("drift_n") or 0),
             "method": r.get("drift_method"), "seeds_needed": r.get("seeds_needed"),
             "speedup": _num(r, "speedup"), "speedup_vs_default": _num(r, "speedup_vs_default"),
             "time_to_quality_seconds": ttq.get(str(r.get("setting_key")), math.nan)}
            for _, r in trained.sort_values("speedup", ascending=False).iterrows()
        ] if len(trained) else [],
        "alternatives": [
            {"label": r.get("label"), "setting": _setting(r).model_dump(mode="json"), "speedup": _num(r, "speedup"),
             "speedup_interval": [_num(r, "speedup_low"), _num(r, "speedup_high")], "drift": _num(r, "drift"),
             "verdict": r.get("verdict")}
            for _, r in front.iterrows()
        ] if len(front) else [],
        "best_same_batch": by_batch["same_batch"],
        "best_larger_batch": by_batch["larger_batch"],
        "settings_by_status": {str(k): int(v) for k, v in statuses.items()},
    }


def _fastest(rows: pd.DataFrame) -> pd.Series | None:
    key = "speedup_vs_default" if "speedup_vs_default" in rows else "speedup"
    return rows.sort_values(key, ascending=False).iloc[0] if len(rows) else None


def _describe(row: pd.Series, reference: Setting, ref_memory: float,
              ttq: dict[str, float] | None = None) -> dict[str, Any]:
    setting = _setting(row)
    memory = _num(row, "peak_memory_mib")
    return {
        "setting": setting.model_dump(mode="json"),
        "setting_key": setting.key(),
        "label": setting.label(),
        "speedup": _num(row, "speedup"),
        "speedup_interval": [_num(row, "speedup_low"), _num(row, "speedup_high")],
        "speedup_coverage": _num(row, "speedup_coverage"),
        "speedup_vs_default": _num(row, "speedup_vs_default"),
        "speedup_vs_default_interval": [_num(row, "speedup_vs_default_low"), _num(row, "speedup_vs_default_high")],
        "peak_memory_mib": memory,
        "memory_saving": 1 - memory / ref_memory if ref_memory and math.isfinite(ref_memory) else math.nan,
        "drift": _num(row, "drift"),
        "drift_interval": [_num(row, "drift_low"), _num(row, "drift_high")],
        "quality_verdict": row.get("verdict"),
        "time_to_quality_seconds": (ttq or {}).get(str(row.get("setting_key")), math.nan),
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

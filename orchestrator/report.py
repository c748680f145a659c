"""The study's report for people: report.md plus plots (Pareto front with interval bars and the
noise band shaded, speedup and memory per setting, loss curves of the reference and the
recommendation), and a cross-model "configuration vs speedup" table. Built from the results table
alone, so it can be rebuilt anywhere (``python -m orchestrator report``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from orchestrator.recommend import Band, score_outcome  # noqa: E402
from orchestrator.tracking import browse_hint  # noqa: E402

PLOTS = {"pareto": "pareto.png", "speed_memory": "speed_memory.png", "curves": "loss_curves.png"}


def _fmt(value: Any, spec: str = ".2f") -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "-" if value is None else str(value)
    return "-" if not math.isfinite(value) else format(value, spec)


def _scored(frame: pd.DataFrame, band: Band) -> pd.DataFrame:
    """Candidate rows with drift/inside_band columns (NaN where not trained)."""
    cands = frame[frame["kind"] == "candidate"].copy()
    scores = [score_outcome(r.to_dict(), band) if float(r.get("trained") or 0) > 0 else
              {"drift": math.nan, "drift_in_bands": math.nan, "inside_band": math.nan} for _, r in cands.iterrows()]
    for key in ("drift", "drift_in_bands", "inside_band"):
        cands[key] = [s[key] for s in scores]
    return cands.sort_values("speedup", ascending=False, na_position="last") if "speedup" in cands else cands


def results_table_text(frame: pd.DataFrame, band: Band | None) -> str:
    """The terminal/markdown table of every setting tried."""
    lines = ["| setting | status | speedup [95% CI] | peak MiB | drift | inside band |", "|---|---|---|---|---|---|"]
    for _, r in frame[frame["kind"] == "reference"].iterrows():
        drift = r.get(band.metric) - band.mean if band is not None and band.metric in r else None
        lines.append(f"| fp32 reference seed {int(r['seed'])} | {r.get('status')} | 1.00 (reference) | "
                     f"{_fmt(r.get('peak_memory_mib'), '.0f')} | {_fmt(drift, '+.4f')} | - |")
    cands = _scored(frame, band) if band is not None else frame[frame["kind"] == "candidate"]
    for _, r in cands.iterrows():
        trained = not math.isnan(float(r.get("inside_band", math.nan)))
        interval = f"{_fmt(r.get('speedup'))} [{_fmt(r.get('speedup_low'))}, {_fmt(r.get('speedup_high'))}]"
        lines.append(f"| {r.get('label')} | {r.get('status')} | {interval} | {_fmt(r.get('peak_memory_mib'), '.0f')} | "
                     f"{_fmt(r['drift'], '+.4f') if trained else 'not trained'} | "
                     f"{('yes' if r['inside_band'] else 'no') if trained else '-'} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots


def plot_pareto(frame: pd.DataFrame, band: Band, rec: dict, path: Path) -> Path:
    cands = _scored(frame, band)
    trained = cands[cands["drift"].notna()]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.axhspan(-band.tolerance, band.tolerance, color="tab:green", alpha=0.15, label="fp32 noise band")
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    for _, r in trained.iterrows():
        x, lo, hi = float(r["speedup"]), float(r["speedup_low"]), float(r["speedup_high"])
        colour = "tab:blue" if r["inside_band"] else "tab:red"
        ax.errorbar(x, float(r["drift"]), xerr=[[max(0.0, x - lo)], [max(0.0, hi - x)]], fmt="o", color=colour,
                    capsize=3)
        ax.annotate(str(r["label"]), (x, float(r["drift"])), fontsize=7, xytext=(4, 4), textcoords="offset points")
    best = rec["recommended"]
    if best.get("drift") is not None and best["label"] in set(trained["label"]):
        ax.scatter([best["speedup"]], [best["drift"]], s=180, facecolors="none", edgecolors="black",
                   label=f"recommended: {best['label']}")
    ax.set_xlabel("speedup vs fp32 (median of paired ratios, 95% CI)")
    ax.set_ylabel(f"drift of {band.metric.removeprefix('quality_')} vs fp32 mean")
    ax.set_title(f"{rec['model']} ({rec['preset']}): speedup vs quality drift")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_speed_memory(frame: pd.DataFrame, band: Band, path: Path) -> Path:
    cands = _scored(frame, band)
    cands = cands[cands["speedup"].notna()] if "speedup" in cands else cands
    labels = [str(l) for l in cands["label"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, max(3.0, 0.28 * len(labels) + 1)), sharey=True)
    ys = range(len(labels))
    speed = cands["speedup"].astype(float)
    err = [(speed - cands["speedup_low"].astype(float)).clip(lower=0).fillna(0),
           (cands["speedup_high"].astype(float) - speed).clip(lower=0).fillna(0)]
    colours = ["tab:blue" if s == "ok" else "tab:grey" for s in cands["status"]]
    left.barh(ys, speed, xerr=err, color=colours, capsize=2)
    left.axvline(1.0, color="black", lw=0.8)
    left.set_yticks(list(ys), labels, fontsize=7)
    left.invert_yaxis()
    left.set_xlabel("speedup vs fp32")
    memory = cands["peak_memory_mib"].astype(float) if "peak_memory_mib" in cands else pd.Series([math.nan] * len(ys))
    right.barh(ys, memory, color="tab:purple")
    refs = frame[frame["kind"] == "reference"]
    if "peak_memory_mib" in refs and refs["peak_memory_mib"].notna().any():
        right.axvline(float(refs["peak_memory_mib"].dropna().iloc[0]), color="black", lw=0.8, label="fp32")
        right.legend(fontsize=8)
    right.set_xlabel("peak training memory (MiB)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _curve(row: pd.Series) -> list[list[float]]:
    raw = row.get("curve")
    return json.loads(raw) if isinstance(raw, str) and raw else []


def plot_curves(frame: pd.DataFrame, rec: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    for _, r in frame[frame["kind"] == "reference"].iterrows():
        curve = _curve(r)
        if curve:
            ax.plot([c[0] * int(r["batch_size"]) for c in curve], [c[1] for c in curve], color="grey", alpha=0.7,
                    label="fp32 references" if int(r["seed"]) == int(frame[frame["kind"] == "reference"]["seed"].min()) else None)
    chosen = frame[(frame["kind"] == "candidate") & (frame.get("label") == rec["recommended"]["label"])]
    for _, r in chosen.iterrows():
        curve = _curve(r)
        if curve:
            ax.plot([c[0] * int(r["batch_size"]) for c in curve], [c[1] for c in curve], color="tab:blue", lw=2,
                    label=f"recommended: {r['label']}")
    ax.set_xlabel("training samples (per worker)")
    ax.set_ylabel("generator loss (mean per chunk)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- report.md


def _choice_lines(title: str, choice: dict | None, band: Band) -> list[str]:
    if not choice:
        return [f"- {title}: none inside the band"]
    return [f"- {title}: **{choice['label']}** — {_fmt(choice['speedup'])}x "
            f"[{_fmt(choice['speedup_interval'][0])}, {_fmt(choice['speedup_interval'][1])}], "
            f"drift {_fmt(choice.get('drift'), '+.4f')} (band ±{_fmt(band.tolerance, '.4f')})"]


def write_report(rec: dict[str, Any], frame: pd.DataFrame, directory: Path, *, tracking_uri: str,
                 machine: str) -> Path:
    """report.md and its plots in ``directory``; returns the report's path."""
    directory.mkdir(parents=True, exist_ok=True)
    band = Band(**rec["noise_band"])
    images = directory / "report_images"
    images.mkdir(exist_ok=True)
    plot_pareto(frame, band, rec, images / PLOTS["pareto"])
    plot_speed_memory(frame, band, images / PLOTS["speed_memory"])
    plot_curves(frame, rec, images / PLOTS["curves"])
    r = rec["recommended"]
    lines = [
        f"# AMP study: {rec['model']} ({rec['preset']} preset)", "",
        f"Machine: {machine}", "",
        "## Recommendation", "",
        f"**{r['label']}** — {r['verdict']}.", "",
        f"- speedup {_fmt(r['speedup'])}x, 95% interval [{_fmt(r['speedup_interval'][0])}, "
        f"{_fmt(r['speedup_interval'][1])}] (median of paired, interleaved ratios against fp32 on the same worker)",
        f"- peak memory {_fmt(r['peak_memory_mib'], '.0f')} MiB (saving {_fmt(100 * (r.get('memory_saving') or 0), '.0f')}%)",
        f"- drift of {band.metric} {_fmt(r['drift'], '+.4f')}; fp32 noise band ±{_fmt(band.tolerance, '.4f')} "
        f"around {_fmt(band.mean, '.4f')} over {len(band.values)} seeds",
        f"- differs from the default in: "
        f"{', '.join(f'{k}={v}' for k, v in r['differs_from_default'].items()) or 'nothing'}", "",
        "Best by batch size (as the seed reports give them):", "",
        *_choice_lines("same batch as fp32", rec.get("best_same_batch"), band),
        *_choice_lines("larger batch", rec.get("best_larger_batch"), band), "",
        f"![speedup vs drift]({images.name}/{PLOTS['pareto']})", "",
        "## Every setting tried", "",
        results_table_text(frame, band), "",
        f"![speedup and memory]({images.name}/{PLOTS['speed_memory']})", "",
        "## Pareto front (speedup vs drift)", "",
    ]
    for alt in rec["alternatives"]:
        lines.append(f"- {alt['label']}: {_fmt(alt['speedup'])}x, drift {_fmt(alt['drift'], '+.4f')}, "
                     f"{'inside' if alt['inside_band'] else 'outside'} the band")
    if not rec["alternatives"]:
        lines.append("- (no trained setting)")
    lines += ["", "## Loss curves", "", f"![loss curves]({images.name}/{PLOTS['curves']})", "",
              "## Browse the runs", "", f"    {browse_hint(tracking_uri)}", ""]
    path = directory / "report.md"
    path.write_text("\n".join(lines))
    return path


def cross_model_table(recommendation_files: list[Path]) -> str:
    """The seeds' "configuration vs speedup" table across models: per model and resolution, the
    best setting at the fp32 batch size, the best with a larger batch, and what was recommended."""

    def cell(best: dict | None) -> str:
        if not best:
            return "—"
        low, high = best["speedup_interval"]
        return (f"{best['label']}: {_fmt(best['speedup'])}x [{_fmt(low)}, {_fmt(high)}], "
                f"drift {_fmt(best.get('drift'), '+.4f')}")

    lines = ["| model | preset | resolution | fp32 batch | best, same batch | best, larger batch | recommended |",
             "|---|---|---|---|---|---|---|"]
    for path in recommendation_files:
        rec = yaml.safe_load(Path(path).read_text())
        study = rec.get("study", {})
        lines.append(f"| {rec['model']} | {rec['preset']} | {study.get('resolution', '-')} | "
                     f"{study.get('reference_batch_size', '-')} | {cell(rec.get('best_same_batch'))} | "
                     f"{cell(rec.get('best_larger_batch'))} | {rec['recommended']['label']} |")
    return "\n".join(lines)

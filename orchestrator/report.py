"""The study's report for people: report.md plus plots (speedup against quality drift with the
equivalence margin shaded, speedup and memory per setting, quality over training samples and over
wall-clock time for fp32 and the recommendation, fp32 and recommended samples side by side, loss
curves), and a cross-model "configuration vs speedup" table. Built from the results table and the
recommendation alone, so it can be rebuilt anywhere (``python -m orchestrator report``).
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

from orchestrator.recommend import quality_curve, reference_curve  # noqa: E402
from orchestrator.tracking import browse_hint  # noqa: E402

PLOTS = {"pareto": "pareto.png", "speed_memory": "speed_memory.png", "quality_samples": "quality_samples.png",
         "quality_time": "quality_time.png", "samples": "samples.png", "curves": "loss_curves.png"}


def _fmt(value: Any, spec: str = ".2f") -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "-" if value is None else str(value)
    return "-" if not math.isfinite(value) else format(value, spec)


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _interval(values: list | None, spec: str = ".2f") -> str:
    if not values:
        return "-"
    return f"[{_fmt(values[0], spec)}, {_fmt(values[1], spec)}]"


def _verdicts(rec: dict) -> dict[str, dict]:
    return {str(v["setting_key"]): v for v in rec.get("verdicts", [])}


def _default_timed(frame: pd.DataFrame) -> bool:
    return "baseline" in frame and (frame["baseline"] == "torch_default").any()


def results_table_text(frame: pd.DataFrame, rec: dict) -> str:
    """The terminal/markdown table of every setting tried."""
    quality = rec.get("quality", {})
    column = quality.get("metric", "")
    verdicts = _verdicts(rec)
    vs_default = _default_timed(frame)
    head = ["setting", "status", "speedup vs fp32 [interval, coverage]"]
    head += ["vs PyTorch default"] if vs_default else []
    head += ["peak MiB", f"drift of {column.removeprefix('quality_')} [90% interval]", "verdict", "time to fp32 quality"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in frame[frame["kind"] == "reference"].sort_values("seed").iterrows():
        cells = [f"fp32 reference seed {int(r['seed'])}", str(r.get("status")), "1.00 (reference)"]
        cells += ["-"] if vs_default else []
        cells += [_fmt(r.get("peak_memory_mib"), ".0f"), f"{column.removeprefix('quality_')} {_fmt(r.get(column), '.4f')}",
                  "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    cands = frame[frame["kind"] == "candidate"]
    if "speedup" in cands:
        cands = cands.sort_values("speedup", ascending=False, na_position="last")
    for _, r in cands.iterrows():
        v = verdicts.get(str(r.get("setting_key")))
        coverage = r.get("speedup_coverage")
        speed = f"{_fmt(r.get('speedup'))} [{_fmt(r.get('speedup_low'))}, {_fmt(r.get('speedup_high'))}]"
        if coverage is not None and not pd.isna(coverage):
            speed += f" ({_fmt(100 * float(coverage), '.0f')} %)"
        label = str(r.get("label")) + (" (PyTorch default)" if r.get("baseline") == "torch_default" else "")
        cells = [label, str(r.get("status")), speed]
        if vs_default:
            cells.append(_fmt(v["speedup_vs_default"]) if v else "-")
        cells.append(_fmt(r.get("peak_memory_mib"), ".0f"))
        if v:
            cells += [f"{_fmt(v['drift'], '+.4f')} {_interval(v['drift_interval'], '+.4f')} ({v['seeds']} seed"
                      f"{'s' if v['seeds'] != 1 else ''}, {v['method'] or '-'})", str(v["verdict"]),
                      _seconds(v.get("time_to_quality_seconds"))]
        else:
            cells += ["not trained", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _seconds(value: Any) -> str:
    """Time to quality: "-" when not measured, "not reached" when the curve never got there."""
    if value is None:
        return "-"
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "-"
    return "not reached" if not math.isfinite(value) else f"{value:.1f} s"


# ----------------------------------------------------------------------------- plots


def plot_pareto(frame: pd.DataFrame, rec: dict, path: Path) -> Path:
    quality = rec["quality"]
    margin, direction = quality["margin"], quality["direction"]
    verdicts = rec.get("verdicts", [])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    colours = {"equivalent": "tab:blue", "worse": "tab:red", "undecided": "tab:orange"}
    shown = []
    for v in verdicts:
        if not math.isfinite(v.get("drift", math.nan)) or not math.isfinite(v.get("speedup", math.nan)):
            continue
        lo, hi = v["drift_interval"]
        yerr = [[max(0.0, v["drift"] - lo)], [max(0.0, hi - v["drift"])]] if math.isfinite(lo) else None
        ax.errorbar(v["speedup"], v["drift"], yerr=yerr, fmt="o", color=colours.get(v["verdict"], "grey"), capsize=3)
        ax.annotate(str(v["label"]), (v["speedup"], v["drift"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
        shown += [x for x in (v["drift"], lo, hi) if math.isfinite(x)]
    best = rec["recommended"]
    if any(v["label"] == best["label"] for v in verdicts):
        ax.scatter([best["speedup"]], [best["drift"]], s=180, facecolors="none", edgecolors="black",
                   label=f"recommended: {best['label']}")
    span = 1.15 * max([abs(d) for d in shown] + [2 * margin])
    ax.set_ylim(-span, span)
    # the equivalence region: any gain, and losses up to the margin
    ax.axhspan(-margin if direction > 0 else -span, span if direction > 0 else margin, color="tab:green",
               alpha=0.12, label=f"equivalent: loss within the margin {margin:.3g}")
    ax.set_xlabel("speedup vs strict fp32 (median of paired ratios, order-statistic interval)")
    ax.set_ylabel(f"drift of {quality['metric'].removeprefix('quality_')} vs fp32 (paired, 90% interval)")
    ax.set_title(f"{rec['model']} ({rec['preset']}): speedup vs quality drift")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_speed_memory(frame: pd.DataFrame, path: Path) -> Path:
    cands = frame[frame["kind"] == "candidate"]
    cands = cands[cands["speedup"].notna()].sort_values("speedup", ascending=False) if "speedup" in cands else cands
    labels = [str(label) for label in cands["label"]]
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
    left.set_xlabel("speedup vs strict fp32")
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


def _recommended_row(frame: pd.DataFrame, rec: dict) -> pd.Series | None:
    key = rec["recommended"].get("setting_key")
    rows = frame[(frame["kind"] == "candidate") & (frame.get("setting_key") == key)] if key else frame.iloc[:0]
    trained = rows[rows.get("trained", pd.Series(0, index=rows.index)).fillna(0).astype(float) > 0] if len(rows) else rows
    return trained.iloc[0] if len(trained) else None


def plot_quality(frame: pd.DataFrame, rec: dict, path: Path, *, x: str) -> Path:
    """Quality over training samples (``x="samples"``) or training seconds (``x="seconds"``):
    every fp32 reference seed, their mean, and the recommended setting (mean over its seeds)."""
    column = rec["quality"]["metric"]
    index = 0 if x == "samples" else 1
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (_, r) in enumerate(frame[frame["kind"] == "reference"].iterrows()):
        curve = quality_curve(r, column)
        if curve:
            ax.plot([c[index] for c in curve], [c[2] for c in curve], color="grey", alpha=0.4, lw=1,
                    label="fp32 seeds" if i == 0 else None)
    mean = reference_curve(frame, column)
    if mean:
        ax.plot([c[index] for c in mean], [c[2] for c in mean], color="black", lw=2, label="fp32 (mean)")
        ax.axhline(rec["quality"]["fp32_mean"], color="black", lw=0.8, ls=":", label="fp32 final quality")
    chosen = _recommended_row(frame, rec)
    if chosen is not None:
        curve = quality_curve(chosen, column)
        ax.plot([c[index] for c in curve], [c[2] for c in curve], color="tab:blue", lw=2, marker="o",
                label=f"recommended: {chosen['label']}")
    ax.set_xlabel("training samples" if x == "samples" else "training time (s, evaluation excluded)")
    ax.set_ylabel(column.removeprefix("quality_"))
    ax.set_title(f"{column.removeprefix('quality_')} over {'samples' if x == 'samples' else 'wall-clock time'}: "
                 "fp32 vs recommended")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def samples_side_by_side(frame: pd.DataFrame, rec: dict, path: Path) -> Path | None:
    """fp32's sample grid beside the recommended setting's (each: generated above ground truth)."""
    from PIL import Image, ImageDraw

    refs = frame[(frame["kind"] == "reference") & frame.get("samples_grid", pd.Series(dtype=object)).notna()]
    chosen = _recommended_row(frame, rec)
    grids = []
    for label, row in (("fp32", refs.iloc[0] if len(refs) else None), (rec["recommended"]["label"], chosen)):
        grid = row.get("samples_grid") if row is not None else None
        if isinstance(grid, str) and Path(grid).exists():
            grids.append((label, Image.open(grid).convert("RGB")))
    if not grids:
        return None
    scale = max(1, 256 // max(g.height for _, g in grids))
    grids = [(label, g.resize((g.width * scale, g.height * scale), Image.NEAREST)) for label, g in grids]
    width, height = sum(g.width for _, g in grids) + 10 * (len(grids) - 1), max(g.height for _, g in grids) + 16
    canvas = Image.new("RGB", (width, height), "white")
    draw, x = ImageDraw.Draw(canvas), 0
    for label, grid in grids:
        draw.text((x + 2, 2), label[:60], fill="black")
        canvas.paste(grid, (x, 16))
        x += grid.width + 10
    canvas.save(path)
    return path


def _loss_curve(row: pd.Series) -> list[list[float]]:
    raw = row.get("curve")
    return json.loads(raw) if isinstance(raw, str) and raw else []


def plot_curves(frame: pd.DataFrame, rec: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (_, r) in enumerate(frame[frame["kind"] == "reference"].iterrows()):
        curve = _loss_curve(r)
        if curve:
            ax.plot([c[0] * int(r["batch_size"]) for c in curve], [c[1] for c in curve], color="grey", alpha=0.7,
                    label="fp32 references" if i == 0 else None)
    chosen = _recommended_row(frame, rec)
    if chosen is not None and _loss_curve(chosen):
        curve = _loss_curve(chosen)
        ax.plot([c[0] * int(chosen["batch_size"]) for c in curve], [c[1] for c in curve], color="tab:blue", lw=2,
                label=f"recommended: {chosen['label']}")
    ax.set_xlabel("training samples (per worker)")
    ax.set_ylabel("generator loss (mean per chunk)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(frame: pd.DataFrame, rec: dict, directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    out = {"pareto": plot_pareto(frame, rec, directory / PLOTS["pareto"]),
           "speed_memory": plot_speed_memory(frame, directory / PLOTS["speed_memory"]),
           "quality_samples": plot_quality(frame, rec, directory / PLOTS["quality_samples"], x="samples"),
           "quality_time": plot_quality(frame, rec, directory / PLOTS["quality_time"], x="seconds"),
           "curves": plot_curves(frame, rec, directory / PLOTS["curves"])}
    samples = samples_side_by_side(frame, rec, directory / PLOTS["samples"])
    if samples is not None:
        out["samples"] = samples
    return out


# ----------------------------------------------------------------------------- report.md


def _choice_lines(title: str, choice: dict | None) -> list[str]:
    if not choice:
        return [f"- {title}: none equivalent and faster"]
    return [f"- {title}: **{choice['label']}** — {_fmt(choice['speedup'])}x {_interval(choice['speedup_interval'])}, "
            f"drift {_fmt(choice.get('drift'), '+.4f')} {_interval(choice.get('drift_interval'), '+.4f')}"]


def _power_lines(rec: dict) -> list[str]:
    q = rec["quality"]
    metric = q["metric"].removeprefix("quality_")
    lines = [f"- fp32 {metric}: {_fmt(q['fp32_mean'], '.4f')} ± {_fmt(q['fp32_sd'], '.4f')} (standard deviation over "
             f"{len(q['fp32_seeds'])} seeds: {', '.join(_fmt(v, '.4f') for v in q['fp32_seeds'].values())})",
             f"- equivalence margin: a loss of at most {_fmt(q['margin'], '.4g')} ({q['margin_source']})",
             f"- design: {q['design']}",
             f"- **smallest quality loss this study could detect** (80 % power, 5 % one-sided): "
             f"{_fmt(q['detectable_drift'], '.4g')}"
             + ("" if q["can_detect_margin"] else " — larger than the margin: an `equivalent` verdict was out of reach "
                                                  "for a setting that truly loses as much as the margin")]
    if q["relative_spread"] > q["max_relative_band"]:
        lines.append(f"- warning: the fp32 seeds spread {_fmt(100 * q['relative_spread'], '.0f')} % of their mean, more "
                     f"than quality.max_relative_band ({_fmt(100 * q['max_relative_band'], '.0f')} %): raise "
                     "budget.train_samples, or the seeds, to see smaller losses")
    undecided = [v for v in rec.get("verdicts", []) if v["verdict"] == "undecided"]
    for v in undecided:
        need = f"about {v['seeds_needed']} seeds per setting would decide it" if v.get("seeds_needed") else \
            "more seeds or training samples would decide it"
        lines.append(f"- undecided: {v['label']} — {need}")
    return lines


def write_report(rec: dict[str, Any], frame: pd.DataFrame, directory: Path, *, tracking_uri: str,
                 machine: str) -> Path:
    """report.md and its plots in ``directory``; returns the report's path."""
    directory.mkdir(parents=True, exist_ok=True)
    images = directory / "report_images"
    plots = write_plots(frame, rec, images)
    r = rec["recommended"]
    q = rec["quality"]
    default_line = (f"- over PyTorch's default fp32 (what you run today): {_fmt(r.get('speedup_vs_default'))}x "
                    f"{_interval(r.get('speedup_vs_default_interval'))}" if _default_timed(frame) else
                    "- PyTorch's default fp32 is strict fp32 on this device (no TF32): the two speedups are the same")
    lines = [
        f"# AMP study: {rec['model']} ({rec['preset']} preset)", "",
        f"Machine: {machine}", "",
        "## Recommendation", "",
        f"**{r['label']}** — {r['verdict']}.", "",
        f"- speedup over strict fp32 {_fmt(r['speedup'])}x, interval {_interval(r['speedup_interval'])}"
        + (f" covering the true median ratio with probability {_fmt(100 * r['speedup_coverage'], '.1f')} %"
           if _finite(r.get("speedup_coverage")) else "") + " (paired, interleaved blocks on the same worker)",
        default_line,
        f"- peak memory {_fmt(r['peak_memory_mib'], '.0f')} MiB (saving {_fmt(100 * (r.get('memory_saving') or 0), '.0f')}%)",
        f"- drift of {q['metric'].removeprefix('quality_')} {_fmt(r['drift'], '+.4f')}, 90% interval "
        f"{_interval(r.get('drift_interval'), '+.4f')}; margin ±{_fmt(q['margin'], '.4g')}",
        f"- time to fp32's final quality: {_seconds(r.get('time_to_quality_seconds'))} "
        f"(fp32: {_seconds(q.get('fp32_time_to_quality_seconds'))})",
        f"- differs from the default in: "
        f"{', '.join(f'{k}={v}' for k, v in r['differs_from_default'].items()) or 'nothing'}",
    ]
    if r.get("tied_with"):
        lines.append(f"- tied with {', '.join(r['tied_with'])}: {r['tie_rule']}")
    apply = r.get("apply") or {}
    if apply:
        lightning, accelerate = apply["lightning"], apply["accelerate"]
        lines += ["", "Using it in your training:", "",
                  f"- plain PyTorch: `torch.autocast(**{apply['autocast']})`, one `torch.amp.GradScaler(**"
                  f"{apply['grad_scaler_per_loss']})` per loss, TF32: {apply['backend_flags']}",
                  f"- Lightning: `Trainer(precision={lightning['precision']!r})`" if lightning["precision"] else
                  "- Lightning: no `precision=` value expresses it",
                  *([f"  ({lightning['not_covered']})"] if lightning["not_covered"] else []),
                  f"- Accelerate: `Accelerator(mixed_precision={accelerate['mixed_precision']!r})`"
                  if accelerate["mixed_precision"] else "- Accelerate: no `mixed_precision=` value expresses it",
                  *([f"  ({accelerate['not_covered']})"] if accelerate["not_covered"] else []),
                  *[f"- by hand: {item}" for item in apply["set_by_hand"]]]
    lines += ["", "Best by batch size (as the seed reports give them):", "",
              *_choice_lines("same batch as fp32", rec.get("best_same_batch")),
              *_choice_lines("larger batch", rec.get("best_larger_batch")), "",
              f"![speedup vs drift]({images.name}/{PLOTS['pareto']})", "",
              "## What this budget could see", "", *_power_lines(rec), "",
              "## Quality over time", "",
              f"![quality over samples]({images.name}/{PLOTS['quality_samples']})", "",
              f"![quality over time]({images.name}/{PLOTS['quality_time']})", ""]
    if "samples" in plots:
        lines += ["## Samples: fp32 and the recommendation (generated above ground truth)", "",
                  f"![samples]({images.name}/{PLOTS['samples']})", ""]
    lines += ["## Every setting tried", "", results_table_text(frame, rec), "",
              f"![speedup and memory]({images.name}/{PLOTS['speed_memory']})", "",
              "## Pareto front (speedup vs quality loss)", ""]
    for alt in rec["alternatives"]:
        lines.append(f"- {alt['label']}: {_fmt(alt['speedup'])}x, drift {_fmt(alt['drift'], '+.4f')}, {alt['verdict']}")
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

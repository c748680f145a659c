"""The recommender on tables with planted truth: candidates trained with the references' seeds 0
and 1 (paired), so their drift is the mean paired difference and their verdict comes from it."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml

from orchestrator.config import QualityConfig
from orchestrator.recommend import Band, load_recommended_setting, recommend, score_outcome, write_recommendation
from orchestrator.report import write_report
from orchestrator.results import ResultsTable
from orchestrator.settings import Setting

REFERENCE = Setting(opt_level="O0", batch_size=2)
SSIM = QualityConfig(metric="ssim")
REFS = (0.50, 0.51, 0.49)


def reference_rows(values=REFS):
    return [{"row_id": f"reference:{i}", "kind": "reference", "seed": i, "status": "ok", "trained": 1,
             "quality_ssim": v, "speedup": 1.0, "peak_memory_mib": 100.0, **REFERENCE.flat()}
            for i, v in enumerate(values)]


def candidate(setting: Setting, speedup, low, high, ssim=None, status="ok", memory=80.0, refs=REFS):
    """``ssim``: per-seed paired differences from fp32 (a pair), or one value for both seeds' drift."""
    row = {"row_id": setting.key(), "setting_key": setting.key(), "setting_json": setting.model_dump_json(),
           "kind": "candidate", "label": setting.label(), "status": status, "speedup": speedup,
           "speedup_low": low, "speedup_high": high, "peak_memory_mib": memory, **setting.flat()}
    if ssim is not None:
        diffs = ssim if isinstance(ssim, tuple) else (ssim - 0.5, ssim - 0.5)
        values = {s: refs[s] + d for s, d in enumerate(diffs)}
        row.update({"trained": 1, "quality_ssim": float(np.mean(list(values.values()))), "seeds": "[0, 1]",
                    "seed_results": json.dumps({str(s): {"status": status, "quality_ssim": v} for s, v in values.items()})})
    return row


FAST_DRIFTING = Setting(opt_level="O3", dtype="fp16", batch_size=2)
GOOD = Setting(opt_level="O1", dtype="fp16", batch_size=2)
OK_SLOWER = Setting(opt_level="O1", dtype="bf16", batch_size=2)
DIVERGED = Setting(opt_level="O2", dtype="fp16", batch_size=2)


def planted_table():
    return pd.DataFrame(reference_rows() + [
        candidate(FAST_DRIFTING, 2.5, 2.4, 2.6, ssim=(-0.20, -0.21)),  # fastest, but loses far beyond the margin
        candidate(GOOD, 1.8, 1.7, 1.9, ssim=(0.002, 0.004)),  # equivalent: the answer
        candidate(OK_SLOWER, 1.2, 1.1, 1.3, ssim=(0.0, 0.001)),
        candidate(DIVERGED, 2.0, 1.9, 2.1, ssim=None, status="diverged"),
    ])


def test_picks_fastest_equivalent_setting_and_rejects_a_fast_worse_one():
    rec = recommend(planted_table(), model="m", preset="tiny", quality=SSIM, reference=REFERENCE)
    assert rec["recommended"]["label"] == GOOD.label()
    assert rec["recommended"]["speedup_interval"] == [1.7, 1.9]
    assert rec["recommended"]["memory_saving"] == pytest.approx(0.2)
    assert rec["recommended"]["differs_from_default"] == {"opt_level": "O1", "dtype": "fp16"}
    assert rec["recommended"]["quality_verdict"] == "equivalent"
    assert "no measurable" not in rec["recommended"]["verdict"]
    verdicts = {v["label"]: v for v in rec["verdicts"]}
    assert verdicts[FAST_DRIFTING.label()]["verdict"] == "worse"
    assert verdicts[GOOD.label()]["method"] == "paired" and verdicts[GOOD.label()]["seeds"] == 2
    labels = [a["label"] for a in rec["alternatives"]]
    assert FAST_DRIFTING.label() in labels  # on the Pareto front, but worse
    assert rec["settings_by_status"] == {"ok": 3, "diverged": 1}
    assert rec["quality"]["margin"] == pytest.approx(0.01) and math.isfinite(rec["quality"]["detectable_drift"])


def test_improvement_is_not_drift():
    band = Band.from_values("quality_ssim", [0.50, 0.51, 0.49])
    assert score_outcome({"quality_ssim": 0.9}, band)["inside_band"] == 1.0
    assert score_outcome({"quality_ssim": 0.3}, band)["inside_band"] == 0.0
    lower_better = Band.from_values("quality_l1", [0.10, 0.11, 0.09])
    assert score_outcome({"quality_l1": 0.05}, lower_better)["drift_in_bands"] == 0.0
    assert score_outcome({"quality_l1": 0.2}, lower_better)["drift_in_bands"] > 1


def test_diverged_outcome_scores_finite_for_optuna_callers():
    band = Band.from_values("quality_ssim", [0.5, 0.6])
    score = score_outcome({"status": "diverged", "quality_ssim": float("nan")}, band)
    assert score["inside_band"] == 0.0 and math.isinf(score["drift_in_bands"])


def test_keeps_fp32_when_nothing_is_measurably_faster():
    table = pd.DataFrame(reference_rows() + [candidate(OK_SLOWER, 1.02, 0.95, 1.1, ssim=(0.0, 0.001)),
                                             candidate(GOOD, 0.9, 0.8, 1.05, ssim=(0.001, -0.001))])
    rec = recommend(table, model="m", preset="tiny", quality=SSIM, reference=REFERENCE)
    assert rec["recommended"]["label"] == REFERENCE.label()
    assert rec["recommended"]["verdict"].startswith("keep fp32")
    assert OK_SLOWER.label() in rec["recommended"]["verdict"]


def test_a_wider_margin_admits_more():
    drifting = candidate(FAST_DRIFTING, 2.5, 2.4, 2.6, ssim=(-0.08, -0.081))
    steady = candidate(GOOD, 1.2, 1.1, 1.3, ssim=(0.0, 0.002))
    table = pd.DataFrame(reference_rows() + [drifting, steady])
    def pick(quality):
        return recommend(table, model="m", preset="t", quality=quality, reference=REFERENCE)["recommended"]["label"]

    assert pick(QualityConfig(metric="ssim", margin=0.1)) == FAST_DRIFTING.label()
    assert pick(QualityConfig(metric="ssim", margin="2%")) == GOOD.label()
    assert pick(SSIM) == GOOD.label()  # default margin: the fp32 seeds' spread, 0.01


def test_ties_on_speed_are_broken_by_a_stated_rule_whatever_the_row_order():
    """Two equivalent settings whose speed intervals overlap: the one with fewer changes from fp32 is
    picked, the other is named as tied, and the answer does not depend on the table's order."""
    simple = Setting(opt_level="O1", dtype="bf16", batch_size=2)
    busier = Setting(opt_level="O2", dtype="bf16", batch_size=4, flags={"checkpointing": "blocks"})
    rows = [candidate(simple, 1.50, 1.40, 1.62, ssim=(0.0, 0.001)), candidate(busier, 1.55, 1.45, 1.66, ssim=(0.001, 0.0))]
    for order in (rows, rows[::-1]):
        rec = recommend(pd.DataFrame(reference_rows() + order), model="m", preset="t", quality=SSIM, reference=REFERENCE)
        assert rec["recommended"]["label"] == simple.label()
        assert rec["recommended"]["tied_with"] == [busier.label()] and "fewest changes" in rec["recommended"]["tie_rule"]


def test_time_to_quality_interpolates_the_curve():
    from orchestrator.recommend import time_to_quality

    assert time_to_quality([(10, 0.2), (20, 0.4), (30, 0.6)], 0.5, +1) == pytest.approx(25.0)
    assert time_to_quality([(10, 0.2), (20, 0.4)], 0.5, +1) != time_to_quality([(10, 0.2), (20, 0.4)], 0.5, +1)  # NaN
    assert time_to_quality([(10, 9.0), (20, 5.0)], 7.0, -1) == pytest.approx(15.0)  # lower is better


def test_recommendation_file_loads_back_as_a_setting(tmp_path):
    rec = recommend(planted_table(), model="m", preset="tiny", quality=SSIM, reference=REFERENCE)
    path = write_recommendation(rec, tmp_path)
    assert path == tmp_path / "recommendations" / "m.yaml"
    assert load_recommended_setting(path) == GOOD
    yaml.safe_load(path.read_text())  # plain YAML, no Python objects
    report = write_report(rec, planted_table(), tmp_path, tracking_uri="sqlite:///x.db", machine="test box")
    text = report.read_text()
    assert GOOD.label() in text and "mlflow ui --backend-store-uri sqlite:///x.db" in text


def test_results_table_round_trips_through_parquet(tmp_path):
    table = ResultsTable(tmp_path / "results.parquet")
    table.upsert("a", {"kind": "candidate", "speedup": 1.5, "speedup_ratios": [1.4, 1.6]})
    table.upsert("b", {"kind": "reference", "quality_ssim": 0.5})
    table.upsert("a", {"status": "ok"})
    again = ResultsTable(tmp_path / "results.parquet")
    assert again.get("a")["speedup"] == 1.5 and again.get("a")["status"] == "ok"
    assert again.get("a")["speedup_ratios"] == "[1.4, 1.6]"
    assert "quality_ssim" not in again.get("a")  # missing cells don't come back as NaN
    assert np.isclose(again.get("b")["quality_ssim"], 0.5)


def test_the_cross_model_table_shows_same_and_larger_batch_per_study(tmp_path, capsys):
    from orchestrator.__main__ import main

    larger = Setting(opt_level="O1", dtype="fp16", batch_size=4)
    frame = pd.concat([planted_table(), pd.DataFrame([candidate(larger, 2.2, 2.1, 2.3, ssim=(0.0, 0.001))])])
    for model, table in (("pix2pixhd", frame), ("spade", planted_table())):
        rec = recommend(table, model=model, preset="tiny", quality=SSIM, reference=REFERENCE)
        rec["study"] = {"resolution": "32x32", "reference_batch_size": 2}
        write_recommendation(rec, tmp_path / model)
    assert main(["compare", str(tmp_path / "pix2pixhd"), str(tmp_path / "spade" / "recommendations" / "spade.yaml")]) == 0
    rows = capsys.readouterr().out.strip().splitlines()[2:]
    assert len(rows) == 2
    p2p, spade = (r.split(" | ") for r in rows)
    assert p2p[4].startswith(f"{GOOD.label()}: 1.80x [1.70, 1.90]") and p2p[5].startswith(f"{larger.label()}: 2.20x")
    assert p2p[6].startswith(larger.label())  # the fastest inside the band overall
    assert spade[5] == "—" and spade[6].startswith(GOOD.label())
    with pytest.raises(SystemExit):
        main(["compare", str(tmp_path / "nowhere")])


def test_a_column_of_mixed_types_is_stored_as_text_not_lost(tmp_path):
    table = ResultsTable(tmp_path / "results.parquet")
    table.upsert("study", {"kind": "study", "when": "2026-11-28T09:00:00"})
    table.upsert("a", {"kind": "candidate", "when": 1764320400.5, "speedup": 1.2})
    again = ResultsTable(tmp_path / "results.parquet")
    assert again.get("a")["speedup"] == 1.2 and again.get("a")["when"] == "1764320400.5"


def test_a_new_speed_flag_reaches_the_recommendation_file(tmp_path, monkeypatch):
    """Add a flag to SpeedFlags: a setting using it is recorded (setting_json), recommended and
    written with the flag, its label and its difference from fp32; nothing lists flags by hand."""
    from pydantic import Field

    import orchestrator.recommend as rec_mod
    import orchestrator.settings as settings_mod

    class MoreFlags(settings_mod.SpeedFlags):
        new_flag: bool = False

    class MoreSetting(settings_mod.Setting):
        flags: MoreFlags = Field(default_factory=MoreFlags)

    monkeypatch.setattr(settings_mod, "SpeedFlags", MoreFlags)
    monkeypatch.setattr(rec_mod, "SpeedFlags", MoreFlags)
    monkeypatch.setattr(rec_mod, "Setting", MoreSetting)
    chosen = MoreSetting(opt_level="O1", dtype="bf16", batch_size=2, flags=MoreFlags(new_flag=True))
    reference = MoreSetting(opt_level="O0", batch_size=2)
    row = candidate(chosen, 1.8, 1.7, 1.9, ssim=(0.001, 0.002))
    rec = recommend(pd.DataFrame(reference_rows() + [row]), model="m", preset="t", quality=SSIM, reference=reference)
    path = write_recommendation(rec, tmp_path)
    written = yaml.safe_load(path.read_text())["recommended"]
    assert written["setting"]["flags"]["new_flag"] is True and "new_flag=True" in written["label"]
    assert written["differs_from_default"]["new_flag"] is True

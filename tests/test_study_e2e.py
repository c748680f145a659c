"""A tiny study through real Ray (Tune + Train), a real MLflow sqlite store and Parquet."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.model_contract import study_runs

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_study_end_to_end(tiny_study):
    out, space, done = tiny_study["output"], tiny_study["space"], tiny_study["process"]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "recommended for pix2pixhd" in done.stdout
    assert f"mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'}" in done.stdout
    # the terminal: the study's own progress, no Ray/Tune internals, no tracebacks
    assert "Traceback" not in done.stdout + done.stderr and "View detailed results" not in done.stdout
    assert "[stage 2] trial 1 of at most" in done.stdout
    assert any("[progress]" in line and "samples/s, ETA" in line for line in done.stdout.splitlines())
    assert (out / "study.log").stat().st_size > 0

    # the table: 2 references + every candidate of the grid except the reference itself
    table = pd.read_parquet(out / "results.parquet")
    refs = table[table["kind"] == "reference"]
    cands = table[table["kind"] == "candidate"]
    assert sorted(refs["seed"].astype(int)) == [0, 1]
    assert set(cands["label"]) == {"fp32-b4", "O1-bf16-b2", "O1-bf16-b4"}
    assert cands["speedup"].notna().all() and cands["profile_status"].notna().all()
    assert refs["quality_ssim"].notna().all()
    trained = cands[cands["trial_done"] == 1] if "trial_done" in cands else cands.iloc[:0]
    survivors = cands[cands["profile_status"] == "ok"]
    assert len(trained) == min(2, len(survivors))
    assert trained["quality_ssim"].notna().all() and trained["drift"].notna().all()
    assert table["mlflow_run_id"].dropna().nunique() == len(refs) + len(cands)
    # two Ray Train runs in all: stage 1's, and one training server that trained the references
    # and every stage-2 setting (no worker group started per setting)
    runs = sorted(p.name for p in (out / "ray").iterdir() if (p / "checkpoint_manager_snapshot.json").exists())
    assert [name.split("-")[0] for name in runs] == ["profile", "trainer"], runs

    # MLflow: one parent run, one nested child per row, with params and metrics
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs, parent, children = study_runs(client, "e2e", len(refs) + len(cands))
    o1 = next(r for r in children if r.info.run_name == "O1-bf16-b2")
    assert o1.data.params["opt_level"] == "O1" and o1.data.params["dtype"] == "bf16"
    assert "speedup" in o1.data.metrics and "peak_memory_mib" in o1.data.metrics
    artifacts = [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert {"pix2pixhd.yaml", "report.md", "results.parquet"} <= set(artifacts)
    assert any(a.path.startswith("figures") for a in client.list_artifacts(parent.info.run_id))
    figures = [a.path for a in client.list_artifacts(parent.info.run_id, "figures")]
    assert "figures/quality_samples.png" in figures and "figures/pareto.png" in figures
    trained_run = client.get_run(trained["mlflow_run_id"].iloc[0])
    assert "samples.png" in [a.path for a in client.list_artifacts(trained_run.info.run_id)]
    assert trained_run.data.tags["status"] == "ok" and "drift" in trained_run.data.metrics
    # quality over time: a step metric (step = samples seen), fp32 and AMP runs on the same axis
    for run_id in (trained_run.info.run_id, refs["mlflow_run_id"].iloc[0]):
        history = client.get_metric_history(run_id, "quality_ssim")
        assert [m.step for m in history] == [4, 8, 12, 16], history
    assert trained_run.info.end_time > trained_run.info.start_time  # the run's real times
    assert "time/train_seconds" in trained_run.data.metrics and "train_seconds" not in trained_run.data.metrics

    # every trained setting has a verdict with its interval; the study says what it could detect
    rec = yaml.safe_load((out / "recommendations" / "pix2pixhd.yaml").read_text())
    assert len(rec["verdicts"]) == len(trained)
    for verdict in rec["verdicts"]:
        assert verdict["verdict"] in ("equivalent", "worse", "undecided") and verdict["seeds"] == 2
        assert verdict["method"] == "paired" and verdict["drift_interval"][0] <= verdict["drift_interval"][1]
    assert rec["quality"]["detectable_drift"] > 0 and rec["quality"]["margin"] > 0
    report = (out / "report.md").read_text()
    assert "smallest quality loss this study could detect" in report and "time to fp32 quality" in report
    assert "no measurable" not in report

    # the recommendation file is loadable as a Setting
    from orchestrator.recommend import load_recommended_setting

    setting = load_recommended_setting(out / "recommendations" / "pix2pixhd.yaml")
    assert setting.label() in (out / "report.md").read_text()

    # the report and recommendation rebuild identically from results.parquet alone and from MLflow alone
    original = yaml.safe_load((out / "recommendations" / "pix2pixhd.yaml").read_text())
    for source, target in ((["--output", str(out)], out.parent / "from-parquet"),
                           (["--experiment", "e2e", "--tracking-uri", f"sqlite:///{out / 'mlflow.db'}"],
                            out.parent / "from-mlflow")):
        rebuilt = subprocess.run([sys.executable, "-m", "orchestrator", "report", *source, "--to", str(target)],
                                 cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
        again_rec = yaml.safe_load((target / "recommendations" / "pix2pixhd.yaml").read_text())
        assert again_rec["recommended"] == original["recommended"], source
        assert again_rec["alternatives"] == original["alternatives"], source
        assert (target / "report_images" / "pareto.png").stat().st_size > 1000

    # --resume on a finished study re-runs nothing and duplicates no MLflow run
    again = subprocess.run([sys.executable, "run_experiment.py", "--search-space", str(space), "--output", str(out),
                            "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "stage 1: profiling" not in again.stdout and "references: training" not in again.stdout
    runs_after, _, _ = study_runs(client, "e2e", len(refs) + len(cands))
    assert len(runs_after) == len(runs)

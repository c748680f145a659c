"""Early stopping in stage 2: a trial whose quality is already clearly outside the fp32 noise band
part-way through training stops there, judged against the references at the same sample count."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from orchestrator.config import BudgetConfig, parse_config
from orchestrator.config import QualityConfig
from orchestrator.recommend import Band, recommend, rung_bands, score_outcome, stops_early
from orchestrator.settings import Setting
from tests.test_recommend import REFERENCE, candidate, reference_rows

ROOT = Path(__file__).resolve().parents[1]
FAULTY = f"{ROOT / 'tests' / 'fault_models.py'}:FaultyColorizer"
FINAL = Band.from_values("quality_ssim", [0.50, 0.51, 0.49])  # halfwidth 0.01


def with_rungs(rows, rungs):
    return [{**row, "rung_quality": json.dumps({"32": {"quality_ssim": q}})} for row, q in zip(rows, rungs)]


def test_rungs_are_fractions_of_the_quality_budget():
    assert BudgetConfig(train_samples=128).stop_samples() == [64]
    assert BudgetConfig(train_samples=128).rung_samples() == [32, 64, 96]  # the curve points too
    budget = BudgetConfig(train_samples=128, early_stop_at=[0.5, 0.25, 0.5], quality_at=[])
    assert budget.rung_samples() == budget.stop_samples() == [32, 64]
    assert BudgetConfig(train_samples=128, early_stop_at=[], quality_at=[]).rung_samples() == []
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        BudgetConfig(early_stop_at=[1.0])


def test_rung_band_comes_from_the_references_and_is_never_narrower_than_the_final_one():
    frame = pd.DataFrame(with_rungs(reference_rows(), [0.30, 0.40, 0.35]))
    band = rung_bands(frame, FINAL)[32]
    assert band.mean == pytest.approx(0.35) and band.halfwidth == pytest.approx(0.05)
    tight = rung_bands(pd.DataFrame(with_rungs(reference_rows(), [0.300, 0.301, 0.302])), FINAL)[32]
    assert tight.halfwidth == pytest.approx(FINAL.halfwidth)  # chance agreement early cannot stop a trial
    assert rung_bands(pd.DataFrame(reference_rows()), FINAL) == {}  # references from before rungs existed


def test_only_a_drift_clearly_on_the_harmful_side_stops_a_trial():
    band = Band.from_values("quality_ssim", [0.30, 0.40, 0.35])  # 0.35 ± 0.05
    assert stops_early({"quality_ssim": 0.33}, band, 3.0) is None  # inside
    assert stops_early({"quality_ssim": 0.22}, band, 3.0) is None  # outside, but not clearly (2.6 bands)
    assert stops_early({"quality_ssim": 0.90}, band, 3.0) is None  # better is never harm
    stopped = stops_early({"quality_ssim": 0.10}, band, 3.0)
    assert stopped["drift"] == pytest.approx(-0.25) and stopped["drift_in_bands"] == pytest.approx(5.0)
    assert stops_early({"quality_ssim": math.nan}, band, 3.0)["drift_in_bands"] == math.inf
    lower_is_better = Band.from_values("quality_l1", [0.20, 0.22])
    assert stops_early({"quality_l1": 0.30}, lower_is_better, 3.0) is not None


def test_a_stopped_trial_keeps_the_drift_it_stopped_with_and_is_never_recommended():
    fast = Setting(opt_level="O1", dtype="bf16", batch_size=2)
    stopped = {**candidate(fast, 2.0, 1.9, 2.1, ssim=0.10, status="stopped"),
               "drift": -0.25, "drift_in_bands": 5.0}
    assert score_outcome(stopped, FINAL) == {"drift": -0.25, "drift_in_bands": 5.0, "inside_band": 0.0}
    rec = recommend(pd.DataFrame(reference_rows() + [stopped]), model="m", preset="tiny", quality=QualityConfig(metric="ssim"),
                    reference=REFERENCE)
    assert rec["recommended"]["label"] == REFERENCE.label() and "keep fp32" in rec["recommended"]["verdict"]


def test_measuring_quality_part_way_does_not_change_the_training(tmp_path):
    """The validation DataLoader draws from the global RNG; evaluate_midway must not, or a
    reference measured at its rungs would train differently from one that is not."""
    from models.base import load_model
    from orchestrator.trainer import Trainer
    from orchestrator.workers import evaluate_midway

    study = parse_config({"experiment": "x", "model": {"name": FAULTY, "preset": "tiny"},
                          "data": {"height": 16, "width": 16, "train_samples": 16, "val_samples": 4}})
    setting = Setting(opt_level="O0", batch_size=2)

    class Noisy(type(load_model(FAULTY))):
        """Draws from the global RNG while training, as a model with dropout or noise inputs does."""

        def generator_loss(self, nets, batch):
            loss, logs = super().generator_loss(nets, batch)
            return loss * (1 + 0.1 * torch.randn(())), logs

    def train(midway: bool) -> dict[str, torch.Tensor]:
        trainer = Trainer(Noisy(), setting, preset="tiny", data=study.data, seed=3)
        trainer.run(3)
        if midway:
            assert 0 <= evaluate_midway(trainer, study)["quality_ssim"] <= 1
        trainer.run(3)
        return {k: v.clone() for k, v in trainer.nets.generator.state_dict().items()}

    plain, measured = train(False), train(True)
    assert all(torch.equal(plain[k], measured[k]) for k in plain)


@pytest.mark.slow
def test_a_planted_drift_stops_at_the_first_rung_and_the_study_goes_on(tmp_path):
    from tests.test_faults import finish, runs_by_row, start, study_yaml

    space = study_yaml(tmp_path, budget__train_samples=64)
    text = yaml.safe_load(space.read_text())
    text["model"]["options"] = {"drift_when_mixed": 0.9}  # O1's samples are nearly black
    text["budget"]["early_stop_at"] = [0.25, 0.5]
    text["quality"] = {"metric": "l1"}  # at 16x16 and a few steps SSIM is near 0 for any output; L1 is not
    space.write_text(yaml.safe_dump(text))
    out = tmp_path / "out"
    output = finish(start(space, out))
    assert "early stop: after 16 samples" in output

    table = pd.read_parquet(out / "results.parquet")
    refs = table[table["kind"] == "reference"]
    assert all(set(json.loads(r)) >= {"16", "32"} for r in refs["rung_quality"])  # both rungs (and the curve points)
    row = table[table["kind"] == "candidate"].set_index("label").loc["O1-bf16-b2"]
    assert row["status"] == "stopped" and "early stop after 16 of 64 samples" in row["reason"]
    assert int(row["steps"]) == 16 // 2 and int(row["stopped_at_samples"]) == 16  # a quarter of the budget
    assert row["trial_done"] == 1 and math.isfinite(row["drift_in_bands"]) and row["drift_in_bands"] > 3
    rec = yaml.safe_load((out / "recommendations" / "faultycolorizer.yaml").read_text())
    assert rec["recommended"]["label"] != "O1-bf16-b2"
    assert rec["settings_by_status"].get("stopped") == 1
    counts = runs_by_row(f"sqlite:///{out / 'mlflow.db'}", "faults")
    assert len(counts) == 3 and all(n == 1 for n in counts.values())  # 2 references + the stopped trial

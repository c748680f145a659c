"""``benchmarks/search_efficiency.py`` replays stage 2's real searcher against known answers: on a
made-up study_cost output where the two fastest settings (fp16) lose quality and the bf16 ones do
not, fastest-first must train three settings to reach the grid's answer, and the search must reach
the same answer."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import yaml

from orchestrator.config import parse_config
from orchestrator.settings import Setting
from tests.conftest import TINY_STUDY

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import search_efficiency  # noqa: E402

REFERENCE_SSIM = {0: 0.50, 1: 0.51, 2: 0.49}
# label -> (stage-1 speedup, quality change against fp32 on every seed)
SETTINGS = {("O2", "fp16"): (2.0, -0.10), ("O1", "fp16"): (1.8, -0.10),
            ("O2", "bf16"): (1.6, 0.0), ("O1", "bf16"): (1.4, 0.0)}


def made_up_study_cost(folder: Path) -> None:
    space = {**TINY_STUDY, "search": {"opt_level": ["O0", "O1", "O2"], "dtype": ["bf16", "fp16"], "batch_size": [2]},
             "budget": {**TINY_STUDY["budget"], "reference_seeds": 3, "max_trials": 4}}
    config = parse_config(space, "made-up")
    (folder / "two-stage").mkdir(parents=True)
    (folder / "grid").mkdir()
    (folder / "two-stage" / "study.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    profile, grid = [], []
    for seed, ssim in REFERENCE_SSIM.items():
        grid.append({"row_id": f"reference:{seed}", "kind": "reference", "seed": seed, "status": "ok", "trained": 1,
                     "speedup": 1.0, "quality_ssim": ssim, "setting_key": config.reference.key(),
                     "setting_json": config.reference.model_dump_json(), **config.reference.flat()})
    for (level, dtype), (speedup, change) in SETTINGS.items():
        setting = Setting(opt_level=level, dtype=dtype, batch_size=2)
        common = {"row_id": setting.key(), "kind": "candidate", "setting_key": setting.key(), "label": setting.label(),
                  "setting_json": setting.model_dump_json(), **setting.flat()}
        profile.append({**common, "profile_status": "ok", "status": "ok", "speedup": speedup,
                        "speedup_low": speedup - 0.1, "speedup_high": speedup + 0.1})
        seeds = {str(s): {"status": "ok", "quality_ssim": REFERENCE_SSIM[s] + change} for s in (0, 1)}
        grid.append({**common, "status": "ok", "trained": 1, "seed": 0, "seed_results": json.dumps(seeds),
                     "quality_ssim": 0.505 + change, "speedup": 1.0, "speedup_low": 1.0, "speedup_high": 1.0})
    pd.DataFrame(profile).to_parquet(folder / "two-stage" / "results.parquet")
    pd.DataFrame(grid).to_parquet(folder / "grid" / "results.parquet")


def test_fastest_first_and_the_search_both_reach_the_grids_answer(tmp_path, capsys):
    made_up_study_cost(tmp_path)
    config, frame, survivors, known, profiled = search_efficiency.answers(tmp_path)
    replay = search_efficiency.Replay(config, frame)
    assert replay.target == "O2-bf16-b2"  # the fastest setting that keeps fp32's quality
    by_speed = [s.key() for s in sorted(survivors, key=lambda s: -known[s.key()]["speedup"])]
    assert replay.trained_until_reached(by_speed) == 3  # two fp16 losers first
    assert replay.trained_until_reached(reversed(by_speed)) == 2  # slowest first: O1-bf16, then O2-bf16

    search_efficiency.report(tmp_path, seeds=2)
    printed = capsys.readouterr().out
    assert "O2-bf16-b2" in printed and "2 of 2 seeds" not in printed or "reached within" in printed
    reached = [line for line in printed.splitlines() if line.startswith("settings trained to reach it")]
    assert reached and reached[0].split()[-3] == "3"  # fastest first's count, then the search's median

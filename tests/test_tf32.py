"""TF32 as a precision choice: on a TF32-capable GPU the study searches TF32 and times PyTorch's
default fp32 as a row of its own, and a setting must beat that default to be called faster.

The device is faked (a CUDA device of compute capability 9.0 with torch's default flags: TF32
convolutions, strict matmuls) through the study's cached device row, so no GPU and no Ray are needed.
"""
from __future__ import annotations

import json

import pandas as pd
import pytest

from orchestrator.config import parse_config
from orchestrator.devices import DeviceInfo
from orchestrator.config import QualityConfig
from orchestrator.recommend import recommend
from orchestrator.settings import Setting, SpeedFlags
from orchestrator.study import Study

H100 = DeviceInfo(type="cuda", name="NVIDIA H100 80GB HBM3", capability=(9, 0), count=1, torch_version="2.13.0",
                  host="gpu-node", default_matmul_tf32=False, default_cudnn_tf32=True)
V100 = DeviceInfo(type="cuda", name="Tesla V100-SXM2-16GB", capability=(7, 0), count=1, torch_version="2.13.0",
                  host="old-node", default_matmul_tf32=False, default_cudnn_tf32=True)
CPU = DeviceInfo(type="cpu", name="CPU only", capability=None, count=1, torch_version="2.13.0", host="laptop")

SPACE = {"experiment": "tf32", "model": {"name": "pix2pixhd", "preset": "tiny"},
         "search": {"opt_level": ["O0", "O1"], "dtype": ["bf16"], "batch_size": [2]}}


def study_on(device: DeviceInfo, tmp_path, **search) -> Study:
    config = parse_config({**SPACE, "search": {**SPACE["search"], **search}})
    study = Study(config, tmp_path / device.type, tracking_uri="sqlite:///unused.db", log=lambda *_: None)
    study.table.upsert("study", {"kind": "study", "device_info": json.dumps(device.as_dict())})
    return study


def test_a_tf32_gpu_adds_tf32_variants_and_the_pytorch_default_row(tmp_path):
    study = study_on(H100, tmp_path)
    labels = {s.label() for s in study.candidates()}
    assert labels == {"fp32-b2 tf32=default", "fp32-b2 tf32=on", "O1-bf16-b2", "O1-bf16-b2 tf32=on"}
    assert study.config.torch_default in study.candidates()
    assert H100.torch_default_differs and "convolutions" in H100.describe()


@pytest.mark.parametrize("device", [CPU, V100], ids=["cpu", "v100"])
def test_without_tf32_nothing_changes(device, tmp_path):
    labels = {s.label() for s in study_on(device, tmp_path).candidates()}
    assert labels == {"O1-bf16-b2"}


def test_a_yaml_that_sets_tf32_is_searched_as_given(tmp_path):
    labels = {s.label() for s in study_on(H100, tmp_path, tf32=[False]).candidates()}
    assert labels == {"fp32-b2 tf32=default", "O1-bf16-b2"}  # the default row is still timed
    assert {s.flags.tf32 for s in study_on(H100, tmp_path / "b", tf32=[True]).candidates()} >= {"on"}


# ---------------------------------------------------------------------------------- recommending

REFERENCE = Setting(opt_level="O0", batch_size=2)
DEFAULT = REFERENCE.model_copy(update={"flags": SpeedFlags(tf32="default")})
O1 = Setting(opt_level="O1", dtype="fp16", batch_size=2)
O1_2X = Setting(opt_level="O1", dtype="fp16", batch_size=4)


def row(setting: Setting, speedup: float, low: float, high: float, ssim: float | None = 0.50) -> dict:
    out = {"row_id": setting.key(), "setting_key": setting.key(), "setting_json": setting.model_dump_json(),
           "kind": "candidate", "label": setting.label(), "status": "ok", "speedup": speedup,
           "speedup_low": low, "speedup_high": high, "speedup_coverage": 0.97, "peak_memory_mib": 80.0,
           **setting.flat()}
    if ssim is not None:  # trained with the references' seeds 0 and 1, paired: a hair either side of them
        values = {0: 0.50 + ssim - 0.50 + 0.001, 1: 0.51 + ssim - 0.50 - 0.001}
        out.update({"trained": 1, "quality_ssim": ssim, "seeds": "[0, 1]",
                    "seed_results": json.dumps({str(k): {"status": "ok", "quality_ssim": v} for k, v in values.items()})})
    return out


def table(*candidates: dict) -> pd.DataFrame:
    refs = [{"row_id": f"reference:{i}", "kind": "reference", "seed": i, "status": "ok", "trained": 1,
             "quality_ssim": v, "speedup": 1.0, "peak_memory_mib": 100.0, **REFERENCE.flat()}
            for i, v in enumerate((0.50, 0.51, 0.49))]
    return pd.DataFrame(refs + list(candidates))


def test_beating_strict_fp32_but_not_pytorch_default_is_not_called_faster():
    """The H200 case: TF32 alone 1.55x, O1-fp16 1.43x over strict fp32. O1 is faster than strict fp32
    but slower than what the user runs today, so the study keeps PyTorch's default."""
    frame = table(row(DEFAULT, 1.55, 1.50, 1.60, ssim=None), row(O1, 1.43, 1.38, 1.48))
    rec = recommend(frame, model="m", preset="paper", quality=QualityConfig(metric="ssim"), reference=REFERENCE)
    assert rec["recommended"]["label"] == DEFAULT.label()
    assert rec["recommended"]["verdict"].startswith("keep your current training (PyTorch default fp32)")
    assert "of PyTorch's default fp32" in rec["recommended"]["verdict"]


def test_a_setting_that_beats_pytorch_default_is_recommended_with_both_speedups():
    frame = table(row(DEFAULT, 1.55, 1.50, 1.60, ssim=None), row(O1, 1.43, 1.38, 1.48),
                  row(O1_2X, 2.71, 2.60, 2.80))
    rec = recommend(frame, model="m", preset="paper", quality=QualityConfig(metric="ssim"), reference=REFERENCE)
    best = rec["recommended"]
    assert best["label"] == O1_2X.label()
    assert best["speedup"] == 2.71 and best["speedup_vs_default"] == pytest.approx(2.71 / 1.55)
    assert best["speedup_vs_default_interval"] == [pytest.approx(2.60 / 1.60), pytest.approx(2.80 / 1.50)]


def test_without_a_pytorch_default_row_the_default_is_strict_fp32():
    """CPUs and pre-Ampere GPUs: no default row, and speedups over the default equal those over fp32."""
    rec = recommend(table(row(O1, 1.43, 1.38, 1.48)), model="m", preset="tiny", quality=QualityConfig(metric="ssim"), reference=REFERENCE)
    assert rec["recommended"]["label"] == O1.label()
    assert rec["recommended"]["speedup_vs_default"] == 1.43

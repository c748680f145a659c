"""``benchmarks/gpu_speedups.py --device cpu --tiny``: the GPU benchmark's code path, on the CPU.

Numbers from a CPU at 16x16 say nothing about a GPU; this checks that every row is built, paired
with strict fp32 and (O0/O1) with the bare torch.amp loop, and written as JSON and markdown."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_speedups  # noqa: E402


def test_cpu_tiny_mode_writes_every_row(tmp_path, capsys):
    assert gpu_speedups.main(["--device", "cpu", "--tiny", "--models", "pix2pixhd", "--output", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "gpu_speedups.json").read_text())
    rows = {r["row"]: r for r in payload["rows"]}
    assert list(rows) == [label for label, _ in gpu_speedups.rows_for(2)]
    assert all(r["status"] in ("ok", "slower") for r in rows.values())
    assert rows["strict fp32"]["speedup"] == 1.0
    assert rows["O1-fp16 2x batch"]["batch"] == 4
    for label, row in rows.items():
        has_twin = not label.startswith("O2")
        assert ("overhead" in row) == has_twin, label
        assert math.isfinite(row["speedup"]) and 0 <= row["speedup_coverage"] <= 1
    table = (tmp_path / "gpu_speedups.md").read_text()
    assert "| pix2pixhd | 16x16 | O2-fp16 |" in table and "no torch.amp twin" in table
    assert "CPU only" in payload["device_text"]


def test_the_bare_loop_trains_the_trainers_networks_from_the_same_start():
    """Same seed, same model: the control starts from the trainer's exact weights."""
    import torch

    from orchestrator.config import DataConfig
    from orchestrator.settings import Setting
    from orchestrator.trainer import Trainer, unwrap
    from models.base import load_model

    data = DataConfig(height=16, width=16, train_samples=8, val_samples=4)
    setting = Setting(opt_level="O1", dtype="bf16", batch_size=2)
    bare = gpu_speedups.BareLoop("pix2pixhd", setting, "tiny", data, torch.device("cpu"))
    trainer = Trainer(load_model("pix2pixhd"), setting, preset="tiny", data=data, seed=0, device="cpu")
    for name, net in trainer.nets.named().items():
        for (k, a), (_, b) in zip(unwrap(net).state_dict().items(), getattr(bare.nets, name).state_dict().items()):
            assert torch.equal(a, b), k
    record = bare.run(2)
    assert record.steps == 2 and len(record.step_times) == 2

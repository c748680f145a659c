"""Checks every GAN family must pass (issue 3): a tiny preset trains under each precision level
with finite losses, and a checkpoint round trip continues bit-exactly. Model test files call these
with their own model name and a small DataConfig."""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from models.base import load_model
from orchestrator.config import DataConfig
from orchestrator.settings import Setting
from orchestrator.trainer import Trainer, unwrap

LEVELS = [("O0", "fp16"), ("O1", "bf16"), ("O1", "fp16"), ("O2", "bf16"), ("O2", "fp16")]


@contextlib.contextmanager
def intra_op_threads(count: int):
    """torch's intra-op threads set to ``count`` meanwhile: model test modules use 1, since the 2
    cores are shared with other test processes and oversubscribed OpenMP barriers stall steps."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_trainer(model_name: str, data: DataConfig, setting: Setting, seed: int = 0, **options) -> Trainer:
    return Trainer(load_model(model_name, **options), setting, preset="tiny", data=data, seed=seed,
                   device="cpu")


def check_trains(model_name: str, data: DataConfig, opt_level: str, dtype: str, steps: int = 3,
                 eps: dict[str, float] | None = None, **options) -> None:
    """``steps`` steps under one precision level: finite losses every step, no divergence."""
    setting = Setting(opt_level=opt_level, dtype=dtype, batch_size=2, eps=eps or {})
    record = make_trainer(model_name, data, setting, **options).run(steps)
    assert record.status == "ok", f"{model_name} {opt_level}-{dtype}: {record.status} ({record.reason})"
    assert record.steps == steps
    for logs in record.losses:
        for key, value in logs.items():
            if key.startswith("loss_"):
                assert math.isfinite(value), f"{model_name} {opt_level}-{dtype}: {key}={value}"


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.detach().clone() for name, net in trainer.nets.named().items()
            for k, v in unwrap(net).state_dict().items()}


def check_resume(model_name: str, data: DataConfig, tmp_path: Path, setting: Setting | None = None,
                 **options) -> None:
    """Train 3 steps, save, train 2 more; a fresh trainer that loads the checkpoint and trains 2
    steps must end with exactly the same weights."""
    setting = setting or Setting(opt_level="O1", dtype="bf16", batch_size=2)
    first = make_trainer(model_name, data, setting, **options)
    first.run(3)
    first.save(tmp_path)
    first.run(2)
    expected = _weights(first)

    second = make_trainer(model_name, data, setting, seed=123, **options)  # different init on purpose
    second.load(tmp_path)
    second.run(2)
    actual = _weights(second)
    assert second.step == first.step
    for key, value in expected.items():
        assert torch.equal(value, actual[key]), f"{model_name}: {key} differs after resume"

"""Under O2/O3 the trainer casts floating batch inputs to half; entries a model declares as
geometry (``fp32_batch_keys``, e.g. optical flow in pixels) stay fp32."""
from __future__ import annotations

import pytest
import torch

from models.base import load_model
from orchestrator.config import DataConfig
from orchestrator.settings import Setting
from orchestrator.trainer import Trainer

DATA = DataConfig(height=32, width=32, train_samples=4, val_samples=2)


@pytest.mark.parametrize("name", ["vid2vid", "fs_vid2vid"])
@pytest.mark.parametrize("opt_level", ["O2", "O3"])
def test_flow_stays_fp32_while_images_go_half_and_training_runs(name, opt_level):
    trainer = Trainer(load_model(name), Setting(opt_level=opt_level, dtype="bf16", batch_size=2), preset="tiny",
                      data=DATA, seed=0)
    raw = next(iter(torch.utils.data.DataLoader(trainer.model.dataset(DATA, "train"), batch_size=2)))
    batch = trainer._to_device(raw)
    assert batch["flow"].dtype == torch.float32 and torch.equal(batch["flow"], raw["flow"])  # not a bit lost
    assert batch["frames"].dtype == torch.bfloat16
    assert trainer.run(2).status == "ok"


def test_without_the_declaration_flow_would_lose_sub_pixel_detail():
    flow = torch.tensor([100.3, -57.7, 12.55])
    assert (flow.to(torch.bfloat16).float() - flow).abs().max() > 0.1  # what fp32_batch_keys prevents

"""Worker body for tests/test_trainer_ddp.py (a module of its own so spawned processes import it)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from models.base import load_model
from orchestrator.config import DataConfig
from orchestrator.settings import Setting
from orchestrator.trainer import Trainer, unwrap

SPEC = f"{Path(__file__).resolve().parents[1] / 'examples' / 'user_model.py'}:Colorizer"


class PoisonOnRankOne:
    """Wraps a model: from step ``after`` on, rank 1's generator loss is NaN."""

    def __init__(self, model, after: int):
        self.model, self.after, self.calls = model, after, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def generator_loss(self, nets, batch):
        loss, logs = self.model.generator_loss(nets, batch)
        self.calls += 1
        if dist.get_rank() == 1 and self.calls > self.after:
            loss = loss * float("nan")
        return loss, logs


def run(rank: int, world: int, port: int, poison: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = load_model(SPEC)
        if poison:
            model = PoisonOnRankOne(model, after=2)
        data = DataConfig(height=16, width=16, train_samples=16, val_samples=4)
        # divergence is read (and agreed on across ranks) every log_every steps; the fused optimizer
        # skips the non-finite updates on the device meanwhile
        setting = Setting(opt_level="O1", dtype="bf16", batch_size=2, flags={"fused_optimizer": True})
        trainer = Trainer(model, setting, preset="tiny", data=data, seed=0, device="cpu", log_every=2)
        record = trainer.run(8)
        weights = torch.cat([p.detach().flatten().float() for p in unwrap(trainer.nets.generator).parameters()])
        torch.save({"status": record.status, "steps": record.steps, "weights": weights,
                    "reason": record.reason}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()

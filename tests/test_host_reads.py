"""The training step never waits for the device: counted on the CPU.

On a GPU every host read of a tensor (``float(t)``, ``.item()``, ``bool(t)``, ``.tolist()``, ...)
waits for every queued kernel. The trainer reads the losses, logs and divergence counters of many
steps in one transfer every ``log_every`` steps, so over N steady-state steps the project's own files
may read at most N / log_every (+ the end of the run) times. A read that comes back into the step
(a ``float(loss)`` in the trainer, a model's log value as a float) makes these tests fail: the
control test plants one and checks that the count sees it.

Reads made inside torch are not counted: with fp16 loss scaling and an unfused optimizer torch's
``GradScaler.step`` itself reads ``found_inf`` (see ``orchestrator/precision.py``).
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch

from models.base import load_model
from orchestrator.config import DataConfig
from orchestrator.settings import Setting, SpeedFlags
from orchestrator.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
PROJECT_DIRS = tuple(str(ROOT / d) + "/" for d in ("orchestrator", "models", "examples"))
# data sets build samples from CPU tensors on the host (in DataLoader workers on a real run): their
# reads never touch the device
HOST_SIDE = (str(ROOT / "orchestrator" / "data") + "/",)
READS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")
STEPS, LOG_EVERY = 40, 10
USER_MODEL = f"{ROOT / 'examples' / 'user_model.py'}:Colorizer"


@contextlib.contextmanager
def count_host_reads(also: tuple[str, ...] = ()):
    """Patch the Tensor methods that read values on the host; count calls from the project's files
    (and from the files in ``also``)."""
    calls: list[str] = []
    counted = PROJECT_DIRS + also
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def patched(name):
        original = originals[name]

        def read(self, *args, **kwargs):
            caller = sys._getframe(1)
            where = caller.f_code.co_filename
            if where.startswith(counted) and not where.startswith(HOST_SIDE):
                calls.append(f"{name} at {where}:{caller.f_lineno}")
            return original(self, *args, **kwargs)

        return read

    for name in READS:
        setattr(torch.Tensor, name, patched(name))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def make_trainer(model: str, setting: Setting, log_every: int = LOG_EVERY, **options) -> Trainer:
    data = DataConfig(height=16, width=16, train_samples=8, val_samples=4,
                      options={"frames": 3} if "vid2vid" in model else {})
    return Trainer(load_model(model, **options), setting, preset="tiny", data=data, device="cpu",
                   log_every=log_every)


def steady_state_reads(trainer: Trainer, steps: int = STEPS) -> list[str]:
    trainer.run(2)  # first steps: lazily built state, optimizer state allocation
    with count_host_reads() as calls:
        record = trainer.run(steps)
    assert record.status == "ok", record.reason
    assert record.steps == steps and len(record.losses) == steps
    assert record.host_reads == steps // trainer.log_every
    return calls


BOUND = STEPS // LOG_EVERY + 1


@pytest.mark.parametrize("level,dtype,fused", [
    ("O0", "fp16", False), ("O1", "bf16", False), ("O2", "bf16", False),
    ("O1", "fp16", True), ("O2", "fp16", True), ("O1", "bf16", True),
])
def test_pix2pixhd_steps_read_the_host_once_per_log_interval(level, dtype, fused):
    setting = Setting(opt_level=level, dtype=dtype, batch_size=2, flags=SpeedFlags(fused_optimizer=fused))
    calls = steady_state_reads(make_trainer("pix2pixhd", setting))
    assert len(calls) <= BOUND, "\n".join(calls)


@pytest.mark.parametrize("model", ["spade", "inpainting", "vid2vid", "fs_vid2vid", "wc_vid2vid", USER_MODEL])
def test_every_model_step_is_free_of_host_reads(model):
    """Every model's losses and logs: 10 steps read back twice (log_every 5), nothing else."""
    trainer = make_trainer(model, Setting(opt_level="O1", dtype="bf16", batch_size=2), log_every=5)
    calls = steady_state_reads(trainer, steps=10)
    assert len(calls) <= 10 // 5 + 1, "\n".join(calls)


def test_a_float_of_the_loss_in_the_step_is_counted():
    """Control: a ``float(loss)`` planted in a model's loss (here, in this file) is counted, once
    per step, far beyond the bound."""
    trainer = make_trainer("pix2pixhd", Setting(opt_level="O1", dtype="bf16", batch_size=2))
    original = trainer.losses["generator"]

    def generator_loss_with_a_read(nets, batch):
        loss, logs = original(nets, batch)
        return loss, {**logs, "g_total": float(loss.detach())}

    trainer.losses["generator"] = generator_loss_with_a_read
    trainer.run(2)
    with count_host_reads(also=(__file__,)) as calls:
        trainer.run(STEPS)
    assert len(calls) >= STEPS > BOUND


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.set_sync_debug_mode")
@pytest.mark.parametrize("level,dtype", [("O0", "fp16"), ("O1", "bf16"), ("O1", "fp16"), ("O2", "fp16")])
def test_cuda_steady_state_steps_never_synchronize(level, dtype):
    """On a GPU: steady-state steps (fused optimizer) run with sync debug mode 'error'."""
    setting = Setting(opt_level=level, dtype=dtype, batch_size=2, flags=SpeedFlags(fused_optimizer=True))
    data = DataConfig(height=32, width=32, train_samples=16, val_samples=4)
    trainer = Trainer(load_model("pix2pixhd"), setting, preset="tiny", data=data, device="cuda", log_every=1000)
    trainer.run(3)
    batches = [trainer._next_batch() for _ in range(5)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches:
            trainer.train_step(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()

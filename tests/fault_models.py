"""Models that fail on purpose, for the fault tests (loaded by path like any user model)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from models.base import load_model

# the README's example model, loaded by path as the orchestrator loads any user model
Colorizer = type(load_model(f"{Path(__file__).resolve().parents[1] / 'examples' / 'user_model.py'}:Colorizer"))


class FaultyColorizer(Colorizer):
    """The example colouriser with two planted faults:

    * a batch larger than ``oom_above`` raises the allocator's out-of-memory error;
    * under half precision (O2/O3 inputs) the generator loss turns NaN after ``nan_after`` calls, so
      a setting passes the few profiling steps and then diverges in quality training;
    * with ``pause_file`` set, the first process to train a mixed-precision setting for
      ``pause_at_call`` steps writes its pid to that file and stops there (until killed), so a test can
      kill a training worker at a known step; processes started later, e.g. the worker Ray Train
      restarts, find the file and carry on;
    * with ``drift_when_mixed`` > 0, a mixed-precision setting's samples are pulled that far towards
      black: it trains like any other but its image quality is clearly worse (planted drift)."""

    name = "faultycolorizer"
    presets = {name: {**arch, "oom_above": 4, "nan_after": 12, "pause_file": "", "pause_at_call": 0,
                      "drift_when_mixed": 0.0}
               for name, arch in Colorizer.presets.items()}

    def build(self, preset, eps, flags):
        arch = self.arch(preset)
        self.oom_above, self.nan_after, self.calls = arch["oom_above"], arch["nan_after"], 0
        self.pause_file, self.pause_at_call = arch["pause_file"], arch["pause_at_call"]
        self.drift_when_mixed = arch["drift_when_mixed"]
        return super().build(preset, eps, flags)

    @staticmethod
    def _mixed(batch) -> bool:
        return torch.is_autocast_enabled(batch["gray"].device.type) or batch["gray"].dtype != torch.float32

    def samples(self, nets, batch):
        fake, real = super().samples(nets, batch)
        if self.drift_when_mixed and self._mixed(batch):
            fake = fake - self.drift_when_mixed * (fake + 1)  # towards -1, black
        return fake, real

    def _maybe_pause(self, batch) -> None:
        if not (self.pause_file and self._mixed(batch) and self.calls == self.pause_at_call):
            return
        try:
            with open(self.pause_file, "x") as f:  # only the first process to get here pauses
                f.write(str(os.getpid()))
        except FileExistsError:
            return
        while True:
            time.sleep(1)

    def generator_loss(self, nets, batch):
        if batch["gray"].shape[0] > self.oom_above:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB (planted by the test)")
        loss, logs = super().generator_loss(nets, batch)
        self.calls += 1
        self._maybe_pause(batch)
        if batch["gray"].dtype != torch.float32 and self.calls > self.nan_after:
            loss = loss * float("nan")
        return loss, logs

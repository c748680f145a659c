"""What a study will do, before it does it: the settings stage 1 profiles on a device, and
(``--dry-run``) the size and an estimated cost of the whole study from a few timed steps here.

No Ray: the grid is a pure function of the configuration and the training device, so the study
(on a worker's device) and the dry run (on this machine's) build it the same way.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

from orchestrator.config import StudyConfig
from orchestrator.devices import DeviceInfo, describe_device
from orchestrator.settings import Setting

# fixed costs measured on the development machine (README.md, "Measured here"): a TorchTrainer start, ray.init
TRAINER_START_SECONDS, RAY_INIT_SECONDS = 15.0, 5.0


def candidate_grid(config: StudyConfig, device: DeviceInfo, auto_settings: list[Setting] = (),
                   sample: bool = True) -> list[Setting]:
    """The settings stage 1 profiles on ``device``: the search space's grid with eps values equal to
    the model's defaults dropped (so the default-eps fp32 setting *is* the reference, not a copy of
    it), minus the reference itself; plus PyTorch's default fp32 where it differs from strict fp32
    (TF32 GPUs) and the ``batch_size: auto`` settings found for this device; a random sample of
    ``budget.max_profiled`` when larger (the PyTorch default row always kept)."""
    from models.base import load_model

    defaults = load_model(config.model.name, **config.model.options).eps_sites
    unique: dict[str, Setting] = {}
    if device.torch_default_differs:
        unique[config.torch_default.key()] = config.torch_default
    for setting in config.search.for_device(device.tf32_capable).candidates():
        eps = {k: v for k, v in setting.eps.items() if defaults.get(k) != v}
        setting = setting.model_copy(update={"eps": eps})
        unique.setdefault(setting.key(), setting)
    for setting in auto_settings:
        unique.setdefault(setting.key(), setting)
    grid = [s for s in unique.values() if s.key() != config.reference.key()]
    limit = config.budget.max_profiled
    if sample and len(grid) > limit:
        keep = [s for s in grid if s == config.torch_default]
        grid = keep + random.Random(config.seed).sample([s for s in grid if s not in keep], limit - len(keep))
    return grid


@dataclass
class CostEstimate:
    step_seconds: float  # one fp32 step at the reference batch, timed here
    profile_seconds: float
    reference_seconds: float
    trial_seconds: float
    overhead_seconds: float

    @property
    def total(self) -> float:
        return self.profile_seconds + self.reference_seconds + self.trial_seconds + self.overhead_seconds


def time_reference_step(config: StudyConfig, steps: int = 3) -> float:
    """Seconds per fp32 training step at the reference batch on this machine (after one warm-up)."""
    from models.base import load_model
    from orchestrator.trainer import Trainer

    data = config.data.model_copy(update={"train_samples": max(config.data.train_samples,
                                                               config.reference.batch_size * (steps + 1))})
    trainer = Trainer(load_model(config.model.name, **config.model.options), config.reference,
                      preset=config.model.preset, data=data, seed=config.seed, device="cpu")
    trainer.run(0, warmup=1)
    started = time.perf_counter()
    trainer.run(steps)
    return (time.perf_counter() - started) / steps


def estimate_cost(config: StudyConfig, n_profiled: int, step_seconds: float) -> CostEstimate:
    """Stage 1: every setting paired with fp32 for its rounds (at least profile_rounds); references
    and trials: the training budget per seed; plus a TorchTrainer start per run and ray.init. Half
    precision is assumed to cost what fp32 costs: an estimate, not a measurement."""
    budget = config.budget
    steps_per_setting = budget.profile_warmup * 2 + budget.profile_rounds * 2 * budget.profile_steps
    profile = n_profiled * steps_per_setting * step_seconds
    per_seed = math.ceil(budget.train_samples / config.reference.batch_size) * step_seconds
    references = budget.reference_seeds * per_seed
    trials = min(budget.max_trials, n_profiled) * budget.candidate_seeds * per_seed
    runs = 2 + min(budget.max_trials, n_profiled)  # stage 1, references, one per trained setting
    return CostEstimate(step_seconds, profile, references, trials, RAY_INIT_SECONDS + runs * TRAINER_START_SECONDS)


def dry_run(config: StudyConfig, time_steps: bool = True) -> str:
    """What the study would do, as text: grid size, the settings to profile, the trials stage 2 may
    train, and the estimated cost. Builds the grid for this machine's device; starts no Ray."""
    device = describe_device()
    search = config.search.for_device(device.tf32_capable)
    grid = candidate_grid(config, device)
    full = len(candidate_grid(config, device, sample=False))
    lines = [f"dry run of {config.experiment!r} ({config.model.name}, {config.model.preset} preset) on {device.describe()}",
             f"grid: {full} distinct settings besides the fp32 reference {config.reference.label()}; "
             f"{len(grid)} to profile" + (f" (a random sample: budget.max_profiled={config.budget.max_profiled})"
                                          if len(grid) < full else "")]
    if search.auto_batch:
        lines.append("batch_size auto: the largest batch per precision setting is probed on a worker at run "
                     "time (not listed here)")
    lines += [f"  {s.label()}" for s in grid]
    budget = config.budget
    lines.append(f"stage 2 may train up to {min(budget.max_trials, len(grid))} of them (budget.max_trials="
                 f"{budget.max_trials}), each with {budget.candidate_seeds} seed(s) of {budget.train_samples} samples; "
                 f"references: {budget.reference_seeds} fp32 seeds")
    if time_steps:
        cost = estimate_cost(config, len(grid), time_reference_step(config))
        lines.append(f"estimated cost on this machine (fp32 step {cost.step_seconds * 1000:.0f} ms, half precision "
                     f"assumed as fast): stage 1 {cost.profile_seconds:.0f} s, references {cost.reference_seconds:.0f} s, "
                     f"stage 2 {cost.trial_seconds:.0f} s, Ray start-ups {cost.overhead_seconds:.0f} s; "
                     f"about {cost.total / 60:.1f} min in all")
    return "\n".join(lines)

"""Where a quality-training run pauses, computed once as data.

A run trains a setting for ``budget.train_samples`` samples. On the way it pauses to checkpoint
(every ``checkpoint_every`` steps), to measure quality (the curve points and early-stop rungs) and,
at an early-stop rung, possibly to stop. ``training_schedule`` lists those pauses in order, so the
loop that trains (``orchestrator.workers``) only walks the list: it never works out sample counts or
step arithmetic itself, and a test can read the whole schedule without training anything.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Pause:
    step: int  # trainer.step where training pauses (optimizer steps of every network)
    samples: int  # training samples seen by then, over all workers
    measure: bool = False  # measure quality here (a point of the quality-over-time curve)
    may_stop: bool = False  # an early-stop rung: a setting clearly worse than fp32 here stops
    checkpoint: bool = False  # report progress with a checkpoint (resume continues from here)
    final: bool = False  # the end of the budget


def training_schedule(*, train_samples: int, per_step: int, checkpoint_every: int,
                      measure_samples: list[int], stop_samples: list[int]) -> list[Pause]:
    """The pauses of one run, in order. ``per_step``: samples per optimizer step over all workers.

    A sample count maps to the first step that reaches it; a point that falls on the last step is
    the final evaluation's."""
    total = max(1, math.ceil(train_samples / per_step))

    def step_of(samples: int) -> int:
        return math.ceil(samples / per_step)

    measure = {step_of(s) for s in measure_samples} | {step_of(s) for s in stop_samples}
    stop = {step_of(s) for s in stop_samples}
    checkpoints = set(range(checkpoint_every, total, checkpoint_every))
    steps = sorted(s for s in measure | checkpoints if 0 < s < total)
    pauses = [Pause(step=s, samples=s * per_step, measure=s in measure, may_stop=s in stop,
                    checkpoint=s in checkpoints or s in measure) for s in steps]
    return pauses + [Pause(step=total, samples=total * per_step, measure=True, final=True)]

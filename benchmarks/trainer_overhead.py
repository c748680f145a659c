#!/usr/bin/env python
"""The trainer's overhead: its O0 step against a bare hand-written loop of the same networks.

Both loops train the same pix2pixHD networks (same init, same batches already in memory) and are
timed in alternating blocks in one process, so machine drift hits both equally. Prints the median
step time of each and their ratio (goal: <= 1.05x).

    python benchmarks/trainer_overhead.py [--preset tiny] [--size 64] [--batch 2] [--rounds 6]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from models.base import load_model
from orchestrator.config import DataConfig
from orchestrator.settings import Setting
from orchestrator.trainer import Trainer


def bare_loop(model, nets, optimizers, batches):
    """What a user would write by hand: D step, then G step, plain Adam, no checks."""
    times = []
    for batch in batches:
        start = time.perf_counter()
        for name, loss_fn in (("discriminator", model.discriminator_loss), ("generator", model.generator_loss)):
            optimizers[name].zero_grad(set_to_none=True)
            loss, _ = loss_fn(nets, batch)
            loss.backward()
            optimizers[name].step()
        times.append(time.perf_counter() - start)
    return times


def trainer_loop(trainer: Trainer, batches):
    times = []
    for batch in batches:
        start = time.perf_counter()
        trainer.train_step(batch)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pix2pixhd")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()

    data = DataConfig(height=args.size, width=args.size, train_samples=args.batch * args.steps)
    trainer = Trainer(load_model(args.model), Setting(opt_level="O0", batch_size=args.batch), preset=args.preset,
                      data=data, seed=0, device="cpu")
    batches = [trainer._next_batch() for _ in range(args.steps)]

    model = load_model(args.model)
    torch.manual_seed(0)
    nets = model.build(args.preset, model.resolve_eps(None), Setting().flags)
    groups = model.param_groups(nets)
    optimizers = {name: torch.optim.Adam(net.parameters(), **groups[name]) for name, net in nets.named().items()}

    bare_loop(model, nets, optimizers, batches[:2])  # warm-up both
    trainer_loop(trainer, batches[:2])
    bare, ours = [], []
    for i in range(args.rounds):
        first, second = (bare_loop, trainer_loop) if i % 2 == 0 else (trainer_loop, bare_loop)
        for fn in (first, second):
            if fn is bare_loop:
                bare += bare_loop(model, nets, optimizers, batches)
            else:
                ours += trainer_loop(trainer, batches)

    b, t = statistics.median(bare), statistics.median(ours)
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"{args.model} {args.preset} {args.size}x{args.size} batch {args.batch}, "
          f"{args.rounds} alternating blocks of {args.steps} steps")
    print(f"{'loop':<12}{'median step ms':>16}")
    print(f"{'bare':<12}{b * 1000:>16.2f}")
    print(f"{'Trainer O0':<12}{t * 1000:>16.2f}")
    print(f"ratio Trainer/bare: {t / b:.3f}x (goal <= 1.05x)")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""The seeds' speedup table on one GPU in one run: each seed model at its paper preset, every
precision row timed against strict fp32 and against a bare torch.amp loop of the same networks.

    python benchmarks/gpu_speedups.py                          # one CUDA GPU, paper presets (<= 8 min on an H100, estimated)
    python benchmarks/gpu_speedups.py --device cpu --tiny      # the same code path in seconds (CI runs it)
    python benchmarks/gpu_speedups.py --models pix2pixhd,spade --output gpu-speedups

Rows per model: strict fp32 (the yardstick: TF32 off), PyTorch default (torch's own backend flags:
TF32 convolutions on Ampere+), TF32, O1 and O2 in fp16 and bf16, O1-fp16 at twice the batch, and
O1-fp16 with the speed flags a user sets in two lines (fused Adam, channels_last).

Timing is the study's (``orchestrator.measure.paired_profile``): interleaved block pairs after
warm-up, the median of the paired ratios with its order-statistic interval and that interval's
coverage. Each row is paired twice: with strict fp32 (its speedup) and with the control at the same
precision (the trainer's overhead). The control is a bare torch.amp loop (``BareLoop``, nanoGPT
style): the same networks, initialisation and batches, the model's own losses, autocast and one
GradScaler per optimizer, torch's Adam, nothing else. O2 has no plain torch.amp counterpart (fp32
master weights), so its overhead column is empty.

Peak memory (CUDA) is the row's own: what its networks, optimizer state and gradients hold after
warm-up, plus the largest allocation on top of that during its timed steps, from the caching
allocator, with the peak counter reset after warm-up so cuDNN's autotuning workspace stays out.

Resolutions (``PAPER``) are chosen from the ms/sample measured on an H200 (README.md, "On a GPU") so the whole
run stays under about 8 minutes on one H100; vid2vid runs at 128x256 (at 256x256 one fp32 step
took ~1 s). Writes ``gpu_speedups.json`` and ``gpu_speedups.md`` in ``--output``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.base import load_model  # noqa: E402
from orchestrator.config import DataConfig  # noqa: E402
from orchestrator.devices import describe_device  # noqa: E402
from orchestrator.measure import paired_profile  # noqa: E402
from orchestrator.precision import HALF_DTYPES, PrecisionPolicy  # noqa: E402
from orchestrator.settings import Setting, SpeedFlags  # noqa: E402
from orchestrator.trainer import RunRecord, StepTimer, Trainer, synchronize  # noqa: E402

# model -> (height, width, batch, data options) at the paper preset
PAPER = {
    "pix2pixhd": (256, 512, 1, {}),
    "spade": (256, 512, 1, {}),
    "inpainting": (256, 256, 4, {}),
    "vid2vid": (128, 256, 1, {}),
    "fs_vid2vid": (256, 256, 1, {}),
}
TINY = {name: (16, 16, 2, {"frames": 3} if "vid2vid" in name else {}) for name in PAPER}

FLAGS = SpeedFlags(fused_optimizer=True, channels_last=True)


def rows_for(batch: int) -> list[tuple[str, Setting]]:
    o1 = Setting(opt_level="O1", dtype="fp16", batch_size=batch)
    return [
        ("strict fp32", Setting(opt_level="O0", batch_size=batch)),
        ("PyTorch default", Setting(opt_level="O0", batch_size=batch, flags=SpeedFlags(tf32="default"))),
        ("TF32", Setting(opt_level="O0", batch_size=batch, flags=SpeedFlags(tf32="on"))),
        ("O1-fp16", o1),
        ("O1-bf16", Setting(opt_level="O1", dtype="bf16", batch_size=batch)),
        ("O2-fp16", Setting(opt_level="O2", dtype="fp16", batch_size=batch)),
        ("O2-bf16", Setting(opt_level="O2", dtype="bf16", batch_size=batch)),
        ("O1-fp16 2x batch", o1.model_copy(update={"batch_size": 2 * batch})),
        ("O1-fp16 + fused Adam, channels_last", o1.model_copy(update={"flags": FLAGS})),
    ]


class BareLoop:
    """The control: what a user writes by hand with torch.amp, on the trainer's networks and batches.

    Same model, preset, eps, seed (so the same initial weights) and data order as ``Trainer``;
    autocast when the level is O1, one GradScaler per optimizer for fp16, torch's Adam with the
    model's own learning rates, the TF32 flags the setting asks for; no checks, no logs, no reads."""

    def __init__(self, model_name: str, setting: Setting, preset: str, data: DataConfig, device: torch.device,
                 seed: int = 0):
        if setting.opt_level not in ("O0", "O1"):
            raise ValueError("plain torch.amp has no O2/O3 (fp32 master weights / half weights)")
        self.model, self.setting, self.device, self.world_size = load_model(model_name), setting, device, 1
        model = self.model
        torch.manual_seed(seed)
        eps = model.resolve_eps(setting.eps)
        self.nets = model.build(preset, eps, SpeedFlags())
        memory_format = torch.channels_last if setting.flags.channels_last else torch.contiguous_format
        for name, net in self.nets.named().items():
            setattr(self.nets, name, net.to(device, memory_format=memory_format))
        if self.nets.aux is not None:
            self.nets.aux = self.nets.aux.to(device).eval().requires_grad_(False)
        groups = model.param_groups(self.nets)
        fused = setting.flags.fused_optimizer
        self.optimizers = {name: torch.optim.Adam(net.parameters(), eps=eps.get("adam", 1e-8), fused=fused or None,
                                                  **groups[name])
                           for name, net in self.nets.named().items()}
        half = setting.opt_level == "O1"
        self.autocast = dict(device_type=device.type, dtype=HALF_DTYPES[setting.dtype], enabled=half)
        self.scalers = {name: torch.amp.GradScaler(device.type, enabled=half and setting.dtype == "fp16")
                        for name in self.optimizers}
        self.tf32 = PrecisionPolicy(setting.opt_level, setting.dtype, device.type, tf32=setting.flags.tf32).tf32_flags
        self.losses = {"discriminator": model.discriminator_loss, "generator": model.generator_loss}
        dataset = model.dataset(data, "train")
        self.loader = DataLoader(dataset, batch_size=setting.batch_size, shuffle=True, drop_last=True,
                                 generator=torch.Generator().manual_seed(seed))
        self._batches = iter(())

    def _next_batch(self) -> dict:
        batch = next(self._batches, None)
        if batch is None:
            self._batches = iter(self.loader)
            batch = next(self._batches)
        cl = self.setting.flags.channels_last
        return {k: (v.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                    if cl and torch.is_tensor(v) and v.dim() == 4 else v.to(self.device, non_blocking=True))
                for k, v in batch.items()}

    def run(self, steps: int, warmup: int = 0) -> RunRecord:
        matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
        saved = (matmul.allow_tf32, cudnn.allow_tf32)
        matmul.allow_tf32, cudnn.allow_tf32 = self.tf32
        timer, record = StepTimer(self.device), RunRecord()
        try:
            for i in range(warmup + steps):
                batch = self._next_batch()
                timer.start()
                for name in self.nets.named():
                    optimizer, scaler = self.optimizers[name], self.scalers[name]
                    optimizer.zero_grad(set_to_none=True)
                    with torch.autocast(**self.autocast):
                        loss, _ = self.losses[name](self.nets, batch)
                    scaler.scale(loss.float()).backward()
                    scaler.step(optimizer)
                    scaler.update()
                timer.stop(keep=i >= warmup)
                record.steps += 1
            record.step_times = timer.times()
        finally:
            matmul.allow_tf32, cudnn.allow_tf32 = saved
        return record


@dataclass
class Arm:
    runner: Trainer | BareLoop
    static_mib: float  # weights, optimizer state, grads held after warm-up


def _allocated_mib(device: torch.device) -> float:
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else math.nan


def build_arm(factory, device: torch.device, warmup: int) -> Arm:
    synchronize(device)
    before = _allocated_mib(device)
    runner = factory()
    runner.run(0, warmup=warmup)  # first steps: cuDNN autotuning, lazily allocated optimizer state
    synchronize(device)
    return Arm(runner, _allocated_mib(device) - before)


def timed_peak(arm: Arm, device: torch.device, steps: int) -> float:
    """The arm's own peak: static memory plus the most its steps allocated on top of what was there."""
    if device.type != "cuda":
        return math.nan
    synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    arm.runner.run(steps)
    synchronize(device)
    return arm.static_mib + (torch.cuda.max_memory_allocated(device) - base) / 2**20


def release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def benchmark_model(name: str, preset: str, shape: tuple, device: torch.device, args) -> list[dict]:
    height, width, batch, options = shape
    data = DataConfig(height=height, width=width, train_samples=max(16, 4 * batch * args.steps),
                      val_samples=4, options=options)
    timing = dict(steps=args.steps, rounds=args.rounds, warmup=0, slower_than=None)
    results = []

    def trainer(setting: Setting):
        return lambda: Trainer(load_model(name), setting, preset=preset, data=data, seed=0, device=device)

    rows = rows_for(batch)
    reference = build_arm(trainer(rows[0][1]), device, args.warmup)
    started = time.time()
    for label, setting in rows:
        row = {"model": name, "preset": preset, "resolution": f"{height}x{width}", "batch": setting.batch_size,
               "row": label, "setting": setting.label()}
        try:
            arm = reference if setting == rows[0][1] else build_arm(trainer(setting), device, args.warmup)
            if arm is not reference:
                speed = paired_profile(reference.runner, arm.runner, **timing)
                row.update(status=speed.status, reason=speed.reason, **(speed.speed.as_dict() if speed.speed else {}))
                row["ms_per_sample"] = 1000.0 / speed.throughput if speed.throughput else math.nan
            else:
                row.update(status="ok", speedup=1.0, speedup_low=1.0, speedup_high=1.0, speedup_coverage=1.0)
            if setting.opt_level in ("O0", "O1") and row["status"] == "ok":
                bare = build_arm(lambda s=setting: BareLoop(name, s, preset, data, device), device, args.warmup)
                control = paired_profile(bare.runner, arm.runner, **timing)
                if control.speed is not None:
                    # trainer time / bare time: > 1 is the trainer's overhead
                    row.update(overhead=1 / control.speed.speedup, overhead_low=1 / control.speed.high,
                               overhead_high=1 / control.speed.low)
                    if arm is reference:
                        row["ms_per_sample"] = 1000.0 / control.throughput
                del bare
            row["peak_mib"] = timed_peak(arm, device, args.steps) if row["status"] == "ok" else math.nan
            if arm is not reference:
                del arm
        except torch.cuda.OutOfMemoryError as error:  # a 2x batch may not fit: record it, go on
            row.update(status="oom", reason=str(error).splitlines()[0])
        release(device)
        results.append(row)
        print(f"  {name:<11} {label:<38} {row.get('status', '?'):<8} speedup {row.get('speedup', math.nan):5.2f}x "
              f"[{row.get('speedup_low', math.nan):.2f}, {row.get('speedup_high', math.nan):.2f}]  "
              f"trainer/bare {row.get('overhead', math.nan):5.3f}  peak {row.get('peak_mib', math.nan):8.0f} MiB  "
              f"({time.time() - started:.0f} s)", flush=True)
    default = next((r for r in results if r["row"] == "PyTorch default" and r.get("status") == "ok"), None)
    for row in results:
        if default is not None and math.isfinite(row.get("speedup", math.nan)):
            row["vs_default"] = row["speedup"] / default["speedup"]
    del reference
    release(device)
    return results


def _f(value, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def markdown(results: list[dict], device_text: str, args) -> str:
    lines = [f"Device: {device_text}. {args.rounds} interleaved rounds of {args.steps} steps per pairing, "
             f"{args.warmup} warm-up steps.", "",
             "| model | resolution | row | batch | ms/sample | speedup vs strict fp32 [interval, coverage] | "
             "vs PyTorch default | trainer / bare loop | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.get("status") != "ok":
            lines.append(f"| {r['model']} | {r['resolution']} | {r['row']} | {r['batch']} | - | {r.get('status')}: "
                         f"{r.get('reason', '')[:60]} | - | - | - |")
            continue
        speed = (f"{_f(r.get('speedup'), '.2f')}x [{_f(r.get('speedup_low'), '.2f')}, "
                 f"{_f(r.get('speedup_high'), '.2f')}, {_f(100 * r.get('speedup_coverage', math.nan), '.0f')} %]")
        overhead = (f"{_f(r.get('overhead'), '.3f')}x [{_f(r.get('overhead_low'), '.3f')}, "
                    f"{_f(r.get('overhead_high'), '.3f')}]" if "overhead" in r else "- (no torch.amp twin)")
        lines.append(f"| {r['model']} | {r['resolution']} | {r['row']} | {r['batch']} | "
                     f"{_f(r.get('ms_per_sample'), '.2f')} | {speed} | {_f(r.get('vs_default'), '.2f')}x | {overhead} | "
                     f"{_f(r.get('peak_mib'), '.0f')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny presets at 16x16: the code path in seconds")
    parser.add_argument("--models", default=",".join(PAPER), help="comma-separated (default: all five)")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed block (default 3; tiny 1)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved pairs per pairing (default 4; tiny 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per arm (default 3; tiny 1)")
    parser.add_argument("--output", type=Path, default=Path("gpu-speedups"))
    args = parser.parse_args(argv)
    args.steps = args.steps or (1 if args.tiny else 3)
    args.rounds = args.rounds or (2 if args.tiny else 4)
    args.warmup = args.warmup or (1 if args.tiny else 3)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; use --device cpu --tiny to exercise the code path", file=sys.stderr)
        return 2
    preset, shapes = ("tiny", TINY) if args.tiny else ("paper", PAPER)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(PAPER))
    if unknown:
        print(f"error: unknown model(s) {unknown}; allowed: {sorted(PAPER)}", file=sys.stderr)
        return 2
    info = describe_device(device)
    print(f"device: {info.describe()}", flush=True)
    torch.backends.cudnn.benchmark = True  # autotuned once per shape, inside each arm's warm-up
    started, results = time.time(), []
    for name in models:
        results += benchmark_model(name, preset, shapes[name], device, args)
    args.output.mkdir(parents=True, exist_ok=True)
    payload = {"device": info.as_dict(), "device_text": info.describe(), "preset": preset,
               "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup,
               "seconds": time.time() - started, "rows": results}
    (args.output / "gpu_speedups.json").write_text(json.dumps(payload, indent=1, default=str))
    table = markdown(results, info.describe(), args)
    (args.output / "gpu_speedups.md").write_text(table)
    print()
    print(table)
    print(f"{time.time() - started:.0f} s; written to {args.output.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

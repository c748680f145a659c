#!/usr/bin/env python
"""Each speed flag against its baseline, all else equal: step time, throughput and peak memory.

For every preset, one fp32 baseline trainer (O0, fixed batch, no flags) is timed against one
trainer per setting in interleaved blocks (B S, S B, ...), in this one process, after warm-up; each
block counts by its median step (robust to bursts from other jobs on a shared machine) and the
speedup is the median of the paired per-sample ratios with an order-statistic interval
(``orchestrator.measure.median_interval``). The first steps of each setting are timed apart: their excess over a steady
step is the warm-up cost (torch.compile's compilation, TorchScript's profiling runs), never part of
the step time. Peak memory: each setting in a fresh process (``orchestrator.memory``: peak RSS over
build + steps on CPU, the allocator's peak on CUDA). ``batch=auto`` rows run the batch finder
(``orchestrator.batch_finder``) under a memory budget and time the batch it found against the fixed
batch: their speedup is per sample.

    python benchmarks/speed_flags.py                       # tiny + small pix2pixHD at 64x64, < ~10 min idle
    python benchmarks/speed_flags.py --presets small --size 128 --batch 4 --steps 6 --rounds 6
    python benchmarks/speed_flags.py --only fusion=compile,channels_last --no-memory
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field

import torch

from models.base import load_model
from models import fusion
from orchestrator.batch_finder import ProbeResult, find_max_batch, trainer_probe
from orchestrator.config import DataConfig
from orchestrator.measure import median_interval
from orchestrator.memory import peak_memory_mib
from orchestrator.settings import Setting, SpeedFlags
from orchestrator.trainer import Trainer

# name -> (flags, batch is auto)
ROWS: dict[str, tuple[dict, bool]] = {
    "fusion=jit": ({"fusion": "jit"}, False),
    "fusion=compile": ({"fusion": "compile"}, False),
    "fused_optimizer": ({"fused_optimizer": True}, False),
    "checkpointing=blocks": ({"checkpointing": "blocks"}, False),
    "checkpointing=all": ({"checkpointing": "all"}, False),
    "channels_last": ({"channels_last": True}, False),
    "affinity": ({"affinity": True}, False),
    "batch=auto": ({}, True),
    "checkpointing=all+batch=auto": ({"checkpointing": "all"}, True),
}


@dataclass
class Row:
    preset: str
    name: str
    batch: int
    base_batch: int
    base_ms: float = math.nan
    ms: float = math.nan
    speedup: float = math.nan
    low: float = math.nan
    high: float = math.nan
    base_mib: float = math.nan
    mib: float = math.nan
    warmup_s: float = math.nan
    notes: list[str] = field(default_factory=list)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = ""
    try:
        text = open("/proc/cpuinfo").read()
        flags = ", ".join(f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in text)
    except OSError:
        pass
    device = (f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
              else "no GPU")
    return (f"{platform.node()}: {cpu} ({flags or 'no AVX-512'}), {os.cpu_count()} CPUs "
            f"({len(os.sched_getaffinity(0))} allowed), {torch.get_num_threads()} torch threads, {device}; "
            f"torch {torch.__version__}, Python {platform.python_version()}; "
            f"TorchScript CPU fusion: {'yes' if fusion.jit_can_fuse_on_cpu() else 'no (no LLVM in this build)'}")


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min) / {five:.1f} (5 min)"


def trainer(args, preset: str, setting: Setting) -> Trainer:
    samples = max(args.samples, setting.batch_size * 2)
    data = DataConfig(height=args.size, width=args.size, train_samples=samples, seed=0)
    return Trainer(load_model(args.model), setting, preset=preset, data=data, seed=0, device=args.device)


def warm(t: Trainer, steps: int) -> list[float]:
    """Time the first ``steps`` steps one by one (what a setting pays once)."""
    times = []
    for _ in range(steps):
        record = t.run(1)
        if record.status != "ok":
            raise RuntimeError(f"{t.setting.label()}: {record.status} {record.reason}")
        times.append(record.step_times[0])
    return times


def interleaved(base: Trainer, candidate: Trainer, steps: int, rounds: int) -> dict:
    """``rounds`` block pairs, order alternating (B S, S B, ...). Each block's *median* step time
    (not its sum) stands for it, so a burst from another job on a shared machine spoils one step,
    not a block; the pair's ratio is per sample (batch sizes may differ)."""
    ratios, base_ms, cand_ms = [], [], []
    for i in range(rounds):
        order = (base, candidate) if i % 2 == 0 else (candidate, base)
        medians = {}
        for t in order:
            record = t.run(steps)
            if record.status != "ok":
                raise RuntimeError(f"{t.setting.label()}: {record.status} {record.reason}")
            medians[id(t)] = statistics.median(record.step_times)
        b, c = medians[id(base)], medians[id(candidate)]
        base_ms.append(1000 * b)
        cand_ms.append(1000 * c)
        ratios.append((b / base.setting.batch_size) / (c / candidate.setting.batch_size))
    return {"ratios": ratios, "base_ms": statistics.median(base_ms), "ms": statistics.median(cand_ms)}


def memory(args, preset: str, setting: Setting) -> tuple[float, str]:
    if args.no_memory:
        return math.nan, ""
    data = DataConfig(height=args.size, width=args.size, train_samples=max(args.samples, setting.batch_size * 2))
    result = peak_memory_mib(args.model, {}, preset, data, setting, steps=2, device=args.device)
    return (result.mib, "") if result.status == "ok" else (math.nan, f"memory {result.status}: {result.reason}")


def auto_batch(args, preset: str, setting: Setting, budget: float, known: dict[int, float]) -> tuple[int, float, str]:
    data = DataConfig(height=args.size, width=args.size, train_samples=args.samples)
    real = trainer_probe(args.model, {}, preset, data, setting, device=args.device)

    def probe(batch: int) -> ProbeResult:
        if batch in known:  # already measured (the baseline's fixed batch): don't pay it twice
            return ProbeResult(batch, "ok", known[batch])
        return real(batch)

    search = find_max_batch(probe, start=args.batch, limit=args.batch * args.auto_limit, budget_mib=budget,
                            margin=args.margin)
    return search.batch_size, search.peak_mib, search.describe()


def run_preset(args, preset: str, rows: list[str]) -> list[Row]:
    base_setting = Setting(opt_level="O0", batch_size=args.batch)
    print(f"[{preset}] baseline: building, warming up, measuring memory ...", flush=True)
    base = trainer(args, preset, base_setting)
    base_warm = warm(base, args.warmup)
    base_mib, note = memory(args, preset, base_setting)
    budget = args.budget_mib or (base_mib * args.budget_factor if math.isfinite(base_mib) else math.nan)
    out = []

    def emit(row: Row) -> None:
        out.append(row)
        print("  " + format_row(row), flush=True)

    for name in rows:
        flags, auto = ROWS[name]
        row = Row(preset, name, args.batch, args.batch, base_mib=base_mib)
        setting = Setting(opt_level="O0", batch_size=args.batch, flags=SpeedFlags(**flags))
        print(f"[{preset}] {name} ...", flush=True)
        started = time.perf_counter()
        try:
            if auto:
                if not math.isfinite(budget):
                    row.notes.append("needs memory (drop --no-memory or pass --budget-mib)")
                    emit(row)
                    continue
                batch, row.mib, described = auto_batch(args, preset, setting, budget,
                                                       {args.batch: base_mib} if not flags else {})
                row.notes.append(described.replace("batch ", "found ", 1))
                if batch < 1:
                    emit(row)
                    continue
                row.batch = batch
                setting = setting.model_copy(update={"batch_size": batch})
            compile_before = sum(fusion.compile_seconds().values())
            candidate = trainer(args, preset, setting)
            first = warm(candidate, args.warmup)
            timing = interleaved(base, candidate, args.steps, args.rounds)
        except Exception as error:  # noqa: BLE001 - a broken setting is a row, not a crash
            row.notes.append(f"{type(error).__name__}: {str(error).splitlines()[0][:120]}")
            emit(row)
            continue
        row.base_ms, row.ms = timing["base_ms"], timing["ms"]
        speed = median_interval(timing["ratios"])
        row.speedup, row.low, row.high = speed.speedup, speed.low, speed.high
        row.warmup_s = sum(first) - len(first) * row.ms / 1000
        info = candidate.speed_info
        if flags.get("fusion") == "compile":
            row.notes.append(f"compile first calls {sum(fusion.compile_seconds().values()) - compile_before:.1f} s "
                             "(fwd), peak RSS includes the compiler")
        if flags.get("fusion"):
            row.notes.append(f"fallbacks: {info['fusion_fallbacks']}")
        if flags.get("fused_optimizer"):
            row.notes.append(f"Adam impl: {info['optimizer_impl_generator']}")
        if flags.get("affinity"):
            row.notes.append(info["affinity"])
        if not auto:
            row.mib, note = memory(args, preset, setting)
            if note:
                row.notes.append(note)
        row.notes.append(f"{time.perf_counter() - started:.0f} s")
        emit(row)
        del candidate
    print(f"[{preset}] baseline first {len(base_warm)} steps {sum(base_warm):.2f} s; budget for batch=auto "
          f"{fmt(budget, '.0f')} MiB", flush=True)
    return out


def fmt(value: float, spec: str) -> str:
    return format(value, spec) if math.isfinite(value) else "-"


HEADER = (f"{'preset':<7}{'setting':<30}{'batch':>7}{'base ms':>9}{'ms':>9}{'speedup [95% CI]':>22}"
          f"{'base MiB':>10}{'MiB':>9}{'mem':>7}{'warm-up s':>11}  notes")


def format_row(r: Row) -> str:
    batch = f"{r.base_batch}" if r.batch == r.base_batch else f"{r.base_batch}->{r.batch}"
    ci = f"{fmt(r.speedup, '.2f')}x [{fmt(r.low, '.2f')}, {fmt(r.high, '.2f')}]" if math.isfinite(r.speedup) else "-"
    mem = f"{r.mib / r.base_mib:.2f}x" if math.isfinite(r.mib) and math.isfinite(r.base_mib) and r.base_mib > 0 else "-"
    return (f"{r.preset:<7}{r.name:<30}{batch:>7}{fmt(r.base_ms, '.1f'):>9}{fmt(r.ms, '.1f'):>9}{ci:>22}"
            f"{fmt(r.base_mib, '.0f'):>10}{fmt(r.mib, '.0f'):>9}{mem:>7}{fmt(r.warmup_s, '.1f'):>11}  "
            f"{'; '.join(r.notes)}")


def print_table(rows: list[Row]) -> None:
    print(HEADER)
    print("-" * len(HEADER))
    for r in rows:
        print(format_row(r))


def micro(args) -> None:
    """Pointwise chains alone: eager vs jit vs compile, forward + backward on ``args.micro_elements``."""
    names = [n for n in args.micro.split(",") if n]
    if not names:
        return
    n = args.micro_elements
    print(f"\npointwise chains alone, {n:,} fp32 elements, forward+backward, median of {args.micro_reps} "
          "interleaved calls (compile: after its first call)")
    print(f"{'chain':<14}{'eager us':>10}{'jit us':>10}{'compile us':>12}{'jit x':>8}{'compile x':>11}{'compile s':>11}")
    for name in names:
        x = torch.randn(n, requires_grad=True)
        inputs = {
            "gelu_tanh": (x,), "lsgan_real": (x,), "leaky_relu": (x, 0.2), "l2_normalize": (x, 1e-12),
            "l1_mean": (x, torch.randn(n)),
            "pconv_renorm": (x.view(1, 1, -1), torch.randint(0, 10, (1, 1, n)).float(), None, 9.0, 1e-6),
        }[name]
        fns = {mode: fusion.fused(name, mode) for mode in fusion.MODES}

        def call(fn, inputs=inputs):
            start = time.perf_counter()
            out = fn(*inputs)
            out = out[0] if isinstance(out, tuple) else out
            out.sum().backward()
            return time.perf_counter() - start

        began = time.perf_counter()
        call(fns["compile"])
        compile_s = time.perf_counter() - began
        for fn in fns.values():
            call(fn)
        times = {mode: [] for mode in fns}
        for _ in range(args.micro_reps):
            for mode, fn in fns.items():
                times[mode].append(call(fn))
        med = {mode: statistics.median(v) * 1e6 for mode, v in times.items()}
        print(f"{name:<14}{med['none']:>10.0f}{med['jit']:>10.0f}{med['compile']:>12.0f}"
              f"{med['none'] / med['jit']:>7.2f}x{med['none'] / med['compile']:>10.2f}x{compile_s:>11.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pix2pixhd")
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--size", type=int, default=64, help="image height and width")
    parser.add_argument("--batch", type=int, default=2, help="the fixed batch size")
    parser.add_argument("--samples", type=int, default=16, help="synthetic training samples")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per block")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved baseline/setting block pairs")
    parser.add_argument("--warmup", type=int, default=2, help="first steps timed apart (compile happens here)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(ROWS)}")
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory measurements")
    parser.add_argument("--budget-mib", type=float, default=None,
                        help="memory budget for batch=auto (default: --budget-factor x the baseline's peak)")
    parser.add_argument("--budget-factor", type=float, default=2.0)
    parser.add_argument("--margin", type=float, default=0.1, help="batch finder safety margin")
    parser.add_argument("--auto-limit", type=int, default=8, help="batch=auto searches up to this x --batch")
    parser.add_argument("--micro", default="gelu_tanh,lsgan_real,pconv_renorm",
                        help="pointwise chains to time alone ('' to skip)")
    parser.add_argument("--micro-elements", type=int, default=1 << 20)
    parser.add_argument("--micro-reps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    rows = [r.strip() for r in args.only.split(",") if r.strip()] or list(ROWS)
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown row(s) {unknown}; allowed: {', '.join(ROWS)}")

    started = time.perf_counter()
    print(f"machine: {machine()}")
    print(f"start: {load()}", flush=True)
    results: list[Row] = []
    for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
        results += run_preset(args, preset, rows)
    print(f"\n{args.model} at {args.size}x{args.size}, fp32 (O0), fixed batch {args.batch}; {args.rounds} "
          f"interleaved block pairs of {args.steps} steps after {args.warmup} warm-up steps. ms = median step; "
          "speedup = median over pairs of baseline/setting time per sample (>1 is faster), mem = setting/baseline peak "
          f"({'not measured' if args.no_memory else 'fresh process each'}), warm-up s = first steps' "
          "excess over a steady step (compile time; not in ms)")
    print(f"machine: {machine()}")
    print_table(results)
    micro(args)
    print(f"\nend: {load()}; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

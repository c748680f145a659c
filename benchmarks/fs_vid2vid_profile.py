#!/usr/bin/env python
"""Where few-shot vid2vid's training step spends its time, per precision: op-level profile and step time.

For each setting (default: fp32 = O0, O1-bf16, O1-fp16) and each model variant (default: this
checkout's ``fs_vid2vid``; ``--model LABEL=path/to/file.py:Class`` adds another, e.g. an older copy
of the file, so before/after run in one process), one ``Trainer`` with the same data and seed.

* **step time**: all trainers are timed in interleaved rounds (order reversed every other round),
  each round ``--steps`` steps after warm-up and counting by its median step; a setting's speedup
  is the median over rounds of (fp32's step / its step) for the same model, paired within a round.
* **profile**: ``torch.profiler`` over ``--profile-steps`` training steps (D step + G step with
  backward, one fixed batch) per trainer, grouped by op and the dtype of its first tensor input:
  the top ops by self time, the share of self time in fp32 / half / other ops, ops per step, and
  casts per step (``aten::_to_copy`` of tensors, by direction; 0-dim casts of Python scalars are
  counted apart: a CUDA kernel reads those from the host, no cast kernel). The optimizer's ops are
  counted apart (CPU runs single-tensor Adam, CUDA foreach). ``--sites`` names the functions in
  ``models/`` whose code issues each cast (Python stacks; slower).
* ``--fake``: no timing, no data; the D and G losses with backward on *fake* tensors
  (``FakeTensorMode``: shapes and dtypes only, no arithmetic) at any preset and size, e.g. the
  paper preset at 256x256 in about a minute: ops per step, every cast by source line with the
  bytes it moves, and the bytes of the tensors autograd keeps for the backward pass (activation
  memory, the larger phase). CPU autocast's op lists (not CUDA's) decide the dtypes.

    python benchmarks/fs_vid2vid_profile.py                                  # small preset, 64x64
    python benchmarks/fs_vid2vid_profile.py --preset paper --size 32 --settings fp32,O1-bf16
    python benchmarks/fs_vid2vid_profile.py --fake --preset paper --size 256
    git show HEAD~1:models/fs_vid2vid.py > /tmp/fs_before.py
    python benchmarks/fs_vid2vid_profile.py --model before=/tmp/fs_before.py:FewShotVid2Vid

What a CPU can show about a GPU: ops and casts per step, the code that issues them, the bytes they
move, host reads (each one a device sync on a GPU) and fp32 islands are the same on both (up to the
autocast op lists, which differ in places: CPU autocast runs e.g. ``reflection_pad2d`` in fp32,
CUDA's does not; CUDA's returns ``softmax`` in fp32, CPU's does not). Time shares are not: fp16 is
emulated on this CPU (10-75x slower per op) and bf16 runs on AVX-512 units whose speed against fp32
depends on the shape. On a CUDA device (``--device cuda``) the profile adds device time per op.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's models/ and orchestrator/, not an installed copy

from models.base import load_model  # noqa: E402
from orchestrator.config import DataConfig  # noqa: E402
from orchestrator.settings import Setting, SpeedFlags  # noqa: E402
from orchestrator.trainer import Trainer, synchronize  # noqa: E402

HALF = {"c10::Half": "fp16", "c10::BFloat16": "bf16"}
FLOAT = {"float": "fp32", "double": "fp64"}
NOT_TENSORS = ("Scalar", "ScalarList", "TensorList", "GenericList", "")


def parse_setting(text: str, batch: int) -> Setting:
    """``fp32`` | ``O1-bf16`` | ``O2-fp16`` ... -> Setting."""
    if text in ("fp32", "O0"):
        return Setting(opt_level="O0", batch_size=batch)
    level, dtype = text.split("-")
    return Setting(opt_level=level, dtype=dtype, batch_size=batch)


def parse_option(text: str):
    key, value = text.split("=", 1)
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False, "none": None}.get(value.lower(), value)


def first_dtype(event) -> str:
    """The dtype class of an op's first tensor input: fp32 | fp16 | bf16 | fp64 | other."""
    for dtype in event.input_dtypes or ():
        if dtype in HALF:
            return HALF[dtype]
        if dtype in FLOAT:
            return FLOAT[dtype]
        if dtype not in NOT_TENSORS:
            return "other"
    return "other"


def short(dtype: str) -> str:
    return HALF.get(dtype) or FLOAT.get(dtype) or dtype or "?"


# --------------------------------------------------------------------------- real profile


@dataclass
class Profile:
    steps: int
    ops: int = 0  # model aten ops called from Python or autograd (top-level dispatches)
    scalar_casts: int = 0  # casts of 0-dim tensors (wrapped Python scalars)
    optimizer_ops: int = 0  # inside ``Optimizer.step``
    self_us: dict[str, float] = field(default_factory=lambda: collections.defaultdict(float))  # by dtype class
    by_op: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # (op, dtype) -> [us, count]
    casts: collections.Counter = field(default_factory=collections.Counter)  # "src->dst" -> count
    cast_us: float = 0.0
    sites: collections.Counter = field(default_factory=collections.Counter)  # site -> casts
    device_us: dict[str, float] = field(default_factory=dict)


def _site(event) -> str:
    """Where a cast was issued: the autograd node that ran it (backward pass), else the innermost
    function in the project's ``models/`` or ``orchestrator/`` (Python frames are profiler events
    with ``with_stack``; the line is the function's first), plus the op autocast cast it for."""
    innermost, op = "", ""
    parent = event.cpu_parent
    while parent is not None:
        name = parent.name
        if name.startswith("autograd::engine::evaluate_function:"):
            return "backward: " + name.split(":", 4)[-1].strip()
        if name.startswith("aten::") and not op and name not in ("aten::to", "aten::_to_copy"):
            op = name  # autocast casts an op's inputs inside that op's profiler event
        if ("models/" in name or "orchestrator/" in name) and "site-packages" not in name:
            return name + (f" (autocast, for {op})" if op else "")
        if not innermost and ".py(" in name:
            innermost = name
        parent = parent.cpu_parent
    return innermost or "(no Python frame)"


def _in_optimizer(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("Optimizer."):
            return True
        parent = parent.cpu_parent
    return False


def profile_steps(trainer: Trainer, steps: int, sites: bool) -> Profile:
    batch = trainer._next_batch()  # one fixed batch: the profile is of the step, not of data generation
    trainer.train_step(batch)  # warm
    activities = [ProfilerActivity.CPU]
    if trainer.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    synchronize(trainer.device)
    with profile(activities=activities, record_shapes=True, with_stack=sites) as prof:
        for _ in range(steps):
            trainer.train_step(batch)
        synchronize(trainer.device)
    out = Profile(steps)
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        top_level = parent is None or not parent.name.startswith("aten::")
        if _in_optimizer(event):  # apart: not the model's, and different on CUDA
            out.optimizer_ops += top_level
            continue
        if event.name == "aten::_to_copy" and event.input_shapes and event.input_shapes[0] == []:
            out.scalar_casts += 1
            continue
        out.ops += top_level
        kind = first_dtype(event)
        out.self_us[kind] += event.self_cpu_time_total
        slot = out.by_op.setdefault((event.name, kind), [0.0, 0])
        slot[0] += event.self_cpu_time_total
        slot[1] += 1
        if event.name == "aten::_to_copy":
            copy = next((c for c in event.cpu_children if c.name == "aten::copy_"), None)
            dtypes = copy.input_dtypes if copy is not None else ["?", "?"]
            out.casts[f"{short(dtypes[1])}->{short(dtypes[0])}"] += 1
            out.cast_us += event.cpu_time_total
            if sites:
                out.sites[_site(event)] += 1
    if trainer.device.type == "cuda":
        for item in prof.key_averages():
            if item.device_time_total > 0:
                out.device_us[item.key] = item.device_time_total
    return out


def print_profile(name: str, prof: Profile, top: int, sites: bool) -> None:
    per = 1.0 / prof.steps
    total = sum(prof.self_us.values())
    shares = ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(prof.self_us.items(), key=lambda kv: -kv[1]))
    casts = sum(prof.casts.values()) * per
    directions = ", ".join(f"{k} {v * per:.0f}" for k, v in prof.casts.most_common())
    print(f"\n== {name}: {total * per / 1e3:.0f} ms op self time/step (profiled; forward, losses, backward), "
          f"{prof.ops * per:.0f} ops/step")
    print(f"   self time by input dtype: {shares}")
    print(f"   casts/step: {casts:.0f} ({directions or 'none'}), {prof.cast_us * per / 1e3:.1f} ms/step in casts; "
          f"{prof.scalar_casts * per:.0f} scalar casts; optimizer {prof.optimizer_ops * per:.0f} ops/step")
    print(f"   {'op':34s} {'dtype':6s} {'ms/step':>8s} {'share':>6s} {'calls/step':>10s}")
    for (op, kind), (us, count) in sorted(prof.by_op.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"   {op:34s} {kind:6s} {us * per / 1e3:8.1f} {us / total:6.1%} {count * per:10.0f}")
    if prof.device_us:
        print("   top device time:")
        for op, us in sorted(prof.device_us.items(), key=lambda kv: -kv[1])[:top]:
            print(f"   {op:50s} {us * per / 1e3:8.2f} ms/step")
    if sites:
        print("   cast sites (casts/step):")
        for site, count in prof.sites.most_common(top):
            print(f"   {count * per:6.0f}  {site}")


def timed_rounds(trainers: dict[str, Trainer], steps: int, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Median step seconds per round, rounds interleaved over the trainers."""
    for trainer in trainers.values():
        trainer.run(warmup)
    medians: dict[str, list[float]] = {name: [] for name in trainers}
    for r in range(rounds):
        order = list(trainers) if r % 2 == 0 else list(trainers)[::-1]
        for name in order:
            record = trainers[name].run(steps)
            if record.status != "ok":
                raise RuntimeError(f"{name}: {record.status} ({record.reason})")
            medians[name].append(statistics.median(record.step_times))
    return medians


# --------------------------------------------------------------------------- fake-tensor count


def fake_counts(spec: str, options: dict, preset: str, size: int, batch: int, shots: int, frames: int,
                dtype: torch.dtype | None, top: int) -> None:
    """Ops and casts of one D step + one G step (losses and backward) on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()
            self.casts, self.bytes = collections.Counter(), collections.Counter()
            self.kinds = collections.Counter()  # weight / frozen weight / activation casts

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.namespace == "aten":
                self.ops[func.overloadpacket.__name__] += 1
            if (func is torch.ops.aten._to_copy.default and isinstance(out, torch.Tensor) and out.dim() > 0
                    and out.dtype != args[0].dtype):
                site = "(backward, or torch internals)"
                for frame in reversed(traceback.extract_stack()):
                    path = Path(frame.filename)
                    if path.is_relative_to(ROOT / "models") or path.is_relative_to(ROOT / "orchestrator") or (
                            not path.is_relative_to(ROOT) and "site-packages" not in frame.filename
                            and path.parent != Path(__file__).parent and "<" not in frame.filename):
                        where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
                        site = f"{where}:{frame.lineno} {frame.line.strip()[:60]}"
                        break
                src = args[0]
                kind = ("activation" if not src.is_leaf or not isinstance(src, nn.Parameter) else
                        "weight" if src.requires_grad else "frozen weight")
                self.kinds[kind] += 1
                key = (site, f"{short_dtype(src.dtype)}->{short_dtype(out.dtype)}")
                self.casts[key] += 1
                self.bytes[key] += out.numel() * (out.element_size() + args[0].element_size())
            return out

    views = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze", "slice",
             "select", "detach", "alias", "as_strided", "split", "split_with_sizes", "unbind", "chunk", "empty",
             "new_empty_strided", "_reshape_alias", "lift_fresh"}
    model = load_model(spec, **options)
    with FakeTensorMode():
        nets = model.build(preset, model.resolve_eps({}), SpeedFlags())
        n, k, t = batch, shots, frames
        label_nc = model.arch(preset)["label_nc"]
        fake_batch = {"ref_images": torch.randn(n, k, 3, size, size), "ref_labels": torch.randn(n, k, label_nc, size, size),
                      "labels": torch.randn(n, t, label_nc, size, size), "frames": torch.randn(n, t, 3, size, size),
                      "flow": torch.randn(n, t - 1, 2, size, size), "flow_mask": torch.randn(n, t - 1, 1, size, size)}
        count = Count()
        saved: dict[int, int] = {}  # tensors kept for the backward pass (activation memory), by identity
        peak_saved = 0

        def pack(tensor):
            saved.setdefault(id(tensor), tensor.numel() * tensor.element_size())
            return tensor

        with count:
            for loss_fn in (model.discriminator_loss, model.generator_loss):  # the trainer's phases
                saved.clear()
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                        loss, _ = loss_fn(nets, fake_batch)
                peak_saved = max(peak_saved, sum(saved.values()))
                loss.float().backward()
    kernels = sum(c for op, c in count.ops.items() if op not in views)
    label = "fp32" if dtype is None else f"autocast {short_dtype(dtype)}"
    print(f"\n== {spec} {label}: {sum(count.ops.values())} aten ops/step ({kernels} not views), "
          f"{sum(count.casts.values())} casts moving {sum(count.bytes.values()) / 1e9:.2f} GB "
          f"({', '.join(f'{k} {v}' for k, v in count.kinds.most_common()) or 'none'}); "
          f"{peak_saved / 1e9:.2f} GB saved for backward (largest phase)")
    for key, casts in sorted(count.casts.items(), key=lambda kv: -count.bytes[kv[0]])[:top]:
        print(f"   {casts:4d} {count.bytes[key] / 1e6:9.1f} MB  {key[1]:10s} {key[0]}")


def short_dtype(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--size", type=int, default=64, help="frame height and width")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--shots", type=int, default=2)
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--option", action="append", default=[], help="preset override KEY=VALUE (repeatable)")
    parser.add_argument("--model", action="append", default=[],
                        help="LABEL=SPEC: another model variant (registry name or path/to/file.py:Class)")
    parser.add_argument("--settings", default="fp32,O1-bf16,O1-fp16")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--profile-steps", type=int, default=1)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--sites", action="store_true", help="name the models/ functions that issue casts")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--fake", action="store_true", help="count ops and casts on fake tensors only")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    options = dict(parse_option(o) for o in args.option)
    variants = {"fs_vid2vid": "fs_vid2vid", **dict(m.split("=", 1) for m in args.model)}
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    print(f"fs_vid2vid preset={args.preset} {options or ''} {args.size}x{args.size} batch={args.batch} "
          f"K={args.shots} T={args.frames} device={args.device} torch={torch.__version__} "
          f"threads={torch.get_num_threads()} models={variants}")

    if args.fake:
        for spec in variants.values():
            for name in settings:
                setting = parse_setting(name, args.batch)
                dtype = None if setting.opt_level == "O0" else {"fp16": torch.float16, "bf16": torch.bfloat16}[setting.dtype]
                fake_counts(spec, options, args.preset, args.size, args.batch, args.shots, args.frames, dtype, args.top)
        return

    data = DataConfig(height=args.size, width=args.size, train_samples=max(4, args.batch),
                      options={"shots": args.shots, "frames": args.frames})
    trainers = {f"{label}:{name}": Trainer(load_model(spec, **options), parse_setting(name, args.batch),
                                           preset=args.preset, data=data, seed=0, device=args.device)
                for label, spec in variants.items() for name in settings}

    if not args.no_timing:
        start = time.perf_counter()
        medians = timed_rounds(trainers, args.steps, args.rounds, args.warmup)
        print(f"\nstep time, {args.rounds} interleaved rounds x {args.steps} steps "
              f"({time.perf_counter() - start:.0f} s); speedup = median over rounds of fp32/setting, same model:")
        for key, values in medians.items():
            label = key.split(":")[0]
            ref = medians.get(f"{label}:fp32")
            ratio = (f"  {statistics.median(a / b for a, b in zip(ref, values)):.2f}x vs fp32"
                     if ref is not None else "")
            spread = f"[{min(values) * 1e3:.0f}-{max(values) * 1e3:.0f}]"
            print(f"  {key:28s} {statistics.median(values) * 1e3:8.1f} ms/step {spread:>14s}{ratio}")
        if len(variants) > 1:
            first = next(iter(variants))
            for name in settings:
                base = medians[f"{first}:{name}"]
                for label in list(variants)[1:]:
                    other = medians[f"{label}:{name}"]
                    ratio = statistics.median(a / b for a, b in zip(other, base))
                    print(f"  {name}: {label} step / {first} step = {ratio:.2f} (median over rounds)")

    if not args.no_profile:
        for key, trainer in trainers.items():
            print_profile(key, profile_steps(trainer, args.profile_steps, args.sites), args.top, args.sites)


if __name__ == "__main__":
    main()

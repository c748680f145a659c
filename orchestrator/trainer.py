"""The GAN training loop: discriminator step, then generator step, under one precision policy.

Read it top to bottom: ``Trainer.__init__`` builds everything a run needs, ``run`` trains a number
of steps and returns their timings, ``evaluate`` measures quality on the validation split, and
``save``/``load`` make a restarted worker continue exactly where it stopped.

Nothing here imports Ray or MLflow: distributed training only needs ``torch.distributed`` to be
initialised (Ray Train does it) and an optional ``prepare_model`` callable (Ray Train's
``ray.train.torch.prepare_model``); without them it is a plain single-process loop.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from models.base import Batch, GANModel, Nets
from orchestrator import affinity as cpu_affinity
from models import fusion
from orchestrator.config import DataConfig
from orchestrator.precision import PrecisionPolicy
from orchestrator.settings import Setting

CHECKPOINT_FILE = "trainer.pt"


DEFAULT_LOG_EVERY = 50  # steps between host reads of losses and divergence counters


@dataclass
class RunRecord:
    """What one call to ``Trainer.run`` measured."""

    status: str = "ok"  # ok | diverged | oom
    reason: str = ""
    steps: int = 0
    step_times: list[float] = field(default_factory=list)  # seconds per step, after warm-up
    losses: list[dict[str, float]] = field(default_factory=list)  # per step, read every log_every steps
    host_reads: int = 0  # times this run waited to read values off the device

    @property
    def seconds(self) -> float:
        return float(sum(self.step_times))


def is_oom(error: BaseException) -> bool:
    """Out of memory: CUDA's OutOfMemoryError, Python's MemoryError, or an allocator's
    'out of memory' error on other devices. The project's one test for it."""
    oom_type = getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(error, (MemoryError, oom_type)) or "out of memory" in str(error).lower()


def default_device() -> torch.device:
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for queued device work so wall-clock step times are true (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Per-step times without waiting for the device between steps.

    CUDA: an event pair around each step in the stream, resolved after one synchronisation at the
    end of the block (``times``). CPU: the wall clock around each step (CPU work is synchronous)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._pairs: list = []
        self._start = None

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self, keep: bool) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            if keep:
                self._pairs.append((self._start, end))
        elif keep:
            self._pairs.append((self._start, time.perf_counter()))

    def times(self) -> list[float]:
        """Seconds per kept step (CUDA: waits for the last event)."""
        if self.cuda:
            if self._pairs:
                self._pairs[-1][1].synchronize()
            return [start.elapsed_time(end) / 1000.0 for start, end in self._pairs]
        return [end - start for start, end in self._pairs]


def _wrap_ddp(module: nn.Module) -> nn.Module:
    """Default ``prepare_model``: DDP when a process group with more than one rank exists."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = next(module.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)
    return module


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


class _ResumableSampler(torch.utils.data.Sampler):
    """A DistributedSampler (also fine for one process) that can start an epoch part-way through,
    so a restored checkpoint sees exactly the batches it would have seen."""

    def __init__(self, dataset, rank: int, world_size: int, seed: int):
        self.inner = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                        seed=seed, drop_last=True)
        self.skip = 0

    def set_position(self, epoch: int, skip: int) -> None:
        self.inner.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        indices = list(self.inner)[self.skip:]
        self.skip = 0
        return iter(indices)

    def __len__(self) -> int:
        return len(self.inner) - self.skip


class Trainer:
    """Trains one model with one ``Setting``. Rank/world size come from torch.distributed if it is
    initialised; ``prepare_model`` wraps each network for DDP (default: plain torch DDP)."""

    def __init__(
        self,
        model: GANModel,
        setting: Setting,
        *,
        preset: str,
        data: DataConfig,
        seed: int = 0,
        device: torch.device | str | None = None,
        prepare_model: Callable[[nn.Module], nn.Module] | None = None,
        log_every: int = DEFAULT_LOG_EVERY,
    ):
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}")
        self.model, self.setting, self.seed = model, setting, seed
        self.log_every = log_every
        self.device = torch.device(device) if device is not None else default_device()
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        self.world_size = dist.get_world_size() if distributed else 1
        # affinity flag: decided now, applied around each run() and undone after it, so settings
        # interleaved in one process (stage-1 profiling) don't inherit each other's pinning
        self.affinity = cpu_affinity.plan_affinity(self.device) if setting.flags.affinity else None

        # networks: build in fp32 on CPU with a fixed seed (same init on every rank), then move,
        # cast to the precision policy, and wrap for DDP
        torch.manual_seed(seed)
        eps = model.resolve_eps(setting.eps)
        nets = model.build(preset, eps, setting.flags)
        self.policy = PrecisionPolicy(
            setting.opt_level, setting.dtype, device_type=self.device.type,
            loss_names=tuple(nets.named()), tf32=setting.flags.tf32,
            # a pass over the weights every step costs a few % on small models; bad weights also
            # show up as non-finite losses on the next step, so every 10th is enough
            param_check_interval=10,
        )
        memory_format = torch.channels_last if setting.flags.channels_last else torch.contiguous_format
        wrap = prepare_model or _wrap_ddp
        for name, net in nets.named().items():
            net = self.policy.prepare_network(net.to(self.device, memory_format=memory_format))
            setattr(nets, name, wrap(net))
        if nets.aux is not None:
            nets.aux = self.policy.prepare_network(nets.aux.to(self.device).eval().requires_grad_(False))
        self.nets: Nets = nets

        # one optimizer per network, each with its own loss scaler inside the policy
        groups = model.param_groups(nets)
        self.optimizers = {
            name: self.policy.make_optimizer(
                name, unwrap(net).parameters(), eps=eps.get("adam", 1e-8),
                fused=setting.flags.fused_optimizer, **groups[name],
            )
            for name, net in nets.named().items()
        }
        self.losses: dict[str, Callable[[Nets, Batch], tuple[torch.Tensor, dict]]] = {
            "discriminator": model.discriminator_loss,
            "generator": model.generator_loss,
        }

        # data: every rank sees its own shard; epochs reshuffle deterministically from the seed
        self.train_set = model.dataset(data, "train")
        per_rank = len(self.train_set) // self.world_size
        if per_rank < setting.batch_size:
            raise ValueError(
                f"batch_size {setting.batch_size} is larger than the {per_rank} training samples per worker "
                f"({len(self.train_set)} samples over {self.world_size} workers): raise data.train_samples"
            )
        self.sampler = _ResumableSampler(self.train_set, self.rank, self.world_size, seed)
        # own generator: starting a new epoch's iterator must not consume the global RNG that the
        # model's losses draw from, or a resumed run would diverge from an uninterrupted one
        self.loader = DataLoader(self.train_set, batch_size=setting.batch_size, sampler=self.sampler,
                                 drop_last=True, num_workers=0, generator=torch.Generator().manual_seed(seed))
        self.data = data
        self.step = 0  # optimizer steps taken (all networks)
        self.epoch = 0
        self.batch_in_epoch = 0
        self._batches: Iterator[Batch] | None = None

    # ------------------------------------------------------------------ data

    def _to_device(self, batch: Batch) -> Batch:
        out = {}
        for key, value in batch.items():
            if torch.is_tensor(value):
                value = value.to(self.device, non_blocking=True)
                if value.is_floating_point() and key not in self.model.fp32_batch_keys:
                    value = value.to(self.policy.input_dtype)
                if self.setting.flags.channels_last and value.dim() == 4:
                    value = value.contiguous(memory_format=torch.channels_last)
            out[key] = value
        return out

    def _next_batch(self) -> Batch:
        while True:
            if self._batches is None:
                self.sampler.set_position(self.epoch, self.batch_in_epoch * self.setting.batch_size)
                self._batches = iter(self.loader)
            batch = next(self._batches, None)
            if batch is not None:
                self.batch_in_epoch += 1
                return self._to_device(batch)
            self.epoch, self.batch_in_epoch, self._batches = self.epoch + 1, 0, None

    # ------------------------------------------------------------------ training

    def train_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One D step (if the model has a discriminator) then one G step. Never waits for the
        device: the returned logs are device tensors (``run`` reads them every ``log_every`` steps)."""
        logs: dict[str, torch.Tensor] = {}
        for name in self.nets.named():
            optimizer = self.optimizers[name]
            optimizer.zero_grad(set_to_none=True)  # drop grads another phase left on this network
            with self.policy.autocast():
                loss, phase_logs = self.losses[name](self.nets, batch)
            # every rank runs every phase's backward (DDP collectives), diverged or not: divergence
            # is read and agreed on every log_every steps
            skipped = self.policy.step(name, loss, optimizer)
            logs[f"loss_{name}"] = loss.detach()
            logs[f"skipped_{name}"] = skipped
            logs.update(phase_logs)
        self.step += 1
        return logs

    def run(self, steps: int, warmup: int = 0,
            on_step: Callable[[int, dict[str, torch.Tensor]], None] | None = None) -> RunRecord:
        """Train ``warmup + steps`` steps; time the last ``steps``.

        The device is waited for only every ``log_every`` steps and at the end (one batched read of
        every step's logs and the precision policy's divergence counters; under DDP the ranks agree
        on divergence there). Step times come from CUDA events (wall clock on CPU). Divergence and
        out-of-memory end the run early with that status instead of raising, so a caller can
        record them and go on. ``on_step(step, logs)`` gets each step's logs as device tensors.
        With the affinity flag the process is pinned meanwhile."""
        with cpu_affinity.pinned(self.affinity):
            return self._run(steps, warmup, on_step)

    def _run(self, steps: int, warmup: int,
             on_step: Callable[[int, dict[str, torch.Tensor]], None] | None) -> RunRecord:
        record = RunRecord()
        for net in self.nets.named().values():
            net.train()
        timer = StepTimer(self.device)
        pending: list[dict[str, torch.Tensor]] = []
        total = warmup + steps
        for i in range(total):
            try:
                batch = self._next_batch()
                timer.start()
                logs = self.train_step(batch)
                timer.stop(keep=i >= warmup)
            except Exception as error:  # noqa: BLE001 - only OOM is recoverable, the rest re-raises
                if not is_oom(error):
                    raise
                record.status, record.reason = "oom", str(error).splitlines()[0]
                self._release_memory()
                break
            pending.append(logs)
            record.steps += 1
            if on_step is not None:
                on_step(self.step, logs)
            if len(pending) >= self.log_every or i == total - 1:
                problem = self._read_back(pending, record)
                pending = []
                if problem:
                    record.status, record.reason = "diverged", problem
                    break
        if pending and record.status == "oom":
            self._read_back(pending, record)
        record.step_times = timer.times()[: max(0, record.steps - warmup)]
        return record

    def _read_back(self, pending: list[dict[str, torch.Tensor]], record: RunRecord) -> str:
        """Read the pending steps' logs and the divergence counters in one transfer; returns why
        training diverged (on this rank or another), or ""."""
        tensors: list[torch.Tensor] = []
        for logs in pending:
            tensors += [v.detach().float().reshape(()) for v in logs.values() if torch.is_tensor(v)]
        health = self.policy.health(self.device)
        diverged = health[:1].clone()
        if self.world_size > 1:
            dist.all_reduce(diverged, op=dist.ReduceOp.MAX)
        values = torch.cat([torch.stack(tensors).to(self.device) if tensors else health[:0], health,
                            diverged]).tolist()
        record.host_reads += 1
        at = 0
        for logs in pending:
            host: dict[str, float] = {}
            for key, value in logs.items():
                if torch.is_tensor(value):
                    host[key] = values[at]
                    at += 1
                else:
                    host[key] = float(value)
            record.losses.append(host)
        problem = self.policy.judge(values[at:-1])
        if problem is not None:
            return str(problem)
        return "diverged on another worker" if values[-1] > 0 else ""

    def _release_memory(self) -> None:
        self._batches = None
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def speed_info(self) -> dict[str, Any]:
        """What the speed flags resolved to here, flat, for a trial to log: the optimizer
        implementation per network (fused | foreach | default), fusion fallbacks and compile
        seconds so far, and the affinity plan."""
        flags = self.setting.flags
        info: dict[str, Any] = {f"optimizer_impl_{n}": impl for n, impl in self.policy.optimizer_impl.items()}
        if flags.fusion != "none":
            info.update(fusion.status(flags.fusion))
        info["affinity"] = self.affinity.describe() if self.affinity is not None else "off"
        return info

    @property
    def samples_seen(self) -> int:
        """Training samples consumed across all workers."""
        return self.step * self.setting.batch_size * self.world_size

    # ------------------------------------------------------------------ quality

    @torch.no_grad()
    def generate(self, batches: int | None = None, batch_size: int = 8) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(fake, real) fp32 pairs on the validation split, produced in the setting's own precision."""
        val_set = self.model.dataset(self.data, "val")
        sampler = DistributedSampler(val_set, num_replicas=self.world_size, rank=self.rank, shuffle=False)
        loader = DataLoader(val_set, batch_size=batch_size, sampler=sampler)
        for net in self.nets.named().values():
            net.eval()
        try:
            for i, batch in enumerate(loader):
                if batches is not None and i >= batches:
                    break
                with self.policy.autocast():
                    fake, real = self.model.samples(self.nets, self._to_device(batch))
                yield fake.float().clamp(-1, 1), real.float()
        finally:
            for net in self.nets.named().values():
                net.train()

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {
            "setting": self.setting.model_dump(mode="json"),
            "nets": {name: unwrap(net).state_dict() for name, net in self.nets.named().items()},
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "precision": self.policy.state_dict(),
            "position": {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                         "data_seed": self.sampler.inner.seed},
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = Setting.model_validate(state["setting"])
        if saved != self.setting:
            raise ValueError(f"checkpoint was written for setting {saved.label()!r}, not {self.setting.label()!r}")
        for name, net in self.nets.named().items():
            unwrap(net).load_state_dict(state["nets"][name])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        self.policy.load_state_dict(state["precision"])
        pos = state["position"]
        self.step, self.epoch, self.batch_in_epoch = pos["step"], pos["epoch"], pos["batch_in_epoch"]
        self.sampler.inner.seed = pos["data_seed"]
        self._batches = None
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def save(self, directory: str | os.PathLike) -> Path:
        """Write a checkpoint (rank 0 only under DDP; every rank holds the same weights)."""
        path = Path(directory) / CHECKPOINT_FILE
        if self.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(self.state_dict(), tmp)
            tmp.replace(path)  # atomic: a crash mid-write never leaves a torn checkpoint
        return path

    def load(self, directory: str | os.PathLike) -> None:
        state = torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        self.load_state_dict(state)


def throughput(record: RunRecord, batch_size: int, world_size: int = 1) -> float:
    """Training samples per second over the timed steps (all workers)."""
    if not record.step_times:
        return math.nan
    return len(record.step_times) * batch_size * world_size / record.seconds


"""CPU affinity for a training process: the ``affinity`` speed flag.

Pins the process to the cores nearest its GPU (read from sysfs, else NVML) or, on a CPU node, to
its share of the cores, and sets torch's intra-op thread count to the number of cores it keeps. Rules:

* **Never widen.** The result is always a subset of ``os.sched_getaffinity(0)`` as found: whatever
  restricted it (taskset, a cgroup cpuset, Ray, a launcher) keeps its restriction.
* **Don't fight Ray.** Ray does not pin cores; it tells a worker how many CPUs it holds through
  ``OMP_NUM_THREADS`` (set for every task/actor unless the user set it) and Ray Train / torchrun
  tell it its ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE``. The share is that many cores, the
  ``LOCAL_RANK``-th slice of the allowed set (an explicit ``cpus=`` wins over the environment). An
  allowed set smaller than all local workers' shares together is taken as already being this
  process's own (someone pinned it) and only the thread count is adjusted.
* **Cooperate with other groups on the node.** Concurrent trials each have a local rank 0, so their
  slices would collide. Processes using this module record the cores they hold in a small claims
  file (``$AMP_STUDY_CPU_CLAIMS``, default ``<tmp>/amp-study-cpu-claims.json``, ``off`` disables it);
  a slice that overlaps another live process's claim moves to free cores when there are enough.
* **Cores in topology order**: per socket, first one hardware thread of every physical core, then
  their SMT siblings; so a slice of N cores gets N physical cores of one socket where possible.

GPU nodes: the slice is taken inside the cores of the GPU's NUMA node (intersected with the
allowed set, never widened). Those cores come from, in order:

1. **sysfs** (primary, no dependency): ``/sys/bus/pci/devices/<bus id>/local_cpulist`` (a Linux
   CPU list such as ``0-15,32-47``), the bus id (``0000:17:00.0``, lower-case hex) from torch's
   device properties (``pci_domain_id``/``pci_bus_id``/``pci_device_id``), so
   ``CUDA_VISIBLE_DEVICES`` remapping cannot pick the wrong GPU;
2. **NVML** (fallback, only when sysfs has no answer and ``pynvml`` is installed; the project does
   not depend on it): ``nvmlDeviceGetCpuAffinity`` for the same bus id;
3. otherwise this worker's **share** of the allowed cores, as on a CPU node.

``AffinityPlan.source`` says which one decided (``sysfs`` | ``nvml`` | ``share``, or ``unchanged``
when the plan is what the process already had); its notes name the GPU-local cores found and why a
path was not used (file missing, pynvml not installed, ...), so a trial's logged affinity
(``describe()``, the trainer's ``speed_info["affinity"]``) tells which path it took.

Nothing here imports Ray. ``plan_affinity`` only computes; ``pinned(plan)`` applies for the
duration of a ``with`` block and restores the previous CPU set and thread count (the trainer uses
it around ``run`` so interleaved settings in one process don't inherit each other's pinning);
``apply_affinity`` applies for good (a user's own loop).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

CLAIMS_ENV = "AMP_STUDY_CPU_CLAIMS"
PCI_SYSFS = "/sys/bus/pci/devices"


@dataclass
class AffinityPlan:
    """What pinning this process means here; ``describe()`` is one line for logs."""

    cpus: list[int]  # the cores to pin to (subset of cpus_before)
    threads: int  # torch intra-op threads to use
    cpus_before: list[int]
    threads_before: int
    source: str  # "sysfs" | "nvml" (GPU-local cores) | "share" | "unchanged"
    reason: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def changes_cpus(self) -> bool:
        return sorted(self.cpus) != sorted(self.cpus_before)

    def describe(self) -> str:
        text = (f"{self.source}: cpus {_ranges(self.cpus_before)} -> {_ranges(self.cpus)}, "
                f"threads {self.threads_before} -> {self.threads}")
        extra = "; ".join(filter(None, [self.reason, *self.notes]))
        return f"{text} ({extra})" if extra else text

    def as_dict(self) -> dict:
        return {**asdict(self), "describe": self.describe()}


# --------------------------------------------------------------------------- topology


def _read_int(path: Path, default: int) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return default


def topology_order(cpus: Sequence[int], sysfs: str | os.PathLike = "/sys/devices/system/cpu") -> list[int]:
    """``cpus`` ordered socket by socket; inside a socket, first one hardware thread of each physical
    core, then the second threads, ... (unknown topology: numeric order)."""
    root = Path(sysfs)
    keyed = []
    seen: dict[tuple[int, int], int] = {}  # (package, core) -> threads of it seen so far
    for cpu in sorted(cpus):
        topo = root / f"cpu{cpu}" / "topology"
        package = _read_int(topo / "physical_package_id", 0)
        core = _read_int(topo / "core_id", cpu)
        sibling = seen.get((package, core), 0)
        seen[(package, core)] = sibling + 1
        keyed.append(((package, sibling, core, cpu), cpu))
    return [cpu for _, cpu in sorted(keyed)]


def mask_to_cpus(words: Sequence[int], bits_per_word: int = 64) -> set[int]:
    """CPU ids set in an NVML affinity mask (array of unsigned longs, word 0 = CPUs 0..63)."""
    return {w * bits_per_word + b for w, word in enumerate(words) for b in range(bits_per_word)
            if (int(word) >> b) & 1}


def _ranges(cpus: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out, items = [], sorted(cpus)
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        out.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(out) or "-"


# --------------------------------------------------------------------------- choosing cores


def choose_share(ordered: Sequence[int], threads: int, local_rank: int, local_world_size: int,
                 claimed: set[int] = frozenset()) -> tuple[list[int], str]:
    """The cores for one local worker: (cores, note). ``ordered`` is its candidate set in topology
    order. Pure function: the policy described in the module docstring."""
    ordered = list(ordered)
    threads = max(1, min(threads, len(ordered)))
    slots = len(ordered) // threads
    if local_world_size > 1 and slots < local_world_size:
        if len(ordered) <= threads:
            return ordered, "allowed set is this worker's own already"
        # oversubscribed: not enough cores for every local worker's share; wrap around
        note = f"{local_world_size} local workers x {threads} threads > {len(ordered)} cores: shares overlap"
    else:
        note = ""
    start = (local_rank % max(slots, 1)) * threads
    share = ordered[start:start + threads]
    if claimed and set(share) & claimed:
        free = [c for c in ordered if c not in claimed]
        if len(free) >= threads:
            return free[:threads], "moved off cores claimed by another process"
        note = "; ".join(filter(None, [note, "cores shared with another process (not enough free)"]))
    return share, note


def parse_cpulist(text: str) -> set[int]:
    """CPU ids of a Linux CPU list as sysfs writes it: ``"0-15,32-47"``, ``"3"``, ``""`` (none).
    Raises ValueError on anything else."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        low, dash, high = part.partition("-")
        first, last = int(low), int(high) if dash else int(low)
        if first < 0 or last < first:
            raise ValueError(f"bad CPU range {part!r}")
        cpus.update(range(first, last + 1))
    return cpus


def gpu_bus_id(index: int) -> str | None:
    """PCI address of CUDA device ``index`` as sysfs names it (``0000:17:00.0``, lower-case hex;
    GPUs are function 0), from torch's device properties; None when torch does not report it."""
    props = torch.cuda.get_device_properties(index)
    if not hasattr(props, "pci_bus_id"):
        return None
    return f"{getattr(props, 'pci_domain_id', 0):04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"


def _sysfs_gpu_cpus(bus_id: str, pci_sysfs: str | os.PathLike) -> tuple[set[int] | None, str]:
    """The GPU's NUMA-local cores from ``<pci_sysfs>/<bus_id>/local_cpulist`` (None and why when
    the file is missing, unreadable or empty)."""
    path = Path(pci_sysfs) / bus_id / "local_cpulist"
    try:
        text = path.read_text()
    except OSError as error:
        return None, f"sysfs: no {path} ({error.strerror or type(error).__name__})"
    try:
        cpus = parse_cpulist(text)
    except ValueError:
        return None, f"sysfs: cannot parse {path} ({text.strip()[:40]!r})"
    if not cpus:
        return None, f"sysfs: {path} lists no cores"
    return cpus, f"GPU {bus_id} local cpus {_ranges(sorted(cpus))} from sysfs"


def _nvml_gpu_cpus(bus_id: str | None, index: int) -> tuple[set[int] | None, str]:
    """The cores NVML reports as nearest the GPU (None and why when NVML cannot say). Optional:
    ``pynvml`` is not a dependency of the project."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None, "NVML: pynvml not installed"
    try:
        pynvml.nvmlInit()
        try:
            if bus_id is not None:
                handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)
            else:  # old torch: map the visible index through CUDA_VISIBLE_DEVICES
                visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
                entry = visible[index] if index < len(visible) else str(index)
                handle = (pynvml.nvmlDeviceGetHandleByUUID(entry) if entry.startswith(("GPU-", "MIG-"))
                          else pynvml.nvmlDeviceGetHandleByIndex(int(entry)))
            words = ((os.cpu_count() or 1) + 63) // 64  # unsigned longs covering every CPU id
            cpus = mask_to_cpus(list(pynvml.nvmlDeviceGetCpuAffinity(handle, words)))
        finally:
            pynvml.nvmlShutdown()
    except Exception as error:  # noqa: BLE001 - NVML errors must not stop training
        return None, f"NVML failed ({type(error).__name__}: {error})"
    if not cpus:
        return None, "NVML: empty CPU affinity mask"
    return cpus, f"GPU {bus_id or index} local cpus {_ranges(sorted(cpus))} from NVML"


def _gpu_cpus(device: torch.device, pci_sysfs: str | os.PathLike) -> tuple[set[int] | None, str, list[str]]:
    """(cores nearest ``device`` or None, the path that answered: "sysfs" | "nvml" | "share", notes
    saying what each path found). sysfs first; NVML only when sysfs has no answer."""
    notes: list[str] = []
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        bus_id = gpu_bus_id(index)
    except Exception as error:  # noqa: BLE001 - no bus id is a reason to fall back, not to fail
        return None, "share", [f"GPU unknown to torch ({type(error).__name__}: {error}): using this worker's share"]
    if bus_id is None:
        notes.append("sysfs: torch reports no PCI bus id for this GPU")
    else:
        cpus, note = _sysfs_gpu_cpus(bus_id, pci_sysfs)
        notes.append(note)
        if cpus:
            return cpus, "sysfs", notes
    cpus, note = _nvml_gpu_cpus(bus_id, index)
    notes.append(note)
    if cpus:
        return cpus, "nvml", notes
    notes.append("GPU-local cores unknown: using this worker's share of the node")
    return None, "share", notes


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    try:
        return int(float(value)) if value else None
    except ValueError:
        return None


# --------------------------------------------------------------------------- claims between processes


def _claims_path() -> Path | None:
    value = os.environ.get(CLAIMS_ENV, "").strip()
    if value.lower() == "off":
        return None
    return Path(value) if value else Path(tempfile.gettempdir()) / "amp-study-cpu-claims.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _claims() -> Iterator[dict[str, list[int]] | None]:
    """The claims table under an exclusive lock, live processes only; written back on exit."""
    path = _claims_path()
    if path is None:
        yield None
        return
    try:
        handle = open(path, "a+")
    except OSError:
        yield None
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            handle.seek(0)
            try:
                table = json.loads(handle.read() or "{}")
            except ValueError:
                table = {}
            table = {pid: cpus for pid, cpus in table.items() if pid.isdigit() and _alive(int(pid))}
            yield table
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps(table))
            handle.flush()
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _others_claims() -> set[int]:
    with _claims() as table:
        if table is None:
            return set()
        me = str(os.getpid())
        return {c for pid, cpus in table.items() if pid != me for c in cpus}


def _set_claim(cpus: list[int] | None) -> None:
    with _claims() as table:
        if table is None:
            return
        if cpus:
            table[str(os.getpid())] = sorted(cpus)
        else:
            table.pop(str(os.getpid()), None)


# --------------------------------------------------------------------------- public API


def plan_affinity(device: torch.device | str | None = None, *, cpus: int | None = None,
                  local_rank: int | None = None, local_world_size: int | None = None,
                  sysfs: str | os.PathLike = "/sys/devices/system/cpu",
                  pci_sysfs: str | os.PathLike = PCI_SYSFS) -> AffinityPlan:
    """Which cores and how many threads this process should use (nothing is applied).

    ``cpus``: how many CPUs this worker holds (default: ``OMP_NUM_THREADS``, which Ray sets to the
    worker's CPU count, else the allowed cores divided among ``LOCAL_WORLD_SIZE`` workers).
    ``local_rank`` / ``local_world_size`` default to ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE``.
    ``sysfs`` is the CPU topology root, ``pci_sysfs`` the PCI devices root (tests pass fake trees)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    before = sorted(os.sched_getaffinity(0))
    threads_before = torch.get_num_threads()
    rank = local_rank if local_rank is not None else (_env_int("LOCAL_RANK") or 0)
    world = local_world_size if local_world_size is not None else (_env_int("LOCAL_WORLD_SIZE") or 1)
    world = max(1, world)
    notes: list[str] = []
    if cpus is not None:
        wanted, why = int(cpus), f"{cpus} cpus given"
    elif _env_int("OMP_NUM_THREADS"):
        wanted, why = _env_int("OMP_NUM_THREADS"), f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS'].strip()}"
    else:
        wanted, why = max(1, len(before) // world), f"{len(before)} allowed cores / {world} local workers"
    why += f", local rank {rank}/{world}"

    candidates, source = before, "share"
    if device.type == "cuda":
        near, near_source, gpu_notes = _gpu_cpus(device, pci_sysfs)
        notes += gpu_notes
        if near is not None and not near & set(before):
            notes.append(f"GPU-local cores {_ranges(sorted(near))} are all outside the allowed set: ignored")
        elif near is not None:  # never widen: only the GPU-local cores this process may use
            candidates, source = sorted(near & set(before)), near_source
    ordered = topology_order(candidates, sysfs)
    chosen, note = choose_share(ordered, wanted, rank, world, _others_claims())
    notes.append(note)
    assert set(chosen) <= set(before), "affinity must never widen the allowed CPU set"
    if sorted(chosen) == before and len(chosen) == threads_before:
        source = "unchanged"
    return AffinityPlan(cpus=sorted(chosen), threads=len(chosen), cpus_before=before,
                        threads_before=threads_before, source=source, reason=why,
                        notes=[n for n in notes if n])


def _apply(cpus: Sequence[int], threads: int) -> None:
    os.sched_setaffinity(0, set(cpus))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def apply_affinity(plan: AffinityPlan | None = None, **kwargs) -> AffinityPlan:
    """Pin this process for good (``plan`` or ``plan_affinity(**kwargs)``); returns the plan."""
    plan = plan or plan_affinity(**kwargs)
    _apply(plan.cpus, plan.threads)
    _set_claim(plan.cpus if plan.changes_cpus else None)
    return plan


@contextlib.contextmanager
def pinned(plan: AffinityPlan | None) -> Iterator[AffinityPlan | None]:
    """Apply ``plan`` inside the block, then restore the CPU set and thread count found on entry.
    ``None`` does nothing (the flag is off)."""
    if plan is None:
        yield None
        return
    saved_cpus, saved_threads = os.sched_getaffinity(0), torch.get_num_threads()
    cpus = [c for c in plan.cpus if c in saved_cpus] or sorted(saved_cpus)  # never widen
    _apply(cpus, min(plan.threads, len(cpus)))
    if plan.changes_cpus:
        _set_claim(cpus)
    try:
        yield plan
    finally:
        _apply(sorted(saved_cpus), saved_threads)
        if plan.changes_cpus:
            _set_claim(None)

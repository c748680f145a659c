"""The doctor: a model's fp16/bf16 hazards and per-layer cost, from a few instrumented steps.

``python -m orchestrator doctor --model NAME|file.py:Class`` builds the model with the project's
:class:`~orchestrator.trainer.Trainer` twice from the same seed, once in strict fp32 (the
reference) and once in the chosen precision, and looks at them four ways:

1. **Paired forward** (same weights, same batch, same random draws): every module's output in the
   chosen precision against fp32 (relative error), its largest magnitude against the dtype's
   largest number (headroom in powers of two), and the share of its fp32 values the half dtype
   flushes to zero or keeps only as subnormals. For norm layers, how much of the half-precision
   rounding of their input their eps lets through to their unit-scale output (channels that are
   nearly constant are divided by ~sqrt(eps)). The backward of the same pass gives every
   parameter's exact gradient, from which the share that underflows at the loss scale in use follows.
2. **Instrumented training steps** in the chosen precision (the model's losses and
   ``PrecisionPolicy.step``, driven here phase by phase; the paired pass is step 0): a dispatch
   mode sees every ATen op with the dtypes it really ran in, and records where the first inf/NaN
   appears (op, module, phase: forward, loss, backward or optimizer, and the Python line), every
   small constant added in half precision (the model's eps sites, found by value) with the
   magnitudes it is added to, and every large factor applied to a half-precision product in one
   step. With the profiler on, the last training step runs under it instead.
3. **Constants**: each eps site's value in the dtype (vanishes, subnormal or exact), which modules
   hold it (found by building the model once more with each site nudged to a marker value) and in
   which dtype it was actually applied.
4. **Per-layer breakdown** (``torch.profiler``): forward and backward time per module and the dtype
   its kernels ran in, fp32 and the chosen precision side by side.

Each hazard becomes a verdict with a concrete action: raise eps site S to V (and the values a study
should search, checked by re-running the doctor with them), keep module M in fp32, apply a factor
in two steps, or prefer bf16 (and why). :func:`expand_auto_eps` runs it for ``search.eps: auto``.

The doctor is a diagnostic: it reads tensors on the host as often as it likes. Nothing here imports
Ray or MLflow at module level (the optional MLflow run goes through ``orchestrator.tracking``).
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import default_collate
from torch.utils.weak import WeakIdKeyDictionary

from models.base import GANModel, Nets, load_model
from orchestrator.config import DataConfig, StudyConfig
from orchestrator.precision import HALF_DTYPES, NORM_TYPES, Diverged
from orchestrator.settings import Setting
from orchestrator.trainer import Trainer, unwrap

PHASES = ("forward", "loss", "backward", "optimizer")  # where a non-finite value can first appear
SAMPLE = 65536  # elements kept per tensor for paired comparisons (a fixed stride through it)
# A norm layer divides each channel by sqrt(var + eps): a channel that is nearly constant (var far
# below its mean squared) but not damped by eps rescales the half-precision rounding of its input
# (std ~ |x| * resolution / sqrt(12)) to a visible share of a unit-scale output. This much noise,
# injected by one layer, is a hazard (in fp16: few-shot vid2vid's label encoder at the published
# structure with eps 1e-5, the seeds' hazard, 3.6 %; vid2vid tiny 1 %; the other models at most
# 0.15 %) ...
NORM_NOISE_HAZARD = 0.02
NORM_NOISE_TARGET = 0.002  # ... and a suggested eps brings it below this (a well-conditioned layer's)
GRAD_FLUSH_WARN = 0.10  # share of a parameter's nonzero gradient lost to underflow: warning
GRAD_FLUSH_HAZARD = 0.50  # ... and hazard
EPS_CANDIDATE_MAX = 1e-2  # scalars below this added to a tensor are treated as eps guards
_TAG = "amp_doctor_module"  # autograd-node metadata key: the module whose forward created the node
_ROOT = Path(__file__).resolve().parents[1]
_TORCH_DIR = os.path.dirname(torch.__file__)


# --------------------------------------------------------------------------- facts about a dtype


@dataclass(frozen=True)
class DtypeFacts:
    """The numbers a hazard is judged against."""

    name: str  # fp16 | bf16 | fp32
    dtype: torch.dtype
    max: float  # largest finite number
    tiny: float  # smallest normal number
    subnormal: float  # smallest positive (subnormal) number
    resolution: float  # distance from 1 to the next number

    @classmethod
    def of(cls, name: str) -> "DtypeFacts":
        dtype = HALF_DTYPES.get(name, torch.float32)
        info = torch.finfo(dtype)
        smallest = float(torch.nextafter(torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype)))
        return cls(name, dtype, float(info.max), float(info.tiny), smallest, float(info.eps))

    def rounds(self, value: float) -> float:
        """``value`` stored in this dtype, read back."""
        return float(torch.tensor(value, dtype=self.dtype))

    def kept(self, value: float) -> str:
        """How the dtype keeps ``value``: 'normal', 'subnormal (...)', 'rounds to 0' or 'overflows'."""
        stored = self.rounds(value)
        if value != 0 and stored == 0:
            return "rounds to 0"
        if math.isinf(stored):
            return "overflows"
        if abs(stored) < self.tiny:
            return f"subnormal ({stored:.3g})"
        return "normal"

    def headroom(self, max_abs: float) -> float:
        """Powers of two between ``max_abs`` and the largest number (negative: it overflows)."""
        if not max_abs > 0 or not math.isfinite(max_abs):
            return math.inf if max_abs == 0 else -math.inf
        return math.log2(self.max / max_abs)

    def safe_eps(self) -> float:
        """The smallest power of ten the dtype keeps within 10 % (fp16: 1e-6, the seeds' fix)."""
        exponent = math.floor(math.log10(self.subnormal))
        while True:
            value = 10.0**exponent
            if abs(self.rounds(value) - value) <= 0.1 * value:
                return float(f"{value:g}")
            exponent += 1


# --------------------------------------------------------------------------- results


@dataclass
class Finding:
    """One verdict: what is wrong, where, the evidence, and what to do."""

    severity: str  # hazard | warning
    kind: str  # nonfinite | eps_vanishes | factor | overflow | norm_noise | grad_underflow | loss_scale
    title: str
    phase: str = ""
    module: str | None = None
    site: str | None = None  # the model's eps site, when one is involved
    callsite: str | None = None  # file:line (function)
    evidence: list[str] = field(default_factory=list)
    action: str = ""
    suggested: list[float] = field(default_factory=list)  # eps values a study should search
    verified: str = ""  # how the suggested value was checked
    bf16: str = ""  # whether bf16 avoids it, and why


@dataclass
class ModuleStats:
    name: str
    type: str
    network: str
    calls: int = 0
    dtypes: set = field(default_factory=set)  # output dtypes in the chosen precision
    in_dtypes: set = field(default_factory=set)  # incoming dtypes (before the policy's casts)
    max_abs: float = 0.0  # largest finite output magnitude, chosen precision
    numel: int = 0
    nonfinite: int = 0
    zeros: int = 0
    subnormal: int = 0  # outputs stored as subnormals of their own (half) dtype
    ref_max_abs: float = 0.0  # fp32 reference (paired forward)
    ref_nonzero: int = 0
    ref_flushed: int = 0  # nonzero fp32 values the half dtype rounds to 0
    ref_subnormal: int = 0  # nonzero fp32 values below the half dtype's normal range
    error: float | None = None  # worst relative error of the output vs fp32 (paired forward)
    error_in: float | None = None  # relative error of its input in that call
    error_rms: float | None = None  # root mean square of the output's difference in that call
    ref_rms: float | None = None  # root mean square of the fp32 output in that call
    eps: float | None = None  # a norm layer's eps
    site: str | None = None  # the eps site it holds, if any
    noise_gain: float | None = None  # largest rms/sqrt(var + eps) over its channels (fp32 reference)
    eps_needed: float | None = None  # the eps that brings its injected noise below NORM_NOISE_TARGET

    @property
    def out_dtype(self) -> str:
        return "/".join(sorted(_short_dtype(d) for d in self.dtypes)) or "-"

    @property
    def is_half(self) -> bool:
        return any(d in HALF_DTYPES.values() for d in self.dtypes)

    @property
    def is_half_input(self) -> bool:
        """Its input arrived in half precision (unknown: assume so)."""
        return not self.in_dtypes or any(d in HALF_DTYPES.values() for d in self.in_dtypes)

    def row(self, facts: DtypeFacts) -> dict[str, Any]:
        magnitude = max(self.ref_max_abs, self.max_abs)
        return {
            "module": self.name, "type": self.type, "network": self.network, "calls": self.calls,
            "out_dtype": self.out_dtype, "in_dtype": "/".join(sorted(_short_dtype(d) for d in self.in_dtypes)),
            "max_abs": magnitude, "headroom_pow2": facts.headroom(magnitude) if self.is_half else None,
            "nonfinite_share": self.nonfinite / self.numel if self.numel else 0.0,
            "zero_share": self.zeros / self.numel if self.numel else 0.0,
            "subnormal_share": self.subnormal / self.numel if self.numel else 0.0,
            "flushed_share": (self.ref_flushed / self.ref_nonzero if self.ref_nonzero and self.is_half else 0.0),
            "below_normal_share": (self.ref_subnormal / self.ref_nonzero if self.ref_nonzero and self.is_half else 0.0),
            "rel_error": self.error, "rel_error_in": self.error_in, "error_rms": self.error_rms,
            "ref_rms": self.ref_rms, "eps": self.eps, "site": self.site,
            "noise_gain": self.noise_gain, "eps_needed": self.eps_needed,
            "injected_noise": (self.noise_gain * facts.resolution / math.sqrt(12)
                               if self.noise_gain is not None and self.is_half_input else None),
        }


def _short_dtype(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}.get(
        dtype, str(dtype).replace("torch.", ""))


def _relpath(filename: str) -> str:
    path = Path(filename)
    for base in (Path.cwd(), _ROOT):
        try:
            return str(path.resolve().relative_to(base))
        except ValueError:
            continue
    return str(path)


def _callsite(depth: int = 2) -> str:
    """The first frame outside torch and this file: ``file:line (function)``."""
    frame = sys._getframe(depth)
    here = __file__
    while frame is not None:
        name = frame.f_code.co_filename
        if not (name.startswith(_TORCH_DIR) or name == here or name.startswith("<") or "contextlib" in name):
            return f"{_relpath(name)}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "?"


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in nested tuples/lists/dicts."""
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _floats(value: Any) -> list[torch.Tensor]:
    return [t for t in _tensors(value) if t.is_floating_point()]


def _sample(t: torch.Tensor) -> torch.Tensor:
    """Up to SAMPLE elements at a fixed stride, fp32 on the CPU (the same in both runs)."""
    flat = t.detach().reshape(-1)
    stride = max(1, flat.numel() // SAMPLE)
    return flat[::stride][:SAMPLE].to(device="cpu", dtype=torch.float32, copy=True)  # a copy: in-place ops follow


def _finite(t: torch.Tensor) -> bool:
    """Every element finite. One fp32 sum: any inf or NaN makes it non-finite; only when it is
    (or a huge tensor overflowed it) the exact elementwise check runs."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t).all())


def _rel_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    if value.shape != reference.shape:
        return math.nan
    if not _finite(value):
        return math.inf
    denominator = float(reference.norm())
    difference = float((value - reference).norm())
    if denominator == 0:
        return 0.0 if difference == 0 else math.inf
    return difference / denominator


# --------------------------------------------------------------------------- module hooks


class _Watch:
    """Hooks on every module of the networks: the module stack (for the op tracer), autograd-node
    tags (so a backward op knows its module), output statistics, and the paired captures."""

    def __init__(self, nets: Nets, facts: DtypeFacts):
        self.facts = facts
        self.stack: list[str] = []
        self.boundaries: list[set[int]] = []
        self.phase = "idle"  # idle | loss | backward | optimizer
        self.busy = False  # the hooks' own tensor work (the op tracer ignores it)
        self.network = ""
        self.step = -1
        self.collect = False  # module output statistics (instrumented steps, paired forward)
        self.capture: dict | None = None  # reference: key -> (input sample, output sample)
        self.compare: dict | None = None  # candidate: compare against this reference capture
        self.calls: Counter = Counter()
        self.stats: dict[str, ModuleStats] = {}
        self.handles: list = []
        self.modules: dict[str, nn.Module] = {}
        for net_name, net in (("discriminator", nets.discriminator), ("generator", nets.generator),
                              ("aux", nets.aux)):
            if net is None:
                continue
            for sub, module in unwrap(net).named_modules():
                name = f"{net_name}.{sub}" if sub else net_name
                self.modules[name] = module
                self.stats[name] = ModuleStats(name, type(module).__name__, net_name)
                if isinstance(module, NORM_TYPES) or "Norm" in type(module).__name__:
                    eps = getattr(module, "eps", None)
                    self.stats[name].eps = float(eps) if isinstance(eps, (int, float)) else None
                self.handles.append(module.register_forward_pre_hook(self._pre(name), prepend=True, with_kwargs=True))
                self.handles.append(module.register_forward_hook(self._post(name), with_kwargs=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def begin(self, step: int, network: str) -> None:
        self.step, self.network, self.phase = step, network, "loss"
        self.stack, self.boundaries = [], []

    def current_phase(self) -> str:
        if self.phase == "loss":
            return "forward" if self.stack else "loss"
        return self.phase

    def current_module(self) -> str | None:
        if self.phase in ("backward", "optimizer"):
            node = torch._C._current_autograd_node()
            if node is not None:
                return node.metadata.get(_TAG)
        return self.stack[-1] if self.stack else None

    # hooks ------------------------------------------------------------------

    def _pre(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self.phase == "idle":
                return
            self.stack.append(name)
            inputs = _floats((args, kwargs))
            self.boundaries.append({id(t.grad_fn) for t in inputs if t.grad_fn is not None})
            if inputs and (self.collect or self.compare is not None) and self.phase == "loss":
                self.stats[name].in_dtypes.add(inputs[0].dtype)

        return hook

    def _post(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self.phase == "idle" or not self.stack:
                return
            self.busy = True
            try:
                self._after(name, module, args, kwargs, output)
            finally:
                self.busy = False

        return hook

    def _after(self, name: str, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Statistics, captures and comparisons of one module call (after its forward)."""
        self.stack.pop()
        boundary = self.boundaries.pop() if self.boundaries else set()
        outputs = _floats(output)
        self._tag(outputs, name, boundary)
        if self.phase != "loss" or not outputs:
            return  # a checkpointed block recomputed in the backward pass: no new statistics
        if self.collect:
            self._stats(name, outputs)
        if self.capture is not None or self.compare is not None:
            key = (self.network, name, self.calls[(self.network, name)])
            self.calls[(self.network, name)] += 1
            inputs = _floats((args, kwargs))
            out_sample = _sample(outputs[0])
            in_sample = _sample(inputs[0]) if inputs else None
            if self.capture is not None:
                self.capture[key] = (in_sample, out_sample)
                self._reference_stats(name, outputs)
                if inputs and self.stats[name].eps is not None:
                    self._norm_noise(name, module, inputs[0])
            elif key in self.compare:
                ref_in, ref_out = self.compare[key]
                error = _rel_error(out_sample, ref_out)
                error_in = (_rel_error(in_sample, ref_in)
                            if in_sample is not None and ref_in is not None else None)
                stats = self.stats[name]
                if stats.error is None or (math.isfinite(error) and error > stats.error) or (
                        not math.isfinite(error) and math.isfinite(stats.error)):
                    stats.error, stats.error_in = error, error_in
                    stats.ref_rms = float(ref_out.pow(2).mean().sqrt()) if ref_out.numel() else 0.0
                    stats.error_rms = (float((out_sample - ref_out).pow(2).mean().sqrt())
                                       if out_sample.shape == ref_out.shape else math.nan)

    @staticmethod
    def _tag(outputs: list[torch.Tensor], name: str, boundary: set[int]) -> None:
        """Mark the autograd nodes this module's forward created (stop at its inputs' nodes and at
        nodes an inner module already marked)."""
        todo = [t.grad_fn for t in outputs if t.grad_fn is not None]
        while todo:
            node = todo.pop()
            if node is None or id(node) in boundary:
                continue
            metadata = node.metadata
            if _TAG in metadata:
                continue
            metadata[_TAG] = name
            todo.extend(next_node for next_node, _ in node.next_functions if next_node is not None)

    def _stats(self, name: str, outputs: list[torch.Tensor]) -> None:
        """Output dtype, largest finite magnitude (whole tensor); shares of non-finite, zero and
        subnormal values (from the fixed-stride sample, scaled to the tensor)."""
        stats = self.stats[name]
        stats.calls += 1
        for t in outputs:
            t = t.detach()
            if not t.numel():
                continue
            stats.dtypes.add(t.dtype)
            finite = _finite(t)
            if finite:
                largest = float(t.abs().max())
            else:
                ok = torch.isfinite(t)
                largest = float(t.abs().masked_fill(~ok, 0).max())
            sample = t.reshape(-1)[:: max(1, t.numel() // SAMPLE)][:SAMPLE]
            magnitude = sample.abs()
            tiny = torch.finfo(t.dtype).tiny
            values = torch.stack([(~torch.isfinite(sample)).sum() if not finite else torch.zeros((), dtype=torch.long),
                                  (sample == 0).sum(), ((magnitude > 0) & (magnitude < tiny)).sum()]).tolist()
            scale = t.numel() / sample.numel()
            stats.max_abs = max(stats.max_abs, largest)
            stats.nonfinite += round(values[0] * scale)
            stats.zeros += round(values[1] * scale)
            stats.subnormal += round(values[2] * scale)
            stats.numel += t.numel()

    def _norm_noise(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        """How much a half-precision rounding of this norm's (exact, fp32) input shows in its
        unit-scale output, per normalised group: rms / sqrt(var + eps); and the eps that keeps it
        below NORM_NOISE_TARGET."""
        x = x.detach().float()
        eps = float(module.eps)
        if isinstance(module, nn.modules.instancenorm._InstanceNorm) and x.dim() >= 3:
            groups = x.flatten(2)  # (N, C, spatial)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and x.dim() >= 2 and module.training:
            groups = x.transpose(0, 1).flatten(1).unsqueeze(0)  # (1, C, N * spatial)
        elif isinstance(module, nn.GroupNorm) and x.dim() >= 2:
            groups = x.reshape(x.shape[0], module.num_groups, -1)
        else:
            return
        count = groups.shape[-1]
        mean, var = groups.mean(-1), groups.var(-1, unbiased=False)
        # the rounding errors of the inputs (std ~ unit * rms) pass minus their mean (one degree of
        # freedom) and, where var dominates eps (the output's scale is then fixed), minus their
        # component along the output (another): a pair of values normalises to +-1 whatever their
        # rounding. A group whose fp32 values are all equal rounds to equal values: no noise at all.
        passed = (count - 1 - var / (var + eps)).clamp_min(0) / count
        rounding = ((mean.square() + var) * passed).masked_fill(var == 0, 0)
        gain = float((rounding.sqrt() / (var + eps).sqrt()).max())
        unit = self.facts.resolution / math.sqrt(12)  # std of a rounding error, relative
        needed = float((rounding * (unit / NORM_NOISE_TARGET) ** 2 - var).max().clamp_min(0))
        stats = self.stats[name]
        stats.noise_gain = max(stats.noise_gain or 0.0, gain)
        stats.eps_needed = max(stats.eps_needed or 0.0, needed)

    def _reference_stats(self, name: str, outputs: list[torch.Tensor]) -> None:
        """fp32 values the half dtype would flush to zero or keep only as subnormals."""
        stats = self.stats[name]
        for t in outputs:
            if not t.numel():
                continue
            largest = float(t.detach().abs().max())
            if math.isfinite(largest):
                stats.ref_max_abs = max(stats.ref_max_abs, largest)
            magnitude = _sample(t).abs()  # shares from the fixed-stride sample
            nonzero = magnitude > 0
            values = torch.stack([nonzero.sum(), (nonzero & (magnitude < self.facts.subnormal / 2)).sum(),
                                  (nonzero & (magnitude < self.facts.tiny)).sum()]).tolist()
            stats.ref_nonzero += int(values[0])
            stats.ref_flushed += int(values[1])
            stats.ref_subnormal += int(values[2])


# --------------------------------------------------------------------------- the op tracer


_SKIP_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_", "set_",
             "detach", "lift_fresh", "_local_scalar_dense", "zeros_like", "ones_like", "zero_",
             "_to_dense", "alias"}
_PASS_THROUGH = {"_to_copy", "clone", "contiguous", "expand", "repeat", "sqrt", "_unsafe_view"}
_CONSUMERS = {"reciprocal", "rsqrt", "div", "log", "pow"}
_PRODUCTS = {"bmm", "mm", "baddbmm", "addmm", "addbmm", "matmul", "dot", "mv", "sum"}
_EPS_OPS = {"add", "add_", "clamp_min", "clamp_min_", "clamp", "clamp_", "_foreach_add", "_foreach_add_"}


@dataclass
class EpsUse:
    """A small constant added to (or used as a floor of) a tensor, aggregated per place."""

    value: float
    dtype: str
    kept: str  # how that dtype keeps the value
    phase: str
    module: str | None
    callsite: str
    op: str
    site: str | None
    count: int = 0
    operand_zero_share: float = 0.0  # share of the operand's elements that are exactly 0
    swallowed_share: float = 0.0  # share of nonzero elements for which x + eps == x
    min_nonzero: float = math.inf  # smallest nonzero |x| it was added to
    consumers: dict = field(default_factory=dict)  # op -> {"dtype":..., "nonfinite": bool}
    modules: list = field(default_factory=list)  # every module it was applied in (``module``: the one
    # whose operand had the most zeros)

    @property
    def vanishes(self) -> bool:
        return self.kept == "rounds to 0"


@dataclass
class FactorUse:
    """A factor below the dtype's normal range applied to a half-precision product in one step."""

    factor: float
    dtype: str
    phase: str
    module: str | None
    callsite: str
    op: str
    product: str
    count: int = 0
    product_max_abs: float = 0.0


class _Tracer(TorchDispatchMode):
    """Sees every ATen op (forward, backward and optimizer, after autocast's casts) and records
    where non-finite values first appear, the eps guards applied in each dtype, and large factors
    applied to half-precision products in one step."""

    def __init__(self, watch: _Watch, sites: dict[str, float], attr_sites: dict[str, dict[str, str]],
                 facts: DtypeFacts, scale: Callable[[], float], max_origins: int = 20):
        super().__init__()
        self.watch, self.sites, self.attr_sites, self.facts = watch, sites, attr_sites, facts
        self.scale = scale
        self.max_origins = max_origins
        self.origins: list[dict[str, Any]] = []
        self.eps_uses: dict[tuple, EpsUse] = {}
        self.factors: dict[tuple, FactorUse] = {}
        self.eps_of = WeakIdKeyDictionary()  # tensor -> the EpsUse key whose output it (still) is
        self.product_of = WeakIdKeyDictionary()  # half tensor -> the product op that made it
        self._mutates: dict[Any, tuple[int, ...]] = {}
        self.ops = 0

    # helpers ----------------------------------------------------------------

    def _mutated(self, func) -> tuple[int, ...]:
        if func not in self._mutates:
            self._mutates[func] = tuple(i for i, a in enumerate(func._schema.arguments)
                                        if a.alias_info is not None and a.alias_info.is_write)
        return self._mutates[func]

    def _where(self) -> tuple[str, str | None, str]:
        phase = self.watch.current_phase()
        module = self.watch.current_module()
        if phase in ("backward", "optimizer") and not self.watch.stack:
            node = torch._C._current_autograd_node()
            where = f"autograd {node.name()}" if node is not None else _callsite(3)
        else:
            where = _callsite(3)
        return phase, module, where

    def _site(self, value: float, phase: str) -> str | None:
        if phase == "optimizer":
            return "adam" if self.sites.get("adam") == value else None
        for name in reversed(self.watch.stack):
            for site in self.attr_sites.get(name, {}).values():
                if self.sites.get(site) == value:
                    return site
        matches = [s for s, v in self.sites.items() if v == value and s != "adam"]
        return matches[0] if len(matches) == 1 else None

    # the mode ---------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _SKIP_OPS or self.watch.phase == "idle" or self.watch.busy:
            return func(*args, **kwargs)
        self.ops += 1
        mutated = self._mutated(func)
        pre_ok = None
        if mutated:
            pre_ok = all(_finite(t) for i in mutated if i < len(args) for t in _floats(args[i]))
        out = func(*args, **kwargs)
        results = _floats(out) if out is not None else [t for i in mutated if i < len(args) for t in _floats(args[i])]
        if getattr(func, "is_view", False) or name in _PASS_THROUGH:
            self._propagate(args, results, name)
            if getattr(func, "is_view", False):
                return out
        if name in _EPS_OPS:
            self._eps(name, args, kwargs, results)
        if name in _CONSUMERS and len(self.eps_of):
            self._consumer(name, args, results)
        if name in _PRODUCTS:
            for t in results:
                if t.dtype in HALF_DTYPES.values():
                    self.product_of[t] = name
        elif name in ("div", "div_", "mul", "mul_") and len(self.product_of):
            self._factor(name, args, results)
        if len(self.origins) < self.max_origins:
            self._check_finite(name, args, kwargs, results, mutated, pre_ok)
        return out

    def _propagate(self, args: tuple, results: list[torch.Tensor], name: str) -> None:
        source = args[0] if args and torch.is_tensor(args[0]) else None
        if source is None:
            return
        if len(self.eps_of) and source in self.eps_of:
            for t in results:
                self.eps_of[t] = self.eps_of[source]
        if len(self.product_of) and source in self.product_of and name != "sqrt":
            for t in results:
                if t.dtype in HALF_DTYPES.values():
                    self.product_of[t] = self.product_of[source]

    def _eps(self, name: str, args: tuple, kwargs: dict, results: list[torch.Tensor]) -> None:
        if name.startswith("clamp") and name not in ("clamp_min", "clamp_min_"):
            value = args[1] if len(args) > 1 else kwargs.get("min")
        else:
            value = args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("scalar"))
        if not isinstance(value, float) or not 0 < value <= EPS_CANDIDATE_MAX:
            return
        operands = _floats(args[0])
        if not operands:
            return
        dtype = operands[0].dtype
        phase, module, where = self._where()
        facts = DtypeFacts.of({torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32"))
        key = (value, str(dtype), phase, where)
        use = self.eps_uses.get(key)
        if use is None:
            use = self.eps_uses[key] = EpsUse(value, _short_dtype(dtype), facts.kept(value) if dtype in (
                torch.float16, torch.bfloat16, torch.float32) else "normal", phase, module, where, name,
                self._site(value, phase))
        use.count += 1
        if module is not None and module not in use.modules:
            use.modules.append(module)
            fresh = len(use.modules) <= 16
        else:
            fresh = use.count <= 4
        if fresh:  # the first few applications (per module) tell the magnitudes
            total = zeros = swallowed = nonzero = 0
            smallest = math.inf
            for x in operands:
                x = x.detach()
                nz = x != 0
                summed = x + torch.tensor(value, dtype=x.dtype, device=x.device)
                values = torch.stack([nz.sum().float(), ((summed == x) & nz).sum().float(),
                                      x.abs().masked_fill(~nz, math.inf).min().float()
                                      if x.numel() else torch.tensor(math.inf)]).tolist()
                total += x.numel()
                nonzero += int(values[0])
                zeros += x.numel() - int(values[0])
                swallowed += int(values[1])
                smallest = min(smallest, values[2])
            if total and zeros / total > use.operand_zero_share:
                use.operand_zero_share, use.module = zeros / total, module or use.module
            use.swallowed_share = max(use.swallowed_share, swallowed / nonzero if nonzero else 0.0)
            use.min_nonzero = min(use.min_nonzero, smallest)
        for t in results:
            self.eps_of[t] = key

    def _consumer(self, name: str, args: tuple, results: list[torch.Tensor]) -> None:
        if name == "div":
            operand = args[1] if len(args) > 1 and torch.is_tensor(args[1]) else None
        elif name == "pow":
            operand = args[0] if len(args) > 1 and isinstance(args[1], (int, float)) and args[1] < 0 else None
        else:
            operand = args[0] if args and torch.is_tensor(args[0]) else None
        if operand is None or operand not in self.eps_of or self.watch.phase == "backward":
            return  # (backward ops reuse the guarded tensor too: its overflows are loss scaling's)
        use = self.eps_uses[self.eps_of[operand]]
        bad = any(not _finite(t) for t in results)
        entry = use.consumers.setdefault(name, {"dtype": _short_dtype(results[0].dtype) if results else "?",
                                                "nonfinite": False})
        entry["nonfinite"] = entry["nonfinite"] or bad

    def _factor(self, name: str, args: tuple, results: list[torch.Tensor]) -> None:
        if len(args) < 2 or not torch.is_tensor(args[0]) or args[0] not in self.product_of:
            return
        value = args[1]
        if not isinstance(value, (int, float)) or value == 0:
            return
        factor = 1.0 / value if name.startswith("div") else float(value)
        dtype = args[0].dtype
        tiny = torch.finfo(dtype).tiny
        if not 0 < abs(factor) < tiny:
            return
        phase, module, where = self._where()
        key = (factor, str(dtype), phase, module, where)
        use = self.factors.get(key)
        if use is None:
            use = self.factors[key] = FactorUse(factor, _short_dtype(dtype), phase, module, where, name,
                                                self.product_of[args[0]])
        use.count += 1
        product = args[0].detach()
        finite = product[torch.isfinite(product)]
        use.product_max_abs = max(use.product_max_abs, float(finite.abs().max()) if finite.numel() else math.inf)
        if finite.numel() < product.numel():
            use.product_max_abs = math.inf

    def _check_finite(self, name: str, args: tuple, kwargs: dict, results: list[torch.Tensor],
                      mutated: tuple[int, ...], pre_ok: bool | None) -> None:
        bad = [t for t in results if not _finite(t)]
        if not bad:
            return
        scalars = [a for a in list(args) + list(kwargs.values()) if isinstance(a, float)]
        if any(not math.isfinite(a) for a in scalars):
            return  # an intended inf (a -inf mask fill)
        inputs = [t for i, a in enumerate(args) if i not in mutated for t in _floats(a)]
        inputs += _floats(kwargs)
        if not inputs and pre_ok is None:
            return  # made from nothing (a factory): not an origin
        if pre_ok is False or any(not _finite(t) for t in inputs):
            return
        phase, module, where = self._where()
        place = (self.watch.network, phase, module, name, where)
        for seen in self.origins:
            if seen["place"] == place:
                seen["count"] += 1
                return
        t = bad[0]
        nan = bool(torch.isnan(t).any())
        input_max = max((float(x.detach().abs().max()) for x in inputs if x.numel()), default=0.0)
        eps_key = next((self.eps_of[x] for x in inputs if x in self.eps_of), None) if len(self.eps_of) else None
        self.origins.append({
            "place": place, "count": 1,
            "step": self.watch.step, "network": self.watch.network, "phase": phase, "module": module,
            "op": name, "dtype": _short_dtype(t.dtype), "where": where, "value": "nan" if nan else "inf",
            "input_dtypes": sorted({_short_dtype(x.dtype) for x in inputs}), "input_max_abs": input_max,
            "loss_scale": self.scale() if phase == "backward" else None,
            "eps": None if eps_key is None else {"value": eps_key[0], "site": self.eps_uses[eps_key].site,
                                                 "dtype": self.eps_uses[eps_key].dtype},
        })


# --------------------------------------------------------------------------- one precision setting


def _prepare(batch: dict, trainer: Trainer) -> dict:
    """The trainer's own input casting: to the device; floating entries to the policy's input dtype
    except the model's fp32 (geometry) keys."""
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            value = value.to(trainer.device)
            if value.is_floating_point() and key not in trainer.model.fp32_batch_keys:
                value = value.to(trainer.policy.input_dtype)
        out[key] = value
    return out


def _batches(trainer: Trainer, count: int, batch_size: int) -> list[dict]:
    data = trainer.train_set
    out = []
    for b in range(count):
        items = [data[(b * batch_size + i) % len(data)] for i in range(batch_size)]
        out.append(default_collate(items))
    return out


class _Setting:
    """One precision setting built by the project's Trainer and driven phase by phase here."""

    def __init__(self, model: GANModel, setting: Setting, preset: str, data: DataConfig, device: str,
                 seed: int, facts: DtypeFacts):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the policy's own Adam-eps warning becomes a finding here
            self.trainer = Trainer(copy.deepcopy(model), setting, preset=preset, data=data, seed=seed,
                                   device=device)
        self.setting = setting
        self.policy = self.trainer.policy
        self.watch = _Watch(self.trainer.nets, facts)
        self.seed = seed
        self.params: dict[int, tuple[str, str]] = {}  # id(param) -> (network, name)
        for net_name, net in self.trainer.nets.named().items():
            for pname, param in unwrap(net).named_parameters():
                self.params[id(param)] = (net_name, pname)
        self.scales: dict[str, list[float]] = {n: [] for n in self.trainer.nets.named()}
        self.losses: list[dict[str, float]] = []
        self.diverged: str = ""

    def networks(self) -> list[str]:
        return list(self.trainer.nets.named())

    def _loss(self, name: str, batch: dict, seed: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[self.trainer.device] if self.trainer.device.type == "cuda" else []):
            torch.manual_seed(seed)
            with self.policy.autocast():
                loss, _ = self.trainer.losses[name](self.trainer.nets, batch)
        return loss

    def paired(self, batch: dict, capture: dict | None, compare: dict | None,
               tracer: _Tracer | None = None, collect: bool = False) -> dict[str, dict]:
        """The paired pass: every loss's forward at the initial weights (module captures or
        comparisons) and its backward at this setting's loss scale; returns each trained
        parameter's gradient sample and the scale it was computed at. No update. With ``tracer``
        its ops are traced too (the doctor's ``steps=0``)."""
        watch = self.watch
        watch.capture, watch.compare, watch.collect = capture, compare, collect
        watch.calls = Counter()
        grads: dict[str, dict] = {}
        try:
            for index, name in enumerate(self.networks()):
                for optimizer in self.trainer.optimizers.values():
                    optimizer.zero_grad(set_to_none=True)
                watch.begin(0, name)
                scale = self.policy.scale(name)
                with tracer if tracer is not None else _nothing():
                    loss = self._loss(name, batch, self.seed + index)
                    watch.phase = "backward"
                    (loss.float() * scale).backward()
                for param in unwrap(self.trainer.nets.named()[name]).parameters():
                    if param.grad is not None and id(param) in self.params:
                        _, pname = self.params[id(param)]
                        grads[f"{name}.{pname}"] = {"network": name, "grad": _sample(param.grad),
                                                   "norm": float(param.grad.float().norm()) / scale,
                                                   "dtype": _short_dtype(param.grad.dtype),
                                                   "numel": param.numel(), "scale": scale}
                watch.phase = "idle"
        finally:
            watch.phase = "idle"
            watch.capture = watch.compare = None
            watch.collect = False
            for optimizer in self.trainer.optimizers.values():
                optimizer.zero_grad(set_to_none=True)
        return grads

    def train(self, batches: list[dict], tracer: _Tracer | None) -> None:
        """The trainer's step, phase by phase: each network's loss under autocast, then
        ``PrecisionPolicy.step`` (its optimizer's step marks the optimizer phase)."""
        watch = self.watch
        hooks = [opt.register_step_pre_hook(lambda *_: setattr(watch, "phase", "optimizer"))
                 for opt in self.trainer.optimizers.values()]
        watch.collect = True
        try:
            for step, batch in enumerate(batches):
                losses = {}
                for index, name in enumerate(self.networks()):
                    optimizer = self.trainer.optimizers[name]
                    optimizer.zero_grad(set_to_none=True)
                    watch.begin(step + 1, name)  # step 0: the paired pass
                    self.scales[name].append(self.policy.scale(name))
                    with tracer if tracer is not None else _nothing():
                        loss = self._loss(name, batch, self.seed + 1000 * (step + 1) + index)
                        losses[name] = float(loss.detach().float())
                        watch.phase = "backward"
                        try:
                            self.policy.step(name, loss, optimizer)
                            check = getattr(self.policy, "check", None)  # policies that defer the read
                            if check is not None:
                                check()
                        except Diverged as error:
                            self.diverged = self.diverged or f"{error} at doctor step {step + 1}"
                    watch.phase = "idle"
                self.losses.append(losses)
                if self.diverged:
                    break
        finally:
            watch.phase = "idle"
            watch.collect = False
            for hook in hooks:
                hook.remove()
        for name in self.networks():
            self.scales[name].append(self.policy.scale(name))

    def close(self) -> None:
        self.watch.remove()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------- eps sites


def _attr_sites(model: GANModel, preset: str, eps: dict[str, float], flags) -> dict[str, dict[str, str]]:
    """module name -> {attribute: eps site}: the model is built once more with every site nudged to
    a marker value; a module attribute equal to a site's marker holds that site."""
    sites = model.resolve_eps(eps)
    markers = {site: value * (1 + (i + 1) * 2.0**-20) for i, (site, value) in enumerate(sorted(sites.items()))}
    probe = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        nets = probe.build(preset, markers, flags)
    by_value = {v: s for s, v in markers.items()}
    out: dict[str, dict[str, str]] = {}
    for net_name, net in (("discriminator", nets.discriminator), ("generator", nets.generator), ("aux", nets.aux)):
        if net is None:
            continue
        for sub, module in net.named_modules():
            for attr, value in vars(module).items():
                if isinstance(value, float) and value in by_value:
                    out.setdefault(f"{net_name}.{sub}" if sub else net_name, {})[attr] = by_value[value]
    return out


# --------------------------------------------------------------------------- profiler


def _profile(run: _Setting, batch: dict) -> dict[str, dict[str, Any]]:
    """One training step under ``torch.profiler`` with a range per module call: forward time and
    kernel dtype per module, backward time per module (autograd nodes linked to the forward op
    that created them by sequence number)."""
    from torch.profiler import ProfilerActivity, profile

    trainer, watch = run.trainer, run.watch
    cuda = trainer.device.type == "cuda"
    ranges: list = []
    handles = []
    active = {"on": False}

    def pre(name):
        def hook(module, args):
            if active["on"]:
                ranges.append(torch.ops.profiler._record_function_enter_new(f"fwd::{name}", None))
        return hook

    def post(name):
        def hook(module, args, output):
            if active["on"] and ranges:
                torch.ops.profiler._record_function_exit._RecordFunction(ranges.pop())
        return hook

    for name, module in watch.modules.items():
        handles.append(module.register_forward_pre_hook(pre(name)))
        handles.append(module.register_forward_hook(post(name)))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:
        with profile(activities=activities, record_shapes=True) as prof:
            for index, name in enumerate(run.networks()):
                optimizer = trainer.optimizers[name]
                optimizer.zero_grad(set_to_none=True)
                active["on"] = True
                loss = run._loss(name, batch, run.seed + 7 + index)
                active["on"] = False
                ranges.clear()
                try:
                    run.policy.step(name, loss, optimizer)
                except Diverged:
                    pass
            if cuda:
                torch.cuda.synchronize(trainer.device)
    finally:
        for handle in handles:
            handle.remove()
    return _parse_profile(prof.events(), cuda)


def _time(event, cuda: bool) -> float:
    if cuda:
        return float(getattr(event, "device_time_total", 0.0) or getattr(event, "cuda_time_total", 0.0))
    return float(event.cpu_time_total)


_FLOAT_NAMES = {"float": "fp32", "c10::Half": "fp16", "c10::BFloat16": "bf16", "double": "fp64"}


def _event_dtype(event) -> str | None:
    for dtype in getattr(event, "input_dtypes", None) or []:
        if dtype in _FLOAT_NAMES:
            return _FLOAT_NAMES[dtype]
    return None


def _self_time(event, cuda: bool) -> float:
    if cuda:
        return float(getattr(event, "self_device_time_total", 0.0) or getattr(event, "self_cuda_time_total", 0.0))
    return float(event.self_cpu_time_total)


def _kernel_dtype(event, cuda: bool) -> str | None:
    """The floating input dtype of the op under ``event`` that spent the most time itself (the
    kernel, below autocast's casts and dispatch wrappers)."""
    best, best_time = None, -1.0
    todo = [event]
    while todo:
        e = todo.pop()
        todo.extend(e.cpu_children)
        dtype = _event_dtype(e)
        if dtype is not None and not e.name.startswith(("aten::to", "aten::_to_copy", "aten::copy_")):
            t = _self_time(e, cuda)
            if t > best_time:
                best, best_time = dtype, t
    return best


def _parse_profile(events, cuda: bool) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    seq_module: dict[int, str] = {}

    def row(name: str) -> dict[str, Any]:
        return rows.setdefault(name, {"fwd_ms": 0.0, "bwd_ms": 0.0, "fwd_dtypes": Counter(), "bwd_dtypes": Counter()})

    def module_of(event) -> str | None:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith("fwd::"):
                return parent.name[5:]
            if not parent.name.startswith(("aten::", "autograd::")):
                return None
            parent = parent.cpu_parent
        return None

    def descendants(event) -> Iterator:
        todo = list(event.cpu_children)
        while todo:
            child = todo.pop(0)
            yield child
            todo.extend(child.cpu_children)

    def add(module: str, phase: str, event) -> None:
        """``event``'s time (ms) to ``module``'s ``phase`` (fwd | bwd) total and kernel dtype tally."""
        r, t = row(module), _time(event, cuda) / 1000
        r[f"{phase}_ms"] += t
        dtype = _kernel_dtype(event, cuda)
        if dtype:
            r[f"{phase}_dtypes"][dtype] += t

    for event in events:
        name = event.name
        if name.startswith("autograd::engine::evaluate_function"):
            continue
        parent = event.cpu_parent
        top_level = parent is None or parent.name.startswith("fwd::")
        if not top_level or name.startswith("fwd::") or not name.startswith("aten::"):
            continue
        module = module_of(event) or "(loss and step, outside modules)"
        add(module, "fwd", event)
        for e in (event, *descendants(event)):
            if getattr(e, "sequence_nr", -1) >= 0:
                seq_module.setdefault(e.sequence_nr, module)
    for event in events:
        if not event.name.startswith("autograd::engine::evaluate_function"):
            continue
        add(seq_module.get(getattr(event, "sequence_nr", -1), "(loss and step, outside modules)"), "bwd", event)
    out = {}
    for name, r in rows.items():
        out[name] = {"fwd_ms": r["fwd_ms"], "bwd_ms": r["bwd_ms"],
                     "fwd_dtype": _dominant(r["fwd_dtypes"]), "bwd_dtype": _dominant(r["bwd_dtypes"])}
    return out


def _dominant(weights: Counter) -> str:
    """The dtype the kernels ran in: 'fp16', or 'fp16 72% / fp32' when mixed."""
    total = sum(weights.values())
    if not total:
        return "-"
    ranked = weights.most_common()
    first, share = ranked[0][0], ranked[0][1] / total
    if share > 0.95 or len(ranked) == 1:
        return first
    return f"{first} {share:.0%} / " + "/".join(d for d, _ in ranked[1:])


# --------------------------------------------------------------------------- the diagnosis


@dataclass
class Diagnosis:
    """Everything one doctor run found; ``to_dict`` is doctor.json, ``markdown`` doctor.md."""

    model: str
    preset: str
    dtype: str
    opt_level: str
    steps: int
    batch_size: int
    device: str
    eps: dict[str, float]
    facts: DtypeFacts
    seconds: float = 0.0
    status: str = "ok"
    modules: list[dict] = field(default_factory=list)
    parameters: list[dict] = field(default_factory=list)
    origins: list[dict] = field(default_factory=list)
    eps_uses: list[dict] = field(default_factory=list)
    factors: list[dict] = field(default_factory=list)
    sites: list[dict] = field(default_factory=list)
    profile: list[dict] = field(default_factory=list)
    loss_scales: dict[str, list[float]] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def hazards(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "hazard"]

    @property
    def first_nonfinite(self) -> dict | None:
        return self.origins[0] if self.origins else None

    @property
    def suggested_eps(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for f in self.findings:
            if f.site and f.suggested:
                out[f.site] = sorted(set(out.get(f.site, [])) | set(f.suggested))
        return out

    @property
    def setting_label(self) -> str:
        return f"{self.opt_level}-{self.dtype}"

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k not in ("facts", "findings")}
        data["facts"] = {"dtype": self.facts.name, "max": self.facts.max, "smallest_normal": self.facts.tiny,
                         "smallest_subnormal": self.facts.subnormal, "resolution": self.facts.resolution}
        data["findings"] = [asdict(f) for f in self.findings]
        data["first_nonfinite"] = self.first_nonfinite
        data["suggested_eps"] = self.suggested_eps
        return _plain(data)

    # rendering --------------------------------------------------------------

    def summary(self, limit: int = 8) -> str:
        """The terminal summary."""
        lines = [f"doctor: {self.model} ({self.preset}) {self.setting_label}, batch {self.batch_size}, "
                 f"paired pass + {self.steps} step(s) on {self.device}, {self.seconds:.0f} s: {self.status}"]
        first = self.first_nonfinite
        lines.append(f"first inf/NaN: {_origin_text(first)}" if first else "first inf/NaN: none")
        if not self.findings:
            lines.append(f"no hazard found: {self.setting_label} looks safe for this model at this size")
        for f in self.findings:
            lines.append(f"[{f.severity}] {f.title}")
            labels = {"action": "->", "search": "search", "bf16": "bf16:"}
            lines += [f"    {labels[kind]} {text}" for kind, text in _advice(f)]
        top = sorted(self.profile, key=lambda r: -(r["half_fwd_ms"] + r["half_bwd_ms"]))[:limit]
        if top:
            lines.append(f"slowest modules in {self.setting_label} (fwd+bwd ms, fp32 -> {self.dtype}, kernel dtype):")
            for r in top:
                lines.append(f"    {r['module']:<48} {r['fp32_fwd_ms'] + r['fp32_bwd_ms']:8.2f} -> "
                             f"{r['half_fwd_ms'] + r['half_bwd_ms']:8.2f}  {r['half_fwd_dtype']}")
        return "\n".join(lines)

    def markdown(self) -> str:
        f16 = self.facts
        out = [f"# Doctor: {self.model} ({self.preset}), {self.setting_label}", "",
               f"The paired fp32/{self.dtype} pass and {self.steps} training step(s) "
               f"({'the last under torch.profiler, the others ' if self.profile else ''}under the op tracer) "
               f"at batch {self.batch_size} on {self.device}, "
               f"{self.seconds:.0f} s; status: **{self.status}**. {f16.name}: max {f16.max:.4g}, smallest "
               f"normal {f16.tiny:.3g}, smallest subnormal {f16.subnormal:.3g}, resolution {f16.resolution:.3g}.", ""]
        out += ["## Verdicts", ""]
        if not self.findings:
            out += [f"No hazard found: {self.setting_label} looks safe for this model at this size.", ""]
        for i, f in enumerate(self.findings, 1):
            out.append(f"{i}. **[{f.severity}] {f.title}**")
            for line in f.evidence:
                out.append(f"   - {line}")
            labels = {"action": "**Action:**", "search": "**Search:**", "bf16": "**bf16:**"}
            out += [f"   - {labels[kind]} {text}" for kind, text in _advice(f, code="`")]
        out += ["", "## First inf/NaN", ""]
        out.append(_origin_text(self.first_nonfinite) if self.first_nonfinite else "None appeared.")
        if len(self.origins) > 1:
            out += ["", "| step | network | phase | module | op | dtype | where | loss scale |", "|---|---|---|---|---|---|---|---|"]
            for o in self.origins:
                out.append(f"| {o['step']} | {o['network']} | {o['phase']} | {o['module'] or '-'} | {o['op']} "
                           f"({o['value']}) | {o['dtype']} | {o['where']} | {_fmt(o['loss_scale'])} |")
        out += ["", "## Constants", "", "| eps site | value | in " + f16.name + " | applied in | held by |",
                "|---|---|---|---|---|"]
        for s in self.sites:
            out.append(f"| {s['site']} | {s['value']:.3g} | {s['kept']} | {', '.join(s['applied']) or '-'} | "
                       f"{_fmt_modules(s['modules'])} |")
        uses = [u for u in self.eps_uses if u["dtype"] in ("fp16", "bf16")]
        if uses:
            out += ["", "Small constants added in half precision (each place once):", "",
                    "| value | site | dtype | kept | phase | module | where | operand zeros | x+eps==x | consumers |",
                    "|---|---|---|---|---|---|---|---|---|---|"]
            for u in uses:
                consumers = ", ".join(f"{k} ({v['dtype']}{', non-finite' if v['nonfinite'] else ''})"
                                      for k, v in u["consumers"].items()) or "-"
                out.append(f"| {u['value']:.3g} | {u['site'] or '-'} | {u['dtype']} | {u['kept']} | {u['phase']} | "
                           f"{u['module'] or '-'} | {u['callsite']} | {u['operand_zero_share']:.1%} | "
                           f"{u['swallowed_share']:.0%} | {consumers} |")
        if self.factors:
            out += ["", "Factors below the normal range applied to a half-precision product in one step:", "",
                    "| factor | dtype | product | product max | phase | module | where |", "|---|---|---|---|---|---|---|"]
            for u in self.factors:
                out.append(f"| {u['factor']:.3g} | {u['dtype']} | {u['product']} | {u['product_max_abs']:.3g} | "
                           f"{u['phase']} | {u['module'] or '-'} | {u['callsite']} |")
        out += ["", f"## Modules (numerics, paired forward vs fp32; the {min(25, len(self.modules))} most at risk)", "",
                "| module | type | out dtype | max abs | headroom (2^k) | non-finite | flushed to 0 | subnormal | "
                "rel. error (input's) | norm: injected noise |", "|---|---|---|---|---|---|---|---|---|---|"]
        for m in _at_risk(self.modules)[:25]:
            out.append(f"| {m['module']} | {m['type']} | {m['out_dtype']} | {m['max_abs']:.3g} | "
                       f"{_fmt(m['headroom_pow2'], '.1f')} | {m['nonfinite_share']:.1%} | {m['flushed_share']:.2%} | "
                       f"{m['below_normal_share']:.2%} | {_fmt(m['rel_error'], '.2g')} ({_fmt(m['rel_error_in'], '.2g')}) | "
                       f"{_fmt(m['injected_noise'], '.2%')} |")
        params = sorted(self.parameters, key=lambda p: (p["negligible"], -p["flushed_norm_share"], -p["flushed_share"]))[:15]
        if params:
            out += ["", "## Gradients (the 15 most underflowing parameters, at the loss scale in use)", "",
                    "| parameter | grad dtype | loss scale | elements flushed to 0 | share of the norm | below normal | "
                    "observed zeros (step 0) |", "|---|---|---|---|---|---|---|"]
            for p in params:
                note = " (negligible gradient)" if p["negligible"] else ""
                out.append(f"| {p['name']}{note} | {p['dtype']} | {_fmt(p['scale'], 'g')} | {p['flushed_share']:.2%} | "
                           f"{p['flushed_norm_share']:.2%} | {p['subnormal_share']:.2%} | "
                           f"{_fmt(p['observed_zero_share'], '.2%')} |")
        if self.loss_scales:
            out += ["", "Loss scale per step: " + "; ".join(f"{k}: {', '.join(_fmt(s, 'g') for s in v)}"
                                                         for k, v in self.loss_scales.items())]
        if self.profile:
            total = {k: sum(r[k] for r in self.profile) for k in ("fp32_fwd_ms", "fp32_bwd_ms", "half_fwd_ms", "half_bwd_ms")}
            out += ["", f"## Per-layer breakdown (torch.profiler, one step each; the 30 slowest in {self.setting_label})", "",
                    f"Total: fp32 {total['fp32_fwd_ms']:.1f} + {total['fp32_bwd_ms']:.1f} ms, {self.setting_label} "
                    f"{total['half_fwd_ms']:.1f} + {total['half_bwd_ms']:.1f} ms (forward + backward).", "",
                    f"| module | fp32 fwd ms | {self.dtype} fwd ms | fp32 bwd ms | {self.dtype} bwd ms | kernels fwd | kernels bwd |",
                    "|---|---|---|---|---|---|---|"]
            for r in sorted(self.profile, key=lambda r: -(r["half_fwd_ms"] + r["half_bwd_ms"]))[:30]:
                out.append(f"| {r['module']} | {r['fp32_fwd_ms']:.2f} | {r['half_fwd_ms']:.2f} | {r['fp32_bwd_ms']:.2f} | "
                           f"{r['half_bwd_ms']:.2f} | {r['half_fwd_dtype']} | {r['half_bwd_dtype']} |")
        if self.notes:
            out += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(out) + "\n"

    def write(self, folder: str | os.PathLike) -> dict[str, Path]:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        md, js = folder / "doctor.md", folder / "doctor.json"
        md.write_text(self.markdown())
        js.write_text(json.dumps(self.to_dict(), indent=1))
        return {"doctor.md": md, "doctor.json": js}


def _plain(value: Any) -> Any:
    """JSON-safe: non-finite floats as strings ("inf", "nan"), sets as sorted lists, the rest str."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        items = [_plain(v) for v in value]
        return sorted(items, key=str) if isinstance(value, set) else items
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return format(value, spec)


def _fmt_list(values: Iterable[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _fmt_modules(modules: list[str], limit: int = 3) -> str:
    if not modules:
        return "-"
    shown = ", ".join(modules[:limit])
    return shown + (f" (+{len(modules) - limit})" if len(modules) > limit else "")


def _advice(f: Finding, code: str = "") -> list[tuple[str, str]]:
    """A finding's advice as (kind, text) rows, kinds action | search | bf16, for both renderings;
    ``code`` quotes the search line (markdown's backtick)."""
    rows = [("action", f.action)] if f.action else []
    if f.suggested:
        rows.append(("search", f"{code}{f.site}: {_fmt_list(f.suggested)}{code}"
                               + (f" ({f.verified})" if f.verified else "")))
    if f.bf16:
        rows.append(("bf16", f.bf16))
    return rows


def _origin_text(o: dict | None) -> str:
    if not o:
        return "none"
    text = (f"{o['value']} in {o['phase']} of {o['network']} step {o['step']}, op {o['op']} ({o['dtype']}) "
            f"in {o['module'] or '(outside modules)'} at {o['where']}")
    if o.get("eps"):
        e = o["eps"]
        text += f"; its input carries eps {e['value']:g}" + (f" (site {e['site']})" if e["site"] else "") + f" added in {e['dtype']}"
    if o.get("loss_scale"):
        text += f"; loss scale {o['loss_scale']:g}"
        if o["phase"] == "backward" and o["loss_scale"] > 1:
            text += " (dynamic loss scaling: the scaler skips that update and halves the scale)"
    return text


def _at_risk(modules: list[dict]) -> list[dict]:
    def risk(m: dict) -> tuple:
        headroom = m["headroom_pow2"] if m["headroom_pow2"] is not None else math.inf
        error = m["rel_error"] if m["rel_error"] is not None and not math.isnan(m["rel_error"]) else 0.0
        return (-m["nonfinite_share"], -(m["injected_noise"] or 0.0) >= -NORM_NOISE_HAZARD, headroom, -error,
                -m["flushed_share"])
    return sorted(modules, key=risk)


# --------------------------------------------------------------------------- running it


def diagnose(model: str | GANModel, *, preset: str = "tiny", dtype: str = "fp16", opt_level: str = "O1",
             steps: int = 2, batch_size: int = 2, data: DataConfig | None = None,
             eps: dict[str, float] | None = None, options: dict[str, Any] | None = None,
             device: str | None = None, seed: int = 0, profile: bool = True, suggest: bool = True,
             max_probes: int = 3, log: Callable[[str], None] | None = None) -> Diagnosis:
    """Diagnose ``model`` (a registry name, ``file.py:Class`` or a GANModel) in ``opt_level``-``dtype``.

    ``data`` defaults to the model's study YAML's data section (tiny sizes); ``eps`` overrides eps
    sites; ``suggest`` re-runs the doctor with raised eps values to find and verify what a study
    should search (at most ``max_probes`` runs per site)."""
    start = time.perf_counter()
    if opt_level == "O0":
        raise ValueError("the doctor compares a half-precision setting with fp32: choose O1, O2 or O3")
    if dtype not in HALF_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(HALF_DTYPES)}, got {dtype!r}")
    spec = model if isinstance(model, str) else None
    instance = load_model(model, **(options or {})) if isinstance(model, str) else model
    data = data or default_data(spec or instance.name, instance)
    data = data.model_copy(update={"train_samples": max(data.train_samples, batch_size * max(steps, 1)),
                                   "val_samples": max(1, min(data.val_samples, 2))})
    eps = dict(eps or {})
    sites = instance.resolve_eps(eps)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    facts = DtypeFacts.of(dtype)
    say = log or (lambda message: None)
    diagnosis = Diagnosis(model=spec or instance.name, preset=preset, dtype=dtype, opt_level=opt_level,
                          steps=steps, batch_size=batch_size, device=device, eps=sites, facts=facts)
    with torch.random.fork_rng(devices=[torch.device(device)] if device.startswith("cuda") else []):
        _run(diagnosis, instance, data, eps, sites, seed, profile, say)
    diagnosis.findings = _verdicts(diagnosis)
    if suggest:
        _suggest(diagnosis, model, instance, data, eps, options, device, seed, max_probes, say)
    diagnosis.seconds = time.perf_counter() - start
    return diagnosis


def default_data(spec: str, model: GANModel | None = None) -> DataConfig:
    """The data section of the model's study YAML (``search_spaces/<name>.yaml``), else 32x32."""
    import yaml

    from search_spaces import default_path

    path = default_path(spec)
    if ".py:" not in spec and path.is_file():
        raw = yaml.safe_load(path.read_text()) or {}
        return DataConfig.model_validate(raw.get("data", {}))
    return DataConfig(height=32, width=32, train_samples=8, val_samples=2)


def _run(d: Diagnosis, model: GANModel, data: DataConfig, eps: dict[str, float], sites: dict[str, float],
         seed: int, profile: bool, say: Callable[[str], None]) -> None:
    facts = d.facts
    reference = _Setting(model, Setting(opt_level="O0", batch_size=d.batch_size, eps=eps), d.preset, data,
                         d.device, seed, facts)
    candidate = _Setting(model, Setting(opt_level=d.opt_level, dtype=d.dtype, batch_size=d.batch_size, eps=eps),
                         d.preset, data, d.device, seed, facts)
    try:
        batches = _batches(reference.trainer, max(d.steps, 1), d.batch_size)
        ref_batches = [_prepare(b, reference.trainer) for b in batches]
        cand_batches = [_prepare(b, candidate.trainer) for b in batches]

        say("paired forward: fp32 reference")
        capture: dict = {}
        ref_grads = reference.paired(ref_batches[0], capture, None)
        say(f"paired forward: {d.setting_label}")
        attr_sites = _attr_sites(model, d.preset, eps, candidate.setting.flags)
        tracer = _Tracer(candidate.watch, sites, attr_sites, facts,
                         scale=lambda: candidate.policy.scale(candidate.watch.network))
        # with the profiler on, the last training step runs under it (untraced): the others under the tracer
        traced = d.steps - 1 if profile and d.steps else d.steps
        cand_grads = candidate.paired(cand_batches[0], None, capture, tracer, collect=traced == 0)
        capture.clear()
        # the reference's statistics were collected on its own watch: move them onto the candidate's
        for name, stats in candidate.watch.stats.items():
            ref = reference.watch.stats[name]
            stats.ref_max_abs, stats.ref_nonzero = ref.ref_max_abs, ref.ref_nonzero
            stats.ref_flushed, stats.ref_subnormal = ref.ref_flushed, ref.ref_subnormal
            stats.noise_gain, stats.eps_needed = ref.noise_gain, ref.eps_needed

        if traced:
            say(f"{traced} instrumented training step(s) in {d.setting_label}")
            candidate.train(cand_batches[:traced], tracer)
        else:
            d.notes.append("no training step ran under the op tracer (only the paired forward and backward: "
                           "no update, so no optimizer phase)")
            for name in candidate.networks():
                candidate.scales[name].append(candidate.policy.scale(name))
        d.status = f"diverged: {candidate.diverged}" if candidate.diverged else "ok"
        d.loss_scales = {k: v for k, v in candidate.scales.items()} if candidate.policy.uses_scaler else {}
        d.origins = tracer.origins
        d.eps_uses = [asdict(u) for u in tracer.eps_uses.values()]
        d.factors = [asdict(u) for u in tracer.factors.values()]
        for name, stats in candidate.watch.stats.items():
            stats.site = attr_sites.get(name, {}).get("eps") if stats.eps is not None else None
        d.modules = [s.row(facts) for s in candidate.watch.stats.values() if s.calls or s.error is not None]
        d.parameters = _gradients(ref_grads, cand_grads, candidate, facts)
        d.sites = _site_table(sites, attr_sites, tracer, facts)
        if tracer.ops == 0:
            d.notes.append("the op tracer saw no operations")

        if profile:
            say("per-layer breakdown: fp32 and " + d.setting_label)
            fp32 = _profile(reference, ref_batches[0])
            half = _profile(candidate, cand_batches[max(d.steps, 1) - 1])
            for name in candidate.networks():
                candidate.scales[name].append(candidate.policy.scale(name))
            if candidate.policy.uses_scaler:
                d.loss_scales = {k: v for k, v in candidate.scales.items()}
            types = {name: s.type for name, s in candidate.watch.stats.items()}
            d.profile = [{"module": name, "type": types.get(name, ""),
                          "fp32_fwd_ms": fp32.get(name, {}).get("fwd_ms", 0.0),
                          "fp32_bwd_ms": fp32.get(name, {}).get("bwd_ms", 0.0),
                          "half_fwd_ms": half.get(name, {}).get("fwd_ms", 0.0),
                          "half_bwd_ms": half.get(name, {}).get("bwd_ms", 0.0),
                          "fp32_fwd_dtype": fp32.get(name, {}).get("fwd_dtype", "-"),
                          "half_fwd_dtype": half.get(name, {}).get("fwd_dtype", "-"),
                          "half_bwd_dtype": half.get(name, {}).get("bwd_dtype", "-")}
                         for name in sorted(set(fp32) | set(half))]
            if d.device == "cpu" and d.dtype == "fp16":
                d.notes.append("fp16 arithmetic is emulated on most CPUs: the per-layer times show where the "
                               "time goes on this machine, not a GPU's speedup")
    finally:
        reference.close()
        candidate.close()


def _gradients(ref_grads: dict, cand_grads: dict, candidate: _Setting, facts: DtypeFacts) -> list[dict]:
    """Per parameter: the share of its nonzero fp32 gradient that underflows at the loss scale in
    use (the last one of the instrumented steps), and what the candidate's own step-0 gradient
    showed."""
    rows = []
    final = {name: (scales[-1] if scales else 1.0) for name, scales in candidate.scales.items()}
    typical: dict[str, float] = {}  # median gradient norm of each network's parameters
    for network in {ref["network"] for ref in ref_grads.values()}:
        norms = sorted(ref["norm"] for ref in ref_grads.values() if ref["network"] == network)
        typical[network] = norms[len(norms) // 2] if norms else 0.0
    for name, ref in ref_grads.items():
        g = ref["grad"].abs()
        nonzero = g > 0
        count = int(nonzero.sum())
        scale = final.get(ref["network"], 1.0) if candidate.policy.uses_scaler else 1.0
        scaled = g * scale
        lost = nonzero & (scaled < facts.subnormal / 2)
        flushed = int(lost.sum())
        subnormal = int((nonzero & (scaled < facts.tiny)).sum())
        norm = float(g.norm())
        lost_norm = float(g[lost].norm()) / norm if norm > 0 else 0.0
        # a gradient a thousand times below its network's typical one (e.g. a conv bias right
        # before a norm layer, mathematically zero) carries no signal worth keeping
        negligible = ref["norm"] < 1e-3 * typical[ref["network"]]
        observed = None
        cand = cand_grads.get(name)
        if cand is not None and cand["grad"].shape == g.shape and torch.isfinite(cand["grad"]).all():
            observed = float(((cand["grad"] == 0) & nonzero).sum()) / count if count else 0.0
        rows.append({"name": name, "network": ref["network"], "dtype": cand["dtype"] if cand else "-",
                     "numel": ref["numel"], "scale": scale, "flushed_share": flushed / count if count else 0.0,
                     "subnormal_share": subnormal / count if count else 0.0, "observed_zero_share": observed,
                     "flushed_norm_share": lost_norm, "negligible": negligible,
                     "max_abs_grad": float(g.max()) if g.numel() else 0.0})
    return rows


def _site_table(sites: dict[str, float], attr_sites: dict[str, dict[str, str]], tracer: _Tracer,
                facts: DtypeFacts) -> list[dict]:
    rows = []
    for site, value in sorted(sites.items()):
        modules = sorted(name for name, attrs in attr_sites.items() if site in attrs.values())
        applied = sorted({u.dtype for u in tracer.eps_uses.values() if u.site == site})
        if not applied and modules:
            kinds = {type(tracer.watch.modules[m]).__name__ for m in modules if m in tracer.watch.modules}
            if kinds and all("Norm" in k for k in kinds):
                applied = ["inside the norm kernel (fp32 accumulation)"]
        rows.append({"site": site, "value": value, "kept": facts.kept(value), "applied": applied,
                     "modules": modules})
    return rows


# --------------------------------------------------------------------------- verdicts


def _verdicts(d: Diagnosis) -> list[Finding]:
    facts = d.facts
    fp16 = d.dtype == "fp16"
    findings: list[Finding] = []
    by_site: dict[str, Finding] = {}  # one finding per eps site
    by_origin: dict[tuple, Finding] = {}  # one per place where non-finite values appear without one

    def site_finding(site: str, kind: str, title: str) -> Finding:
        if site not in by_site:
            by_site[site] = Finding("hazard", kind, title, site=site)
            findings.append(by_site[site])
        return by_site[site]

    # 1. constants that vanish where they are applied
    for u in d.eps_uses:
        if u["dtype"] not in ("fp16", "bf16") or u["kept"] != "rounds to 0":
            continue
        guards = u["operand_zero_share"] > 0 or bool(u["consumers"]) or u["site"] is not None
        name = f"eps site `{u['site']}`" if u["site"] else f"constant {u['value']:g}"
        where = _fmt_modules(u["modules"]) if u["modules"] else "the loss"
        text = (f"{name} = {u['value']:g} rounds to 0 in {u['dtype']} where it is applied "
                f"({u['op']} at {u['callsite']}, {u['phase']}, in {where})")
        detail = (f"added to values of which {u['operand_zero_share']:.1%} are exactly 0"
                  + (f"; then {', '.join(u['consumers'])} in {'/'.join(sorted({c['dtype'] for c in u['consumers'].values()}))}"
                     if u["consumers"] else "")
                  + ("; the result was non-finite" if any(c["nonfinite"] for c in u["consumers"].values()) else ""))
        if u["site"]:
            f = site_finding(u["site"], "eps_vanishes", f"eps site `{u['site']}` ({u['value']:g}) vanishes in {u['dtype']}")
            f.evidence += [text, detail]
            f.module = f.module or u["module"]
            f.callsite = f.callsite or u["callsite"]
            f.phase = f.phase or u["phase"]
        else:
            findings.append(Finding("hazard" if guards and u["operand_zero_share"] > 0 else "warning", "eps_vanishes",
                                    f"{name} vanishes in {u['dtype']} at {u['callsite']}", phase=u["phase"],
                                    module=u["module"], callsite=u["callsite"], evidence=[text, detail],
                                    action=f"make it an eps site of the model and raise it to {facts.safe_eps():g} "
                                           f"in {u['dtype']}, or compute this line in fp32"))

    # 2. where non-finite values first appear
    scaled_overflow = []
    for o in d.origins:
        if o["phase"] == "backward" and o.get("loss_scale") and o["loss_scale"] > 1:
            scaled_overflow.append(o)
            continue
        text = _origin_text(o)
        if o.get("eps") and o["eps"]["site"]:
            f = site_finding(o["eps"]["site"], "nonfinite", f"eps site `{o['eps']['site']}` lets {o['op']} produce {o['value']}")
            if any(line.startswith("first ") for line in f.evidence):
                continue  # the first appearance is the evidence; the same place in later steps adds nothing
            f.evidence.insert(0, f"first {o['value']}: {text}")
            f.kind = "nonfinite"
            f.module, f.phase = o["module"] or f.module, o["phase"]
            f.callsite = f.callsite or o["where"]
            f.title = (f"eps site `{o['eps']['site']}` ({o['eps']['value']:g}, added in {o['eps']['dtype']}) does not "
                       f"keep {o['op']} ({o['dtype']}) finite in {o['module'] or o['where']} ({o['phase']})")
            continue
        key = (o["module"], o["op"], o["phase"])
        if key in by_origin:
            continue
        f = Finding("hazard", "nonfinite",
                    f"{o['value']} first appears in {o['module'] or o['where']} ({o['op']} in {o['dtype']}, {o['phase']})",
                    phase=o["phase"], module=o["module"], callsite=o["where"], evidence=[f"first {o['value']}: {text}"])
        overflow = o["value"] == "inf" or o["input_max_abs"] > facts.max / 2
        if o["phase"] == "optimizer":
            f.action = "raise the optimizer's eps (the `adam` eps site, e.g. 1e-4) or use the fused optimizer (fp32 math)"
        elif o["module"]:
            f.action = (f"keep module `{o['module']}` in fp32" + (" (its values leave the dtype's range)" if overflow else ""))
        else:
            f.action = f"compute {o['where']} in fp32"
        if fp16 and overflow:
            f.bf16 = "prefer bf16: it has fp32's exponent range, so values that overflow fp16 fit"
        by_origin[key] = f
        findings.append(f)
    if scaled_overflow and d.status.startswith("diverged") and "scale" in d.status:
        o = scaled_overflow[0]
        findings.append(Finding("hazard", "loss_scale", f"gradients overflow even at a small loss scale ({o['module'] or o['where']})",
                                phase="backward", module=o["module"], evidence=[_origin_text(o), d.status],
                                action=f"keep module `{o['module']}` in fp32" if o["module"] else "keep that computation in fp32",
                                bf16="prefer bf16: no loss scaling needed, fp32's range"))
    elif scaled_overflow:
        o = scaled_overflow[0]
        d.notes.append(f"backward overflow at loss scale {o['loss_scale']:g} in {o['module'] or o['where']} "
                       f"({o['op']}): ordinary dynamic loss scaling, the scaler backs off (scales: "
                       + "; ".join(f"{k} {', '.join(f'{s:g}' for s in v)}" for k, v in d.loss_scales.items()) + ")")

    # 3. factors applied to a half product in one step
    for u in d.factors:
        headroom = facts.headroom(u["product_max_abs"]) if math.isfinite(u["product_max_abs"]) else -math.inf
        findings.append(Finding(
            "hazard", "factor",
            f"factor {u['factor']:.3g} applied in one step to a {u['dtype']} {u['product']} product at {u['callsite']}",
            phase=u["phase"], module=u["module"], callsite=u["callsite"],
            evidence=[f"{u['factor']:.3g} is below {u['dtype']}'s normal range ({facts.tiny:.3g}): the product it "
                      f"normalises is up to 1/factor = {1 / u['factor']:.3g} times its result and reached "
                      f"{u['product_max_abs']:.3g} here (headroom 2^{headroom:.1f}); it overflows for larger inputs "
                      f"or features"],
            action=(f"apply the factor in two steps: multiply one operand by {math.sqrt(u['factor']):.3g} (1/sqrt) "
                    f"before the {u['product']} and the rest after it (e.g. torch.baddbmm(..., alpha=...))"),
            bf16="prefer bf16: its normal range reaches 1e-38, so the product and the factor both fit" if fp16 else ""))

    # 4. norm layers that rescale the rounding of near-constant channels to visible noise
    for m in d.modules:
        noise = m["injected_noise"]
        if noise is None or noise < NORM_NOISE_HAZARD:
            continue
        line = (f"{m['module']} ({m['type']}, eps {m['eps']:g}): a channel with rms/sqrt(var + eps) = "
                f"{m['noise_gain']:.0f} turns the {d.dtype} rounding of its input into {noise:.1%} noise of a "
                f"unit-scale output" + (f"; paired forward: output {m['rel_error']:.1%} off fp32 (its input "
                                        f"{_fmt(m['rel_error_in'], '.1%')})" if m["rel_error"] is not None else ""))
        if m["site"]:
            f = by_site.get(m["site"])
            if f is None:
                f = site_finding(m["site"], "norm_noise",
                                 f"eps site `{m['site']}` ({m['eps']:g}) lets norm layers amplify {d.dtype} rounding noise")
                f.module, f.phase = m["module"], "forward"
                f.evidence.append(f"near-constant channels: the norm divides by sqrt(var + eps) and rescales what "
                                  f"the {d.dtype} rounding of its input left to unit size (a well-conditioned "
                                  f"layer injects ~{NORM_NOISE_TARGET / 2:.1%})")
                f.bf16 = ("bf16 does not help: it keeps 8 significant bits to fp16's 11, so the same layers inject "
                          "8x more noise" if fp16 else "")
            f.evidence.append(line)
        else:
            findings.append(Finding("hazard", "norm_noise", f"{m['module']} amplifies {d.dtype} rounding noise",
                                    phase="forward", module=m["module"], evidence=[line],
                                    action=f"raise the eps of `{m['module']}` to {_decade(m['eps_needed'] or m['eps']):g} "
                                           f"(make it an eps site) or keep the layer feeding it in fp32"))

    # 5. overflow headroom of module outputs
    for m in d.modules:
        headroom = m["headroom_pow2"]
        if headroom is None or m["nonfinite_share"] > 0:
            continue
        if headroom < 0:
            findings.append(Finding("hazard", "overflow", f"{m['module']} overflows {d.dtype} (max |x| {m['max_abs']:.3g})",
                                    phase="forward", module=m["module"],
                                    evidence=[f"fp32 output reaches {m['max_abs']:.3g} > {facts.max:.4g}"],
                                    action=f"keep module `{m['module']}` in fp32",
                                    bf16="prefer bf16: fp32's exponent range" if fp16 else ""))
        elif headroom < 1:
            findings.append(Finding("warning", "overflow", f"{m['module']} uses all but 2^{headroom:.1f} of {d.dtype}'s range",
                                    phase="forward", module=m["module"],
                                    evidence=[f"fp32 output reaches {m['max_abs']:.3g}, {d.dtype} max {facts.max:.4g}"],
                                    action=f"keep module `{m['module']}` in fp32 if larger inputs are trained",
                                    bf16="prefer bf16: fp32's exponent range" if fp16 else ""))

    # 6. gradient underflow at the loss scale in use
    worst: dict[str, list[dict]] = {}
    for p in d.parameters:
        if p["flushed_norm_share"] >= GRAD_FLUSH_WARN and not p["negligible"]:
            worst.setdefault(p["network"], []).append(p)
    for network, params in worst.items():
        params.sort(key=lambda p: -p["flushed_norm_share"])
        top = params[0]
        severity = "hazard" if top["flushed_norm_share"] >= GRAD_FLUSH_HAZARD else "warning"
        findings.append(Finding(
            severity, "grad_underflow",
            f"{len(params)} {network} parameter(s) lose >= {GRAD_FLUSH_WARN:.0%} of their gradient norm to underflow "
            f"at loss scale {top['scale']:g}",
            phase="backward", module=top["name"],
            evidence=[f"{p['name']}: {p['flushed_share']:.1%} of its nonzero fp32 gradient elements "
                      f"({p['flushed_norm_share']:.1%} of its norm) fall below {facts.subnormal / 2:.3g} after "
                      f"scaling by {p['scale']:g}" for p in params[:5]],
            action="keep the loss scale higher for this network (it backs off on overflows elsewhere) or keep "
                   "the layers these gradients flow through in fp32",
            bf16="prefer bf16: no loss scale needed, gradients down to 1e-38 survive" if fp16 else ""))

    # actions for eps sites
    for site, f in by_site.items():
        value = d.eps.get(site)
        if f.kind in ("eps_vanishes", "nonfinite"):
            if fp16 and value is not None:
                kept = DtypeFacts.of("bf16").kept(value)
                f.bf16 = (f"prefer bf16: it keeps {value:g} ({kept}) and has fp32's exponent range"
                          if kept != "rounds to 0" else "")
            f.action = (f"raise eps site `{site}` from {value:g} to {max(facts.safe_eps(), value * 10):g} or more "
                        f"(the smallest power of ten {d.dtype} keeps within 10 %)")
        elif f.kind == "norm_noise":
            needed = max((m["eps_needed"] or 0.0) for m in d.modules if m["site"] == site)
            f.action = (f"raise eps site `{site}` from {value:g} to about {max(_decade(needed), value * 10):g} "
                        f"(brings the injected noise below {NORM_NOISE_TARGET:.1%})")
    order = {"hazard": 0, "warning": 1}
    findings.sort(key=lambda f: order.get(f.severity, 2))
    return findings


# --------------------------------------------------------------------------- suggestions


def _decade(value: float) -> float:
    """The smallest power of ten >= ``value``."""
    return float(f"{10.0 ** math.ceil(math.log10(value) - 1e-9):g}") if value > 0 else 0.0


def _ladder(start: float, stop: float = 1.0) -> list[float]:
    values, exponent = [], math.ceil(math.log10(start) - 1e-9)
    while 10.0**exponent <= stop * (1 + 1e-9):
        values.append(float(f"{10.0 ** exponent:g}"))
        exponent += 1
    return values


def _suggest(d: Diagnosis, model_arg: str | GANModel, instance: GANModel, data: DataConfig,
             eps: dict[str, float], options: dict | None, device: str, seed: int, max_probes: int,
             say: Callable[[str], None]) -> None:
    """For each eps site with a hazard: the smallest raised value that removes it, found by
    re-running the doctor (one step; the paired forward for norm noise), and the values to search."""
    for f in d.findings:
        if f.site and f.severity == "hazard" and f.kind in ("eps_vanishes", "nonfinite", "norm_noise"):
            _suggest_one(d, f, model_arg, instance, data, eps, options, device, seed, max_probes, say)


def _suggest_one(d: Diagnosis, f: Finding, model_arg: str | GANModel, instance: GANModel, data: DataConfig,
                 eps: dict[str, float], options: dict | None, device: str, seed: int, max_probes: int,
                 say: Callable[[str], None]) -> None:
    facts = d.facts
    current = d.eps[f.site]
    if f.kind == "norm_noise":
        needed = max((m["eps_needed"] or 0.0) for m in d.modules if m["site"] == f.site)
        ladder = _ladder(max(_decade(needed), current * 10))
        first = ladder[0] if ladder else None
    else:
        first = max(facts.safe_eps(), current * 10)
        ladder = _ladder(first)
    tried: dict[float, bool] = {}

    def works(value: float) -> bool:
        if value not in tried:
            say(f"checking {f.site}={value:g}")
            noise = f.kind == "norm_noise"
            probe = diagnose(model_arg if isinstance(model_arg, str) else instance, preset=d.preset,
                             dtype=d.dtype, opt_level=d.opt_level, steps=1 if f.phase == "optimizer" else 0,
                             batch_size=d.batch_size, data=data, eps={**eps, f.site: value}, options=options,
                             device=device, seed=seed, profile=False, suggest=False)
            if noise:  # down to a well-conditioned layer's noise, not merely below the hazard line
                tried[value] = all((m["injected_noise"] or 0.0) <= NORM_NOISE_TARGET * 1.5
                                   for m in probe.modules if m["site"] == f.site)
            else:
                tried[value] = not any(g.site == f.site and g.severity == "hazard" for g in probe.hazards)
        return tried[value]

    found = None
    candidates = list(ladder)
    if first is not None and candidates and len(tried) < max_probes and works(candidates[0]):
        found = candidates[0]
    else:
        lo, hi = (1 if first is not None else 0), len(candidates) - 1
        while lo <= hi and len(tried) < max_probes:
            mid = (lo + hi) // 2
            if works(candidates[mid]):
                found, hi = candidates[mid], mid - 1
            else:
                lo = mid + 1
    checks = ", ".join(f"{v:g} {'ok' if ok else 'still hazardous'}" for v, ok in sorted(tried.items()))
    if found is not None:
        f.suggested = [v for v in (found, found * 10) if v <= 1.0 + 1e-9] or [found]
        f.suggested = [float(f"{v:g}") for v in f.suggested]
        f.action = f"raise eps site `{f.site}` from {current:g} to {found:g} in {d.dtype}"
        f.verified = f"re-ran the doctor with {checks}"
        smallest = min((u["min_nonzero"] for u in d.eps_uses if u["site"] == f.site
                        and u["dtype"] == d.dtype and math.isfinite(u["min_nonzero"])), default=math.inf)
        if f.kind != "norm_noise" and found > 0.01 * smallest:
            f.action += (f"; but {found:g} is {found / smallest:.0%} of the smallest nonzero value it is added to "
                         f"({smallest:.3g}), so it changes the result there: computing "
                         f"{f.callsite or 'that line'} in fp32 keeps {current:g} exact")
    else:
        where = f"module `{f.module}`" if f.module else (f.callsite or "that computation")
        f.action = (f"no raised `{f.site}` removed it ({checks or 'not checked'}): keep {where} in fp32"
                    + (" or prefer bf16" if f.bf16.startswith("prefer") else ""))
        f.verified = checks


# --------------------------------------------------------------------------- search.eps: auto


def expand_auto_eps(config: StudyConfig, *, steps: int = 1, log: Callable[[str], None] | None = print,
                    output: str | os.PathLike | None = None) -> StudyConfig:
    """Replace ``search.eps: auto`` (or a site's ``auto``) by the site's default plus the values the
    doctor suggests, for every half dtype the study searches (at the most half-precision opt level
    it searches). Sites without a hazard keep their default only. Returns a new config."""
    if not config.search.auto_eps:
        return config
    eps = config.search.eps
    auto_all = eps == "auto"
    model = load_model(config.model.name, **config.model.options)
    auto_sites = sorted(model.eps_sites) if auto_all else sorted(s for s, v in eps.items() if v == "auto")
    found: dict[str, set[float]] = {site: {model.eps_sites[site]} for site in auto_sites}
    levels = [level for level in config.search.opt_level if level != "O0"]
    say = log or (lambda message: None)
    if levels:
        level = max(levels)
        batch = config.reference_batch_size or min(config.search.fixed_batch_sizes)
        for dtype in config.search.dtype:
            say(f"doctor: {config.model.name} {level}-{dtype} (search.eps: auto) ...")
            diagnosis = diagnose(config.model.name, preset=config.model.preset, dtype=dtype, opt_level=level,
                                 steps=steps, batch_size=batch, data=config.data, options=config.model.options,
                                 profile=False, seed=config.seed)
            if output is not None:
                diagnosis.write(Path(output) / f"doctor-{level}-{dtype}")
            for f in diagnosis.hazards:
                say(f"doctor: [{f.severity}] {f.title}" + (f" -> search {_fmt_list(f.suggested)}" if f.suggested else ""))
            for site, values in diagnosis.suggested_eps.items():
                if site in found:
                    found[site] |= set(values)
            if not diagnosis.hazards:
                say(f"doctor: no hazard in {level}-{dtype}")
    expanded = {} if auto_all else {s: v for s, v in eps.items() if v != "auto"}
    for site in auto_sites:
        if len(found[site]) > 1 or not auto_all:
            expanded[site] = sorted(found[site])
    say("search.eps: " + (", ".join(f"{s}: {_fmt_list(v)}" for s, v in expanded.items()) or "defaults only"))
    search = config.search.model_copy(update={"eps": expanded})
    return config.model_copy(update={"search": search})


# --------------------------------------------------------------------------- MLflow


def log_to_mlflow(diagnosis: Diagnosis, uri: str, experiment: str, files: dict[str, Path]) -> str:
    """One MLflow run with the doctor's parameters, counts and files; returns its id."""
    from orchestrator.tracking import log_standalone_run

    params = {"model": diagnosis.model, "preset": diagnosis.preset, "dtype": diagnosis.dtype,
              "opt_level": diagnosis.opt_level, "steps": diagnosis.steps, "batch_size": diagnosis.batch_size,
              "device": diagnosis.device, **{f"eps.{k}": v for k, v in diagnosis.eps.items()}}
    metrics = {"hazards": float(len(diagnosis.hazards)),
               "warnings": float(len(diagnosis.findings) - len(diagnosis.hazards)),
               "nonfinite_origins": float(len(diagnosis.origins)), "seconds": diagnosis.seconds}
    tags = {"amp.kind": "doctor", "status": diagnosis.status}
    for site, values in diagnosis.suggested_eps.items():
        tags[f"suggested.{site}"] = _fmt_list(values)
    return log_standalone_run(uri, experiment, f"doctor {diagnosis.setting_label}", params, metrics,
                              list(files.values()), tags)

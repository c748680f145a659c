"""The precision policy: weight casting, autocast, fp32 master weights and one loss scaler per loss.

apex's opt_level names, implemented with native ``torch.amp`` only. Nothing here
imports Ray or MLflow, and nothing depends on the device beyond ``device_type`` ("cpu" or "cuda"):
a user can paste a recommended setting into their own loop::

    policy = PrecisionPolicy("O2", "fp16", device_type="cuda")
    net = policy.prepare_network(net.cuda())          # before make_optimizer
    opt = policy.make_optimizer("generator", net.parameters(), lr=2e-4)
    with policy.autocast():
        loss = loss_fn(net(x.to(policy.input_dtype)))
    policy.step("generator", loss, opt)               # never waits for the device
    if step % 50 == 0:
        policy.check()                                # one host read; raises Diverged

=====  ==========================  ==========  ==============================  ===================
level  weights                     autocast    optimizer updates               fp16 loss scaling
=====  ==========================  ==========  ==============================  ===================
O0     fp32                        disabled    the fp32 weights                none
O1     fp32                        enabled     the fp32 weights                GradScaler per loss
O2     half, norm layers fp32      enabled     fp32 masters, copied to model   GradScaler per loss
O3     half everywhere             disabled    the half weights (no masters)   fp16-capable scaler
=====  ==========================  ==========  ==============================  ===================

Choices worth knowing:

* **O2 keeps autocast enabled.** apex O2 patched no functions; here the weights are already half so
  the matmul/conv casts are no-ops, but ops on autocast's fp32 list (losses, softmax, log, norms
  called functionally, ...) still run in fp32, and a tensor a model creates in fp32 on the fly does
  not crash a half conv. Normalization modules (BatchNorm*, InstanceNorm* incl. affine=False,
  GroupNorm, LayerNorm, RMSNorm) stay fp32 and get hooks: input cast to fp32, output cast back to the
  incoming dtype.
* **O3 disables autocast**: everything, norm layers included, runs in the half dtype (apex O3, the
  speed ceiling). Models must create their own tensors in the dtype of their inputs. fp16 gradients
  are unscaled in fp16 by :class:`HalfGradScaler` (native GradScaler refuses them). Adam keeps its
  state in fp16 too: its default ``eps=1e-8`` rounds to 0 in fp16, so the unfused Adam turns a zero
  gradient into 0/0 = NaN and an underflowed second moment into inf. :meth:`make_optimizer` warns
  about it; raise the ``adam`` eps site (e.g. 1e-4) or use the fused Adam (fp32 math inside).
* **One scaler per loss name** (apex ``num_losses``): the discriminator's overflows never shrink
  the generator's scale. bf16 and O0 have no scaler; their non-finite gradients are still caught
  and the update skipped (an unscaled NaN gradient would otherwise be applied).
* **A step never waits for the device.** On a GPU every host read of a tensor (``float(t)``,
  ``.item()``, ``bool(t)``) drains the launch queue. ``step`` keeps its bookkeeping in device-side
  counters: non-finite losses, skipped updates, the streak of consecutive bad steps, the loss scale
  and (every ``param_check_interval`` steps) non-finite weights. ``check()`` reads them all in one
  transfer and raises :class:`Diverged`; ``health()`` hands the same counters to a caller that
  batches them with its own reads (the trainer, every ``log_every`` steps). Divergence is decided
  locally: under DDP the trainer agrees on it across ranks at those reads.
* **Skipping a non-finite update happens on the device** when the optimizer can (torch's fused
  Adam takes GradScaler's ``found_inf`` tensor and skips inside its kernel; we hand it the same
  flag when there is no scaler). Other optimizers: with fp16 loss scaling torch's ``GradScaler``
  decides the skip itself, reading ``found_inf`` on the host (torch's own wait, once per loss and
  step, which a bare torch.amp loop pays too); without loss scaling (bf16, O0) the update is applied
  and non-finite weights are caught by the next check: without loss scaling a non-finite gradient
  is no overflow to wait out, it is divergence.
* **TF32** is scoped: the process-global flags (``torch.backends.cuda.matmul.allow_tf32`` and
  ``torch.backends.cudnn.allow_tf32``) are set for ``tf32`` inside :meth:`autocast` and
  :meth:`step` and restored on exit, so policies can be interleaved in one process. Note cuDNN's
  default is TF32 *on*: the strict fp32 reference (``tf32="off"``) switches it off, and
  ``tf32="default"`` (PyTorch's default, what a user runs today) keeps the flags torch set. The legacy flags are
  used because they exist in every torch >= 2.4; mixing them with torch's newer
  ``fp32_precision`` attributes makes torch refuse to read them.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, get_args

import torch
from torch import nn
from torch.amp import GradScaler
from torch.optim import optimizer as torch_optimizer

from orchestrator.settings import HalfDtype, OptLevel

OPT_LEVELS: tuple[str, ...] = get_args(OptLevel)  # the one definition lives in orchestrator/settings.py
HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
assert set(HALF_DTYPES) == set(get_args(HalfDtype)), "a HalfDtype without a torch dtype"

# Modules kept in fp32 under O2 (apex's keep_batchnorm_fp32, extended to every normalization).
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,  # BatchNorm1d/2d/3d, SyncBatchNorm, lazy variants
    nn.modules.instancenorm._InstanceNorm,  # InstanceNorm1d/2d/3d, affine or not
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

_HOOKED = "_precision_fp32_norm_hooks"

# The TF32 backend flags as torch set them in this process (read at import, before any policy
# changed them): what ``tf32="default"`` restores, i.e. what a user's own fp32 training runs with.
TORCH_DEFAULT_TF32 = {"matmul": bool(torch.backends.cuda.matmul.allow_tf32),
                      "cudnn": bool(torch.backends.cudnn.allow_tf32)}


class Diverged(RuntimeError):
    """Training has diverged: the setting failed, the caller records it and moves on."""

    def __init__(self, reason: str, step: int, loss_name: str = ""):
        super().__init__(f"{reason} (step {step})")
        self.reason = reason
        self.step = step
        self.loss_name = loss_name

    def __reduce__(self):  # picklable across processes (Ray) despite the extra fields
        return (type(self), (self.reason, self.step, self.loss_name))


class HalfGradScaler(GradScaler):
    """GradScaler that also unscales fp16 gradients (O3, where no fp32 master grads exist).

    ``GradScaler.unscale_`` calls ``_unscale_grads_(..., allow_fp16=False)`` and so raises
    "Attempting to unscale FP16 gradients."; this passes ``allow_fp16=True``, which GradScaler itself
    already does for its inf checks. The multiply by ``1/scale`` happens in fp32 and is stored back in
    fp16, so gradients below fp16's range flush to zero: part of why O3 is only a speed ceiling.
    """

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):  # noqa: D401
        return super()._unscale_grads_(optimizer, inv_scale, found_inf, True)


class MasterWeightAdam(torch.optim.Adam):
    """Adam over fp32 master copies of half parameters (O2).

    Each half (fp16/bf16) parameter gets an fp32 master that Adam updates; fp32 parameters (the
    norm layers) are their own masters. ``copy_grads_to_masters`` moves the model's half gradients
    onto the masters (the policy calls it before unscaling), ``step`` updates the masters and
    refreshes the half model weights from them. ``state_dict`` carries the masters under
    ``"master_params"`` (aligned with the optimizer's parameter order), so a checkpoint round trip
    is exact: the half model weights alone lose the low bits. Build it after the network was cast.
    """

    def __init__(self, params, **kwargs: Any):
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (half model param, fp32 master)
        self._model_params: list[torch.Tensor] = []
        self._grad_buffers: dict[int, torch.Tensor] = {}  # fp32 gradient storage per master
        super().__init__(params, **kwargs)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        masters = []
        for p in params:
            self._model_params.append(p)
            if p.is_floating_point() and p.dtype != torch.float32:
                master = p.detach().to(torch.float32).clone().requires_grad_(p.requires_grad)
                self._pairs.append((p, master))
                masters.append(master)
            else:
                masters.append(p)
        group["params"] = masters
        super().add_param_group(group)

    @property
    def model_parameters(self) -> list[torch.Tensor]:
        """The network's own parameters this optimizer maintains (half ones and fp32 ones)."""
        return list(self._model_params)

    @property
    def master_parameters(self) -> list[torch.Tensor]:
        """The fp32 masters of the half parameters."""
        return [m for _, m in self._pairs]

    @torch.no_grad()
    def copy_grads_to_masters(self) -> None:
        """The half gradients onto fp32 buffers the masters keep: one multi-tensor copy."""
        with_grad = [(p, m) for p, m in self._pairs if p.grad is not None]
        for _, m in self._pairs:
            m.grad = None
        if not with_grad:
            return
        buffers = []
        for _, m in with_grad:
            buffer = self._grad_buffers.get(id(m))
            if buffer is None:
                buffer = self._grad_buffers[id(m)] = torch.empty_like(m)
            m.grad = buffer
            buffers.append(buffer)
        torch._foreach_copy_(buffers, [p.grad for p, _ in with_grad])
        for p, _ in with_grad:
            p.grad = None  # the half grad is no longer needed

    @torch.no_grad()
    def copy_masters_to_model(self) -> None:
        if self._pairs:
            torch._foreach_copy_([p for p, _ in self._pairs], [m for _, m in self._pairs])

    def step(self, closure=None):
        loss = super().step(closure)
        self.copy_masters_to_model()  # a step skipped on the device copies the unchanged masters
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for p, _ in self._pairs:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["master_params"] = [p for group in self.param_groups for p in group["params"]]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("master_params", None)
        super().load_state_dict(state_dict)
        if saved is None:
            warnings.warn("optimizer state has no fp32 master weights: keeping masters made from the "
                          "half model weights (training will not continue bit-exactly)", stacklevel=2)
            return
        current = [p for group in self.param_groups for p in group["params"]]
        if len(saved) != len(current):
            raise ValueError(f"checkpoint holds {len(saved)} master weights, the optimizer {len(current)}")
        with torch.no_grad():
            for dst, src in zip(current, saved):
                if dst.shape != src.shape:
                    raise ValueError(f"master weight shape {tuple(src.shape)} != {tuple(dst.shape)}")
                dst.copy_(src)
        self.copy_masters_to_model()


def _nonfinite_flag(tensors: Iterable[torch.Tensor | None]) -> torch.Tensor | None:
    """A 0-d float tensor on the device, 1.0 when any element of any tensor is inf or NaN; no
    host read. None when there is nothing to check.

    One multi-tensor max-norm per device/dtype instead of a kernel per tensor: a non-finite element
    makes its tensor's max-norm inf or NaN, and a max never overflows the way a sum of squares can."""
    present = [t for t in tensors if t is not None]
    if not present:
        return None
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in present:
        groups.setdefault((t.device, t.dtype), []).append(t)
    device = present[0].device
    norms = [n.float().reshape(1).to(device, non_blocking=True)
             for group in groups.values() for n in torch._foreach_norm(group, float("inf"))]
    return (~torch.isfinite(torch.cat(norms))).any().float()


def _skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` honours a ``found_inf`` tensor (torch's fused optimizers do)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


class _Counters:
    """One loss's device-side bookkeeping (0-d float32 tensors; nothing here reads the host)."""

    FIELDS = ("steps", "skipped", "nonfinite", "streak", "tripped_at", "bad_weights_at")

    def __init__(self, device: torch.device, initial: dict[str, float] | None = None):
        initial = initial or {}
        for field in self.FIELDS:
            setattr(self, field, torch.tensor(float(initial.get(field, 0.0)), device=device))
        self.last_skipped = torch.zeros((), device=device)

    def vector(self) -> torch.Tensor:
        return torch.stack([getattr(self, f) for f in self.FIELDS])


def _normalize_params(params) -> list:
    """A list of tensors, or of param-group dicts whose ``params`` are lists (generators consumed once)."""
    if torch.is_tensor(params):
        return [params]
    out = []
    for item in params:
        if isinstance(item, dict):
            group = item["params"]
            item = dict(item, params=[group] if torch.is_tensor(group) else list(group))
        out.append(item)
    return out


def _fused_adam_supported(params: list) -> bool:
    """Whether ``Adam(fused=True)`` can step these parameters (torch checks only at the first step).

    Mirrors ``torch.optim.optimizer._device_dtype_check_for_fused``: floating point tensors on a
    device with fused kernels (cuda, and cpu since torch 2.4)."""
    tensors = [t for item in params for t in (item["params"] if isinstance(item, dict) else [item])]
    get_devices = getattr(torch_optimizer, "_get_fused_kernels_supported_devices", lambda: ["cuda"])
    devices = set(get_devices())
    return all(t.is_floating_point() and t.device.type in devices for t in tensors)


def _cast_fp32_input(module: nn.Module, args: tuple) -> tuple:
    incoming = next((a.dtype for a in args if torch.is_tensor(a) and a.is_floating_point()), None)
    module._precision_incoming_dtype = incoming
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _cast_output_back(module: nn.Module, args: tuple, output: Any) -> Any:
    incoming = getattr(module, "_precision_incoming_dtype", None)
    if incoming is None or incoming == torch.float32:
        return output
    if torch.is_tensor(output) and output.is_floating_point():
        return output.to(incoming)
    return output


def _log2(value: float) -> str:
    return f"2**{math.log2(value):g}" if value > 0 else str(value)


class PrecisionPolicy:
    """How one setting computes, stores and updates: see the module docstring for the levels.

    Args:
        opt_level: "O0" | "O1" | "O2" | "O3".
        dtype: "fp16" | "bf16", the half dtype (ignored by O0).
        device_type: "cpu" | "cuda", for autocast and the scalers.
        loss_names: one loss scaler (and step/skip counters) per name; ``step`` takes one of them.
        init_scale, growth_interval: GradScaler's (fp16 only; backoff 0.5, growth 2).
        nonfinite_patience: consecutive non-finite steps of one loss tolerated before Diverged.
        min_scale: a loss scale below this is a collapse (fp16 overflowing even unscaled).
        tf32: TF32 for CUDA matmuls/convs inside ``autocast()`` and ``step()``: "off" (strict fp32),
            "on", or "default" (torch's own flags, as found at import: TF32 convs, strict matmuls);
            True/False mean "on"/"off".
        param_check_interval: check the weights for non-finite values every N steps of a loss.
    """

    def __init__(
        self,
        opt_level: str,
        dtype: str = "fp16",
        device_type: str = "cpu",
        loss_names: Sequence[str] = ("discriminator", "generator"),
        init_scale: float = 2.0**16,
        growth_interval: int = 2000,
        nonfinite_patience: int = 3,
        min_scale: float = 2.0**-8,
        tf32: bool | str = "off",
        param_check_interval: int = 1,
    ):
        if opt_level not in OPT_LEVELS:
            raise ValueError(f"opt_level must be one of {OPT_LEVELS}, got {opt_level!r}")
        if dtype not in HALF_DTYPES:
            raise ValueError(f"dtype must be one of {tuple(HALF_DTYPES)}, got {dtype!r}")
        if device_type not in ("cpu", "cuda"):
            raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}")
        if nonfinite_patience < 1 or param_check_interval < 1:
            raise ValueError("nonfinite_patience and param_check_interval must be >= 1")
        if not loss_names or len(set(loss_names)) != len(loss_names):
            raise ValueError(f"loss_names must be distinct and non-empty, got {loss_names!r}")
        self.opt_level = opt_level
        self.dtype = dtype
        self.device_type = device_type
        self.loss_names = tuple(loss_names)
        self.nonfinite_patience = nonfinite_patience
        self.min_scale = float(min_scale)
        tf32 = {True: "on", False: "off"}.get(tf32, tf32) if isinstance(tf32, bool) else tf32
        if tf32 not in ("off", "on", "default"):
            raise ValueError(f"tf32 must be 'off', 'on' or 'default', got {tf32!r}")
        self.tf32 = tf32
        self.param_check_interval = param_check_interval
        self.optimizer_impl: dict[str, str] = {}

        scaler_type = HalfGradScaler if opt_level == "O3" else GradScaler
        self.scalers: dict[str, GradScaler] = {
            name: scaler_type(device_type, init_scale=init_scale, growth_interval=growth_interval,
                              enabled=self.uses_scaler)
            for name in self.loss_names
        }
        self._steps = {name: 0 for name in self.loss_names}  # host side: known without a read
        self._counters: dict[str, _Counters] = {}  # created on the loss's device at its first step
        self._loaded: dict[str, dict[str, float]] = {}  # counters from a checkpoint, until then
        self._host: dict[str, dict[str, float]] = {}  # the counters as last read

    # ------------------------------------------------------------------ what the setting means

    @property
    def half_dtype(self) -> torch.dtype:
        return HALF_DTYPES[self.dtype]

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype the trainer casts floating inputs to."""
        return self.half_dtype if self.opt_level in ("O2", "O3") else torch.float32

    @property
    def uses_scaler(self) -> bool:
        return self.dtype == "fp16" and self.opt_level != "O0"

    @property
    def uses_master_weights(self) -> bool:
        return self.opt_level == "O2"

    @property
    def autocast_enabled(self) -> bool:
        return self.opt_level in ("O1", "O2")

    def __repr__(self) -> str:
        return f"PrecisionPolicy({self.opt_level!r}, {self.dtype!r}, device_type={self.device_type!r})"

    # ------------------------------------------------------------------ networks and optimizers

    def prepare_network(self, net: nn.Module) -> nn.Module:
        """Cast ``net``'s weights and buffers in place for this level; returns ``net``.

        O0/O1: unchanged (fp32). O2: half except normalization modules, which stay fp32 behind
        casting hooks. O3: every floating parameter and buffer half. Call before make_optimizer."""
        if self.opt_level == "O3":
            net.to(self.half_dtype)
        elif self.opt_level == "O2":
            for module in net.modules():
                if isinstance(module, NORM_TYPES):
                    module.float()
                    if not getattr(module, _HOOKED, False):
                        module.register_forward_pre_hook(_cast_fp32_input)
                        module.register_forward_hook(_cast_output_back)
                        setattr(module, _HOOKED, True)
                else:
                    for param in module.parameters(recurse=False):
                        if param.is_floating_point():
                            param.data = param.data.to(self.half_dtype)  # same Parameter object
                    for key, buf in module.named_buffers(recurse=False):
                        if buf.is_floating_point():
                            setattr(module, key, buf.to(self.half_dtype))
        return net

    def make_optimizer(
        self,
        name: str,
        params,
        *,
        lr: float,
        betas: tuple[float, float] = (0.5, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        fused: bool = False,
    ) -> torch.optim.Optimizer:
        """Adam for the network trained by loss ``name`` (O2: over fp32 master weights).

        ``fused=True`` uses ``Adam(fused=True)`` when torch supports it for these parameters'
        device and dtype, else ``foreach=True``; ``self.optimizer_impl[name]`` records which
        ("fused" | "foreach" | "default")."""
        params = _normalize_params(params)
        cls = MasterWeightAdam if self.uses_master_weights else torch.optim.Adam
        kwargs = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        if fused and _fused_adam_supported(params):
            optimizer, impl = cls(params, fused=True, **kwargs), "fused"
        elif fused:
            optimizer, impl = cls(params, foreach=True, **kwargs), "foreach"
        else:
            optimizer, impl = cls(params, **kwargs), "default"
        self.optimizer_impl[name] = impl
        if impl != "fused":
            self._warn_if_eps_vanishes(name, optimizer, eps)
        return optimizer

    def _warn_if_eps_vanishes(self, name: str, optimizer: torch.optim.Optimizer, eps: float) -> None:
        dtypes = {p.dtype for g in optimizer.param_groups for p in g["params"] if p.is_floating_point()}
        lost = sorted(str(d) for d in dtypes if eps > 0 and torch.tensor(eps, dtype=d).item() == 0)
        if lost:
            warnings.warn(
                f"Adam eps={eps:g} rounds to 0 in {', '.join(lost)} ({name}): a zero gradient becomes "
                f"0/0 = NaN and an underflowed second moment inf. Raise the 'adam' eps site (>= 6e-8, "
                f"e.g. 1e-4) or use the fused optimizer.", stacklevel=3)

    # ------------------------------------------------------------------ forward

    @property
    def tf32_flags(self) -> tuple[bool, bool]:
        """(matmul, cudnn) ``allow_tf32`` inside this policy's scopes."""
        if self.tf32 == "default":
            return TORCH_DEFAULT_TF32["matmul"], TORCH_DEFAULT_TF32["cudnn"]
        return (self.tf32 == "on",) * 2

    @contextlib.contextmanager
    def _tf32_scope(self) -> Iterator[None]:
        matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
        saved = (matmul.allow_tf32, cudnn.allow_tf32)
        matmul.allow_tf32, cudnn.allow_tf32 = self.tf32_flags
        try:
            yield
        finally:
            matmul.allow_tf32, cudnn.allow_tf32 = saved

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Context for forward passes and losses: autocast on for O1/O2, explicitly off for O0/O3."""
        with self._tf32_scope(), torch.autocast(self.device_type, dtype=self.half_dtype,
                                                 enabled=self.autocast_enabled):
            yield

    # ------------------------------------------------------------------ the update

    def _check_name(self, name: str) -> None:
        if name not in self.scalers:
            raise KeyError(f"unknown loss {name!r}: this policy was built for {self.loss_names}")

    def step(self, name: str, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """Backward ``loss`` and update through ``optimizer`` without waiting for the device.

        Scales the fp32 loss with this loss's own scaler, backpropagates (always, so DDP ranks stay
        in step), moves grads to the fp32 masters (O2), unscales, updates unless gradients are
        non-finite (see the module docstring for where the skip is decided), updates the scale and
        frees the grads. The optimizer's grads are cleared first: one backward per step, no
        accumulation. Returns the step's "skipped" flag as a 0-d device tensor (1.0 = skipped);
        reading it waits for the device.

        Divergence is recorded on the device and raised by :meth:`check`: the loss (or, without
        a scaler, the gradients) non-finite for ``nonfinite_patience`` consecutive steps, the loss
        scale below ``min_scale``, or non-finite weights."""
        self._check_name(name)
        masters = isinstance(optimizer, MasterWeightAdam)
        if self.uses_master_weights and not masters:
            if any(p.dtype != torch.float32 for g in optimizer.param_groups for p in g["params"]):
                raise TypeError("O2 updates fp32 master weights: build the optimizer with make_optimizer")
        scaler = self.scalers[name]
        self._steps[name] += 1
        counters = self._counters_for(name, loss.device)

        with self._tf32_scope():
            optimizer.zero_grad(set_to_none=True)
            loss = loss.float()
            loss_bad = (~torch.isfinite(loss)).any().float()
            scaler.scale(loss).backward()
            if masters:
                optimizer.copy_grads_to_masters()
            if scaler.is_enabled():
                scaler.unscale_(optimizer)
                found_inf = sum(f.to(loss.device, non_blocking=True)
                                for f in scaler._found_inf_per_device(optimizer).values())
                scaler.step(optimizer)  # skipped when a gradient overflowed (on the device if fused)
                scaler.update()
                skipped = found_inf
            else:
                found_inf = _nonfinite_flag(p.grad for g in optimizer.param_groups for p in g["params"])
                if found_inf is None:
                    found_inf = torch.zeros((), device=loss.device)
                if _skips_on_device(optimizer):
                    optimizer.grad_scale, optimizer.found_inf = None, found_inf
                    try:
                        optimizer.step()
                    finally:
                        del optimizer.grad_scale, optimizer.found_inf
                    skipped = found_inf
                else:
                    optimizer.step()  # applied: non-finite weights are caught by the next check
                    skipped = torch.zeros((), device=loss.device)
            optimizer.zero_grad(set_to_none=True)

        # bookkeeping, all on the device. With a scaler, a finite loss whose gradients overflowed is
        # ordinary loss scaling (the scale shrinks); without one nothing will shrink, so non-finite
        # gradients count as a bad step.
        bad = loss_bad if scaler.is_enabled() else torch.maximum(loss_bad, found_inf)
        counters.steps += 1
        counters.skipped += skipped
        counters.nonfinite += loss_bad
        counters.streak.copy_((counters.streak + 1) * bad)
        tripped_now = (counters.streak >= self.nonfinite_patience) & (counters.tripped_at == 0)
        counters.tripped_at.copy_(torch.where(tripped_now, counters.steps, counters.tripped_at))
        counters.last_skipped = skipped
        if self._steps[name] % self.param_check_interval == 0:
            weights = optimizer.model_parameters if masters else (
                p for g in optimizer.param_groups for p in g["params"])
            flag = _nonfinite_flag(weights)
            if flag is not None:
                first = (flag > 0) & (counters.bad_weights_at == 0)
                counters.bad_weights_at.copy_(torch.where(first, counters.steps, counters.bad_weights_at))
        return skipped

    # ------------------------------------------------------------------ divergence, read in one go

    def _counters_for(self, name: str, device: torch.device) -> _Counters:
        counters = self._counters.get(name)
        if counters is None:
            counters = self._counters[name] = _Counters(device, self._loaded.pop(name, None))
        return counters

    def _scale_tensor(self, name: str, device: torch.device) -> torch.Tensor:
        scaler = self.scalers[name]
        scale = scaler._scale if scaler.is_enabled() else None  # _get_scale_async without the warning
        if scale is None:
            return torch.full((), self.scale_before_first_step(name), device=device)
        return scale.reshape(()).to(device=device, dtype=torch.float32, non_blocking=True)

    def scale_before_first_step(self, name: str) -> float:
        scaler = self.scalers[name]
        return float(scaler._init_scale) if scaler.is_enabled() else 1.0

    HEALTH_FIELDS = _Counters.FIELDS + ("scale",)

    def health(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Every loss's counters and scale, plus a leading "diverged" flag, as one 1-D float32 tensor
        on the device (no host read): ``[diverged, *(counters + scale) per loss]``. Pass the values
        (``tensor.tolist()``, batched with other reads) to :meth:`judge`. Under DDP, all-reduce
        element 0 with MAX first so every rank stops together."""
        if device is None:
            device = next((c.steps.device for c in self._counters.values()), torch.device("cpu"))
        device = torch.device(device)
        parts, flags = [], []
        for name in self.loss_names:
            counters = self._counters_for(name, device)
            scale = self._scale_tensor(name, device)
            parts.append(torch.cat([counters.vector(), scale.reshape(1)]))
            flags += [counters.tripped_at > 0, counters.bad_weights_at > 0]
            if self.scalers[name].is_enabled():
                flags.append(scale < self.min_scale)
        diverged = torch.stack(flags).any().float().reshape(1)
        return torch.cat([diverged, *parts])

    def judge(self, values: Sequence[float]) -> Diverged | None:
        """Take the values of :meth:`health` (read on the host); remember them for :meth:`stats` and
        return the :class:`Diverged` they show, or None."""
        width = len(self.HEALTH_FIELDS)
        problems: list[Diverged] = []
        for i, name in enumerate(self.loss_names):
            host = dict(zip(self.HEALTH_FIELDS, values[1 + i * width: 1 + (i + 1) * width]))
            self._host[name] = host
            if host["tripped_at"] > 0:
                what = "loss" if host["nonfinite"] > 0 else "gradients (no loss scaling)"
                problems.append(Diverged(f"non-finite {name} {what} for {self.nonfinite_patience} "
                                         f"consecutive steps", int(host["tripped_at"]), name))
            if host["bad_weights_at"] > 0:
                problems.append(Diverged(f"non-finite {name} weights after the update",
                                         int(host["bad_weights_at"]), name))
            if self.scalers[name].is_enabled() and host["scale"] < self.min_scale:
                problems.append(Diverged(f"{name} loss scale collapsed to {_log2(host['scale'])}, below "
                                         f"min_scale {_log2(self.min_scale)}", int(host["steps"]), name))
        return min(problems, key=lambda d: d.step) if problems else None

    def check(self) -> None:
        """Read the counters (one host read) and raise :class:`Diverged` if training diverged."""
        problem = self.judge(self.health().tolist())
        if problem is not None:
            raise problem

    # ------------------------------------------------------------------ bookkeeping

    def _read(self) -> dict[str, dict[str, float]]:
        """The counters on the host (reads the device once when any loss has stepped)."""
        if self._counters:
            self.judge(self.health().tolist())
        out = {}
        for name in self.loss_names:
            host = self._host.get(name) or {**dict.fromkeys(_Counters.FIELDS, 0.0), **self._loaded.get(name, {}),
                                            "scale": self.scale_before_first_step(name)}
            out[name] = host
        return out

    def scale(self, name: str) -> float:
        """Current loss scale of ``name`` (1.0 when unscaled); reads the device."""
        self._check_name(name)
        return float(self._read()[name]["scale"]) if self.scalers[name].is_enabled() else 1.0

    def stats(self) -> dict[str, float]:
        """Per loss ``steps_/skipped_/nonfinite_/scale_<name>``; totals ``steps/skipped/skip_rate``.
        Reads the device once."""
        host = self._read()
        out: dict[str, float] = {}
        for name in self.loss_names:
            out[f"steps_{name}"] = float(self._steps[name])
            out[f"skipped_{name}"] = float(host[name]["skipped"])
            out[f"nonfinite_{name}"] = float(host[name]["nonfinite"])
            out[f"scale_{name}"] = float(host[name]["scale"]) if self.scalers[name].is_enabled() else 1.0
        steps = sum(self._steps.values())
        skipped = sum(out[f"skipped_{name}"] for name in self.loss_names)
        out["steps"], out["skipped"] = float(steps), float(skipped)
        out["skip_rate"] = skipped / steps if steps else 0.0
        return out

    def state_dict(self) -> dict[str, Any]:
        """Scalers and counters (the optimizers hold their own state, O2 masters included)."""
        host = self._read()
        return {
            "opt_level": self.opt_level,
            "dtype": self.dtype,
            "scalers": {name: s.state_dict() for name, s in self.scalers.items()},
            "steps": dict(self._steps),
            "counters": {name: {f: float(host[name][f]) for f in _Counters.FIELDS} for name in self.loss_names},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["opt_level"], state["dtype"]) != (self.opt_level, self.dtype):
            raise ValueError(f"precision state is for {state['opt_level']}/{state['dtype']}, "
                             f"not {self.opt_level}/{self.dtype}")
        missing = set(self.loss_names) - set(state["scalers"])
        if missing:
            raise ValueError(f"precision state has no scaler for {sorted(missing)}")
        for name, scaler in self.scalers.items():
            scaler.load_state_dict(state["scalers"][name])
        self._steps.update({n: int(state["steps"].get(n, 0)) for n in self.loss_names})
        counters = state.get("counters", {})
        devices = {n: c.steps.device for n, c in self._counters.items()}
        self._counters, self._host = {}, {}
        self._loaded = {n: dict(counters.get(n, {})) for n in self.loss_names}
        for name, device in devices.items():
            self._counters_for(name, device)

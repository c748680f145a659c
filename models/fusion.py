"""Fused pointwise chains: the ``fusion`` speed flag (``none | jit | compile``).

Each chain of pointwise ops in our losses and layers is written **once**, as a plain function in
the TorchScript-compatible subset of Python (type annotations, no closures). ``fused(name, mode)``
turns it into what a setting asks for:

* ``none``    the plain function (eager PyTorch, one kernel per op);
* ``jit``     ``torch.jit.script`` of the same source (what the vid2vid seed used: NVFuser/NNC fuse the
              chain into one kernel on CUDA). torch >= 2.9 warns that ``torch.jit.script`` is
              deprecated; that one warning is silenced *locally*, around the ``script`` call only.
              Note: this CPU build of torch has no LLVM, so TorchScript cannot fuse on a CPU here; a
              scripted chain runs op by op through the interpreter (measured, not assumed);
* ``compile`` ``torch.compile`` of the same source (Inductor generates one fused kernel, on CPU as on
              CUDA). Compilation happens on the first call per input signature and costs seconds:
              ``compile_seconds()`` reports that time separately so it never counts as step time.

Nothing raises because a backend is missing: when scripting or compiling a chain fails on the
installed torch, the caller gets the eager function and ``fallbacks()`` records why (a trial logs
it, e.g. as MLflow params). A compiled chain that fails on its first call (Inductor needs a C
compiler, some Python versions are unsupported, ...) falls back the same way, for good; an error
that the eager function raises too is the caller's error and is re-raised unchanged.

Loss terms (``lsgan_*``, ``hinge_*``, ``l1_mean``) compute in fp32 whatever their input dtype, as
autocast already does for ``mse_loss``/``l1_loss``: the upcast happens inside the fused kernel and
costs nothing. Layer chains (activations, normalisation, partial-conv re-normalisation) keep their
input dtype.

A model file uses a chain in one line, and registers its own chains the same way::

    from models import fusion
    act = fusion.fused("leaky_relu", flags.fusion)          # in build(): store flags.fusion
    y = act(x, 0.2)

    @fusion.register("my_model.blend")                      # at import time, module level
    def blend(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return a * w + b * (1.0 - w)
"""
from __future__ import annotations

import threading
import time
import warnings
from typing import Any, Callable, Optional, Tuple

import torch
from torch import nn

MODES = ("none", "jit", "compile")

_EAGER: dict[str, Callable[..., Any]] = {}
_CACHE: dict[tuple[str, str], Callable[..., Any]] = {}
_FALLBACKS: dict[str, str] = {}  # "name/mode" -> reason
_COMPILE_SECONDS: dict[str, float] = {}  # name -> seconds spent in first calls per input signature
_LOCK = threading.Lock()
_JIT_DEPRECATED = r".*torch\.jit\.\w+.* is deprecated"


def register(name: str, fn: Callable[..., Any] | None = None):
    """Register ``fn`` (the eager definition) as chain ``name``; usable as a decorator.

    The function must be TorchScript-compatible (annotated arguments, tensors/floats/ints/
    ``Optional[Tensor]``) so the ``jit`` mode can script it. Re-registering a name replaces it and
    drops its cached variants."""

    def wrap(func: Callable[..., Any]) -> Callable[..., Any]:
        with _LOCK:
            _EAGER[name] = func
            for mode in MODES:
                _CACHE.pop((name, mode), None)
                _FALLBACKS.pop(f"{name}/{mode}", None)
        return func

    return wrap(fn) if fn is not None else wrap


def names() -> list[str]:
    """Registered chain names."""
    return sorted(_EAGER)


def eager(name: str) -> Callable[..., Any]:
    """The plain definition of chain ``name``."""
    try:
        return _EAGER[name]
    except KeyError:
        raise KeyError(f"no fused chain {name!r}; registered: {names()}") from None


def fused(name: str, mode: str = "none") -> Callable[..., Any]:
    """Chain ``name`` in ``mode`` (``none`` | ``jit`` | ``compile``); never raises for a backend
    that does not work here (see ``fallbacks()``). Variants are built once and cached."""
    if mode not in MODES:
        raise ValueError(f"unknown fusion mode {mode!r}; allowed: {', '.join(MODES)}")
    fn = eager(name)
    if mode == "none":
        return fn
    key = (name, mode)
    cached = _CACHE.get(key)
    if cached is not None:
        return cached
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = _script(name, fn) if mode == "jit" else _CompiledChain(name, fn)
        return _CACHE[key]


def fallbacks() -> dict[str, str]:
    """``{"<name>/<mode>": reason}`` for every chain that runs eagerly although fusion was asked."""
    return dict(_FALLBACKS)


def compile_seconds() -> dict[str, float]:
    """Seconds each compiled chain spent in first calls (one per new input signature: shapes,
    dtypes, devices, requires_grad). Includes Dynamo tracing, Inductor code generation and the C++
    build, plus one forward run; the backward kernels are compiled on the first backward and show
    up in that step's time instead (a benchmark reports first-step time minus steady time)."""
    return dict(_COMPILE_SECONDS)


def status(mode: str) -> dict[str, Any]:
    """What ``mode`` resolved to, flat, for a trial's logs: fallbacks and compile time so far."""
    out: dict[str, Any] = {"fusion": mode}
    relevant = {k: v for k, v in _FALLBACKS.items() if k.endswith(f"/{mode}")}
    out["fusion_fallbacks"] = "; ".join(f"{k}: {v}" for k, v in sorted(relevant.items())) or "none"
    if mode == "compile":
        out["fusion_compile_seconds"] = float(sum(_COMPILE_SECONDS.values()))
    return out


def clear() -> None:
    """Drop cached variants, recorded fallbacks and compile times (tests; after ``torch._dynamo.reset()``)."""
    with _LOCK:
        _CACHE.clear()
        _FALLBACKS.clear()
        _COMPILE_SECONDS.clear()


def _record_fallback(name: str, mode: str, error: BaseException) -> None:
    first_line = (str(error).strip().splitlines() or [""])[0][:300]
    _FALLBACKS[f"{name}/{mode}"] = f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__
    warnings.warn(f"fusion: {name} runs eagerly, {mode} failed: {_FALLBACKS[f'{name}/{mode}']}",
                  RuntimeWarning, stacklevel=4)


def _script(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    try:
        with warnings.catch_warnings():
            # torch >= 2.9: "`torch.jit.script` is deprecated. Please switch to `torch.compile`..."
            # jit is the seed-faithful mode on purpose; only this warning, only here, is silenced
            warnings.filterwarnings("ignore", message=_JIT_DEPRECATED, category=DeprecationWarning)
            return torch.jit.script(fn)
    except Exception as error:  # noqa: BLE001 - any scripting failure means "run eagerly"
        _record_fallback(name, "jit", error)
        return fn


def _signature(args: tuple, kwargs: dict) -> tuple:
    """What makes Dynamo compile again: tensor metadata, and the values of plain scalars."""
    def one(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return (tuple(value.shape), value.dtype, value.device, value.requires_grad)
        return value if isinstance(value, (int, float, bool, str, type(None))) else type(value)

    return tuple(one(a) for a in args) + tuple((k, one(v)) for k, v in sorted(kwargs.items()))


class _CompiledChain:
    """``torch.compile(fn)`` that falls back to ``fn`` for good when compiling fails."""

    def __init__(self, name: str, fn: Callable[..., Any]):
        self.name, self.eager = name, fn
        self.__name__ = getattr(fn, "__name__", name)
        self.__doc__ = fn.__doc__
        self._seen: set[tuple] = set()
        self.compiled: Callable[..., Any] | None = None
        try:
            if not hasattr(torch, "compile"):
                raise RuntimeError(f"torch {torch.__version__} has no torch.compile")
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_JIT_DEPRECATED, category=DeprecationWarning)
                self.compiled = torch.compile(fn, dynamic=None)
        except Exception as error:  # noqa: BLE001 - e.g. an unsupported Python version
            _record_fallback(name, "compile", error)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is None:
            return self.eager(*args, **kwargs)
        sig = _signature(args, kwargs)
        if sig in self._seen:
            return self.compiled(*args, **kwargs)
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                # compiling imports parts of torch that still use torch.jit decorators
                warnings.filterwarnings("ignore", message=_JIT_DEPRECATED, category=DeprecationWarning)
                out = self.compiled(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - decide below whether it was the backend's fault
            out = self.eager(*args, **kwargs)  # raises the caller's own error unchanged
            self.compiled = None
            _record_fallback(self.name, "compile", error)
            return out
        self._seen.add(sig)
        _COMPILE_SECONDS[self.name] = _COMPILE_SECONDS.get(self.name, 0.0) + time.perf_counter() - start
        return out


# --------------------------------------------------------------------------- GAN loss terms
# Averaged over every element; fp32 inside (see module docstring).


@register("lsgan_real")
def lsgan_real(pred: torch.Tensor) -> torch.Tensor:
    """LSGAN term towards 'real' (D on real, G on fake): mean((pred - 1)^2)."""
    p = pred.float()
    return ((p - 1.0) * (p - 1.0)).mean()


@register("lsgan_fake")
def lsgan_fake(pred: torch.Tensor) -> torch.Tensor:
    """LSGAN term towards 'fake' (D on fake): mean(pred^2)."""
    p = pred.float()
    return (p * p).mean()


@register("hinge_d_real")
def hinge_d_real(pred: torch.Tensor) -> torch.Tensor:
    """Hinge D term on real: mean(relu(1 - pred))."""
    return torch.relu(1.0 - pred.float()).mean()


@register("hinge_d_fake")
def hinge_d_fake(pred: torch.Tensor) -> torch.Tensor:
    """Hinge D term on fake: mean(relu(1 + pred))."""
    return torch.relu(1.0 + pred.float()).mean()


@register("hinge_g")
def hinge_g(pred: torch.Tensor) -> torch.Tensor:
    """Hinge G term: -mean(pred)."""
    return -pred.float().mean()


@register("l1_mean")
def l1_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean(|a - b|): feature matching and L1 reconstruction terms."""
    return (a.float() - b.float()).abs().mean()


# --------------------------------------------------------------------------- layer chains
# Output dtype = input dtype.


@register("leaky_relu")
def leaky_relu(x: torch.Tensor, negative_slope: float = 0.2) -> torch.Tensor:
    """x where x > 0, else negative_slope * x (same gradient at 0 as ``F.leaky_relu``)."""
    return torch.where(x > 0, x, x * negative_slope)


@register("gelu_tanh")
def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation: the seed's fusion example (5 kernels -> 1 on 1M elements)."""
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


@register("l2_normalize")
def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """x / (||x|| + eps) over all elements: spectral norm's power-iteration step for u and v (the
    ``spectral_norm`` eps site; 1e-12 is 0 in fp16 and bf16 keeps it only as a subnormal)."""
    return x / (torch.linalg.vector_norm(x) + eps)


@register("pconv_renorm")
def pconv_renorm(raw_out: torch.Tensor, mask_sum: torch.Tensor, bias: Optional[torch.Tensor],
                 window: float, eps: float = 1e-8) -> Tuple[torch.Tensor, torch.Tensor]:
    """Partial convolution's re-normalisation (Liu et al. 2018, NVIDIA's reference code).

    ``raw_out`` = conv(x * mask) *including* the bias, ``mask_sum`` = conv(mask, ones) (the number of
    valid inputs under each window), ``bias`` the conv bias shaped to broadcast (e.g.
    ``conv.bias.view(1, -1, 1, 1)``) or None, ``window`` = K*K*(mask channels), ``eps`` the
    ``pconv_mask`` eps site (1e-8 is 0 in fp16: use 1e-6). Returns (output, updated mask):

        ratio = window / (mask_sum + eps) * clamp(mask_sum, 0, 1)
        out   = ((raw_out - bias) * ratio + bias) * clamp(mask_sum, 0, 1)     (bias=None: raw_out * ratio)
    """
    update = torch.clamp(mask_sum, 0.0, 1.0)
    ratio = window / (mask_sum + eps) * update
    if bias is None:
        return raw_out * ratio, update
    return ((raw_out - bias) * ratio + bias) * update, update


class FusedActivation(nn.Module):
    """An activation module backed by a chain: drop-in for ``nn.LeakyReLU`` / ``nn.GELU('tanh')``."""

    def __init__(self, kind: str, mode: str, negative_slope: float = 0.2):
        super().__init__()
        if kind not in ("leaky_relu", "gelu_tanh"):
            raise ValueError(f"unknown fused activation {kind!r}; allowed: leaky_relu, gelu_tanh")
        self.kind, self.mode, self.negative_slope = kind, mode, float(negative_slope)
        self.fn = fused(kind, mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "leaky_relu":
            return self.fn(x, self.negative_slope)
        return self.fn(x)

    def extra_repr(self) -> str:
        slope = f", negative_slope={self.negative_slope}" if self.kind == "leaky_relu" else ""
        return f"{self.kind}, mode={self.mode}{slope}"


def swap_activations(module: nn.Module, mode: str) -> int:
    """Replace ``nn.LeakyReLU`` and tanh-``nn.GELU`` submodules of ``module`` in place with fused
    ones; returns how many were swapped (0 for ``mode == "none"``). Worth it where the activation
    follows other pointwise work inside one compiled region; a lone in-place LeakyReLU is already one
    kernel with no extra memory, so swapping it alone buys nothing (measure before adopting)."""
    if mode == "none":
        return 0
    count = 0
    for parent in module.modules():
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.LeakyReLU):
                setattr(parent, child_name, FusedActivation("leaky_relu", mode, child.negative_slope))
            elif isinstance(child, nn.GELU) and child.approximate == "tanh":
                setattr(parent, child_name, FusedActivation("gelu_tanh", mode))
            else:
                continue
            count += 1
    return count


# --------------------------------------------------------------------------- fused optimizer


def jit_can_fuse_on_cpu() -> bool:
    """Whether TorchScript can fuse on a CPU with this torch build (needs LLVM; CPU wheels lack it)."""
    try:
        return bool(torch._C._llvm_enabled() and torch._C._jit_can_fuse_on_cpu())
    except AttributeError:
        return False


__all__ = [
    "MODES", "register", "names", "eager", "fused", "fallbacks", "compile_seconds", "status", "clear",
    "FusedActivation", "swap_activations", "jit_can_fuse_on_cpu",
    "lsgan_real", "lsgan_fake", "hinge_d_real", "hinge_d_fake", "hinge_g", "l1_mean",
    "leaky_relu", "gelu_tanh", "l2_normalize", "pconv_renorm",
]

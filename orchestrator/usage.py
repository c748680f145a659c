"""A recommended ``Setting`` in the user's own training: a plain torch.amp loop, Lightning or
Accelerate, with any optimizer class.

    setting = load_recommended_setting("runs/pix2pixhd/recommendations/pix2pixhd.yaml")
    apply_backend_flags(setting)                          # TF32 switches (process-wide)
    netG, netD = prepare_networks(setting, netG, netD)     # memory format; O2/O3 weight casts
    optG = make_optimizer(setting, torch.optim.AdamW, netG.parameters(), lr=2e-4)
    scalers = {name: torch.amp.GradScaler(**grad_scaler_kwargs(setting)) for name in ("G", "D")}
    with torch.autocast(**autocast_kwargs(setting)):
        loss = ...

``framework_settings(setting)`` says what to pass to Lightning's ``Trainer(precision=...)`` and
Accelerate's ``Accelerator(mixed_precision=...)`` where they can express the setting, and what
they cannot (O2's fp32 master weights, one loss scaler per loss, eps sites, speed flags).

Plain torch only: no Ray, no MLflow, and Lightning/Accelerate are never imported.
"""
from __future__ import annotations

import inspect
from typing import Any, Iterable

import torch
from torch import nn

from orchestrator.precision import HALF_DTYPES, PrecisionPolicy
from orchestrator.settings import Setting

# The values each library documents (Lightning 2.x ``Trainer(precision=...)``, Accelerate
# ``Accelerator(mixed_precision=...)``); tests check every mapping lands inside them.
LIGHTNING_PRECISIONS = ("transformer-engine", "transformer-engine-float16", "16-true", "16-mixed",
                        "bf16-true", "bf16-mixed", "32-true", "64-true")
ACCELERATE_MIXED_PRECISIONS = ("no", "fp16", "bf16", "fp8")


def autocast_kwargs(setting: Setting, device_type: str = "cuda") -> dict[str, Any]:
    """Keyword arguments of ``torch.autocast`` for this setting's forward passes and losses."""
    return {"device_type": device_type, "dtype": HALF_DTYPES[setting.dtype],
            "enabled": setting.opt_level in ("O1", "O2")}


def grad_scaler_kwargs(setting: Setting, device_type: str = "cuda") -> dict[str, Any]:
    """Keyword arguments of ``torch.amp.GradScaler``: build one per loss (the seeds' ``num_losses=2``:
    the discriminator's overflows must not shrink the generator's scale). Disabled for bf16 and O0.
    O3's fp16 gradients need ``orchestrator.precision.HalfGradScaler`` instead (torch's refuses them)."""
    return {"device": device_type, "enabled": setting.dtype == "fp16" and setting.opt_level != "O0",
            "init_scale": 2.0**16, "growth_interval": 2000}


def backend_flags(setting: Setting) -> dict[str, bool] | None:
    """The TF32 switches (process-wide; CUDA only), or None to leave torch's defaults."""
    if setting.flags.tf32 == "default":
        return None
    on = setting.flags.tf32 == "on"
    return {"torch.backends.cuda.matmul.allow_tf32": on, "torch.backends.cudnn.allow_tf32": on}


def apply_backend_flags(setting: Setting) -> None:
    flags = backend_flags(setting)
    if flags is not None:
        torch.backends.cuda.matmul.allow_tf32 = flags["torch.backends.cuda.matmul.allow_tf32"]
        torch.backends.cudnn.allow_tf32 = flags["torch.backends.cudnn.allow_tf32"]


def prepare_networks(setting: Setting, *nets: nn.Module) -> tuple[nn.Module, ...]:
    """channels_last when asked, and the weight casts of O2 (half, norm layers fp32) and O3 (half).
    Call before building optimizers. Inputs must then be given in ``input_dtype(setting)``."""
    policy = PrecisionPolicy(setting.opt_level, setting.dtype)
    out = []
    for net in nets:
        if setting.flags.channels_last:
            net = net.to(memory_format=torch.channels_last)
        out.append(policy.prepare_network(net))
    return tuple(out)


def input_dtype(setting: Setting) -> torch.dtype:
    return PrecisionPolicy(setting.opt_level, setting.dtype).input_dtype


def make_optimizer(setting: Setting, optimizer_class: type[torch.optim.Optimizer], params: Iterable,
                   **kwargs: Any) -> torch.optim.Optimizer:
    """Any torch optimizer class, with the setting's choices where the class takes them: the
    ``adam`` eps site as ``eps``, and ``fused=True`` for the fused_optimizer flag. Under O2, the
    project's ``PrecisionPolicy.make_optimizer`` keeps fp32 master weights (Adam only); a plain
    optimizer over O2's half weights would update them in half precision."""
    accepted = inspect.signature(optimizer_class.__init__).parameters
    if "adam" in setting.eps and "eps" in accepted:
        kwargs.setdefault("eps", setting.eps["adam"])
    if setting.flags.fused_optimizer and "fused" in accepted:
        kwargs.setdefault("fused", True)
    return optimizer_class(params, **kwargs)


def eps_instructions(setting: Setting) -> list[str]:
    """What the user must change by hand: each eps site the setting moves from the model's default."""
    lines = []
    for site, value in setting.eps.items():
        where = "the optimizer's eps" if site == "adam" else f"the model's {site!r} constant"
        lines.append(f"set {where} to {value:g} (eps site {site})")
    return lines


def flag_instructions(setting: Setting) -> list[str]:
    flags, lines = setting.flags, []
    if flags.checkpointing != "none":
        lines.append(f"gradient checkpointing of the {flags.checkpointing} (torch.utils.checkpoint)")
    if flags.fusion != "none":
        lines.append(f"fused pointwise chains ({'torch.compile' if flags.fusion == 'compile' else 'torch.jit.script'})")
    if flags.affinity:
        lines.append("pin each training process to the CPU cores nearest its GPU (orchestrator.affinity)")
    if flags.channels_last:
        lines.append("channels_last memory format for networks and 4-D inputs")
    if flags.fused_optimizer:
        lines.append("a fused optimizer (torch's fused=True)")
    return lines


def lightning_precision(setting: Setting) -> tuple[str | None, str]:
    """(Lightning ``precision=`` value or None, what it does not cover)."""
    gaps = []
    if setting.opt_level == "O0":
        value = "32-true"
    elif setting.opt_level == "O1":
        value = "16-mixed" if setting.dtype == "fp16" else "bf16-mixed"
        if setting.dtype == "fp16":
            gaps.append("Lightning uses one GradScaler for every loss, the seeds one per loss (manual "
                        "optimization with two scalers restores it)")
    elif setting.opt_level == "O3":
        value = "16-true" if setting.dtype == "fp16" else "bf16-true"
        if setting.dtype == "fp16":
            gaps.append("16-true has no loss scaling: O3's scaled fp16 gradients need the project's HalfGradScaler")
    else:
        return None, ("no Lightning precision keeps fp32 master weights behind a half model (O2): use the "
                      "project's PrecisionPolicy in a LightningModule with manual optimization, or O1's '"
                      + ("16-mixed" if setting.dtype == "fp16" else "bf16-mixed") + "'")
    if setting.flags.tf32 != "off":
        gaps.append("TF32 is not part of precision=: set the backend flags (backend_flags) yourself")
    return value, "; ".join(gaps)


def accelerate_mixed_precision(setting: Setting) -> tuple[str | None, str]:
    """(Accelerate ``mixed_precision=`` value or None, what it does not cover)."""
    if setting.opt_level == "O0":
        return "no", ""
    if setting.opt_level == "O1":
        gap = ("Accelerate keeps one GradScaler for every loss, the seeds one per loss"
               if setting.dtype == "fp16" else "")
        return setting.dtype, gap
    return None, (f"Accelerate's mixed_precision only autocasts ({setting.opt_level} casts the weights"
                  + (" and keeps fp32 master weights" if setting.opt_level == "O2" else "") + "): use the "
                  "project's PrecisionPolicy with Accelerate's prepare(), mixed_precision='no'")


def framework_settings(setting: Setting) -> dict[str, Any]:
    """Everything a user needs to apply ``setting`` outside this project, as plain data (written
    into the recommendation file and the report)."""
    lightning, lightning_gap = lightning_precision(setting)
    accelerate, accelerate_gap = accelerate_mixed_precision(setting)
    return {
        "autocast": {k: (str(v).replace("torch.", "") if k == "dtype" else v)
                     for k, v in autocast_kwargs(setting).items()},
        "grad_scaler_per_loss": grad_scaler_kwargs(setting),
        "backend_flags": backend_flags(setting) or "torch defaults (PyTorch's own TF32 settings)",
        "lightning": {"precision": lightning, "not_covered": lightning_gap},
        "accelerate": {"mixed_precision": accelerate, "not_covered": accelerate_gap},
        "set_by_hand": eps_instructions(setting) + flag_instructions(setting),
    }

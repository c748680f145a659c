"""What the training device is and what it means for the search: TF32 support and PyTorch's own
backend defaults, read where the training runs (a Ray worker), never on the driver, which on a
cluster is often a CPU-only head node.

No Ray here: ``describe_device`` runs in any process; ``orchestrator.search.probe_device`` runs it
as a Ray task with a trial's resources.
"""
from __future__ import annotations

import platform
from dataclasses import asdict, dataclass

import torch

TF32_MIN_CAPABILITY = (8, 0)  # Ampere and newer have TF32 tensor cores


@dataclass(frozen=True)
class DeviceInfo:
    type: str  # "cuda" | "cpu"
    name: str
    capability: tuple[int, int] | None  # CUDA compute capability
    count: int  # devices of this type visible to the worker
    torch_version: str
    host: str
    # torch's TF32 flags as found in the worker before any setting changed them
    default_matmul_tf32: bool = False
    default_cudnn_tf32: bool = False

    @property
    def tf32_capable(self) -> bool:
        """TF32 changes the arithmetic here (a CUDA device of compute capability >= 8.0)."""
        return self.type == "cuda" and self.capability is not None and tuple(self.capability) >= TF32_MIN_CAPABILITY

    @property
    def torch_default_differs(self) -> bool:
        """PyTorch's default fp32 is not strict fp32 here: it uses TF32 somewhere."""
        return self.tf32_capable and (self.default_matmul_tf32 or self.default_cudnn_tf32)

    def describe(self) -> str:
        if self.type == "cuda":
            cc = ".".join(map(str, self.capability)) if self.capability else "?"
            tf32 = (f"; PyTorch default fp32 uses TF32 for {self.torch_default_tf32_text()}"
                    if self.torch_default_differs else "")
            return f"{self.host}: {self.count}x {self.name} (compute capability {cc}); torch {self.torch_version}{tf32}"
        return f"{self.host}: {self.name}; torch {self.torch_version}"

    def torch_default_tf32_text(self) -> str:
        parts = [what for what, on in (("convolutions", self.default_cudnn_tf32),
                                       ("matmuls", self.default_matmul_tf32)) if on]
        return " and ".join(parts) or "nothing"

    def as_dict(self) -> dict:
        out = asdict(self)
        out["capability"] = list(self.capability) if self.capability else None
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "DeviceInfo":
        data = dict(data)
        cap = data.get("capability")
        data["capability"] = tuple(cap) if cap else None
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def describe_device(device: torch.device | str | None = None) -> DeviceInfo:
    """The device training would use here (CUDA when available, unless ``device`` says otherwise)."""
    from orchestrator.precision import TORCH_DEFAULT_TF32  # read at import, before any policy ran

    device = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return DeviceInfo(type="cuda", name=torch.cuda.get_device_name(index),
                          capability=tuple(torch.cuda.get_device_capability(index)),
                          count=torch.cuda.device_count(), torch_version=torch.__version__,
                          host=platform.node(), default_matmul_tf32=TORCH_DEFAULT_TF32["matmul"],
                          default_cudnn_tf32=TORCH_DEFAULT_TF32["cudnn"])
    name = f"CPU only ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads)"
    return DeviceInfo(type="cpu", name=name, capability=None, count=1, torch_version=torch.__version__,
                      host=platform.node())

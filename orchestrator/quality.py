"""Image quality of generated samples against their paired ground truth (torchmetrics).

SSIM, PSNR and L1 need nothing downloaded. The Fréchet distance needs a feature network: a
TorchScript file the user gives (e.g. an Inception feature extractor), or else a fixed, seeded
random conv net. The network's name is part of the metric's key (``fd_<name>``) so distances
from different feature networks are never compared with each other.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchmetrics import MeanAbsoluteError
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from torchmetrics.image.fid import FrechetInceptionDistance

FALLBACK_FEATURES = "randconv32"

# direction of each metric: +1 higher is better, -1 lower is better
DIRECTION = {"ssim": +1, "psnr": +1, "l1": -1, "fd": -1}


def metric_direction(metric: str) -> int:
    """+1 if higher is better, -1 if lower is better (``fd_*`` keys count as ``fd``)."""
    base = "fd" if metric.startswith("fd_") else metric
    if base not in DIRECTION:
        raise ValueError(f"unknown quality metric {metric!r}; allowed: ssim, psnr, l1, fd_<network>")
    return DIRECTION[base]


class RandomConvFeatures(nn.Module):
    """A fixed random conv net as a stand-in feature extractor when no trained one is available.

    Random conv features still separate image distributions (texture and colour statistics), but
    their distances are not comparable to published FID numbers: hence the distinct name."""

    num_features = 32

    def __init__(self, seed: int = 1234):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        widths = [3, 16, 32, self.num_features]
        layers: list[nn.Module] = []
        for cin, cout in zip(widths[:-1], widths[1:]):
            conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / (cin * 9)) ** 0.5)
                conv.bias.zero_()
            layers += [conv, nn.LeakyReLU(0.2)]
        self.body = nn.Sequential(*layers).requires_grad_(False).eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # images in [0, 1]
        images = nn.functional.interpolate(images.float(), size=(64, 64), mode="bilinear", align_corners=False)
        return self.body(images * 2 - 1).mean(dim=(2, 3))


class TorchScriptFeatures(nn.Module):
    """A user-supplied TorchScript feature extractor: (N,3,H,W) floats in [0,1] -> (N,F)."""

    def __init__(self, path: str | Path):
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"quality.feature_network: file {str(path)!r} not found")
        self.net = torch.jit.load(str(path), map_location="cpu").eval()
        with torch.no_grad():
            probe = self.net(torch.rand(2, 3, 64, 64))
        if probe.dim() != 2:
            raise ValueError(f"quality.feature_network {str(path)!r} must return (N, F) features, got {tuple(probe.shape)}")
        self.num_features = int(probe.shape[1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.float())


def feature_network(path: str | Path | None) -> tuple[nn.Module, str]:
    """(module, name) for the Fréchet distance."""
    if path is None:
        return RandomConvFeatures(), FALLBACK_FEATURES
    return TorchScriptFeatures(path), Path(path).stem.replace("-", "_").replace(".", "_")


class QualityMeter:
    """Accumulates (fake, real) batches in [-1, 1]; ``compute`` returns every metric as a float."""

    def __init__(self, feature_path: str | Path | None = None, device: torch.device | str = "cpu"):
        features, self.feature_name = feature_network(feature_path)
        self.metrics = {
            "ssim": StructuralSimilarityIndexMeasure(data_range=1.0),
            "psnr": PeakSignalNoiseRatio(data_range=1.0),
            "l1": MeanAbsoluteError(),
            f"fd_{self.feature_name}": FrechetInceptionDistance(feature=features, normalize=True),
        }
        for metric in self.metrics.values():
            metric.to(device)
        self.count = 0

    @torch.no_grad()
    def update(self, fake: torch.Tensor, real: torch.Tensor) -> None:
        fake01 = ((fake.float().clamp(-1, 1) + 1) / 2)
        real01 = ((real.float().clamp(-1, 1) + 1) / 2)
        for name, metric in self.metrics.items():
            if name.startswith("fd_"):
                metric.update(real01, real=True)
                metric.update(fake01, real=False)
            else:
                metric.update(fake01, real01)
        self.count += fake.shape[0]

    def compute(self) -> dict[str, float]:
        if self.count < 2:
            raise ValueError(f"quality needs at least 2 samples, got {self.count}: raise data.val_samples")
        return {name: float(metric.compute()) for name, metric in self.metrics.items()}

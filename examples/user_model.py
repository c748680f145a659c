"""A complete user model: colourise grayscale images with a small conditional GAN.

Run a study on it with

    python run_experiment.py --model examples/user_model.py:Colorizer --search-space search_spaces/user.yaml

Everything the orchestrator needs is the ``GANModel`` interface (models/base.py): networks, losses,
data and the numerically sensitive constants ("eps sites") the study may tune.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.base import TRAINER_FLAGS, Batch, GANModel, Logs, Nets
from models.layers import maybe_checkpoint
from orchestrator.settings import SpeedFlags


class SmoothColours(torch.utils.data.Dataset):
    """Deterministic smooth colour fields (a few blurred blobs per image) and their grayscale."""

    def __init__(self, height: int, width: int, count: int, seed: int):
        self.height, self.width, self.count, self.seed = height, width, count, seed

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Batch:
        rng = np.random.default_rng([self.seed, index])
        yy, xx = np.mgrid[0:self.height, 0:self.width] / max(self.height, self.width)
        image = np.zeros((3, self.height, self.width), dtype=np.float32) + rng.uniform(0.2, 0.8, (3, 1, 1))
        for _ in range(4):
            cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.4)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / r**2)
            image += rng.uniform(-0.5, 0.5, (3, 1, 1)) * blob
        rgb = torch.from_numpy(np.clip(image, 0, 1)) * 2 - 1
        gray = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]).unsqueeze(0)
        return {"gray": gray, "image": rgb}


class Block(nn.Module):
    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.InstanceNorm2d(channels, eps=eps)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.norm(self.conv1(x))))


class Generator(nn.Module):
    def __init__(self, width: int, blocks: int, eps: float, checkpointing: bool):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.blocks = nn.ModuleList(Block(width, eps) for _ in range(blocks))
        self.head = nn.Conv2d(width, 3, 3, padding=1)
        self.checkpointing = checkpointing

    def forward(self, gray: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(gray))
        for block in self.blocks:
            x = maybe_checkpoint(block, x, enabled=self.checkpointing)
        return torch.tanh(self.head(x))


class Discriminator(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(4, width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, width * 2, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width * 2, 1, 3, 1, 1),
        )

    def forward(self, gray: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.body(torch.cat([gray, image], dim=1))


class Colorizer(GANModel):
    name = "colorizer"
    supported_flags = TRAINER_FLAGS | {"checkpointing"}
    eps_sites = {"adam": 1e-8, "instance_norm": 1e-5}
    presets: dict[str, dict[str, Any]] = {
        "tiny": {"width": 8, "blocks": 2, "l1_weight": 10.0},
        "small": {"width": 32, "blocks": 4, "l1_weight": 10.0},
        "paper": {"width": 64, "blocks": 9, "l1_weight": 10.0},
    }

    def build(self, preset: str, eps: dict[str, float], flags: SpeedFlags) -> Nets:
        arch = self.arch(preset)
        self.l1_weight = arch["l1_weight"]
        generator = Generator(arch["width"], arch["blocks"], eps["instance_norm"],
                              checkpointing=flags.checkpointing != "none")
        return Nets(generator=generator, discriminator=Discriminator(arch["width"]))

    def dataset(self, data_cfg: Any, split: str) -> torch.utils.data.Dataset:
        count = data_cfg.train_samples if split == "train" else data_cfg.val_samples
        seed = data_cfg.seed if split == "train" else data_cfg.seed + 10_000
        return SmoothColours(data_cfg.height, data_cfg.width, count, seed)

    def discriminator_loss(self, nets: Nets, batch: Batch) -> tuple[torch.Tensor, Logs]:
        with torch.no_grad():
            fake = nets.generator(batch["gray"])
        real_score = nets.discriminator(batch["gray"], batch["image"])
        fake_score = nets.discriminator(batch["gray"], fake)
        loss = 0.5 * (F.mse_loss(real_score.float(), torch.ones_like(real_score, dtype=torch.float32))
                      + F.mse_loss(fake_score.float(), torch.zeros_like(fake_score, dtype=torch.float32)))
        return loss, {}

    def generator_loss(self, nets: Nets, batch: Batch) -> tuple[torch.Tensor, Logs]:
        fake = nets.generator(batch["gray"])
        score = nets.discriminator(batch["gray"], fake)
        adversarial = F.mse_loss(score.float(), torch.ones_like(score, dtype=torch.float32))
        l1 = F.l1_loss(fake.float(), batch["image"].float())
        return adversarial + self.l1_weight * l1, {"g_l1": l1.detach()}

    def samples(self, nets: Nets, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return nets.generator(batch["gray"]), batch["image"]

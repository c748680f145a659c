"""A user model with an fp16 hazard planted in it: user-guided colourisation (a grayscale photo
plus a few colour hints a user clicked, as in Zhang et al. 2017), built on the colouriser of
``examples/user_model.py``.

The hints are spread to their neighbourhood by a box filter and normalised by how many hints the
window holds, written the way fp32 code writes it::

    local_colour = box(hints) / (box(hint_mask) + 1e-8)

Under AMP the box filter is a convolution, so both sums come out in half precision. In fp16 the
1e-8 rounds to 0 and every window without a hint (most of them: hints are sparse) divides 0 by 0
= NaN: training diverges at once. bf16 keeps 1e-8; fp16 with an eps of 1e-6 or more trains. The
eps is the model's eps site ``hint_norm``, so a study can search it, and
``search_spaces/planted_user.yaml`` lets the doctor choose the values (``search.eps: auto``)::

    python -m orchestrator doctor --model examples/planted_user_model.py:HintColorizer
    python run_experiment.py --model examples/planted_user_model.py:HintColorizer \\
        --search-space search_spaces/planted_user.yaml
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.base import TRAINER_FLAGS, Batch, GANModel, Logs, Nets
from models.layers import maybe_checkpoint
from orchestrator.settings import SpeedFlags

HINT_SHARE = 0.02  # share of pixels with a user colour hint
WINDOW = 5  # box filter spreading each hint


def _user_model_module():
    """examples/user_model.py (its images, blocks and discriminator), loaded by path."""
    path = Path(__file__).resolve().parent / "user_model.py"
    spec = importlib.util.spec_from_file_location("amp_examples_user_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_BASE = _user_model_module()


class HintedColours(torch.utils.data.Dataset):
    """The colouriser's smooth colour fields with sparse colour hints: ``hint_mask`` (1, H, W) is 1
    at about 2 % of the pixels, ``hints`` (3, H, W) the true colour there and 0 elsewhere."""

    def __init__(self, height: int, width: int, count: int, seed: int):
        self.images = _BASE.SmoothColours(height, width, count, seed)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Batch:
        item = self.images[index]
        rng = np.random.default_rng([self.seed, index, 7])
        mask = torch.from_numpy(rng.random(item["gray"].shape) < HINT_SHARE).float()
        return {**item, "hint_mask": mask, "hints": item["image"] * mask}


class HintSpread(nn.Module):
    """Each pixel gets the mean colour of the hints in its ``WINDOW`` x ``WINDOW`` neighbourhood
    (0 where there is none) and the share of hinted pixels there."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps
        self.register_buffer("box", torch.ones(1, 1, WINDOW, WINDOW), persistent=False)

    def forward(self, hints: torch.Tensor, hint_mask: torch.Tensor) -> torch.Tensor:
        box = self.box.to(hints.dtype)
        count = F.conv2d(hint_mask.to(hints.dtype), box, padding=WINDOW // 2)
        colour_sum = F.conv2d(hints, box.expand(3, 1, WINDOW, WINDOW), padding=WINDOW // 2, groups=3)
        local_colour = colour_sum / (count + self.eps)
        return torch.cat([local_colour, count / WINDOW**2], dim=1)


class Generator(nn.Module):
    def __init__(self, width: int, blocks: int, eps_hint: float, eps_norm: float, checkpointing: bool):
        super().__init__()
        self.hints = HintSpread(eps_hint)
        self.stem = nn.Conv2d(1 + 4, width, 3, padding=1)
        self.blocks = nn.ModuleList(_BASE.Block(width, eps_norm) for _ in range(blocks))
        self.head = nn.Conv2d(width, 3, 3, padding=1)
        self.checkpointing = checkpointing

    def forward(self, gray: torch.Tensor, hints: torch.Tensor, hint_mask: torch.Tensor) -> torch.Tensor:
        spread = self.hints(hints, hint_mask)
        x = F.relu(self.stem(torch.cat([gray, spread.to(gray.dtype)], dim=1)))
        for block in self.blocks:
            x = maybe_checkpoint(block, x, enabled=self.checkpointing)
        return torch.tanh(self.head(x))


class HintColorizer(GANModel):
    name = "hint_colorizer"
    supported_flags = TRAINER_FLAGS | {"checkpointing"}
    # hint_norm: 1e-8, as fp32 code writes it (0 in fp16)
    eps_sites = {"adam": 1e-8, "instance_norm": 1e-5, "hint_norm": 1e-8}
    presets: dict[str, dict[str, Any]] = {
        "tiny": {"width": 8, "blocks": 2, "l1_weight": 10.0},
        "small": {"width": 32, "blocks": 4, "l1_weight": 10.0},
        "paper": {"width": 64, "blocks": 9, "l1_weight": 10.0},
    }

    def build(self, preset: str, eps: dict[str, float], flags: SpeedFlags) -> Nets:
        arch = self.arch(preset)
        self.l1_weight = arch["l1_weight"]
        generator = Generator(arch["width"], arch["blocks"], eps["hint_norm"], eps["instance_norm"],
                              checkpointing=flags.checkpointing != "none")
        return Nets(generator=generator, discriminator=_BASE.Discriminator(arch["width"]))

    def dataset(self, data_cfg: Any, split: str) -> torch.utils.data.Dataset:
        count = data_cfg.train_samples if split == "train" else data_cfg.val_samples
        seed = data_cfg.seed if split == "train" else data_cfg.seed + 10_000
        return HintedColours(data_cfg.height, data_cfg.width, count, seed)

    @staticmethod
    def generate(nets: Nets, batch: Batch) -> torch.Tensor:
        return nets.generator(batch["gray"], batch["hints"], batch["hint_mask"])

    def discriminator_loss(self, nets: Nets, batch: Batch) -> tuple[torch.Tensor, Logs]:
        with torch.no_grad():
            fake = self.generate(nets, batch)
        real_score = nets.discriminator(batch["gray"], batch["image"])
        fake_score = nets.discriminator(batch["gray"], fake)
        loss = 0.5 * (F.mse_loss(real_score.float(), torch.ones_like(real_score, dtype=torch.float32))
                      + F.mse_loss(fake_score.float(), torch.zeros_like(fake_score, dtype=torch.float32)))
        return loss, {}

    def generator_loss(self, nets: Nets, batch: Batch) -> tuple[torch.Tensor, Logs]:
        fake = self.generate(nets, batch)
        score = nets.discriminator(batch["gray"], fake)
        adversarial = F.mse_loss(score.float(), torch.ones_like(score, dtype=torch.float32))
        l1 = F.l1_loss(fake.float(), batch["image"].float())
        return adversarial + self.l1_weight * l1, {"g_l1": l1.detach()}

    def samples(self, nets: Nets, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.generate(nets, batch), batch["image"]

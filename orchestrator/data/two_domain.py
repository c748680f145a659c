"""Unpaired two-domain images for UNIT and MUNIT: the synthetic street scenes (``street.py``) as
domain A ("summer"), and a deterministic, class-aware winter restyling of them as domain B.

The restyling (:func:`winterize`) reads each pixel's class from the scene's label map: snow covers
terrain, vegetation and sidewalks (more or less, by the image's ``snow`` amount), the sky turns an
overcast grey, the road darkens as if wet, and the whole image cools and loses saturation. Three
numbers drawn per B image make domain B multimodal, as MUNIT assumes: the snow amount, the overcast
and a colour temperature. Nothing in the restyle is random beyond those three numbers, so the B
rendering of a scene is an exact ground truth for translating its A rendering.

* ``train``: item ``i`` holds ``image_a`` = scene ``i`` in domain A and ``image_b`` = scene
  ``N + i`` in domain B (``N`` = ``train_samples``): two disjoint sets of scenes, **unpaired**.
* ``val``: item ``k`` holds the **same** scene in both domains, so a translation a -> b can be
  compared with the true B image (content preservation and style; SSIM/L1) and b -> a with the true
  A image; the Fréchet distance compares the translated set with the real one.

An item: ``image_a``, ``image_b`` (3, H, W) float32 in [-1, 1]; ``style_b`` (3,) float32, the B
image's (snow, overcast, temperature) in [0, 1] (for tests and analysis; no model trains on it).
Everything is drawn from numpy Generators seeded by ``(seed, split, scene)``: any process, any order
gives the same tensors.
"""
from __future__ import annotations

import numpy as np
import torch

from orchestrator.config import DataConfig
from orchestrator.data.seeded import SPLIT_STREAM, SeededDataset
from orchestrator.data.street import CLASSES, render_street

_STYLE_TAG = 0xB1  # keeps the style draws apart from any stream street.py derives from the same key
SNOW_CLASSES = ("terrain", "vegetation", "sidewalk")
LUMA = np.array([0.299, 0.587, 0.114], np.float32)
SNOW = (0.45, 0.95)       # range of the snow amount
OVERCAST = (0.3, 1.0)     # range of the sky's overcast
TEMPERATURE = 0.08        # largest red/blue shift of the colour temperature

__all__ = ["TwoDomainDataset", "winterize", "winter_style"]


def winter_style(rng: np.random.Generator) -> np.ndarray:
    """One B image's (snow, overcast, temperature), each in [0, 1]."""
    return rng.random(3).astype(np.float32)


def winterize(rgb: np.ndarray, label: np.ndarray, style: np.ndarray) -> np.ndarray:
    """The domain-B rendering of a scene: ``rgb`` (H, W, 3) in [0, 1], ``label`` (H, W) Cityscapes
    ids, ``style`` (snow, overcast, temperature) in [0, 1] -> (H, W, 3) float32 in [0, 1]."""
    snow = SNOW[0] + (SNOW[1] - SNOW[0]) * float(style[0])
    overcast = OVERCAST[0] + (OVERCAST[1] - OVERCAST[0]) * float(style[1])
    temperature = (2 * float(style[2]) - 1) * TEMPERATURE
    rgb = rgb.astype(np.float32)
    luma = (rgb @ LUMA)[..., None]
    out = rgb * np.float32([0.88, 0.96, 1.08])           # cooler light
    out = out + 0.3 * (luma - out)                       # less saturated
    snowy = np.isin(label, [CLASSES[c] for c in SNOW_CLASSES])[..., None]
    snow_colour = (0.8 + 0.3 * (luma - 0.5)) * np.float32([0.97, 0.99, 1.03])  # keeps the texture
    out = np.where(snowy, out + snow * (snow_colour - out), out)
    sky = (label == CLASSES["sky"])[..., None]
    grey = (0.62 + 0.25 * luma) * np.float32([0.96, 0.98, 1.02])
    out = np.where(sky, out + 0.85 * overcast * (grey - out), out)
    road = (label == CLASSES["road"])[..., None]
    out = np.where(road, 0.7 * out + np.float32([0.0, 0.01, 0.04]), out)
    out = out * np.float32([1 - temperature, 1.0, 1 + temperature])
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))) * 2 - 1


class TwoDomainDataset(SeededDataset):
    """``train``: ``data_cfg.train_samples`` unpaired (A, B) items; ``val``: ``val_samples`` paired
    ones (see the module docstring). ``data_cfg.options`` takes none."""

    def __init__(self, data_cfg: DataConfig, split: str = "train"):
        super().__init__(data_cfg, split)
        if data_cfg.options:
            raise ValueError(f"two-domain data has no option(s) {sorted(data_cfg.options)}; it takes none")

    def scene_b(self, index: int) -> int:
        """The scene shown in domain B by item ``index`` (another scene in train, the same in val)."""
        return self.length + index if self.split == "train" else index

    def style(self, scene: int) -> np.ndarray:
        key = [abs(self.seed), int(self.seed < 0), SPLIT_STREAM[self.split], int(scene), _STYLE_TAG]
        return winter_style(np.random.default_rng(np.random.SeedSequence(key)))

    def render(self, scene: int, domain: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(rgb (H, W, 3) in [0, 1], style or None) of ``scene`` in ``domain`` 'a' or 'b'."""
        label, _, rgb = render_street(self.seed, scene, self.height, self.width, self.split)
        if domain == "a":
            return rgb, None
        style = self.style(scene)
        return winterize(rgb, label, style), style

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        self.check_index(index)
        label, _, image_a = render_street(self.seed, index, self.height, self.width, self.split)
        scene_b = self.scene_b(index)
        if scene_b != index:
            label, _, rgb = render_street(self.seed, scene_b, self.height, self.width, self.split)
        else:
            rgb = image_a
        style = self.style(scene_b)
        image_b = winterize(rgb, label, style)
        return {"image_a": _tensor(image_a), "image_b": _tensor(image_b), "style_b": torch.from_numpy(style)}

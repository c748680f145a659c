"""Few-shot video sequences: a target clip plus K example frames of the same video.

Few-shot vid2vid (Wang et al., 2019) learns to synthesise a video of an *unseen* subject from a few
example images of it. What makes the examples necessary is that every sequence looks different:
the generator cannot know a sequence's colours from its label maps alone. This module builds that
setting on top of the synthetic street videos of :mod:`orchestrator.data.videos` (label maps,
images and exact backward flow):

* each video keeps its own scene content (layout, facade colours, objects) from ``videos``, and is
  additionally **restyled** with its own colour transform, drawn per sequence: a hue rotation
  about the grey axis (any angle, so a sky may come out green or a road purple), a saturation and
  a contrast gain and a brightness shift. All frames of a sequence (targets and examples) share it;
  two sequences almost never do. Set ``options["restyle"] = False`` for the plain street colours.
* the ``K`` examples (``options["shots"]``, default 2) are other frames of the same video, at
  distinct times drawn after the target clip (``options["ref_window"]`` frames to choose from,
  default 24): same scene and style, different camera position and object poses.
* the target clip has ``T`` frames (``options["frames"]``, default 2; few-shot vid2vid's
  ``num_frames_G``), with the ground-truth backward flow between consecutive frames (in pixels,
  ``videos``' convention: ``flow[i]`` belongs to frame ``i + 1`` and points into frame ``i``).

An item (unbatched; class ids are Cityscapes ids, one-hot over ``label_nc`` channels)::

    ref_images  (K, 3, H, W)         float32 in [-1, 1]
    ref_labels  (K, label_nc, H, W)  float32 one-hot
    labels      (T, label_nc, H, W)  float32 one-hot
    frames      (T, 3, H, W)         float32 in [-1, 1]
    flow        (T-1, 2, H, W)       float32, pixels (x, y)
    flow_mask   (T-1, 1, H, W)       float32 0/1: the point was visible in the previous frame

Every draw comes from a numpy Generator seeded by ``(seed, split, index)`` (no global RNG) and
items are rendered on demand, so any process produces the same tensors.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from orchestrator.config import DataConfig
from orchestrator.data.seeded import SPLIT_STREAM
from orchestrator.data.street import LABEL_NC, LabelMapDataset
from orchestrator.data.videos import VideoScene, one_hot

DEFAULT_SHOTS = 2
DEFAULT_FRAMES = 2
DEFAULT_REF_WINDOW = 24
_STYLE_TAG = 0xF5  # keeps this module's draws apart from any stream videos.py derives from the same key

__all__ = ["DEFAULT_SHOTS", "DEFAULT_FRAMES", "FewShotDataset", "SequenceStyle", "few_shot_options"]


class SequenceStyle:
    """One sequence's colour transform: ``rgb -> clip(contrast * (R_hue S_sat (rgb - g)) + g + shift)``
    with ``g`` the mid grey, ``R_hue`` a rotation about the grey axis and ``S_sat`` a saturation
    gain (scales the colour away from / toward its grey projection)."""

    def __init__(self, rng: np.random.Generator):
        angle = float(rng.uniform(0, 2 * np.pi))
        axis = np.ones(3) / np.sqrt(3.0)
        cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        rot = np.cos(angle) * np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * np.outer(axis, axis)
        grey = np.outer(axis, axis)  # projection onto the grey axis
        saturation = float(rng.uniform(0.7, 1.6))
        sat = grey + saturation * (np.eye(3) - grey)
        contrast = float(rng.uniform(0.75, 1.3))
        self.matrix = (contrast * rot @ sat).astype(np.float32)
        self.shift = rng.uniform(-0.12, 0.12, 3).astype(np.float32)
        self.angle, self.saturation, self.contrast = angle, saturation, contrast

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        """(..., 3) colours in [0, 1] -> restyled colours in [0, 1] (float32)."""
        centred = rgb.astype(np.float32) - 0.5
        return np.clip(centred @ self.matrix.T + 0.5 + self.shift, 0.0, 1.0).astype(np.float32)


def few_shot_options(options: dict[str, Any]) -> tuple[int, int, int, bool]:
    """``(shots, frames, ref_window, restyle)`` from ``data_cfg.options``, validated."""
    allowed = {"shots", "frames", "ref_window", "restyle"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"few-shot data has no option(s) {unknown}; allowed: {sorted(allowed)}")
    shots = options.get("shots", DEFAULT_SHOTS)
    frames = options.get("frames", DEFAULT_FRAMES)
    window = options.get("ref_window", DEFAULT_REF_WINDOW)
    restyle = options.get("restyle", True)
    for name, value, low in (("shots", shots, 1), ("frames", frames, 2), ("ref_window", window, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"data.options.{name} must be an integer >= {low}, got {value!r}")
    if window < shots:
        raise ValueError(f"data.options.ref_window ({window}) must be >= shots ({shots}): the examples are "
                         "distinct frames")
    if not isinstance(restyle, bool):
        raise ValueError(f"data.options.restyle must be true or false, got {restyle!r}")
    return shots, frames, window, restyle


class FewShotDataset(LabelMapDataset):
    """``train`` holds ``data_cfg.train_samples`` sequences, ``val`` ``data_cfg.val_samples`` from
    another seed stream; see the module docstring for an item's contents."""

    data_kind, items = "video", "sequences"

    def __init__(self, data_cfg: DataConfig, split: str = "train", label_nc: int = LABEL_NC):
        super().__init__(data_cfg, split, label_nc)
        self.shots, self.frames, self.ref_window, self.restyle = few_shot_options(data_cfg.options)

    def _streams(self, index: int) -> tuple[np.random.Generator, np.random.Generator]:
        """(style, example times) generators of one sequence: independent streams, so changing
        ``shots`` or ``ref_window`` never changes a sequence's colours."""
        key = [abs(int(self.seed)), int(self.seed < 0), SPLIT_STREAM[self.split], int(index), _STYLE_TAG]
        style, times = np.random.SeedSequence(key).spawn(2)
        return np.random.default_rng(style), np.random.default_rng(times)

    def reference_times(self, index: int) -> list[int]:
        """The example frames' times (distinct, after the target clip's ``frames`` frames)."""
        picks = self._streams(index)[1].choice(self.ref_window, size=self.shots, replace=False)
        return [self.frames + int(p) for p in picks]

    def style(self, index: int) -> SequenceStyle:
        return SequenceStyle(self._streams(index)[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        self.check_index(index)
        scene = VideoScene(self.seed, index, self.split)
        clip = scene.render(self.frames, self.height, self.width)
        refs = [scene.render(1, self.height, self.width, start=t) for t in self.reference_times(index)]
        style = self.style(index) if self.restyle else None

        def images(rgb: np.ndarray) -> torch.Tensor:  # (n, H, W, 3) in [0, 1] -> (n, 3, H, W) in [-1, 1]
            rgb = style.apply(rgb) if style is not None else rgb
            return torch.from_numpy(np.ascontiguousarray(rgb.transpose(0, 3, 1, 2))) * 2 - 1

        ref_image = np.concatenate([r.image for r in refs])
        ref_label = np.concatenate([r.label for r in refs])
        return {
            "ref_images": images(ref_image),
            "ref_labels": one_hot(ref_label, self.label_nc).contiguous(),
            "labels": one_hot(clip.label, self.label_nc).contiguous(),
            "frames": images(clip.image),
            "flow": torch.from_numpy(np.ascontiguousarray(clip.flow)),
            "flow_mask": torch.from_numpy(clip.visible[:, None].astype(np.float32)),
        }

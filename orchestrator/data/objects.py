"""Many-class object images for FUNIT and COCO-FUNIT: procedural "creature" classes, each with its
own appearance, in poses that belong to the image, with held-out classes for few-shot evaluation.

A **class** (drawn from ``(seed, class id)``) fixes the appearance: a head shape (ellipse, rounded
square, diamond or a lobed blob) and its aspect ratio, a body and a pattern colour, a coat pattern
(stripes, spots, checks, rings or a plain gradient) with its scale and angle, and eyes (colour,
size, spacing, height). A **pose** (drawn per image) fixes the content: where the creature is, its
size and tilt, and the background (two colours and a gradient direction). The pattern, the eyes and
the shading are drawn in the creature's own coordinates, so they follow the pose.

Rendering a pose with another class therefore gives the exact translation FUNIT is asked for: the
content image's pose and background, the example images' class appearance. That is the
ground-truth ``target`` of every item; it is never used in training, only by ``samples`` for the
quality metrics.

* ``train``: the content image shows one of the first ``classes`` classes, the ``shots`` examples
  (``K``) another training class (possibly the same), each in its own pose;
* ``val``: content images of training classes, examples of the ``held_out`` classes that follow
  them (ids ``classes .. classes + held_out - 1``), which no network sees in training.

An item::

    content        (3, H, W)     float32 in [-1, 1]
    content_class  ()            int64
    examples       (K, 3, H, W)  float32 in [-1, 1]
    example_class  ()            int64
    target         (3, H, W)     float32 in [-1, 1]: the content pose in the examples' class

``data.options``: ``classes`` (training classes, default 32), ``held_out`` (default 8), ``shots``
(default 2). Generated on demand from numpy Generators seeded by ``(seed, split, index)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from orchestrator.config import DataConfig
from orchestrator.data.seeded import SPLIT_STREAM, SeededDataset

DEFAULT_CLASSES = 32
DEFAULT_HELD_OUT = 8
DEFAULT_SHOTS = 2
SHAPES = ("ellipse", "rounded", "diamond", "blob")
PATTERNS = ("stripes", "spots", "checks", "rings", "plain")
_CLASS_TAG = 0xC1A55
_ITEM_TAG = 0x17E4

__all__ = ["ObjectClassDataset", "ObjectClass", "Pose", "render_object", "object_options"]


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour (each in [0, 1]) as RGB float32."""
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    return (v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)).astype(np.float32)


@dataclass(frozen=True)
class ObjectClass:
    """The appearance of one class."""

    shape: str
    aspect: float
    lobes: int
    lobe_depth: float
    body: np.ndarray
    pattern_colour: np.ndarray
    pattern: str
    frequency: float
    angle: float
    eye_colour: np.ndarray
    eye_size: float
    eye_spacing: float
    eye_height: float

    @classmethod
    def draw(cls, seed: int, class_id: int) -> ObjectClass:
        rng = np.random.default_rng(np.random.SeedSequence([abs(seed), int(seed < 0), _CLASS_TAG, class_id]))
        hue = rng.random()
        return cls(
            shape=SHAPES[int(rng.integers(len(SHAPES)))], aspect=float(rng.uniform(0.75, 1.3)),
            lobes=int(rng.integers(3, 7)), lobe_depth=float(rng.uniform(0.08, 0.2)),
            body=_hsv(hue, rng.uniform(0.35, 0.9), rng.uniform(0.45, 0.95)),
            pattern_colour=_hsv((hue + rng.uniform(0.25, 0.75)) % 1, rng.uniform(0.3, 1.0), rng.uniform(0.15, 0.9)),
            pattern=PATTERNS[int(rng.integers(len(PATTERNS)))], frequency=float(rng.uniform(1.5, 3.5)),
            angle=float(rng.uniform(0, np.pi)), eye_colour=_hsv(rng.random(), rng.uniform(0.3, 1), rng.uniform(0.6, 1)),
            eye_size=float(rng.uniform(0.1, 0.18)), eye_spacing=float(rng.uniform(0.28, 0.45)),
            eye_height=float(rng.uniform(-0.35, -0.05)),
        )


@dataclass(frozen=True)
class Pose:
    """Where and how an object stands in one image, and the background behind it."""

    cx: float
    cy: float
    size: float
    tilt: float
    background: tuple[np.ndarray, np.ndarray]
    gradient: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> Pose:
        bg = _hsv(rng.random(), rng.uniform(0.05, 0.5), rng.uniform(0.3, 0.95))
        bg2 = np.clip(bg * rng.uniform(0.6, 1.2) + rng.uniform(-0.1, 0.1, 3), 0, 1).astype(np.float32)
        return cls(cx=float(rng.uniform(0.38, 0.62)), cy=float(rng.uniform(0.4, 0.6)),
                   size=float(rng.uniform(0.24, 0.34)), tilt=float(rng.uniform(-0.6, 0.6)),
                   background=(bg, bg2), gradient=float(rng.uniform(0, 2 * np.pi)))


def _radius(kind: ObjectClass, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The shape's radial function in object coordinates: < 1 inside."""
    u = u / kind.aspect
    if kind.shape == "ellipse":
        return np.sqrt(u * u + v * v)
    if kind.shape == "rounded":
        return (np.abs(u) ** 4 + np.abs(v) ** 4) ** 0.25
    if kind.shape == "diamond":
        return (np.abs(u) ** 1.3 + np.abs(v) ** 1.3) ** (1 / 1.3)
    theta = np.arctan2(v, u)
    return np.sqrt(u * u + v * v) / (1 + kind.lobe_depth * np.cos(kind.lobes * theta))


def _pattern(kind: ObjectClass, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """How much of the pattern colour shows, in [0, 1]."""
    f = kind.frequency
    ru = u * np.cos(kind.angle) + v * np.sin(kind.angle)
    rv = -u * np.sin(kind.angle) + v * np.cos(kind.angle)
    if kind.pattern == "stripes":
        wave = np.sin(2 * np.pi * f * ru)
    elif kind.pattern == "spots":
        gu, gv = ru * f - np.round(ru * f), rv * f - np.round(rv * f)
        wave = 1 - 6 * (gu * gu + gv * gv)
    elif kind.pattern == "checks":
        wave = np.sin(np.pi * f * ru) * np.sin(np.pi * f * rv) * 4
    elif kind.pattern == "rings":
        wave = np.sin(2 * np.pi * f * np.sqrt(u * u + v * v))
    else:
        wave = v * 2 - 0.5
    return np.clip(0.5 + 2.0 * wave, 0, 1)


def render_object(kind: ObjectClass, pose: Pose, height: int, width: int) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1]: a ``kind`` object in ``pose``."""
    ys = (np.arange(height, dtype=np.float32) + 0.5) / height
    xs = (np.arange(width, dtype=np.float32) + 0.5) / width
    x, y = np.meshgrid(xs, ys)
    dx, dy = (x - pose.cx) / pose.size, (y - pose.cy) / pose.size
    c, s = np.cos(pose.tilt), np.sin(pose.tilt)
    u, v = c * dx + s * dy, -s * dx + c * dy  # object coordinates (v down)

    t = (np.cos(pose.gradient) * (x - 0.5) + np.sin(pose.gradient) * (y - 0.5) + 0.5)[..., None]
    rgb = pose.background[0] * (1 - t) + pose.background[1] * t

    radius = _radius(kind, u, v)
    pixel = 1.0 / (pose.size * min(height, width))  # one pixel in object units
    alpha = np.clip((1 - radius) / pixel + 0.5, 0, 1)[..., None]
    mix = _pattern(kind, u, v)[..., None]
    body = kind.body * (1 - mix) + kind.pattern_colour * mix
    body = body * (1.05 - 0.3 * np.clip(u * u + v * v, 0, 1))[..., None]            # round shading
    body = body * np.where(radius > 0.88, 0.6, 1.0)[..., None]                     # outline
    for side in (-1.0, 1.0):
        d2 = (u - side * kind.eye_spacing) ** 2 + (v - kind.eye_height) ** 2
        eye = np.clip((kind.eye_size - np.sqrt(d2)) / pixel + 0.5, 0, 1)[..., None]
        pupil = np.clip((0.45 * kind.eye_size - np.sqrt(d2)) / pixel + 0.5, 0, 1)[..., None]
        body = body * (1 - eye) + kind.eye_colour * eye
        body = body * (1 - pupil) + 0.05 * pupil
    rgb = rgb * (1 - alpha) + body * alpha
    return np.clip(rgb, 0, 1).astype(np.float32)


def object_options(options: dict[str, Any]) -> tuple[int, int, int]:
    """``(classes, held_out, shots)`` from ``data_cfg.options``, validated."""
    allowed = {"classes", "held_out", "shots"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"object-class data has no option(s) {unknown}; allowed: {sorted(allowed)}")
    values = []
    for name, default in (("classes", DEFAULT_CLASSES), ("held_out", DEFAULT_HELD_OUT), ("shots", DEFAULT_SHOTS)):
        value = options.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"data.options.{name} must be an integer >= 1, got {value!r}")
        values.append(value)
    return values[0], values[1], values[2]


def _tensor(rgb: np.ndarray) -> torch.Tensor:
    """(..., H, W, 3) in [0, 1] -> (..., 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(rgb, -1, -3))) * 2 - 1


class ObjectClassDataset(SeededDataset):
    """``train`` holds ``data_cfg.train_samples`` items, ``val`` ``val_samples``; see the module
    docstring for what an item holds."""

    def __init__(self, data_cfg: DataConfig, split: str = "train"):
        super().__init__(data_cfg, split)
        self.classes, self.held_out, self.shots = object_options(data_cfg.options)
        self._kinds: dict[int, ObjectClass] = {}

    def kind(self, class_id: int) -> ObjectClass:
        if class_id not in self._kinds:
            self._kinds[class_id] = ObjectClass.draw(self.seed, class_id)
        return self._kinds[class_id]

    def classes_of(self, index: int) -> tuple[int, int]:
        """(content class, example class) of item ``index``."""
        return self._draw_classes(self._rng(index))

    def _draw_classes(self, rng: np.random.Generator) -> tuple[int, int]:
        content = int(rng.integers(self.classes))
        if self.split == "train":
            return content, int(rng.integers(self.classes))
        return content, self.classes + int(rng.integers(self.held_out))

    def _rng(self, index: int) -> np.random.Generator:
        key = [abs(self.seed), int(self.seed < 0), SPLIT_STREAM[self.split], int(index), _ITEM_TAG]
        return np.random.default_rng(np.random.SeedSequence(key))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        self.check_index(index)
        rng = self._rng(index)
        content_class, example_class = self._draw_classes(rng)
        pose = Pose.draw(rng)
        example_poses = [Pose.draw(rng) for _ in range(self.shots)]
        h, w = self.height, self.width
        examples = np.stack([render_object(self.kind(example_class), p, h, w) for p in example_poses])
        return {
            "content": _tensor(render_object(self.kind(content_class), pose, h, w)),
            "content_class": torch.tensor(content_class, dtype=torch.int64),
            "examples": _tensor(examples),
            "example_class": torch.tensor(example_class, dtype=torch.int64),
            "target": _tensor(render_object(self.kind(example_class), pose, h, w)),
        }

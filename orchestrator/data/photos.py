"""Inpainting data: real photos cut into random crops, each paired with an irregular hole mask.

Photos are the colour pictures that ship inside scikit-image (``skimage.data``, readable offline),
or the user's own with ``data.kind: folder`` (``<root>/train_img`` and ``<root>/test_img``, the
pix2pixHD layout's photo folders). The ``val`` split holds different photos from ``train`` by
default (a cat and a coffee cup are never trained on), and its crops come from another seed stream.

Masks follow the partial-convolution paper's evaluation protocol: the hole area of each sample falls
in one of the bins 0-10 %, 10-20 %, ..., 50-60 % of the image (``options["hole_bins"]``, bin edges),
the bin chosen by the sample's index (``index % n_bins``, so every bin is equally represented and
quality can be reported per bin). A mask is drawn from random brush strokes, ellipses and straight
lines, shape by shape, until its hole ratio enters the bin; a shape that would overshoot the bin is
drawn again at half the size, so the loop always ends (a last resort adds single hole pixels).

Every item is generated on demand from ``(seed, split, index)`` with its own numpy Generators (no
global RNG): any process, any worker, any order gives the same tensors. An item is::

    {"image": (3, H, W) float32 in [-1, 1],
     "mask":  (1, H, W) float32, 1 = valid pixel, 0 = hole,
     "bin":   int64 scalar, the hole-area bin}

A photo file that cannot be read (not an image, truncated, a 16-bit map among the photos) raises
``orchestrator.data.check.DataError`` naming it; ``check_files`` opens every photo once, before a
study starts.

``data.options`` (all optional): ``hole_bins`` (edges, default ``[0, .1, .2, .3, .4, .5, .6]``),
``train_photos`` / ``val_photos`` (``skimage.data`` names), ``min_crop`` (smallest crop side as a
fraction of the largest crop that fits, default 0.3).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from orchestrator.config import DataConfig
from orchestrator.data.check import DataError, DataProblem, file_problem, map_in_threads, open_image, photo_mode_problem
from orchestrator.data.seeded import SPLIT_STREAM, SeededDataset

TRAIN_PHOTOS = ("astronaut", "rocket", "stereo_motorcycle", "hubble_deep_field", "immunohistochemistry", "retina")
VAL_PHOTOS = ("chelsea", "coffee")
# colour photos of skimage.data that load without a download (scikit-image 0.26)
BUNDLED_PHOTOS = frozenset(TRAIN_PHOTOS + VAL_PHOTOS + ("colorwheel", "logo"))  # "cat" is chelsea again
HOLE_BINS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
MIN_CROP = 0.3
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_FOLDER = {"train": "train_img", "val": "test_img"}
_BILINEAR = 2  # PIL.Image.Resampling.BILINEAR
_MAX_SHAPES = 400  # shape draws per mask before the pixel-level last resort


# --------------------------------------------------------------------------- photos

@functools.lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """A ``skimage.data`` photo as an (H, W, 3) uint8 array (read once per process)."""
    if name not in BUNDLED_PHOTOS:
        raise ValueError(f"unknown photo {name!r}; allowed: {sorted(BUNDLED_PHOTOS)}")
    from skimage import data as skdata  # local: importing skimage costs ~1 s

    image = getattr(skdata, name)()
    if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity); the left view only
        image = image[0]
    return _as_rgb(np.asarray(image), name)


@functools.lru_cache(maxsize=None)
def _bundled_image(name: str):
    from PIL import Image

    return Image.fromarray(load_photo(name))


@functools.lru_cache(maxsize=64)
def _file_image(path: str):
    img = open_image(path)  # DataError naming the file when it cannot be read
    problem = photo_mode_problem(img, path)
    if problem is not None:
        raise DataError(problem)
    return img.convert("RGB")


def _photo_problems(path: str) -> list[DataProblem]:
    try:
        img = open_image(path)
    except DataError as error:
        return error.problems
    problem = photo_mode_problem(img, path)
    return [problem] if problem is not None else []


def _as_rgb(image: np.ndarray, what: str) -> np.ndarray:
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"photo {what!r} has shape {image.shape}, expected (H, W, 3)")
    image = image[..., :3]
    if image.dtype != np.uint8:
        image = np.clip(image.astype(np.float64) * (255.0 if image.max() <= 1 else 1.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image)


def random_crop(photo: Any, rng: np.random.Generator, height: int, width: int,
                min_crop: float = MIN_CROP) -> np.ndarray:
    """A random crop of ``photo`` (an (H, W, 3) uint8 array or an RGB PIL image) with the target's
    aspect ratio, side between ``min_crop`` and 1 times the largest such crop, flipped left-right
    half the time, resized (PIL bilinear, antialiased when shrinking) to ``(3, height, width)``
    float32 in [-1, 1]."""
    ph, pw = photo.shape[:2] if isinstance(photo, np.ndarray) else (photo.height, photo.width)
    aspect = width / height
    largest = min(ph, pw / aspect)  # crop height of the largest crop that fits
    scale = float(rng.uniform(min_crop, 1.0))
    ch = int(np.clip(round(largest * scale), 1, ph))
    cw = int(np.clip(round(ch * aspect), 1, pw))
    y0 = int(rng.integers(0, ph - ch + 1))
    x0 = int(rng.integers(0, pw - cw + 1))
    flip = bool(rng.random() < 0.5)
    if isinstance(photo, np.ndarray):
        from PIL import Image

        photo = Image.fromarray(photo)
    box = (x0, y0, x0 + cw, y0 + ch)
    resized = np.asarray(photo.resize((width, height), _BILINEAR, box=box, reducing_gap=3.0))
    if flip:
        resized = resized[:, ::-1]
    return np.ascontiguousarray(resized.transpose(2, 0, 1), dtype=np.float32) / 127.5 - 1.0


# --------------------------------------------------------------------------- masks

def _paint_capsule(hole: np.ndarray, p0: np.ndarray, p1: np.ndarray, radius: float) -> None:
    """Set pixels whose centre lies within ``radius`` of segment p0-p1 (pixel units, (y, x))."""
    h, w = hole.shape
    lo = np.floor(np.minimum(p0, p1) - radius).astype(int)
    hi = np.ceil(np.maximum(p0, p1) + radius).astype(int)
    r0, r1, c0, c1 = max(lo[0], 0), min(hi[0] + 1, h), max(lo[1], 0), min(hi[1] + 1, w)
    if r0 >= r1 or c0 >= c1:
        return
    ys = np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(c0, c1, dtype=np.float32)[None, :] + 0.5
    d = p1 - p0
    length2 = float(d @ d)
    if length2 > 0:
        t = np.clip(((ys - p0[0]) * d[0] + (xs - p0[1]) * d[1]) / length2, 0.0, 1.0)
    else:
        t = np.zeros((r1 - r0, c1 - c0), np.float32)
    dy, dx = ys - (p0[0] + t * d[0]), xs - (p0[1] + t * d[1])
    hole[r0:r1, c0:c1] |= dy * dy + dx * dx <= radius * radius


def _paint_ellipse(hole: np.ndarray, centre: np.ndarray, radii: np.ndarray, angle: float) -> None:
    h, w = hole.shape
    reach = float(radii.max())
    r0, r1 = max(int(centre[0] - reach), 0), min(int(centre[0] + reach) + 2, h)
    c0, c1 = max(int(centre[1] - reach), 0), min(int(centre[1] + reach) + 2, w)
    if r0 >= r1 or c0 >= c1:
        return
    ys = np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5 - centre[0]
    xs = np.arange(c0, c1, dtype=np.float32)[None, :] + 0.5 - centre[1]
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = (xs * cos + ys * sin) / radii[1], (-xs * sin + ys * cos) / radii[0]
    hole[r0:r1, c0:c1] |= u * u + v * v <= 1.0


def _draw_shape(hole: np.ndarray, rng: np.random.Generator, size: float) -> None:
    """One random shape into ``hole`` (bool, True = hole). ``size`` scales every length (1 = full
    size; halved after an overshoot). Geometry is drawn in units of the image's shorter side."""
    h, w = hole.shape
    unit = min(h, w)
    kind = rng.choice(3, p=(0.55, 0.25, 0.2))  # brush stroke, ellipse, straight line
    start = rng.uniform((0, 0), (h, w)).astype(np.float32)
    if kind == 0:
        radius = max(float(rng.uniform(0.02, 0.08)) * unit * size, 0.5)
        angle = float(rng.uniform(0, 2 * np.pi))
        point = start
        for _ in range(int(rng.integers(2, 7))):
            angle += float(rng.normal(0, 0.9))
            step = float(rng.uniform(0.05, 0.25)) * unit * size
            nxt = (point + step * np.array([np.sin(angle), np.cos(angle)], np.float32)).astype(np.float32)
            _paint_capsule(hole, point, nxt, radius)
            point = nxt
    elif kind == 1:
        radii = (rng.uniform(0.04, 0.2, 2) * unit * size + 0.5).astype(np.float32)
        _paint_ellipse(hole, start, radii, float(rng.uniform(0, np.pi)))
    else:
        radius = max(float(rng.uniform(0.008, 0.02)) * unit * size, 0.5)
        angle = float(rng.uniform(0, 2 * np.pi))
        length = float(rng.uniform(0.2, 0.6)) * unit * size
        end = (start + length * np.array([np.sin(angle), np.cos(angle)], np.float32)).astype(np.float32)
        _paint_capsule(hole, start, end, radius)


def irregular_mask(rng: np.random.Generator, height: int, width: int, low: float, high: float) -> np.ndarray:
    """(height, width) float32 mask, 1 = valid, 0 = hole, with ``low < hole ratio <= high``.

    Shapes are added one at a time; one that would push the ratio past ``high`` is discarded and the
    next is drawn at half the size. After ``_MAX_SHAPES`` draws, single random pixels finish it."""
    n = height * width
    need = int(np.floor(low * n)) + 1  # fewest hole pixels with ratio > low
    if need > high * n:
        raise ValueError(f"hole bin ({low}, {high}] is too narrow for a {height}x{width} mask")
    hole = np.zeros((height, width), bool)
    size = 1.0
    count = 0
    for _ in range(_MAX_SHAPES):
        if count >= need:
            break
        trial = hole.copy()
        _draw_shape(trial, rng, size)
        trial_count = int(trial.sum())
        if trial_count > high * n:
            size *= 0.5
            continue
        hole, count = trial, trial_count
    if count < need:  # last resort: single pixels (each adds 1/n <= the bin's width)
        free = np.flatnonzero(~hole.ravel())
        hole.ravel()[rng.choice(free, size=need - count, replace=False)] = True
    return (~hole).astype(np.float32)


# --------------------------------------------------------------------------- options and data set

def photo_options(options: dict[str, Any]) -> tuple[tuple[tuple[float, float], ...], tuple[str, ...],
                                                    tuple[str, ...], float]:
    """``(bins, train_photos, val_photos, min_crop)`` from ``data_cfg.options``, validated."""
    allowed = {"hole_bins", "train_photos", "val_photos", "min_crop"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"inpainting data has no option(s) {unknown}; allowed: {sorted(allowed)}")
    edges = options.get("hole_bins", HOLE_BINS)
    if (not isinstance(edges, (list, tuple)) or len(edges) < 2
            or not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in edges)):
        raise ValueError(f"data.options.hole_bins must be a list of at least 2 bin edges, got {edges!r}")
    edges = [float(e) for e in edges]
    if edges[0] < 0 or edges[-1] > 1 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"data.options.hole_bins must increase strictly within [0, 1], got {edges}")
    photos = []
    for key, default in (("train_photos", TRAIN_PHOTOS), ("val_photos", VAL_PHOTOS)):
        names = options.get(key, default)
        if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
            raise ValueError(f"data.options.{key} must be a non-empty list of photo names, got {names!r}")
        bad = sorted(set(names) - BUNDLED_PHOTOS)
        if bad:
            raise ValueError(f"data.options.{key}: unknown photo(s) {bad}; allowed: {sorted(BUNDLED_PHOTOS)}")
        photos.append(tuple(names))
    min_crop = options.get("min_crop", MIN_CROP)
    if isinstance(min_crop, bool) or not isinstance(min_crop, (int, float)) or not 0 < min_crop <= 1:
        raise ValueError(f"data.options.min_crop must be in (0, 1], got {min_crop!r}")
    return tuple(zip(edges, edges[1:])), photos[0], photos[1], float(min_crop)


def _folder_photos(root: Path, split: str) -> list[Path]:
    folder = Path(root).expanduser() / _FOLDER[split]
    if not folder.is_dir():
        raise DataError(file_problem(folder, f"the {split} split needs this folder, which does not exist"))
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(file_problem(folder, f"no {'/'.join(IMAGE_SUFFIXES)} photos"))
    return files


class PhotoInpaintingDataset(SeededDataset):
    """``train`` holds ``data_cfg.train_samples`` (crop, mask) pairs, ``val`` ``val_samples``;
    see the module docstring. ``data_cfg.kind`` 'synthetic' uses the bundled photos, 'folder' the
    photos under ``data_cfg.root``."""

    def __init__(self, data_cfg: DataConfig, split: str = "train"):
        super().__init__(data_cfg, split)
        self.bins, train_photos, val_photos, self.min_crop = photo_options(data_cfg.options)
        if data_cfg.kind == "folder":
            self.sources: list[str] = [str(p) for p in _folder_photos(data_cfg.root, split)]
            self.from_files = True
        else:
            self.sources = list(train_photos if split == "train" else val_photos)
            self.from_files = False
        n = self.height * self.width
        for low, high in self.bins:  # fail now, not in the middle of training
            if int(np.floor(low * n)) + 1 > high * n:
                raise ValueError(f"hole bin ({low}, {high}] is too narrow for {self.height}x{self.width} images")

    def check_files(self) -> list[DataProblem]:
        """Open every photo file once (folder data); everything wrong with them. Bundled photos
        need no check."""
        return map_in_threads(_photo_problems, self.sources) if self.from_files else []

    def photo(self, source: str):
        """The RGB PIL image of a source (cached per process)."""
        return _file_image(source) if self.from_files else _bundled_image(source)

    def _streams(self, index: int) -> tuple[np.random.Generator, np.random.Generator]:
        """(crop, mask) generators of one item: independent, so a change of photos never changes
        a mask, nor the bins the crops."""
        key = [abs(self.seed), int(self.seed < 0), SPLIT_STREAM[self.split], int(index)]
        crop, mask = np.random.SeedSequence(key).spawn(2)
        return np.random.default_rng(crop), np.random.default_rng(mask)

    def bin_of(self, index: int) -> int:
        return int(index) % len(self.bins)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        self.check_index(index)
        crop_rng, mask_rng = self._streams(index)
        source = self.sources[int(crop_rng.integers(len(self.sources)))]
        image = random_crop(self.photo(source), crop_rng, self.height, self.width, self.min_crop)
        bin_index = self.bin_of(index)
        low, high = self.bins[bin_index]
        mask = irregular_mask(mask_rng, self.height, self.width, low, high)
        return {
            "image": torch.from_numpy(image),
            "mask": torch.from_numpy(mask)[None],
            "bin": torch.tensor(bin_index, dtype=torch.int64),
        }


def hole_ratio(mask: torch.Tensor) -> torch.Tensor:
    """Fraction of hole pixels of masks shaped (..., 1, H, W) (1 = valid)."""
    return 1.0 - mask.float().mean(dim=(-3, -2, -1))


__all__: Sequence[str] = ("PhotoInpaintingDataset", "irregular_mask", "random_crop", "load_photo", "hole_ratio",
                          "photo_options", "HOLE_BINS", "TRAIN_PHOTOS", "VAL_PHOTOS")

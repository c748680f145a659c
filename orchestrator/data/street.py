"""A deterministic synthetic street-scene data set: label maps, instance maps and rendered photos.

Each sample is generated on demand from ``(seed, split, index)`` with its own numpy Generator (no
global RNG), so any process produces the same tensors. The scene geometry (horizon, vanishing
point, skyline, trees, poles, people, cars) and every colour are drawn before anything that
depends on the resolution, so one index shows the same scene at every size.

Class ids follow the Cityscapes label ids (road 7, ..., car 26), so a model built for Cityscapes
(``label_nc`` 35) trains on this data unchanged. Instance ids: a stuff pixel carries its class id,
each tree/person/car its own id from 100 up. All ids stay below 2048 so they survive an fp16 cast
exactly (instance boundaries are computed from them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from orchestrator.config import DataConfig
from orchestrator.data.seeded import SPLIT_STREAM, SeededDataset

CLASSES: dict[str, int] = {
    "road": 7, "sidewalk": 8, "building": 11, "pole": 17, "traffic_sign": 20,
    "vegetation": 21, "terrain": 22, "sky": 23, "person": 24, "car": 26,
}
LABEL_NC = 35  # Cityscapes' label id count (pix2pixHD's label_nc)
FIRST_THING_ID = 100

Colour = tuple[float, float, float]


# --------------------------------------------------------------------------- painting helpers

def value_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a (cells+1)^2 random grid bilinearly interpolated to (height, width).
    The grid's draws do not depend on the resolution."""
    grid = rng.random((cells + 1, cells + 1), dtype=np.float32)
    ys = (np.arange(height, dtype=np.float32) + 0.5) / height * cells
    xs = (np.arange(width, dtype=np.float32) + 0.5) / width * cells
    y0 = np.minimum(ys.astype(np.int64), cells - 1)
    x0 = np.minimum(xs.astype(np.int64), cells - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


class _Canvas:
    """Label, instance and RGB buffers painted back to front in normalised coordinates
    (x, y in [0, 1], y down). Each paint call only touches the shape's pixel bounding box."""

    def __init__(self, height: int, width: int, noise: dict[str, np.ndarray]):
        self.h, self.w = height, width
        self.ys = (np.arange(height, dtype=np.float32) + 0.5) / height
        self.xs = (np.arange(width, dtype=np.float32) + 0.5) / width
        self.label = np.zeros((height, width), np.uint8)
        self.inst = np.zeros((height, width), np.int32)
        self.rgb = np.zeros((height, width, 3), np.float32)
        self.noise = noise  # full-frame texture fields, indexed by the same window

    def paint(self, box: tuple[float, float, float, float], inside: Callable, cls: int, inst: int,
              colour: Colour | Callable) -> None:
        """Paint pixels of ``box`` = (x0, x1, y0, y1) where ``inside(y, x)`` holds.
        ``colour`` is an RGB tuple or ``f(y, x, window) -> (h, w, 3)``."""
        x0, x1, y0, y1 = box
        r0, r1 = max(int(np.floor(y0 * self.h)), 0), min(int(np.ceil(y1 * self.h)), self.h)
        c0, c1 = max(int(np.floor(x0 * self.w)), 0), min(int(np.ceil(x1 * self.w)), self.w)
        if r0 >= r1 or c0 >= c1:
            return
        win = (slice(r0, r1), slice(c0, c1))
        y, x = self.ys[r0:r1, None], self.xs[None, c0:c1]
        mask = np.broadcast_to(inside(y, x), (r1 - r0, c1 - c0))
        self.label[win][mask] = cls
        self.inst[win][mask] = inst
        rgb = colour(y, x, win) if callable(colour) else np.asarray(colour, np.float32)
        self.rgb[win][mask] = np.broadcast_to(rgb, (r1 - r0, c1 - c0, 3))[mask]


def _rect(x0: float, x1: float, y0: float, y1: float):
    return (x0, x1, y0, y1), lambda y, x: (y >= y0) & (y < y1) & (x >= x0) & (x < x1)


def _ellipse(cx: float, cy: float, rx: float, ry: float):
    return (cx - rx, cx + rx, cy - ry, cy + ry), lambda y, x: ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1


def _jitter(rng: np.random.Generator, colour: Colour, amount: float = 0.08) -> Colour:
    return tuple(float(np.clip(c + rng.uniform(-amount, amount), 0, 1)) for c in colour)


# --------------------------------------------------------------------------- the scene

@dataclass
class _Layout:
    horizon: float      # y of the horizon
    vx: float           # x of the vanishing point
    road: float         # road half-width at the bottom edge
    walk: float         # sidewalk width at the bottom edge (beyond the road)

    def depth(self, y) -> np.ndarray:
        """0 at the horizon, 1 at the bottom edge (perspective scale of things standing at y)."""
        return np.clip((y - self.horizon) / (1 - self.horizon), 0, None)


def render_street(seed: int, index: int, height: int, width: int, split: str = "train"
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(label ids uint8 (H, W), instance ids int32 (H, W), RGB float32 (H, W, 3) in [0, 1])."""
    geo_seq, tex_seq, grain_seq = np.random.SeedSequence([seed, SPLIT_STREAM[split], index]).spawn(3)
    geo, tex = np.random.default_rng(geo_seq), np.random.default_rng(tex_seq)
    noise = {"coarse": value_noise(tex, height, width, 6), "mid": value_noise(tex, height, width, 24)}
    # per-pixel grain is the only draw whose count depends on the resolution: its own stream
    noise["grain"] = np.random.default_rng(grain_seq).standard_normal((height, width), dtype=np.float32)
    canvas = _Canvas(height, width, noise)
    lay = _Layout(horizon=geo.uniform(0.36, 0.55), vx=geo.uniform(0.35, 0.65),
                  road=geo.uniform(0.3, 0.5), walk=geo.uniform(0.1, 0.22))

    def textured(base: Colour, field: str = "mid", amount: float = 0.15, grain: float = 0.03):
        def colour(y, x, win):
            shade = (noise[field][win] - 0.5) * amount + noise["grain"][win] * grain
            return np.asarray(base, np.float32) + shade[..., None]
        return colour

    _paint_background(canvas, geo, lay, textured)
    things = _draw_things(geo, lay)
    for _, draw in sorted(things, key=lambda item: item[0]):  # far (small depth) first
        draw(canvas, textured)
    return canvas.label, canvas.inst, _light(canvas.rgb, geo, canvas)


def _paint_background(cv: _Canvas, geo: np.random.Generator, lay: _Layout, textured) -> None:
    h0 = lay.horizon
    sky_top, sky_low = _jitter(geo, (0.30, 0.50, 0.85)), _jitter(geo, (0.75, 0.85, 0.95))
    cloudiness = geo.uniform(0.0, 0.6)

    def sky(y, x, win):
        t = np.clip(y / h0, 0, 1)[..., None]
        rgb = np.asarray(sky_top, np.float32) * (1 - t) + np.asarray(sky_low, np.float32) * t
        cloud = np.clip((cv.noise["coarse"][win] - (1 - cloudiness)) * 3, 0, 1)[..., None]
        return rgb * (1 - cloud) + 0.95 * cloud

    cv.paint((0, 1, 0, 1), lambda y, x: np.ones((1, 1), bool), CLASSES["sky"], CLASSES["sky"], sky)

    x = 0.0
    while x < 1:  # skyline: buildings of random width and height, sometimes a gap
        bw = geo.uniform(0.08, 0.22)
        top = geo.uniform(0.04, h0 - 0.06)
        gap = geo.random() < 0.15
        base, lit = _jitter(geo, (0.55, 0.45, 0.40), 0.2), geo.uniform(0.0, 0.4)
        cols, rows = int(geo.integers(2, 6)), int(geo.integers(4, 12))
        if not gap:
            cv.paint(*_rect(x, x + bw, top, h0 + 0.02), CLASSES["building"], CLASSES["building"],
                     _windows(cv, base, lit, x, bw, top, h0 - top, cols, rows))
        x += bw

    cv.paint(*_rect(0, 1, h0, 1), CLASSES["terrain"], CLASSES["terrain"], textured((0.42, 0.52, 0.25), "mid", 0.3))
    walk = lambda y, x: np.abs(x - lay.vx) < lay.depth(y) * (lay.road + lay.walk)  # noqa: E731
    cv.paint((0, 1, h0, 1), walk, CLASSES["sidewalk"], CLASSES["sidewalk"], _tiles(cv, lay))
    road = lambda y, x: np.abs(x - lay.vx) < lay.depth(y) * lay.road  # noqa: E731
    cv.paint((0, 1, h0, 1), road, CLASSES["road"], CLASSES["road"], _asphalt(cv, lay))


def _windows(cv: _Canvas, base: Colour, lit: float, x0: float, bw: float, top: float, bh: float,
             cols: int, rows: int):
    """Facade colour with a grid of dark (some lit) windows, in normalised units."""
    def colour(y, x, win):
        u, v = (x - x0) / bw * cols, (y - top) / bh * rows
        fu, fv = u - np.floor(u), v - np.floor(v)
        window = (fu > 0.25) & (fu < 0.75) & (fv > 0.3) & (fv < 0.8)
        on = cv.noise["mid"][win] < lit
        glass = np.where(on[..., None], np.float32([0.9, 0.8, 0.45]), np.float32([0.18, 0.22, 0.28]))
        wall = np.asarray(base, np.float32) + (cv.noise["grain"][win] * 0.02)[..., None]
        return np.where(window[..., None], glass, wall)
    return colour


def _asphalt(cv: _Canvas, lay: _Layout):
    def colour(y, x, win):
        d = np.maximum(lay.depth(y), 1e-3)
        rgb = 0.30 + (cv.noise["mid"][win] - 0.5) * 0.08 + cv.noise["grain"][win] * 0.03
        centre = np.abs(x - lay.vx) < 0.012 * d
        dash = (1 / d) % 1.0 < 0.5  # dashes shorten towards the horizon
        marking = centre & dash
        rgb = np.where(marking, 0.85, rgb)
        return np.repeat(rgb[..., None], 3, axis=-1) * np.float32([1.0, 1.0, 1.06])
    return colour


def _tiles(cv: _Canvas, lay: _Layout):
    def colour(y, x, win):
        d = np.maximum(lay.depth(y), 1e-3)
        joint = (2 / d) % 1.0 < 0.08
        rgb = np.where(joint, 0.45, 0.62) + cv.noise["grain"][win] * 0.03
        return rgb[..., None] * np.float32([1.0, 0.96, 0.9])
    return colour


def _draw_things(geo: np.random.Generator, lay: _Layout) -> list[tuple[float, Callable]]:
    """Trees, poles with signs, people and cars as (depth, draw(canvas, textured)) pairs.
    Every random draw happens here, before any painting."""
    items: list[tuple[float, Callable]] = []
    next_id = iter(range(FIRST_THING_ID, 2048))

    def on_sidewalk(d: float) -> float:
        side = 1 if geo.random() < 0.5 else -1
        return lay.vx + side * d * (lay.road + lay.walk * geo.uniform(0.3, 0.8))

    def base_y(d: float) -> float:
        return lay.horizon + d * (1 - lay.horizon)

    for _ in range(int(geo.integers(0, 4))):  # trees: trunk + crown, one instance
        d = geo.uniform(0.15, 0.9)
        x, y, ident = on_sidewalk(d), base_y(d), next(next_id)
        green = _jitter(geo, (0.15, 0.42, 0.15))

        def tree(cv, textured, d=d, x=x, y=y, ident=ident, green=green):
            cls = CLASSES["vegetation"]
            cv.paint(*_rect(x - 0.015 * d, x + 0.015 * d, y - 0.35 * d, y), cls, ident, (0.35, 0.25, 0.15))
            cv.paint(*_ellipse(x, y - 0.5 * d, 0.14 * d, 0.2 * d), cls, ident, textured(green, "mid", 0.35))
        items.append((d, tree))

    for _ in range(int(geo.integers(0, 3))):  # poles with a traffic sign on top (stuff classes)
        d = geo.uniform(0.2, 0.9)
        x, y = on_sidewalk(d), base_y(d)
        sign = (0.9, 0.8, 0.1) if geo.random() < 0.5 else (0.1, 0.3, 0.8)

        def pole(cv, textured, d=d, x=x, y=y, sign=sign):
            top = y - 0.55 * d
            cv.paint(*_rect(x - 0.006 * d, x + 0.006 * d, top, y), CLASSES["pole"], CLASSES["pole"], (0.5, 0.5, 0.52))
            cv.paint(*_rect(x - 0.04 * d, x + 0.04 * d, top - 0.05 * d, top + 0.03 * d),
                     CLASSES["traffic_sign"], CLASSES["traffic_sign"], sign)
        items.append((d, pole))

    for _ in range(int(geo.integers(0, 4))):  # people: legs, torso, head
        d = geo.uniform(0.2, 1.0)
        x, y, ident = on_sidewalk(d), base_y(d), next(next_id)
        shirt = tuple(float(c) for c in geo.uniform(0.1, 0.9, 3))

        def person(cv, textured, d=d, x=x, y=y, ident=ident, shirt=shirt):
            cls, w = CLASSES["person"], 0.035 * d
            cv.paint(*_rect(x - w * 0.8, x + w * 0.8, y - 0.13 * d, y), cls, ident, (0.15, 0.15, 0.25))
            cv.paint(*_rect(x - w, x + w, y - 0.25 * d, y - 0.13 * d), cls, ident, shirt)
            cv.paint(*_ellipse(x, y - 0.28 * d, w * 0.7, 0.03 * d), cls, ident, (0.85, 0.65, 0.5))
        items.append((d, person))

    for _ in range(int(geo.integers(1, 5))):  # cars on the road: body, cabin, wheels
        d = geo.uniform(0.12, 1.0)
        x, y, ident = lay.vx + d * lay.road * geo.uniform(-0.7, 0.7), base_y(d), next(next_id)
        paint = tuple(float(c) for c in geo.uniform(0.05, 0.95, 3))

        def car(cv, textured, d=d, x=x, y=y, ident=ident, paint=paint):
            cls, w = CLASSES["car"], 0.2 * d
            cv.paint(*_rect(x - w * 0.7, x + w * 0.7, y - 0.16 * d, y - 0.09 * d), cls, ident, (0.15, 0.2, 0.25))
            cv.paint(*_rect(x - w, x + w, y - 0.1 * d, y - 0.02 * d), cls, ident, textured(paint, "mid", 0.1))
            for wx in (x - w * 0.65, x + w * 0.65):
                cv.paint(*_ellipse(wx, y - 0.02 * d, 0.035 * d, 0.025 * d), cls, ident, (0.05, 0.05, 0.05))
        items.append((d, car))
    return items


def _light(rgb: np.ndarray, geo: np.random.Generator, cv: _Canvas) -> np.ndarray:
    """Per-sample lighting: overall brightness, a horizontal sun gradient, a colour tint."""
    brightness = geo.uniform(0.7, 1.15)
    sun = geo.uniform(-0.35, 0.35)
    tint = np.asarray(_jitter(geo, (1.0, 1.0, 1.0), 0.06), np.float32)
    shade = brightness * (1 + sun * (cv.xs[None, :] - 0.5)) * (1 - 0.1 * cv.ys[:, None])
    return np.clip(rgb * shade[..., None] * tint, 0, 1).astype(np.float32)


# --------------------------------------------------------------------------- the data set

def to_batch(label: np.ndarray, inst: np.ndarray, rgb: np.ndarray, label_nc: int) -> dict[str, torch.Tensor]:
    """Numpy maps -> the model's sample dict: one-hot label (label_nc, H, W), inst (1, H, W) and
    image (3, H, W) in [-1, 1], all float32."""
    ids = torch.from_numpy(label.astype(np.int64))[None]
    onehot = torch.zeros((label_nc, *label.shape), dtype=torch.float32).scatter_(0, ids, 1.0)
    return {
        "label": onehot,
        "inst": torch.from_numpy(inst.astype(np.float32))[None],
        "image": torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))) * 2 - 1,
    }


class LabelMapDataset(SeededDataset):
    """A seeded data set whose items carry these Cityscapes class ids, one-hot in ``label_nc``
    channels (which must hold them all)."""

    data_kind = "street"  # named in the label_nc error

    def __init__(self, data_cfg: DataConfig, split: str = "train", label_nc: int = LABEL_NC):
        super().__init__(data_cfg, split)
        if label_nc <= max(CLASSES.values()):
            raise ValueError(f"label_nc {label_nc} is too small for the {self.data_kind} data: its class ids go up "
                             f"to {max(CLASSES.values())} (Cityscapes ids), so label_nc must be > {max(CLASSES.values())}")
        self.label_nc = label_nc


class StreetDataset(LabelMapDataset):
    """``train`` has ``data_cfg.train_samples`` scenes, ``val`` ``val_samples`` from another seed
    stream; size ``data_cfg.height x data_cfg.width``."""

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        self.check_index(index)
        label, inst, rgb = render_street(self.seed, int(index), self.height, self.width, self.split)
        return to_batch(label, inst, rgb, self.label_nc)

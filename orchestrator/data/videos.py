"""Deterministic synthetic videos with per-frame label maps and exact ground-truth optical flow.

A video is a street-like scene: a sky / skyline (buildings and trees) / sidewalk / road background
seen by a camera that pans sideways at a constant speed, plus a few rigid objects (cars, people,
rotating signs) that move with known velocities and angular velocities, bouncing inside the frame.
Every colour is an analytic function of a point's coordinates in its own frame of reference
(world coordinates for the background, object-local coordinates for objects), so a frame can be
rendered at any time and any resolution, and the motion between two frames is known exactly.
That exact flow replaces the pretrained FlowNet2 that vid2vid needs for its reference flow.

Conventions, shared with any model that imports this module (vid2vid, few-shot vid2vid):

* **Flow is backward flow in pixels**: ``flow[i]`` belongs to frame ``i + 1`` and points, for each
  of its pixels, to where that scene point was in frame ``i``; channel 0 is x (columns), channel 1
  is y (rows). Warping frame ``i`` with it (bilinear sampling at ``pixel + flow``) reproduces frame
  ``i + 1`` wherever the point was visible (``visible[i]``).
* Pixel ``(row, col)`` has its centre at normalised ``((col + 0.5) / W, (row + 0.5) / H)``.
  Rotations happen in units of the image height, so shapes are not sheared at other aspect ratios.
* **Class ids are Cityscapes label ids** (road 7, sidewalk 8, building 11, vegetation 21, sky 23,
  person 24, car 26, traffic sign 20), as in ``orchestrator.data.street``: a model built for
  ``label_nc`` 35 trains on it unchanged. Instance ids: stuff pixels carry their class id, object
  ``k`` carries ``FIRST_THING_ID + k``.
* A video is drawn from ``(seed, split, index)`` with its own numpy Generator (no global RNG) and
  nothing drawn depends on the resolution, the number of frames or ``start``: the same index shows
  the same video at every size, and ``start`` renders later frames of that same video (useful for
  few-shot reference frames).

``make_video`` is the function to reuse; ``VideoDataset`` wraps it as a map-style data set of
``{"labels": (T, label_nc, H, W) one-hot, "frames": (T, 3, H, W) in [-1, 1], "flow": (T-1, 2, H, W)}``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from orchestrator.config import DataConfig
from orchestrator.data.seeded import SPLIT_STREAM, check_split
from orchestrator.data.street import CLASSES, FIRST_THING_ID, LABEL_NC, LabelMapDataset

DEFAULT_FRAMES = 4
_TABLE = 64  # facades in the skyline table (the skyline repeats after this many)
_OBJECT_KINDS = ("car", "person", "sign")
BACKGROUND = -1  # owner id of background pixels

__all__ = ["DEFAULT_FRAMES", "VideoClip", "VideoScene", "VideoDataset", "make_video", "clip_to_batch",
           "one_hot"]


@dataclass(frozen=True)
class VideoClip:
    """One rendered clip of ``T`` frames at ``H x W`` (numpy, channel layouts as named)."""

    label: np.ndarray  # (T, H, W) uint8 class ids
    instance: np.ndarray  # (T, H, W) int32 instance ids (stuff: class id; object k: FIRST_THING_ID + k)
    image: np.ndarray  # (T, H, W, 3) float32 in [0, 1]
    flow: np.ndarray  # (T-1, 2, H, W) float32 backward flow in pixels, frame i+1 -> frame i, (x, y)
    visible: np.ndarray  # (T-1, H, W) bool: the point of frame i+1 is in view and unoccluded in frame i

    @property
    def frames(self) -> int:
        return int(self.label.shape[0])


# --------------------------------------------------------------------------- scene description


@dataclass(frozen=True)
class _Object:
    kind: str
    cls: int
    centre: tuple[float, float]  # normalised (x, y) at time 0
    velocity: tuple[float, float]  # normalised units per frame
    bounds: tuple[float, float, float, float]  # bounce box x0, x1, y0, y1 (normalised)
    angle: float  # radians at time 0
    spin: float  # radians per frame
    size: float  # height units
    facing: float  # +1 or -1 (mirrors cars driving left)
    colours: np.ndarray  # (3 parts, 3) base colours
    tex_freq: tuple[float, float]
    tex_phase: tuple[float, float]


def _bounce(start: float, velocity: float, lo: float, hi: float, t: np.ndarray | float) -> np.ndarray:
    """Position at time ``t`` of a point moving at ``velocity`` that reflects off ``lo`` and ``hi``."""
    span = hi - lo
    if span <= 0:
        return np.full_like(np.asarray(t, np.float64), lo)
    y = np.mod(start - lo + velocity * np.asarray(t, np.float64), 2 * span)
    return lo + np.where(y > span, 2 * span - y, y)


class VideoScene:
    """The content of one video, independent of resolution and frame count.

    ``owner``/``colour`` evaluate the scene at any time and any continuous normalised points, which
    is what makes the flow exact: ``source_points`` maps a point of frame ``t`` to where the same
    scene point was at frame ``t - 1``."""

    def __init__(self, seed: int, index: int, split: str = "train"):
        check_split(split)
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        rng = np.random.default_rng(np.random.SeedSequence([abs(int(seed)), int(seed < 0),
                                                            SPLIT_STREAM[split], int(index)]))
        self.horizon = float(rng.uniform(0.35, 0.5))
        self.walk = float(rng.uniform(0.05, 0.09))  # sidewalk band below the horizon
        road_top = self.horizon + self.walk
        self.lane = float(road_top + (1 - road_top) * rng.uniform(0.4, 0.6))
        self.lane_period = float(rng.uniform(0.25, 0.4))
        self.pan = float(rng.choice([-1.0, 1.0]) * rng.uniform(0.008, 0.025)) if rng.random() < 0.8 else 0.0
        self.cam0 = float(rng.uniform(0, 10))
        self.facade = float(rng.uniform(0.14, 0.26))  # facade width (normalised x)
        self.tops = rng.uniform(0.12, 0.33, _TABLE)  # skyline height above the horizon
        self.is_tree = rng.random(_TABLE) < 0.25
        self.facade_colour = np.where(
            self.is_tree[:, None], rng.uniform([0.12, 0.35, 0.1], [0.25, 0.55, 0.22], (_TABLE, 3)),
            rng.uniform([0.35, 0.3, 0.28], [0.75, 0.65, 0.6], (_TABLE, 3))).astype(np.float32)
        self.sky = rng.uniform([0.45, 0.6, 0.8], [0.65, 0.78, 0.95]).astype(np.float32)
        self.road = rng.uniform([0.25, 0.25, 0.27], [0.4, 0.4, 0.42]).astype(np.float32)
        self.sidewalk = rng.uniform([0.55, 0.5, 0.45], [0.7, 0.65, 0.6]).astype(np.float32)
        self.bg_phase = rng.uniform(0, 2 * np.pi, 4)
        self.objects = [self._draw_object(rng, k) for k in range(int(rng.integers(2, 6)))]

    def _draw_object(self, rng: np.random.Generator, k: int) -> _Object:
        kind = _OBJECT_KINDS[int(rng.choice(3, p=[0.5, 0.3, 0.2]))]
        road_top = self.horizon + self.walk
        if kind == "car":
            size = float(rng.uniform(0.26, 0.4))  # length
            x0, x1, y0, y1 = 0.1, 0.9, road_top + 0.08, 0.88
            velocity = (float(rng.choice([-1, 1]) * rng.uniform(0.02, 0.06)), float(rng.uniform(-0.006, 0.006)))
            spin = float(rng.uniform(-0.02, 0.02))
            angle = float(rng.uniform(-0.1, 0.1))
            colours = np.stack([rng.uniform(0.1, 0.9, 3), rng.uniform([0.55, 0.65, 0.75], [0.7, 0.8, 0.9]),
                                rng.uniform(0.05, 0.12, 3)])
        elif kind == "person":
            size = float(rng.uniform(0.2, 0.32))  # height
            x0, x1, y0, y1 = 0.08, 0.92, self.horizon + 0.05, 0.85
            velocity = (float(rng.choice([-1, 1]) * rng.uniform(0.008, 0.025)), float(rng.uniform(-0.005, 0.005)))
            spin = float(rng.uniform(-0.01, 0.01))
            angle = 0.0
            colours = np.stack([rng.uniform(0.15, 0.85, 3), rng.uniform([0.6, 0.4, 0.3], [0.9, 0.7, 0.55]),
                                rng.uniform(0.1, 0.4, 3)])
        else:  # a diamond sign spinning in place while it drifts
            size = float(rng.uniform(0.08, 0.14))  # half diagonal
            x0, x1, y0, y1 = 0.12, 0.88, 0.12, self.horizon + 0.2
            velocity = (float(rng.uniform(-0.01, 0.01)), float(rng.uniform(-0.01, 0.01)))
            spin = float(rng.choice([-1, 1]) * rng.uniform(0.05, 0.2))
            angle = float(rng.uniform(0, np.pi))
            colours = np.stack([rng.uniform([0.8, 0.6, 0.0], [1.0, 0.85, 0.2]), rng.uniform(0.05, 0.2, 3),
                                rng.uniform(0.8, 1.0, 3)])
        centre = (float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1)))
        return _Object(
            kind=kind, cls=CLASSES["traffic_sign" if kind == "sign" else kind], centre=centre,
            velocity=velocity, bounds=(x0, x1, y0, y1), angle=angle, spin=spin, size=size,
            facing=1.0 if velocity[0] >= 0 else -1.0, colours=colours.astype(np.float32),
            tex_freq=(float(2 * np.pi / rng.uniform(0.12, 0.3)), float(2 * np.pi / rng.uniform(0.12, 0.3))),
            tex_phase=(float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0, 2 * np.pi))),
        )

    # ------------------------------------------------------------------ motion

    def camera(self, t: float) -> float:
        """Horizontal camera offset (normalised x) at frame ``t``."""
        return self.cam0 + self.pan * t

    def pose(self, k: int, t: float) -> tuple[float, float, float]:
        """Object ``k``'s centre (normalised x, y) and angle at frame ``t``."""
        obj = self.objects[k]
        x0, x1, y0, y1 = obj.bounds
        cx = float(_bounce(obj.centre[0], obj.velocity[0], x0, x1, t))
        cy = float(_bounce(obj.centre[1], obj.velocity[1], y0, y1, t))
        return cx, cy, obj.angle + obj.spin * t

    def _local(self, k: int, t: float, x: np.ndarray, y: np.ndarray, aspect: float):
        """Object-local coordinates (height units, unrotated, cars facing right) of points."""
        cx, cy, angle = self.pose(k, t)
        dx, dy = (x - cx) * aspect, y - cy
        c, s = np.cos(angle), np.sin(angle)
        return (c * dx + s * dy) * self.objects[k].facing, -s * dx + c * dy

    def _parts(self, k: int, qx: np.ndarray, qy: np.ndarray) -> np.ndarray:
        """Part index per point (-1 outside; 0 main colour, 1 and 2 the other parts; last wins)."""
        obj, size = self.objects[k], self.objects[k].size
        part = np.full(qx.shape, -1, np.int8)
        if obj.kind == "car":
            h = 0.36 * size
            part[(np.abs(qx) < size / 2) & (np.abs(qy) < h / 2)] = 0
            part[(np.abs(qx + 0.04 * size) < 0.27 * size) & (qy > -h / 2 - 0.6 * h) & (qy <= -h / 2)] = 1
            for wx in (-0.3 * size, 0.3 * size):
                part[(qx - wx) ** 2 + (qy - h / 2) ** 2 < (0.32 * h) ** 2] = 2
        elif obj.kind == "person":
            part[(np.abs(qx) < 0.16 * size) & (qy > -0.3 * size) & (qy < 0.12 * size)] = 0
            part[(np.abs(qx) < 0.12 * size) & (qy >= 0.12 * size) & (qy < 0.5 * size)] = 2
            part[qx ** 2 + (qy + 0.39 * size) ** 2 < (0.1 * size) ** 2] = 1
        else:
            inside = np.abs(qx) + np.abs(qy) < size
            part[inside] = 0
            part[inside & (np.abs(qx) + np.abs(qy) > 0.8 * size)] = 2
            part[inside & (np.abs(qy) < 0.12 * size) & (np.abs(qx) < 0.55 * size)] = 1
        return part

    def owner(self, t: float, x: np.ndarray, y: np.ndarray, aspect: float) -> np.ndarray:
        """Which object covers each point at frame ``t`` (frontmost; ``BACKGROUND`` if none).
        Objects are drawn in index order: a later object occludes an earlier one."""
        own = np.full(np.broadcast(x, y).shape, BACKGROUND, np.int32)
        for k in range(len(self.objects)):
            qx, qy = self._local(k, t, x, y, aspect)
            own[self._parts(k, qx, qy) >= 0] = k
        return own

    def source_points(self, t: float, x: np.ndarray, y: np.ndarray, owner: np.ndarray,
                      aspect: float) -> tuple[np.ndarray, np.ndarray]:
        """Where the scene point under each ``(x, y)`` of frame ``t`` (owned by ``owner``) was at
        frame ``t - 1``: the exact backward correspondence."""
        x, y = np.broadcast_arrays(x, y)
        sx = x + (self.camera(t) - self.camera(t - 1))  # background: the camera moved
        sy = y.copy()
        for k in range(len(self.objects)):
            mask = owner == k
            if not mask.any():
                continue
            qx, qy = self._local(k, t, x[mask], y[mask], aspect)
            qx = qx * self.objects[k].facing
            cx, cy, angle = self.pose(k, t - 1)
            c, s = np.cos(angle), np.sin(angle)
            sx[mask] = cx + (c * qx - s * qy) / aspect
            sy[mask] = cy + s * qx + c * qy
        return sx, sy

    # ------------------------------------------------------------------ appearance

    def render_points(self, t: float, x: np.ndarray, y: np.ndarray, aspect: float):
        """(owner, class id, instance id, rgb in [0, 1]) of each point at frame ``t``."""
        x, y = np.broadcast_arrays(np.asarray(x, np.float64), np.asarray(y, np.float64))
        own = self.owner(t, x, y, aspect)
        label = np.zeros(x.shape, np.uint8)
        rgb = np.zeros(x.shape + (3,), np.float32)

        # background, in world coordinates (x shifted by the camera)
        wx = x + self.camera(t)
        p = self.bg_phase
        cell = np.floor(wx / self.facade).astype(np.int64) % _TABLE
        top = self.horizon - self.tops[cell]
        sky = y <= top
        facade = ~sky & (y < self.horizon)
        walk = (y >= self.horizon) & (y < self.horizon + self.walk)
        road = y >= self.horizon + self.walk
        tree = facade & self.is_tree[cell]
        label[sky] = CLASSES["sky"]
        label[facade] = CLASSES["building"]
        label[tree] = CLASSES["vegetation"]
        label[walk] = CLASSES["sidewalk"]
        label[road] = CLASSES["road"]
        shade = 0.9 + 0.1 * np.sin(2 * np.pi * wx / 0.21 + p[0]) * np.sin(2 * np.pi * y / 0.17 + p[1])
        rgb[sky] = self.sky * (0.85 + 0.3 * y[sky, None]).astype(np.float32)
        rgb[facade] = self.facade_colour[cell[facade]] * shade[facade, None]
        rgb[walk] = self.sidewalk * shade[walk, None]
        road_shade = 0.92 + 0.08 * np.sin(2 * np.pi * wx / 0.33 + p[2]) * np.cos(2 * np.pi * y / 0.23 + p[3])
        rgb[road] = self.road * road_shade[road, None]
        dash = road & (np.abs(y - self.lane) < 0.012) & (np.mod(wx, self.lane_period) < 0.5 * self.lane_period)
        rgb[dash] = 0.9
        inst = label.astype(np.int32)

        # objects, in their own coordinates
        for k, obj in enumerate(self.objects):
            mask = own == k
            if not mask.any():
                continue
            qx, qy = self._local(k, t, x[mask], y[mask], aspect)
            part = self._parts(k, qx, qy)
            tex = 0.86 + 0.14 * np.sin(obj.tex_freq[0] * qx + obj.tex_phase[0]) * np.cos(
                obj.tex_freq[1] * qy + obj.tex_phase[1])
            rgb[mask] = obj.colours[part] * tex[:, None].astype(np.float32)
            label[mask] = obj.cls
            inst[mask] = FIRST_THING_ID + k
        return own, label, inst, np.clip(rgb, 0.0, 1.0)

    def render(self, frames: int, height: int, width: int, start: int = 0) -> VideoClip:
        """Frames ``start .. start + frames - 1`` at ``height x width``, with their exact flow."""
        if frames < 1 or height < 1 or width < 1:
            raise ValueError(f"need frames, height, width >= 1, got {frames}, {height}, {width}")
        aspect = width / height
        y = ((np.arange(height, dtype=np.float64) + 0.5) / height)[:, None]
        x = ((np.arange(width, dtype=np.float64) + 0.5) / width)[None, :]
        x, y = np.broadcast_arrays(x, y)
        labels, insts, images, flows, visible = [], [], [], [], []
        for i in range(frames):
            t = start + i
            own, label, inst, rgb = self.render_points(t, x, y, aspect)
            labels.append(label)
            insts.append(inst)
            images.append(rgb)
            if i == 0:
                continue
            sx, sy = self.source_points(t, x, y, own, aspect)
            flows.append(np.stack([(sx - x) * width, (sy - y) * height]).astype(np.float32))
            inside = (sx > 0.5 / width) & (sx < 1 - 0.5 / width) & (sy > 0.5 / height) & (sy < 1 - 0.5 / height)
            # the same object (or the background) must be under the source point one frame earlier
            visible.append(inside & (self.owner(t - 1, sx, sy, aspect) == own))
        empty = np.zeros((0, height, width), np.float32)
        return VideoClip(
            label=np.stack(labels), instance=np.stack(insts), image=np.stack(images).astype(np.float32),
            flow=np.stack(flows) if flows else np.zeros((0, 2, height, width), np.float32),
            visible=np.stack(visible) if visible else empty.astype(bool),
        )


def make_video(seed: int, index: int, frames: int, height: int, width: int, *,
               split: str = "train", start: int = 0) -> VideoClip:
    """Video ``index`` of ``split`` under ``seed``: ``frames`` frames from ``start`` at
    ``height x width``, with label maps, instance maps, images and exact backward flow."""
    return VideoScene(seed, index, split).render(frames, height, width, start=start)


# --------------------------------------------------------------------------- tensors and data set


def one_hot(label: np.ndarray, label_nc: int) -> torch.Tensor:
    """(..., H, W) integer ids -> (..., label_nc, H, W) float32 one-hot."""
    ids = torch.from_numpy(np.asarray(label, np.int64))
    if ids.numel() and (int(ids.max()) >= label_nc or int(ids.min()) < 0):
        raise ValueError(f"label ids span {int(ids.min())}..{int(ids.max())}, outside 0..{label_nc - 1}")
    return torch.nn.functional.one_hot(ids, label_nc).movedim(-1, -3).to(torch.float32)


def clip_to_batch(clip: VideoClip, label_nc: int = LABEL_NC) -> dict[str, torch.Tensor]:
    """The sample dict video models train on: ``labels`` (T, label_nc, H, W) one-hot float32,
    ``frames`` (T, 3, H, W) float32 in [-1, 1], ``flow`` (T-1, 2, H, W) float32 (pixels)."""
    return {
        "labels": one_hot(clip.label, label_nc).contiguous(),
        "frames": torch.from_numpy(np.ascontiguousarray(clip.image.transpose(0, 3, 1, 2))) * 2 - 1,
        "flow": torch.from_numpy(np.ascontiguousarray(clip.flow)),
    }


class VideoDataset(LabelMapDataset):
    """``train`` holds ``data_cfg.train_samples`` videos, ``val`` ``val_samples`` from another seed
    stream; ``frames`` frames each (argument, else ``data_cfg.options["frames"]``, else
    ``DEFAULT_FRAMES``) at ``data_cfg.height x data_cfg.width``. Items are generated on demand."""

    data_kind, items = "video", "videos"
    # what a clip is and what item it makes (a subclass swaps in its own, as WorldDataset does)
    make_clip = staticmethod(make_video)
    clip_item = staticmethod(clip_to_batch)

    def __init__(self, data_cfg: DataConfig, split: str = "train", label_nc: int = LABEL_NC,
                 frames: int | None = None):
        super().__init__(data_cfg, split, label_nc)
        frames = frames if frames is not None else data_cfg.options.get("frames", DEFAULT_FRAMES)
        if not isinstance(frames, int) or isinstance(frames, bool) or frames < 2:
            raise ValueError(f"data.options.frames must be an integer >= 2 (a video needs motion), got {frames!r}")
        self.frames = frames

    def clip(self, index: int) -> VideoClip:
        self.check_index(index)
        return self.make_clip(self.seed, index, self.frames, self.height, self.width, split=self.split)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.clip_item(self.clip(index), self.label_nc)


"""Synthetic 3D street worlds seen by a moving camera: labels, photos, depth and exact cameras.

World-consistent vid2vid (Mallya et al., ECCV 2020) colours a 3D point cloud with the frames it has
generated and renders that cloud into the next view as *guidance*. The published model gets the
cloud from structure-from-motion; here the world is known exactly, so guidance, flow and
visibility follow from per-frame depth and cameras with no reconstruction and no downloads.

A world is a static street: a ground plane (road with lane dashes, sidewalks, grass), axis-aligned
boxes (building blocks with windows, parked cars, poles, hedges) and a sky at infinity. A camera
drives along the street with a small sideways sway, yaw oscillation and a fixed downward pitch,
starting hundreds of metres from the world origin (as SfM coordinates do: camera translations are
large numbers). Each pixel centre's ray is cast against the analytic primitives.

Conventions (shared with ``models.wc_vid2vid``):

* **World**: metres, Y up, ground at Y = 0, the street runs along +Z.
* **Camera**: OpenCV axes (x right, y down, z forward). ``extrinsics`` (4, 4) maps world to camera,
  ``X_cam = R X_world + t``; ``intrinsics`` (3, 3) is a skew-free pinhole ``[[f, 0, cx], [0, f, cy],
  [0, 0, 1]]`` in pixels, with pixel ``(row, col)`` centred at ``(u, v) = (col + 0.5, row + 0.5)``.
  ``f`` is proportional to the width, so one index shows the same world at every resolution.
* **Depth** is the camera-space z of the surface under the pixel centre (not the ray length);
  **0 means no surface** (sky).
* **Colours are view-independent** functions of the surface point (texture in the face's own world
  coordinates times a fixed shade per face orientation); the sky's colour depends only on the
  ray's world direction. A surface point therefore has the same colour in every frame that sees it,
  which is what makes projected colours comparable across frames.
* **Class ids are Cityscapes label ids** (``orchestrator.data.street.CLASSES``), so a model built for
  ``label_nc`` 35 trains on it unchanged.
* A world is drawn from ``(seed, split, index)`` with its own numpy Generator; nothing drawn depends
  on the resolution, the clip length or ``start`` (boxes are laid out over a fixed stretch of street
  that covers ``MAX_FRAMES`` frames of travel).

``make_world_clip`` is the function to reuse; ``WorldDataset`` wraps it as a map-style data set of
``{"labels": (T, label_nc, H, W) one-hot, "frames": (T, 3, H, W) in [-1, 1], "depth": (T, 1, H, W),
"intrinsics": (T, 3, 3), "extrinsics": (T, 4, 4)}`` (all float32).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from orchestrator.config import DataConfig
from orchestrator.data.seeded import SPLIT_STREAM, check_split
from orchestrator.data.street import CLASSES, LABEL_NC
from orchestrator.data.videos import VideoDataset, one_hot

DEFAULT_FRAMES = 4
MAX_FRAMES = 64  # frames of travel the laid-out street covers (frames beyond see its far end)
HORIZONTAL_FOV = np.deg2rad(80.0)
_WORLD_TAG = 0x3D  # keeps this module's draws apart from other generators keyed the same way
NO_HIT = -1  # primitive index of rays that hit nothing (sky)
GROUND = -2  # primitive index of the ground plane
# fixed shade per face orientation (a view-independent "sun"), indexed [axis, normal > 0]
_FACE_SHADE = np.array([[0.7, 0.82], [0.5, 1.0], [0.76, 0.9]])
_CAST_CHUNK = 4096  # rays per slab test (memory: rays x boxes x 3 per array)

__all__ = ["DEFAULT_FRAMES", "MAX_FRAMES", "WorldClip", "WorldScene", "WorldDataset", "make_world_clip"]


@dataclass(frozen=True)
class WorldClip:
    """One rendered clip of ``T`` frames at ``H x W`` (numpy)."""

    label: np.ndarray  # (T, H, W) uint8 class ids
    image: np.ndarray  # (T, H, W, 3) float32 in [0, 1]
    depth: np.ndarray  # (T, H, W) float32 camera-space z, 0 for sky
    intrinsics: np.ndarray  # (T, 3, 3) float64
    extrinsics: np.ndarray  # (T, 4, 4) float64, world -> camera

    @property
    def frames(self) -> int:
        return int(self.label.shape[0])


@dataclass(frozen=True)
class _Box:
    lo: tuple[float, float, float]
    hi: tuple[float, float, float]
    cls: int
    colour: tuple[float, float, float]
    windows: bool  # building facades get a window grid
    tex_period: tuple[float, float]
    tex_phase: tuple[float, float]


class WorldScene:
    """The content of one world and its camera path, independent of resolution and clip length."""

    def __init__(self, seed: int, index: int, split: str = "train"):
        check_split(split)
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        rng = np.random.default_rng(np.random.SeedSequence(
            [abs(int(seed)), int(seed < 0), SPLIT_STREAM[split], int(index), _WORLD_TAG]))
        self.road = float(rng.uniform(4.0, 6.0))  # road half width
        self.walk = float(rng.uniform(1.5, 3.0))  # sidewalk width
        self.lane_period = float(rng.uniform(6.0, 10.0))
        self.road_colour = rng.uniform([0.25, 0.25, 0.27], [0.4, 0.4, 0.43])
        self.walk_colour = rng.uniform([0.55, 0.5, 0.45], [0.72, 0.66, 0.6])
        self.grass_colour = rng.uniform([0.2, 0.4, 0.12], [0.32, 0.55, 0.22])
        self.sky_horizon = rng.uniform([0.7, 0.78, 0.85], [0.85, 0.9, 0.97])
        self.sky_zenith = rng.uniform([0.3, 0.45, 0.7], [0.45, 0.6, 0.9])
        self.ground_phase = rng.uniform(0, 2 * np.pi, 4)
        # the camera path: far from the world origin, like SfM coordinates
        self.z0 = float(rng.uniform(100.0, 400.0))
        self.x0 = float(rng.uniform(-0.2, 0.2) * self.road)
        self.height = float(rng.uniform(1.3, 1.8))
        self.speed = float(rng.uniform(0.4, 1.2))  # metres per frame
        self.sway = (float(rng.uniform(0.0, 0.2)), float(rng.uniform(0.1, 0.4)), float(rng.uniform(0, 2 * np.pi)))
        self.yaw = (float(rng.uniform(-0.12, 0.12)), float(rng.uniform(0.0, 0.06)),
                    float(rng.uniform(0.1, 0.5)), float(rng.uniform(0, 2 * np.pi)))
        self.pitch = float(rng.uniform(0.0, 0.08))
        self.boxes = self._layout(rng)
        self._lo = np.array([b.lo for b in self.boxes])
        self._hi = np.array([b.hi for b in self.boxes])

    # ------------------------------------------------------------------ layout

    def _layout(self, rng: np.random.Generator) -> list[_Box]:
        start, end = self.z0 - 30.0, self.z0 + 160.0 + 1.2 * MAX_FRAMES
        boxes: list[_Box] = []

        def texture() -> dict:
            return dict(tex_period=(float(rng.uniform(0.8, 3.0)), float(rng.uniform(0.8, 3.0))),
                        tex_phase=(float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0, 2 * np.pi))))

        for side in (-1.0, 1.0):
            edge = self.road + self.walk  # the sidewalk's outer edge
            z = start
            while z < end:  # building blocks, with gaps
                length, gap = float(rng.uniform(6.0, 18.0)), float(rng.uniform(0.0, 5.0))
                setback, depth = float(rng.uniform(0.0, 2.0)), float(rng.uniform(8.0, 15.0))
                near, far = edge + setback, edge + setback + depth
                x_lo, x_hi = (near, far) if side > 0 else (-far, -near)
                boxes.append(_Box((x_lo, 0.0, z), (x_hi, float(rng.uniform(5.0, 20.0)), z + length),
                                  CLASSES["building"], tuple(rng.uniform([0.35, 0.3, 0.28], [0.8, 0.7, 0.62])),
                                  True, **texture()))
                z += length + gap
            z = start + float(rng.uniform(0.0, 8.0))
            while z < end:  # parked cars along the kerb
                length, width = float(rng.uniform(3.8, 4.6)), float(rng.uniform(1.7, 1.9))
                if rng.random() < 0.55:
                    outer = self.road - 0.3
                    x_lo, x_hi = (outer - width, outer) if side > 0 else (-outer, -outer + width)
                    boxes.append(_Box((x_lo, 0.0, z), (x_hi, float(rng.uniform(1.35, 1.6)), z + length),
                                      CLASSES["car"], tuple(rng.uniform(0.08, 0.9, 3)), False, **texture()))
                z += length + float(rng.uniform(1.0, 6.0))
            z = start + float(rng.uniform(0.0, 10.0))
            while z < end:  # poles and hedges on the sidewalk
                if rng.random() < 0.5:
                    x = side * (self.road + 0.45)
                    boxes.append(_Box((x - 0.08, 0.0, z), (x + 0.08, float(rng.uniform(3.5, 5.5)), z + 0.16),
                                      CLASSES["pole"], (0.35, 0.35, 0.38), False, **texture()))
                else:
                    x = side * (edge - 0.5)
                    boxes.append(_Box((x - 0.4, 0.0, z), (x + 0.4, float(rng.uniform(0.8, 2.2)),
                                                          z + float(rng.uniform(2.0, 6.0))),
                                      CLASSES["vegetation"], tuple(rng.uniform([0.1, 0.3, 0.08], [0.25, 0.5, 0.2])),
                                      False, **texture()))
                z += float(rng.uniform(8.0, 22.0))
        return boxes

    # ------------------------------------------------------------------ cameras

    def camera_position(self, t: float) -> np.ndarray:
        amplitude, freq, phase = self.sway
        return np.array([self.x0 + amplitude * np.sin(freq * t + phase), self.height, self.z0 + self.speed * t])

    def rotation(self, t: float) -> np.ndarray:
        """(3, 3) world -> camera rotation at frame ``t``: rows are the camera's right, down and
        forward axes in world coordinates."""
        base, amplitude, freq, phase = self.yaw
        yaw = base + amplitude * np.sin(freq * t + phase)
        forward = np.array([np.sin(yaw) * np.cos(self.pitch), -np.sin(self.pitch), np.cos(yaw) * np.cos(self.pitch)])
        right = np.array([np.cos(yaw), 0.0, -np.sin(yaw)])
        return np.stack([right, np.cross(right, forward), forward])

    def extrinsics(self, t: float) -> np.ndarray:
        """(4, 4) world -> camera transform at frame ``t``."""
        rot = self.rotation(t)
        out = np.eye(4)
        out[:3, :3] = rot
        out[:3, 3] = -rot @ self.camera_position(t)
        return out

    @staticmethod
    def intrinsics(height: int, width: int) -> np.ndarray:
        """(3, 3) pinhole with an 80 degree horizontal field of view, principal point at the centre."""
        focal = width / (2 * np.tan(HORIZONTAL_FOV / 2))
        return np.array([[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]])

    # ------------------------------------------------------------------ ray casting

    def cast(self, origin: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Nearest hit of rays ``origin + s * dirs`` (``dirs`` (P, 3), not normalised) with ``s > 0``.
        Returns ``s`` (P,) (inf for no hit), the primitive index (P,) (``GROUND``, a box index, or
        ``NO_HIT``) and the hit face (P, 2): axis and sign of its outward normal."""
        dirs = np.asarray(dirs, np.float64)
        parts = [self._cast_chunk(origin, dirs[i:i + _CAST_CHUNK]) for i in range(0, len(dirs), _CAST_CHUNK)]
        if not parts:
            return np.zeros(0), np.zeros(0, np.int64), np.zeros((0, 2), np.int64)
        return tuple(np.concatenate(arrays) for arrays in zip(*parts))

    def _cast_chunk(self, origin: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = dirs.shape[0]
        best = np.full(n, np.inf)
        prim = np.full(n, NO_HIT, np.int64)
        face = np.zeros((n, 2), np.int64)
        with np.errstate(divide="ignore", invalid="ignore"):
            s_ground = np.where(dirs[:, 1] < 0, -origin[1] / dirs[:, 1], np.inf)
            hit = np.isfinite(s_ground) & (s_ground > 0)
            best[hit], prim[hit], face[hit] = s_ground[hit], GROUND, (1, 1)
            # slab test, one axis at a time; fmin/fmax skip the NaN of 0 * inf (a ray inside a
            # slab's plane), which then constrains nothing along that axis
            boxes = np.arange(len(self.boxes))
            if (dirs[:, 2] > 0).all():  # rays that all go forward cannot hit boxes behind the camera
                boxes = boxes[self._hi[:, 2] > origin[2]]
            entry = np.full((n, len(boxes)), -np.inf)
            exit_ = np.full((n, len(boxes)), np.inf)
            axis = np.zeros((n, len(boxes)), np.int64)
            for a in range(3):
                inv = 1.0 / dirs[:, a, None]
                t1 = (self._lo[boxes, a] - origin[a]) * inv
                t2 = (self._hi[boxes, a] - origin[a]) * inv
                near = np.fmin(t1, t2)
                axis = np.where(near > entry, a, axis)  # the slab entered last is the face hit
                entry = np.fmax(entry, near)
                exit_ = np.fmin(exit_, np.fmax(t1, t2))
        entry = np.where((entry <= exit_) & (entry > 0), entry, np.inf)
        rows = np.arange(n)
        if len(boxes):
            pick = entry.argmin(-1)
            s_box = entry[rows, pick]
            closer = s_box < best
            best[closer], prim[closer] = s_box[closer], boxes[pick][closer]
            hit_axis = axis[rows, pick]
            sign = np.where(dirs[rows, hit_axis] > 0, -1, 1)  # the normal faces the ray
            face[closer] = np.stack([hit_axis, sign], -1)[closer]
        return best, prim, face

    def shade(self, points: np.ndarray, prim: np.ndarray, face: np.ndarray,
              dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(class id (P,) uint8, rgb (P, 3) float32) of surface ``points`` on ``prim``/``face``
        (from ``cast``); sky colours for ``NO_HIT`` rays from their world directions ``dirs``."""
        n = points.shape[0]
        label = np.full(n, CLASSES["sky"], np.uint8)
        rgb = np.zeros((n, 3), np.float64)
        sky = prim == NO_HIT
        d = dirs[sky]
        elevation = np.clip(d[:, 1] / np.linalg.norm(d, axis=1), 0.0, 1.0)[:, None]
        rgb[sky] = self.sky_horizon * (1 - elevation) + self.sky_zenith * elevation

        ground = prim == GROUND
        x, z = points[ground, 0], points[ground, 2]
        p = self.ground_phase
        grain = 0.9 + 0.1 * np.sin(2 * np.pi * x / 0.9 + p[0]) * np.sin(2 * np.pi * z / 1.7 + p[1])
        slab = 0.88 + 0.12 * np.sin(2 * np.pi * x / 1.3 + p[2]) * np.cos(2 * np.pi * z / 1.1 + p[3])
        road, walk = np.abs(x) < self.road, np.abs(x) < self.road + self.walk
        colour = np.where(road[:, None], self.road_colour * grain[:, None],
                          np.where(walk[:, None], self.walk_colour * slab[:, None], self.grass_colour * grain[:, None]))
        dash = road & (np.abs(x) < 0.12) & (np.mod(z, self.lane_period) < 0.45 * self.lane_period)
        colour[dash] = 0.88
        rgb[ground] = colour
        label[ground] = np.where(road, CLASSES["road"], np.where(walk, CLASSES["sidewalk"], CLASSES["terrain"]))

        for k in np.unique(prim[prim >= 0]):
            box, mask = self.boxes[k], prim == k
            pts, fc = points[mask], face[mask]
            # texture in the face's own two world coordinates
            a = np.where(fc[:, 0] == 0, pts[:, 2], pts[:, 0])
            b = np.where(fc[:, 0] == 1, pts[:, 2], pts[:, 1])
            tex = 0.86 + 0.14 * np.sin(2 * np.pi * a / box.tex_period[0] + box.tex_phase[0]) * np.cos(
                2 * np.pi * b / box.tex_period[1] + box.tex_phase[1])
            shade = _FACE_SHADE[fc[:, 0], (fc[:, 1] > 0).astype(np.int64)]
            colour = np.asarray(box.colour)[None] * (tex * shade)[:, None]
            if box.windows:  # a window grid on the walls (2.6 m wide bays, 3 m storeys)
                wall = fc[:, 0] != 1
                window = wall & (np.mod(a, 2.6) > 0.7) & (np.mod(a, 2.6) < 1.9) & (np.mod(b, 3.0) > 1.0) \
                    & (np.mod(b, 3.0) < 2.3) & (b > 0.5)
                colour[window] = np.array([0.16, 0.2, 0.27]) * shade[window, None]
            rgb[mask] = colour
            label[mask] = box.cls
        return label, np.clip(rgb, 0.0, 1.0).astype(np.float32)

    # ------------------------------------------------------------------ frames

    def pixel_rays(self, t: float, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Camera centre (3,) and world ray directions (H*W, 3) through the pixel centres of frame
        ``t``, scaled so the hit parameter ``s`` equals the camera-space depth."""
        k_inv = np.linalg.inv(self.intrinsics(height, width))
        v, u = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
        pix = np.stack([u.ravel(), v.ravel(), np.ones(u.size)])
        return self.camera_position(t), (self.rotation(t).T @ (k_inv @ pix)).T

    def render(self, frames: int, height: int, width: int, start: int = 0) -> WorldClip:
        """Frames ``start .. start + frames - 1`` at ``height x width``."""
        if frames < 1 or height < 1 or width < 1:
            raise ValueError(f"need frames, height, width >= 1, got {frames}, {height}, {width}")
        labels, images, depths = [], [], []
        for t in range(start, start + frames):
            origin, dirs = self.pixel_rays(t, height, width)
            s, prim, face = self.cast(origin, dirs)
            label, rgb = self.shade(origin + np.where(np.isfinite(s), s, 0.0)[:, None] * dirs, prim, face, dirs)
            labels.append(label.reshape(height, width))
            images.append(rgb.reshape(height, width, 3))
            depths.append(np.where(np.isfinite(s), s, 0.0).reshape(height, width))
        times = range(start, start + frames)
        return WorldClip(label=np.stack(labels), image=np.stack(images),
                         depth=np.stack(depths).astype(np.float32),
                         intrinsics=np.stack([self.intrinsics(height, width)] * frames),
                         extrinsics=np.stack([self.extrinsics(t) for t in times]))


def make_world_clip(seed: int, index: int, frames: int, height: int, width: int, *,
                    split: str = "train", start: int = 0) -> WorldClip:
    """World ``index`` of ``split`` under ``seed``: ``frames`` frames from ``start`` at ``height x width``."""
    return WorldScene(seed, index, split).render(frames, height, width, start=start)


def clip_to_batch(clip: WorldClip, label_nc: int = LABEL_NC) -> dict[str, torch.Tensor]:
    """The sample dict ``models.wc_vid2vid`` trains on (see the module docstring), all float32."""
    return {
        "labels": one_hot(clip.label, label_nc).contiguous(),
        "frames": torch.from_numpy(np.ascontiguousarray(clip.image.transpose(0, 3, 1, 2))) * 2 - 1,
        "depth": torch.from_numpy(np.ascontiguousarray(clip.depth[:, None])),
        "intrinsics": torch.from_numpy(clip.intrinsics.astype(np.float32)),
        "extrinsics": torch.from_numpy(clip.extrinsics.astype(np.float32)),
    }


class WorldDataset(VideoDataset):
    """``train`` holds ``data_cfg.train_samples`` worlds, ``val`` ``val_samples`` from another seed
    stream; ``frames`` frames each (argument, else ``data_cfg.options["frames"]``, else
    ``DEFAULT_FRAMES``) at ``data_cfg.height x data_cfg.width``. Items are rendered on demand.
    (``VideoDataset``'s checks and bookkeeping; ``clip`` makes a ``WorldClip``.)"""

    data_kind, items = "world", "worlds"
    make_clip = staticmethod(make_world_clip)
    clip_item = staticmethod(clip_to_batch)

    def __init__(self, data_cfg: DataConfig, split: str = "train", label_nc: int = LABEL_NC,
                 frames: int | None = None):
        unknown = sorted(set(data_cfg.options) - {"frames"})
        if unknown:
            raise ValueError(f"world data has no option(s) {unknown}; allowed: ['frames']")
        frames = frames if frames is not None else data_cfg.options.get("frames", DEFAULT_FRAMES)
        super().__init__(data_cfg, split, label_nc=label_nc, frames=frames)
        if self.frames > MAX_FRAMES:
            raise ValueError(f"data.options.frames must be at most {MAX_FRAMES} (the laid-out street), got {frames}")

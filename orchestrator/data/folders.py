"""Paired data in pix2pixHD's folder layout.

```
<root>/train_label/<name>.png   class ids (single channel)
<root>/train_img/<name>.png|jpg photos
<root>/train_inst/<name>.png    optional instance ids (any integer png, e.g. Cityscapes 16-bit)
```
The ``val`` split reads ``test_label``, ``test_img`` and ``test_inst``. Files pair up by stem.
Layout problems (missing folders, unpaired labels) are reported when the data set is built; content
problems (sizes, out-of-range ids) when a sample is read, naming the file.

Instance ids are renumbered per image to 0..K-1 (only their boundaries are used), which keeps them
exact under an fp16 cast; without an instance folder the label map serves as the instance map.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from orchestrator.config import DataConfig
from orchestrator.data.street import to_batch

_PREFIX = {"train": "train", "val": "test"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _files(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """stem -> file for the files of ``folder`` with one of ``suffixes``; a stem twice is an error."""
    out: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in suffixes:
            if path.stem in out:
                raise ValueError(f"{folder}: two files for {path.stem!r}: {out[path.stem].name}, {path.name}")
            out[path.stem] = path
    return out


def _resize_nearest(ids: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of an integer map (pixel centres), exact for any id range."""
    rows = np.minimum(((np.arange(height) + 0.5) * ids.shape[0] / height).astype(np.int64), ids.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * ids.shape[1] / width).astype(np.int64), ids.shape[1] - 1)
    return ids[rows][:, cols]


def _read_ids(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        ids = np.asarray(img)
    if ids.ndim != 2:
        raise ValueError(f"{path}: expected a single-channel id map, got an image of shape {ids.shape}")
    return ids.astype(np.int64)


class FolderDataset(Dataset):
    """Paired label/photo(/instance) files under ``data_cfg.root``, resized to
    ``data_cfg.height x data_cfg.width``; samples as ``orchestrator.data.street.to_batch`` makes them."""

    def __init__(self, data_cfg: DataConfig, split: str = "train", label_nc: int = 35):
        if split not in _PREFIX:
            raise ValueError(f"unknown split {split!r}; allowed: {sorted(_PREFIX)}")
        if data_cfg.root is None:
            raise ValueError("data.root is required for folder data")
        root = Path(data_cfg.root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"data root {root} does not exist or is not a folder")
        prefix = _PREFIX[split]
        label_dir, img_dir, inst_dir = (root / f"{prefix}_{kind}" for kind in ("label", "img", "inst"))
        for folder in (label_dir, img_dir):
            if not folder.is_dir():
                raise FileNotFoundError(f"{split} split needs the folder {folder}, which does not exist")
        labels = _files(label_dir, (".png",))
        if not labels:
            raise ValueError(f"no .png label files in {label_dir}")
        images = _files(img_dir, IMAGE_SUFFIXES)
        unpaired = sorted(set(labels) - set(images))
        if unpaired:
            raise ValueError(f"labels without an image in {img_dir}: {_names(labels, unpaired)}")
        insts: dict[str, Path] | None = None
        if inst_dir.is_dir():
            insts = _files(inst_dir, (".png",))
            unpaired = sorted(set(labels) - set(insts))
            if unpaired:
                raise ValueError(f"labels without an instance map in {inst_dir}: {_names(labels, unpaired)}")
        self.samples = [(labels[s], images[s], insts[s] if insts else None) for s in sorted(labels)]
        self.label_nc, self.height, self.width = label_nc, data_cfg.height, data_cfg.width

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        label_path, img_path, inst_path = self.samples[index]
        label = _read_ids(label_path)
        if label.max() >= self.label_nc or label.min() < 0:
            raise ValueError(f"{label_path}: label ids span {label.min()}..{label.max()}, "
                             f"outside 0..{self.label_nc - 1} (label_nc={self.label_nc})")
        with Image.open(img_path) as img:
            rgb_img = img.convert("RGB")
        if rgb_img.size != (label.shape[1], label.shape[0]):
            raise ValueError(f"size mismatch: {img_path} is {rgb_img.size[0]}x{rgb_img.size[1]} but "
                             f"{label_path} is {label.shape[1]}x{label.shape[0]} (width x height)")
        if inst_path is not None:
            inst = _read_ids(inst_path)
            if inst.shape != label.shape:
                raise ValueError(f"size mismatch: {inst_path} is {inst.shape[1]}x{inst.shape[0]} but "
                                 f"{label_path} is {label.shape[1]}x{label.shape[0]} (width x height)")
        else:
            inst = label
        size = (self.width, self.height)
        rgb = np.asarray(rgb_img.resize(size, Image.BICUBIC) if rgb_img.size != size else rgb_img,
                         dtype=np.float32) / 255.0
        label = _resize_nearest(label, self.height, self.width)
        inst = np.unique(_resize_nearest(inst, self.height, self.width), return_inverse=True)[1]
        return to_batch(label, inst.reshape(self.height, self.width), np.clip(rgb, 0, 1), self.label_nc)


def _names(files: dict[str, Path], stems: list[str], limit: int = 10) -> str:
    names = [files[s].name for s in stems[:limit]]
    more = f" and {len(stems) - limit} more" if len(stems) > limit else ""
    return ", ".join(names) + more

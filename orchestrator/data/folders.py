"""Paired data in pix2pixHD's folder layout.

```
<root>/train_label/<name>.png   class ids (single channel)
<root>/train_img/<name>.png|jpg photos
<root>/train_inst/<name>.png    optional instance ids (any integer png, e.g. Cityscapes 16-bit)
```
The ``val`` split reads ``test_label``, ``test_img`` and ``test_inst``. Files pair up by stem, and
every file must have its partners (pix2pixHD itself pairs the sorted folders by position, so one
missing file shifts every pair after it). Layout problems (missing folders, unpaired files) are
reported when the data set is built, all of them; content problems (unreadable files, channels,
sizes, out-of-range ids) when a sample is read, naming the file. ``check_files`` reads every sample
once and reports all of them: ``orchestrator.data.check`` runs it before a study starts.

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
from orchestrator.data.check import (DataError, DataProblem, file_problem, id_map_problem, map_in_threads,
                                     open_image, photo_mode_problem)
from orchestrator.data.street import to_batch

_PREFIX = {"train": "train", "val": "test"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

Sample = tuple[Path, Path, "Path | None"]  # label, photo, instance map


def _files(folder: Path, suffixes: tuple[str, ...], problems: list[DataProblem]) -> dict[str, Path]:
    """stem -> file for the files of ``folder`` with one of ``suffixes``; a stem twice is a problem
    (and that stem is left out)."""
    out: dict[str, Path] = {}
    twice: set[str] = set()
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in suffixes:
            if path.stem in out:
                problems.append(file_problem(path, f"a second file for {path.stem!r} beside {out[path.stem].name}"))
                twice.add(path.stem)
            else:
                out[path.stem] = path
    return {stem: path for stem, path in out.items() if stem not in twice}


def scan(root: Path | str | None, split: str) -> tuple[list[Sample], list[DataProblem]]:
    """The (label, photo, instance map) files of ``split`` under ``root``, paired by stem, and every
    problem of the layout. Samples whose files all exist are returned even when others have problems."""
    if split not in _PREFIX:
        raise ValueError(f"unknown split {split!r}; allowed: {sorted(_PREFIX)}")
    if root is None:
        return [], [DataProblem(None, "data.root is required for folder data")]
    root = Path(root).expanduser()
    if not root.is_dir():
        return [], [file_problem(root, "the data root does not exist or is not a folder")]
    prefix = _PREFIX[split]
    label_dir, img_dir, inst_dir = (root / f"{prefix}_{kind}" for kind in ("label", "img", "inst"))
    missing = [d for d in (label_dir, img_dir) if not d.is_dir()]
    if missing:
        return [], [file_problem(d, f"the {split} split needs this folder, which does not exist") for d in missing]
    problems: list[DataProblem] = []
    labels = _files(label_dir, (".png",), problems)
    images = _files(img_dir, IMAGE_SUFFIXES, problems)
    insts = _files(inst_dir, (".png",), problems) if inst_dir.is_dir() else None
    if not labels:
        return [], problems + [file_problem(label_dir, "no .png label files")]
    for stem in sorted(set(labels) - set(images)):
        problems.append(file_problem(labels[stem], f"label map without a photo ({stem}.png/.jpg in {img_dir})"))
    for stem in sorted(set(images) - set(labels)):
        problems.append(file_problem(images[stem], f"photo without a label map ({stem}.png in {label_dir})"))
    if insts is not None:
        for stem in sorted(set(labels) - set(insts)):
            problems.append(file_problem(labels[stem], f"label map without an instance map ({stem}.png in {inst_dir})"))
        for stem in sorted(set(insts) - set(labels)):
            problems.append(file_problem(insts[stem], f"instance map without a label map ({stem}.png in {label_dir})"))
    samples = [(labels[s], images[s], insts[s] if insts is not None else None)
               for s in sorted(labels) if s in images and (insts is None or s in insts)]
    return samples, problems


def _resize_nearest(ids: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of an integer map (pixel centres), exact for any id range."""
    rows = np.minimum(((np.arange(height) + 0.5) * ids.shape[0] / height).astype(np.int64), ids.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * ids.shape[1] / width).astype(np.int64), ids.shape[1] - 1)
    return ids[rows][:, cols]


def _read_ids(path: Path, problems: list[DataProblem]) -> np.ndarray | None:
    try:
        img = open_image(path)
    except DataError as error:
        problems += error.problems
        return None
    problem = id_map_problem(img, path)
    if problem is not None:
        problems.append(problem)
        return None
    return np.asarray(img).astype(np.int64)


def read_sample(sample: Sample, label_nc: int) -> tuple[np.ndarray | None, Image.Image | None, np.ndarray | None,
                                                        list[DataProblem]]:
    """(label ids, RGB photo, instance ids, problems) of one sample's files, each opened once.
    With problems, the arrays are not to be used."""
    label_path, img_path, inst_path = sample
    problems: list[DataProblem] = []
    label = _read_ids(label_path, problems)
    if label is not None and label.size and (label.max() >= label_nc or label.min() < 0):
        problems.append(file_problem(label_path, f"label ids span {label.min()}..{label.max()}, outside "
                                                 f"0..{label_nc - 1} (the model's label_nc={label_nc})"))
    rgb = None
    try:
        photo = open_image(img_path)
    except DataError as error:
        problems += error.problems
    else:
        problem = photo_mode_problem(photo, img_path)
        if problem is not None:
            problems.append(problem)
        else:
            rgb = photo.convert("RGB")
            if label is not None and rgb.size != (label.shape[1], label.shape[0]):
                problems.append(file_problem(img_path, f"size mismatch: the photo is {rgb.size[0]}x{rgb.size[1]} but "
                                                       f"{label_path} is {label.shape[1]}x{label.shape[0]} "
                                                       "(width x height)"))
    inst = None
    if inst_path is not None:
        inst = _read_ids(inst_path, problems)
        if inst is not None and label is not None and inst.shape != label.shape:
            problems.append(file_problem(inst_path, f"size mismatch: the instance map is {inst.shape[1]}x{inst.shape[0]} "
                                                    f"but {label_path} is {label.shape[1]}x{label.shape[0]} "
                                                    "(width x height)"))
    return label, rgb, inst, problems


class FolderDataset(Dataset):
    """Paired label/photo(/instance) files under ``data_cfg.root``, resized to
    ``data_cfg.height x data_cfg.width``; samples as ``orchestrator.data.street.to_batch`` makes them.
    A layout problem raises ``DataError`` listing all of them (its ``dataset`` holds the pairs found)."""

    def __init__(self, data_cfg: DataConfig, split: str = "train", label_nc: int = 35):
        self.samples, problems = scan(data_cfg.root, split)
        self.label_nc, self.height, self.width = label_nc, data_cfg.height, data_cfg.width
        if problems:
            raise DataError(problems, dataset=self if self.samples else None)

    def __len__(self) -> int:
        return len(self.samples)

    def check_files(self) -> list[DataProblem]:
        """Open every file of every sample once; everything wrong, in sample order."""
        return map_in_threads(lambda sample: read_sample(sample, self.label_nc)[3], self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        label, rgb_img, inst, problems = read_sample(self.samples[index], self.label_nc)
        if problems:
            raise DataError(problems)
        if inst is None:
            inst = label
        size = (self.width, self.height)
        rgb = np.asarray(rgb_img.resize(size, Image.BICUBIC) if rgb_img.size != size else rgb_img,
                         dtype=np.float32) / 255.0
        label = _resize_nearest(label, self.height, self.width)
        inst = np.unique(_resize_nearest(inst, self.height, self.width), return_inverse=True)[1]
        return to_batch(label, inst.reshape(self.height, self.width), np.clip(rgb, 0, 1), self.label_nc)

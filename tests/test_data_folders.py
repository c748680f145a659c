"""pix2pixHD folder layout loader: reading, resizing, and an error naming the culprit for each fault."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.pix2pixhd import Pix2PixHD
from orchestrator.config import DataConfig
from orchestrator.data.check import DataError
from orchestrator.data.folders import FolderDataset

W, H = 8, 6  # stored size


def label_map(seed: int) -> np.ndarray:
    ids = np.zeros((H, W), np.uint8)
    ids[:, W // 2:] = 7 + seed
    ids[: H // 2, : W // 2] = 23
    return ids


def write_tree(root: Path, names=("a", "b"), prefix="train", inst=True, img_ext=".png") -> Path:
    for kind in ("label", "img") + (("inst",) if inst else ()):
        (root / f"{prefix}_{kind}").mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(label_map(i)).save(root / f"{prefix}_label" / f"{name}.png")
        rgb = np.full((H, W, 3), 40 * i, np.uint8)
        rgb[..., 0] = np.arange(W, dtype=np.uint8)[None] * 30
        Image.fromarray(rgb).save(root / f"{prefix}_img" / f"{name}{img_ext}")
        if inst:
            ids = np.full((H, W), 7, np.uint16)  # 16-bit png, as Cityscapes ships them
            ids[:, W // 2:] = 26001  # Cityscapes-style: class * 1000 + k
            ids[:, W - 2:] = 26002
            Image.fromarray(ids).save(root / f"{prefix}_inst" / f"{name}.png")
    return root


def cfg(root: Path, height: int = H, width: int = W) -> DataConfig:
    return DataConfig(kind="folder", root=root, height=height, width=width)


def test_reads_pairs_at_stored_size(tmp_path):
    data = FolderDataset(cfg(write_tree(tmp_path)), "train", label_nc=35)
    assert len(data) == 2
    sample = data[1]
    assert sample["label"].shape == (35, H, W) and sample["image"].shape == (3, H, W)
    assert torch.equal(sample["label"].argmax(0), torch.from_numpy(label_map(1)).long())
    expected_red = torch.arange(W, dtype=torch.float32) * 30 / 255 * 2 - 1
    torch.testing.assert_close(sample["image"][0, 0], expected_red)
    # instance ids renumbered 0..K-1 (boundaries unchanged), so fp16 keeps them exact
    assert sample["inst"].unique().tolist() == [0.0, 1.0, 2.0]
    assert sample["inst"][0, 0, W - 1] == 2 and sample["inst"][0, 0, 0] == 0


def test_val_split_jpg_and_resize(tmp_path):
    write_tree(tmp_path, names=("x",), prefix="test", inst=False, img_ext=".jpg")
    data = FolderDataset(cfg(tmp_path, height=H * 2, width=W // 2), "val", label_nc=35)
    sample = data[0]
    assert sample["image"].shape == (3, H * 2, W // 2)
    labels = sample["label"].argmax(0)
    assert labels[0].tolist() == [23, 23, 7, 7] and labels[-1].tolist() == [0, 0, 7, 7]  # nearest
    assert sample["inst"].unique().numel() == 3  # no inst folder: the label map is the instance map


def test_model_uses_folder_kind(tmp_path):
    data = Pix2PixHD().dataset(cfg(write_tree(tmp_path)), "train")
    assert isinstance(data, FolderDataset) and data[0]["label"].shape[0] == 35


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="nowhere: the data root does not exist"):
        FolderDataset(cfg(tmp_path / "nowhere"))


def test_missing_folder(tmp_path):
    write_tree(tmp_path)
    for path in (tmp_path / "train_img").iterdir():
        path.unlink()
    (tmp_path / "train_img").rmdir()
    with pytest.raises(DataError, match="train_img: the train split needs this folder"):
        FolderDataset(cfg(tmp_path))
    with pytest.raises(DataError, match="test_label: the val split needs this folder"):
        FolderDataset(cfg(tmp_path), "val")


def test_no_label_files(tmp_path):
    (tmp_path / "train_label").mkdir()
    (tmp_path / "train_img").mkdir()
    with pytest.raises(DataError, match="train_label: no .png label files"):
        FolderDataset(cfg(tmp_path))


def test_label_without_image_is_named(tmp_path):
    write_tree(tmp_path, names=("a", "b", "c"))
    (tmp_path / "train_img" / "b.png").unlink()
    with pytest.raises(DataError, match=r"^\S+/train_label/b\.png: label map without a photo \(b\.png/\.jpg in \S+/train_img\)$"):
        FolderDataset(cfg(tmp_path))


def test_label_without_instance_is_named(tmp_path):
    write_tree(tmp_path)
    (tmp_path / "train_inst" / "a.png").unlink()
    with pytest.raises(DataError, match=r"train_label/a\.png: label map without an instance map"):
        FolderDataset(cfg(tmp_path))


def test_size_mismatch_names_both_files(tmp_path):
    write_tree(tmp_path)
    Image.new("RGB", (W + 1, H)).save(tmp_path / "train_img" / "a.png")
    data = FolderDataset(cfg(tmp_path))
    with pytest.raises(DataError, match=r"train_img/a\.png: size mismatch: the photo is 9x6 but .*train_label/a\.png is 8x6"):
        data[0]
    data[1]  # the other pair is fine


def test_label_id_out_of_range_is_named(tmp_path):
    write_tree(tmp_path)
    data = FolderDataset(cfg(tmp_path), label_nc=8)  # both samples have ids up to 23
    with pytest.raises(DataError, match=r"train_label/a\.png: label ids span 0\.\.23, outside 0\.\.7"):
        data[0]


def test_rgb_label_is_rejected(tmp_path):
    write_tree(tmp_path)
    Image.new("RGB", (W, H)).save(tmp_path / "train_label" / "a.png")
    with pytest.raises(DataError, match=r"train_label/a\.png: expected a single-channel id map, got a 3-channel RGB"):
        FolderDataset(cfg(tmp_path))[0]

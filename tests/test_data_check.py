"""The data check that runs before a study starts Ray (orchestrator/data/check.py, GANModel.check_data):
every bad file of a data set found in one pass, each named with what is wrong; run_experiment.py
stops with exit code 2 and no traceback before anything starts Ray; a file that goes bad later fails
its sample with a DataError naming it."""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.base import load_model
from orchestrator.config import DataConfig
from orchestrator.data.check import DataError, DataProblem, describe_problems
from orchestrator.data.folders import FolderDataset

W, H = 8, 6


def good_sample(root: Path, name: str, prefix: str = "train") -> None:
    ids = np.full((H, W), 7, np.uint8)
    ids[: H // 2] = 23
    Image.fromarray(ids).save(root / f"{prefix}_label" / f"{name}.png")
    Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(root / f"{prefix}_img" / f"{name}.png")
    inst = np.full((H, W), 7, np.uint16)
    inst[:, W // 2:] = 26001
    Image.fromarray(inst).save(root / f"{prefix}_inst" / f"{name}.png")


def bad_folder(root: Path) -> Path:
    """A pix2pixHD folder with one good pair per split and, in train, one fault per file."""
    for prefix in ("train", "test"):
        for kind in ("label", "img", "inst"):
            (root / f"{prefix}_{kind}").mkdir(parents=True)
        for name in ("good", "ids", "text", "rgblabel", "deep", "cut", "wide", "noinst", "nophoto", "orphan"):
            good_sample(root, name, prefix)
            if prefix == "test":
                break
    train = {kind: root / f"train_{kind}" for kind in ("label", "img", "inst")}
    Image.fromarray(np.full((H, W), 200, np.uint8)).save(train["label"] / "ids.png")  # ids >= label_nc 35
    (train["img"] / "text.png").write_text("not an image, only named like one\n")  # a text file
    Image.new("RGB", (W, H), (7, 7, 7)).save(train["label"] / "rgblabel.png")  # colour-coded label
    Image.fromarray(np.full((H, W), 300, np.uint16)).save(train["img"] / "deep.png")  # 16-bit map among photos
    data = (train["img"] / "cut.png").read_bytes()
    (train["img"] / "cut.png").write_bytes(data[: len(data) // 2])  # truncated
    Image.new("RGB", (W + 4, H), (1, 2, 3)).save(train["img"] / "wide.png")  # size mismatch
    (train["inst"] / "noinst.png").unlink()  # instance map missing
    (train["img"] / "nophoto.png").unlink()  # photo missing
    (train["label"] / "orphan.png").unlink()  # photo and instance map without a label
    return root


# what each bad file must be reported with: (path relative to the root, words of the message)
EXPECTED = [
    ("train_label/ids.png", "label ids span 200..200, outside 0..34"),
    ("train_img/text.png", "not a readable image"),
    ("train_label/rgblabel.png", "expected a single-channel id map, got a 3-channel RGB image"),
    ("train_img/deep.png", "is a single-channel I;16 image, not an 8-bit photo"),
    ("train_img/cut.png", "not a readable image"),
    ("train_img/wide.png", "size mismatch: the photo is 12x6"),
    ("train_label/noinst.png", "label map without an instance map"),
    ("train_label/nophoto.png", "label map without a photo"),
    ("train_img/orphan.png", "photo without a label map"),
    ("train_inst/orphan.png", "instance map without a label map"),
]


def folder_cfg(root: Path) -> DataConfig:
    return DataConfig(kind="folder", root=root, height=H, width=W)


def assert_all_named(lines: list[str], root: Path) -> None:
    for rel, words in EXPECTED:
        hits = [line for line in lines if f"{root / rel}: " in line]
        assert len(hits) == 1 and words in hits[0], (rel, hits)
    assert not any("good.png" in line for line in lines)
    assert len(lines) == len(EXPECTED)


@pytest.mark.parametrize("model", ["pix2pixhd", "spade"])  # SPADE wraps the loader (LabelIdDataset)
def test_every_bad_file_is_named_at_once(tmp_path, model):
    root = bad_folder(tmp_path)
    problems = load_model(model).check_data(folder_cfg(root))
    assert all(isinstance(p, DataProblem) for p in problems)
    assert_all_named([str(p) for p in problems], root)


def test_a_clean_folder_has_no_problems_and_label_count_is_the_models(tmp_path):
    root = bad_folder(tmp_path)
    for path in root.rglob("*.png"):
        if path.stem != "good":
            path.unlink()
    assert load_model("pix2pixhd").check_data(folder_cfg(root)) == []
    # ids 7 and 23 are fine for 35 classes, not for 20: the count comes from the model's options
    problems = load_model("pix2pixhd", label_nc=20).check_data(folder_cfg(root))
    assert [p.path for p in problems] == [str(root / "train_label/good.png"), str(root / "test_label/good.png")]
    assert "outside 0..19 (the model's label_nc=20)" in problems[0].message


def test_missing_split_folders_and_root_are_named(tmp_path):
    root = bad_folder(tmp_path)
    for path in (root / "test_img").iterdir():
        path.unlink()
    (root / "test_img").rmdir()
    problems = [str(p) for p in load_model("pix2pixhd").check_data(folder_cfg(root))]
    assert f"{root / 'test_img'}: the val split needs this folder, which does not exist" in problems
    assert len(problems) == len(EXPECTED) + 1  # the train problems are still all there
    nowhere = [str(p) for p in load_model("pix2pixhd").check_data(folder_cfg(tmp_path / "nowhere"))]
    assert nowhere == [f"{tmp_path / 'nowhere'}: the data root does not exist or is not a folder"]


def test_run_experiment_stops_before_ray_with_exit_2_and_every_file(tmp_path, monkeypatch, capsys):
    import ray

    import run_experiment
    from orchestrator import search

    def no_ray(*args, **kwargs):
        raise AssertionError("the data check must stop the study before Ray starts")

    monkeypatch.setattr(search, "connect", no_ray)
    root = bad_folder(tmp_path / "data")
    code = run_experiment.main(["--set", "data.kind=folder", "--set", f"data.root={root}",
                                "--output", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in out + err and out == ""
    lines = err.splitlines()
    assert lines[0] == f"error: the folder data under {root} is not usable ({len(EXPECTED)} problems):"
    assert_all_named([line.strip() for line in lines[1:]], root)
    assert not (tmp_path / "out").exists() and not ray.is_initialized()


def test_a_file_that_goes_bad_later_fails_its_sample_naming_it(tmp_path):
    root = bad_folder(tmp_path)
    for path in root.rglob("*.png"):
        if path.stem != "good":
            path.unlink()
    Image.fromarray(np.full((H, W), 7, np.uint8)).save(root / "train_label" / "other.png")
    Image.new("RGB", (W, H)).save(root / "train_img" / "other.png")
    Image.fromarray(np.full((H, W), 7, np.uint16)).save(root / "train_inst" / "other.png")
    data = FolderDataset(folder_cfg(root), "train", label_nc=35)
    assert data.check_files() == []
    (root / "train_img" / "other.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # after the check
    data[0]  # good.png still reads
    with pytest.raises(DataError) as caught:
        data[1]
    assert caught.value.path == str(root / "train_img" / "other.png")
    assert re.fullmatch(rf"{re.escape(str(root / 'train_img' / 'other.png'))}: not a readable image.*", str(caught.value))
    assert isinstance(caught.value, ValueError)
    # it crosses process boundaries (Ray ships a trial's error to the driver) with its problems
    again = pickle.loads(pickle.dumps(caught.value))
    assert isinstance(again, DataError) and again.problems == caught.value.problems and str(again) == str(caught.value)


def test_inpainting_folder_photos_are_checked(tmp_path):
    for split in ("train_img", "test_img"):
        (tmp_path / split).mkdir()
        Image.new("RGB", (20, 16), (10, 20, 30)).save(tmp_path / split / "ok.jpg")
    (tmp_path / "train_img" / "notes.png").write_text("text")
    Image.fromarray(np.zeros((16, 20), np.uint16)).save(tmp_path / "train_img" / "mask16.png")
    cfg = DataConfig(kind="folder", root=tmp_path, height=16, width=16, train_samples=4, val_samples=2)
    problems = [str(p) for p in load_model("inpainting").check_data(cfg)]
    assert len(problems) == 2
    assert problems[0].startswith(f"{tmp_path / 'train_img' / 'mask16.png'}: is a single-channel I;16 image")
    assert problems[1].startswith(f"{tmp_path / 'train_img' / 'notes.png'}: not a readable image")
    # during training the photo is named too
    data = load_model("inpainting").dataset(cfg, "train")
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "train_img" / "notes.png"))):
        data.photo(str(tmp_path / "train_img" / "notes.png"))


@pytest.mark.parametrize("model,data,words", [
    ("vid2vid", {"options": {"frames": 1}}, "data.options.frames must be an integer >= 2"),
    ("fs_vid2vid", {"options": {"shots": 0}}, "data.options.shots must be an integer >= 1"),
    ("inpainting", {"options": {"hole_bins": [0.5, 0.2]}}, "hole_bins must increase strictly"),
    ("pix2pixhd", {"kind": "folder", "root": "/nonexistent-amp-data"}, "/nonexistent-amp-data: the data root does not exist"),
    ("vid2vid", {"kind": "folder", "root": "/tmp"}, "vid2vid has no data kind 'folder'"),
])
def test_synthetic_options_and_kinds_are_checked(model, data, words):
    problems = load_model(model).check_data(DataConfig(**data))
    assert len(problems) == 1 and words in str(problems[0]), problems  # reported once, not per split


@pytest.mark.parametrize("model", ["pix2pixhd", "spade", "inpainting", "vid2vid", "fs_vid2vid",
                                   "examples/user_model.py:Colorizer"])
def test_default_synthetic_data_passes(model):
    assert load_model(model).check_data(DataConfig(height=16, width=16)) == []


def test_describe_problems_caps_a_long_list():
    problems = [DataProblem(f"/d/{i}.png", "bad") for i in range(5)]
    text = describe_problems(problems, DataConfig(kind="folder", root="/d"), limit=3)
    assert text.splitlines() == ["error: the folder data under /d is not usable (5 problems):",
                                 "  /d/0.png: bad", "  /d/1.png: bad", "  /d/2.png: bad", "  ... and 2 more"]

"""Synthetic street data: format, determinism (within and across processes), scene content."""
from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from models.layers import instance_edges
from orchestrator.config import DataConfig
from orchestrator.data.street import CLASSES, FIRST_THING_ID, StreetDataset, render_street


def cfg(**kw) -> DataConfig:
    return DataConfig(**{"height": 24, "width": 40, "train_samples": 4, "val_samples": 3, **kw})


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_sample_format():
    data = StreetDataset(cfg(), "train")
    assert len(data) == 4 and len(StreetDataset(cfg(), "val")) == 3
    sample = data[0]
    assert set(sample) == {"label", "inst", "image"}
    assert sample["label"].shape == (35, 24, 40) and sample["label"].dtype == torch.float32
    assert sample["inst"].shape == (1, 24, 40) and sample["inst"].dtype == torch.float32
    assert sample["image"].shape == (3, 24, 40) and sample["image"].dtype == torch.float32
    assert torch.equal(sample["label"].sum(0), torch.ones(24, 40))  # one-hot
    assert sample["image"].min() >= -1 and sample["image"].max() <= 1
    batch = next(iter(DataLoader(data, batch_size=2)))
    assert batch["label"].shape == (2, 35, 24, 40)


def test_deterministic_per_index_and_across_instances():
    a, b = StreetDataset(cfg(), "train"), StreetDataset(cfg(), "train")
    assert_same(a[2], a[2])
    assert_same(a[2], b[2])
    assert not torch.equal(a[1]["image"], a[2]["image"])
    assert not torch.equal(a[1]["image"], StreetDataset(cfg(), "val")[1]["image"])
    assert not torch.equal(a[1]["image"], StreetDataset(cfg(seed=5), "train")[1]["image"])


def test_deterministic_across_processes():
    code = ("from orchestrator.data.street import render_street; import hashlib; "
            "l, i, r = render_street(7, 3, 20, 30, 'val'); "
            "print(hashlib.sha1(l.tobytes() + i.tobytes() + r.tobytes()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    label, inst, rgb = render_street(7, 3, 20, 30, "val")
    assert out.stdout.strip() == hashlib.sha1(label.tobytes() + inst.tobytes() + rgb.tobytes()).hexdigest()


def test_scene_content_varies_and_instances_are_separate():
    horizons = set()
    for index in range(6):
        label, inst, rgb = render_street(0, index, 64, 64)
        present = set(np.unique(label).tolist())
        assert {CLASSES["sky"], CLASSES["road"], CLASSES["sidewalk"], CLASSES["car"]} <= present
        assert present <= set(CLASSES.values())
        things = np.unique(inst[inst >= FIRST_THING_ID])
        assert len(things) >= 1 and inst.max() < 2048  # exact in fp16
        for ident in things:  # a thing instance has one class
            assert len(np.unique(label[inst == ident])) == 1
        horizons.add(int(np.argmax((label == CLASSES["sky"]).mean(1) < 0.5)))
        assert rgb.std() > 0.05  # textured, not flat colours
    assert len(horizons) > 2


def test_instance_ids_survive_fp16_edges():
    inst = StreetDataset(cfg(height=64, width=64), "train")[0]["inst"][None]
    assert torch.equal(instance_edges(inst), instance_edges(inst.half()).float())


def test_same_scene_at_every_resolution():
    small, _, _ = render_street(0, 1, 32, 32)
    large, _, _ = render_street(0, 1, 64, 64)
    assert (large[::2, ::2] == small).mean() > 0.9


def test_errors():
    with pytest.raises(ValueError, match="label_nc"):
        StreetDataset(cfg(), "train", label_nc=10)
    with pytest.raises(ValueError, match="split"):
        StreetDataset(cfg(), "test")
    with pytest.raises(IndexError):
        StreetDataset(cfg(), "train")[4]

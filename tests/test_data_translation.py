"""The data of the unsupervised translation models: unpaired two-domain street scenes (UNIT, MUNIT)
and procedural object classes with held-out classes (FUNIT, COCO-FUNIT)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from orchestrator.config import DataConfig
from orchestrator.data.objects import ObjectClass, ObjectClassDataset, Pose, render_object
from orchestrator.data.street import CLASSES, render_street
from orchestrator.data.two_domain import TwoDomainDataset, winterize

SIZE = 32
CFG = DataConfig(height=SIZE, width=SIZE, train_samples=6, val_samples=4, seed=3)


def _same_items(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("make", [TwoDomainDataset, ObjectClassDataset])
def test_items_are_deterministic_lazy_and_leave_the_global_rng_alone(make):
    a, b = make(CFG, "train"), make(CFG, "train")
    state = torch.get_rng_state()
    assert _same_items(a[2], b[2]) and _same_items(a[2], a[2])
    assert torch.equal(state, torch.get_rng_state()), "items must not draw from the global RNG"
    assert not _same_items(a[2], a[3])
    assert not _same_items(a[1], make(CFG, "val")[1])
    assert not _same_items(a[1], make(CFG.model_copy(update={"seed": 4}), "train")[1])
    assert len(a) == 6 and len(make(CFG, "val")) == 4
    with pytest.raises(IndexError):
        a[6]
    for value in a[0].values():
        if value.is_floating_point() and value.dim() >= 3:
            assert value.min() >= -1 and value.max() <= 1


# ---------------------------------------------------------------------------- two domains


def test_train_is_unpaired_and_val_is_paired_with_an_exact_ground_truth():
    train, val = TwoDomainDataset(CFG, "train"), TwoDomainDataset(CFG, "val")
    item = train[1]
    assert item["image_a"].shape == item["image_b"].shape == (3, SIZE, SIZE) and item["style_b"].shape == (3,)
    # train: B shows another scene (index N + i), never one of the A scenes
    assert train.scene_b(1) == 7 and all(train.scene_b(i) >= len(train) for i in range(len(train)))
    # val: B is the winter rendering of the very same scene, reproducible from its label map
    label, _, rgb = render_street(CFG.seed, 2, SIZE, SIZE, "val")
    expected = torch.from_numpy(winterize(rgb, label, val.style(2)).transpose(2, 0, 1)) * 2 - 1
    assert torch.equal(val[2]["image_b"], expected)
    assert torch.equal(val[2]["image_a"], torch.from_numpy(rgb.transpose(2, 0, 1)) * 2 - 1)


def test_winter_restyle_follows_the_classes_and_the_style():
    label, _, rgb = render_street(0, 0, 64, 64)
    style = np.array([1.0, 0.5, 0.5], np.float32)
    out = winterize(rgb, label, style)
    assert out.shape == rgb.shape and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
    snowy = np.isin(label, [CLASSES["terrain"], CLASSES["vegetation"], CLASSES["sidewalk"]])
    road = label == CLASSES["road"]
    assert snowy.any() and road.any()
    assert out[snowy].mean() > rgb[snowy].mean() + 0.15       # snow brightens the ground
    assert out[road].mean() < rgb[road].mean()                # the road darkens
    less_snow = winterize(rgb, label, np.array([0.0, 0.5, 0.5], np.float32))
    assert out[snowy].mean() > less_snow[snowy].mean() + 0.05  # the style is a real degree of freedom
    np.testing.assert_array_equal(out[~snowy & ~road & (label != CLASSES["sky"])],
                                  less_snow[~snowy & ~road & (label != CLASSES["sky"])])
    with pytest.raises(ValueError, match="no option"):
        TwoDomainDataset(DataConfig(options={"styles": 2}))


# ---------------------------------------------------------------------------- object classes


def test_object_items_hold_k_examples_of_one_class_and_the_exact_translation():
    data = ObjectClassDataset(CFG.model_copy(update={"options": {"shots": 3}}), "val")
    item = data[0]
    assert item["content"].shape == item["target"].shape == (3, SIZE, SIZE)
    assert item["examples"].shape == (3, 3, SIZE, SIZE)
    assert item["content_class"].dtype == item["example_class"].dtype == torch.int64
    content_class, example_class = data.classes_of(0)
    assert (int(item["content_class"]), int(item["example_class"])) == (content_class, example_class)
    # the examples are distinct images (own poses) of one class; the target is the content's pose
    assert not torch.equal(item["examples"][0], item["examples"][1])
    rng = data._rng(0)
    data._draw_classes(rng)
    pose = Pose.draw(rng)
    expected = render_object(ObjectClass.draw(CFG.seed, example_class), pose, SIZE, SIZE)
    assert torch.equal(item["target"], torch.from_numpy(expected.transpose(2, 0, 1)) * 2 - 1)
    content = render_object(ObjectClass.draw(CFG.seed, content_class), pose, SIZE, SIZE)
    assert torch.equal(item["content"], torch.from_numpy(content.transpose(2, 0, 1)) * 2 - 1)


def test_validation_targets_are_held_out_classes():
    options = {"classes": 5, "held_out": 3}
    train = ObjectClassDataset(DataConfig(train_samples=40, options=options), "train")
    val = ObjectClassDataset(DataConfig(val_samples=40, options=options), "val")
    train_classes = {c for i in range(40) for c in train.classes_of(i)}
    val_targets = {val.classes_of(i)[1] for i in range(40)}
    val_contents = {val.classes_of(i)[0] for i in range(40)}
    assert train_classes == set(range(5))
    assert val_targets == {5, 6, 7} and val_contents <= set(range(5))


def test_classes_differ_in_appearance_and_poses_in_geometry():
    pose = Pose.draw(np.random.default_rng(0))
    images = [render_object(ObjectClass.draw(0, c), pose, SIZE, SIZE) for c in range(6)]
    assert min(np.abs(a - b).mean() for i, a in enumerate(images) for b in images[i + 1:]) > 0.02
    kind = ObjectClass.draw(0, 1)
    other_pose = Pose.draw(np.random.default_rng(1))
    assert np.abs(render_object(kind, pose, SIZE, SIZE) - render_object(kind, other_pose, SIZE, SIZE)).mean() > 0.05


def test_object_options_are_validated():
    for options, match in [({"classes": 0}, "classes"), ({"shots": 1.5}, "shots"), ({"held": 2}, "no option")]:
        with pytest.raises(ValueError, match=match):
            ObjectClassDataset(DataConfig(options=options))

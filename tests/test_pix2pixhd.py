"""pix2pixHD model, shared layers and losses: shapes, gradients, checkpointing, local enhancer, VGG."""
from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn
from torch.utils.data import default_collate

from models.base import Nets
from models.layers import MultiscaleDiscriminator, instance_edges, maybe_checkpoint, norm_layer
from models.losses import VGGLoss, _vgg19_features, feature_matching_loss, gan_loss
from models.pix2pixhd import Pix2PixHD
from orchestrator.config import DataConfig
from orchestrator.data.street import StreetDataset
from orchestrator.settings import SpeedFlags
from tests import model_contract
from tests.model_contract import (assert_finite_grads, assert_same_generator_grads, check_losses_and_grads,
                                  check_registry_and_presets)

SIZE = 32


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    data = StreetDataset(DataConfig(height=SIZE, width=SIZE, train_samples=2), "train")
    return default_collate([data[0], data[1]])


build = partial(model_contract.build, Pix2PixHD)


# ---------------------------------------------------------------------------- model


def test_registry_and_presets():
    paper = check_registry_and_presets(Pix2PixHD)
    keys = {"label_nc", "ngf", "n_downsample", "n_blocks", "n_local_enhancers", "ndf", "n_layers", "num_D",
            "lambda_feat", "use_vgg", "vgg_weights"}
    assert {name: set(p) for name, p in Pix2PixHD.presets.items()} == {n: keys for n in ("tiny", "small", "paper")}
    assert (paper["ngf"], paper["n_downsample"], paper["n_blocks"], paper["n_local_enhancers"]) == (64, 4, 9, 1)
    assert (paper["ndf"], paper["n_layers"], paper["num_D"], paper["label_nc"]) == (64, 3, 2, 35)
    assert paper["use_vgg"] and paper["lambda_feat"] == 10
    assert Pix2PixHD.eps_sites == {"instance_norm": 1e-5, "adam": 1e-8}


def test_shapes_and_eps_routing(batch):
    model = Pix2PixHD()
    nets = model.build("tiny", model.resolve_eps({"instance_norm": 0.1}), SpeedFlags())
    norms = [m for net in (nets.generator, nets.discriminator) for m in net.modules()
             if isinstance(m, nn.InstanceNorm2d)]
    assert norms and all(m.eps == 0.1 for m in norms)
    assert nets.aux is None  # tiny has no VGG

    x = model.generator_input(batch)
    assert x.shape == (2, 35 + 1, SIZE, SIZE)
    fake = nets.generator(x)
    assert fake.shape == (2, 3, SIZE, SIZE) and fake.dtype == torch.float32
    assert fake.abs().max() <= 1
    outs = nets.discriminator(torch.cat([x, fake], 1))
    assert len(outs) == 2 and all(len(o) == 2 + 2 for o in outs)  # n_layers + 2 blocks per scale
    assert outs[0][-1].shape[1] == 1 and outs[1][-1].shape[-1] < outs[0][-1].shape[-1]

    with torch.no_grad():
        fake, real = model.samples(nets, batch)
    assert fake.shape == real.shape == (2, 3, SIZE, SIZE)


def test_forward_backward_gives_finite_losses_and_grads(batch):
    model, nets = build()
    check_losses_and_grads(model, nets, batch, {"d_real", "d_fake"}, {"g_gan", "g_feat"})


@pytest.mark.parametrize("mode", ["blocks", "all"])
def test_checkpointing_gives_same_generator_grads(batch, mode):
    model, plain = build(seed=1)
    _, ckpt = build(seed=1, checkpointing=mode)
    assert ckpt.generator.global_net.blocks.checkpointing
    assert not plain.generator.global_net.blocks.checkpointing
    assert_same_generator_grads(model, plain, ckpt, batch)


def test_local_enhancer_runs_global_at_half_resolution(batch):
    model, nets = build(n_local_enhancers=1)
    seen = []
    nets.generator.global_net.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[-1]))
    loss, _ = model.generator_loss(nets, batch)
    loss.backward()
    assert seen == [SIZE // 2]
    assert_finite_grads(nets.generator, "G")
    assert nets.generator.global_net.head is None  # the enhancer's head replaces the global one
    with torch.no_grad():
        fake, _ = model.samples(nets, batch)
    assert fake.shape == (2, 3, SIZE, SIZE)


def test_generator_loss_needs_build(batch):
    with pytest.raises(RuntimeError, match="build"):
        Pix2PixHD().generator_loss(Nets(generator=nn.Identity()), batch)


def test_dataset_kinds():
    model = Pix2PixHD()
    data = model.dataset(DataConfig(height=16, width=16, train_samples=3), "train")
    assert len(data) == 3 and data[0]["label"].shape == (35, 16, 16)
    assert len(model.dataset(DataConfig(height=16, width=16, val_samples=2), "val")) == 2


# ---------------------------------------------------------------------------- VGG


def save_vgg(tmp_path, seed: int = 3):
    torch.manual_seed(seed)
    features = _vgg19_features()
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # a full torchvision vgg19 file has these
    path = tmp_path / "vgg19.pth"
    torch.save(state, path)
    return path, features


def test_vgg_weights_loaded_from_path_and_recorded(tmp_path, batch):
    path, features = save_vgg(tmp_path)
    model, nets = build(use_vgg=True, vgg_weights=str(path))
    vgg = nets.aux["vgg"]
    assert vgg.weights_source == str(path)
    loaded = nn.Sequential(*[m for block in vgg.slices for m in block]).state_dict()
    for key, value in features.state_dict().items():
        assert torch.equal(loaded[key], value), key
    assert not any(p.requires_grad for p in vgg.parameters())

    loss, logs = model.generator_loss(nets, batch)
    assert "g_vgg" in logs and logs["g_vgg"] > 0
    loss.backward()
    assert_finite_grads(nets.generator, "G")
    assert all(p.grad is None for p in vgg.parameters())


def test_vgg_random_init_is_recorded_and_bad_files_are_named(tmp_path):
    assert VGGLoss().weights_source == "random-init"
    _, nets = build(use_vgg=True)
    assert nets.aux["vgg"].weights_source == "random-init"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        VGGLoss(tmp_path / "nope.pth")
    torch.save({"0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="partial.pth.*lacks"):
        VGGLoss(tmp_path / "partial.pth")


# ---------------------------------------------------------------------------- layers and losses


def test_instance_edges_mark_both_sides_of_a_boundary():
    inst = torch.zeros(1, 1, 4, 5)
    inst[..., :, 3:] = 7
    edges = instance_edges(inst)
    assert edges.dtype == inst.dtype
    assert edges[0, 0].sum(0).tolist() == [0, 0, 4, 4, 0]


def test_norm_layer_factory():
    assert isinstance(norm_layer("instance", 4, 0.5), nn.InstanceNorm2d) and norm_layer("instance", 4, 0.5).eps == 0.5
    assert isinstance(norm_layer("batch", 4), nn.BatchNorm2d)
    assert isinstance(norm_layer("none", 4), nn.Identity)
    with pytest.raises(ValueError, match="allowed"):
        norm_layer("group", 4)


def test_maybe_checkpoint_matches_plain_call():
    layer = nn.Linear(3, 3)
    x = torch.randn(2, 3)
    maybe_checkpoint(layer, x, enabled=True).sum().backward()
    ckpt_grad = layer.weight.grad.clone()
    layer.weight.grad = None
    maybe_checkpoint(layer, x, enabled=False).sum().backward()
    torch.testing.assert_close(ckpt_grad, layer.weight.grad)


def test_gan_losses():
    pred = [[torch.zeros(1, 4, 2, 2), torch.full((1, 1, 2, 2), 0.5)], [torch.zeros(1), torch.full((1, 1, 1, 1), 2.0)]]
    assert gan_loss(pred, True).item() == pytest.approx((0.25 + 1.0) / 2)
    assert gan_loss(pred, False).item() == pytest.approx((0.25 + 4.0) / 2)
    assert gan_loss(pred, True, "hinge").item() == pytest.approx((0.5 + 0.0) / 2)
    assert gan_loss(pred, False, "hinge").item() == pytest.approx((1.5 + 3.0) / 2)
    assert gan_loss(pred, True, "hinge", for_discriminator=False).item() == pytest.approx(-1.25)
    with pytest.raises(ValueError, match="allowed"):
        gan_loss(pred, True, "wgan")


def test_feature_matching_excludes_predictions_and_detaches_real():
    fake = [[torch.ones(1, 2, 2, 2, requires_grad=True), torch.zeros(1, 1, 2, 2)]]
    real = [[torch.zeros(1, 2, 2, 2, requires_grad=True), torch.full((1, 1, 2, 2), 100.0)]]
    loss = feature_matching_loss(fake, real, weight=10.0)
    assert loss.item() == pytest.approx(10.0)
    loss.backward()
    assert real[0][0].grad is None and fake[0][0].grad is not None


def test_multiscale_discriminator_returns_features_per_scale():
    disc = MultiscaleDiscriminator(4, num_d=3, ndf=4, n_layers=1)
    outs = disc(torch.randn(1, 4, 32, 32))
    assert len(outs) == 3 and all(len(o) == 3 for o in outs)
    assert [o[0].shape[-1] for o in outs] == [17, 9, 5]

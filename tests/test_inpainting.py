"""Partial-convolution inpainting: the model contract, the partial convolution itself, the U-Net,
shapes and gradients, checkpointing, the photo/mask data, and the two fp16 hazards (mask-ratio eps
and the Gram matrix's 1/(c*h*w) factor)."""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import default_collate

from models.inpainting import (FP16_TINY, Inpainting, PartialConv2d, PConvUNet, gram_matrix, hole_tv_loss,
                               mask_ratio)
from orchestrator.config import DataConfig, load_config
from orchestrator.data.photos import (HOLE_BINS, TRAIN_PHOTOS, VAL_PHOTOS, PhotoInpaintingDataset, hole_ratio,
                                      irregular_mask)
from orchestrator.settings import Setting, SpeedFlags
from tests import model_contract
from tests.model_contract import one_thread  # noqa: F401  (autouse fixture)
from tests.model_contract import (assert_same_generator_grads, check_registry_and_presets, check_resume, contract_tests,
                                  make_trainer)

SIZE = 32
# contract runs at 16x16 (tiny has 4 stride-2 layers, so sizes must be multiples of 16)
DATA = DataConfig(height=16, width=16, train_samples=8, val_samples=4)
FIX = {"pconv_mask": 1e-6}  # the seeds' fp16 fix
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    data = Inpainting().dataset(DataConfig(height=SIZE, width=SIZE, train_samples=6), "train")
    return default_collate([data[2], data[5]])  # hole bins 20-30 % and 50-60 %


build = partial(model_contract.build, Inpainting)


# ---------------------------------------------------------------------------- (1) contract


# fp16 with the fp32 code's mask eps (1e-8) diverges by design (see the hazard tests below): the
# levels that compute in fp16 train with the fix
(test_trains_under_each_level, test_checkpoint_round_trip_resumes_exactly,
 test_study_yaml_loads) = contract_tests("inpainting", DATA, fp16_eps=FIX)


def test_checkpoint_round_trip_resumes_exactly_in_fp16_o2(tmp_path):
    # batch-norm running stats, fp32 master weights and the loss scaler must all round-trip
    check_resume("inpainting", DATA, tmp_path, Setting(opt_level="O2", dtype="fp16", batch_size=2, eps=FIX))


def test_trainer_skips_the_discriminator_step():
    trainer = make_trainer("inpainting", DATA, Setting(opt_level="O0", batch_size=2))
    assert trainer.nets.discriminator is None
    assert list(trainer.nets.named()) == ["generator"]
    assert list(trainer.optimizers) == ["generator"]
    assert trainer.policy.loss_names == ("generator",)
    record = trainer.run(2)
    assert record.status == "ok" and record.steps == 2
    for logs in record.losses:
        assert "loss_generator" in logs and math.isfinite(logs["loss_generator"])
        assert not any("discriminator" in key for key in logs)
    with pytest.raises(NotImplementedError):
        trainer.model.discriminator_loss(trainer.nets, trainer._next_batch())


# ---------------------------------------------------------------------------- model


def test_registry_presets_and_eps_sites():
    paper = check_registry_and_presets(Inpainting)
    assert (paper["ngf"], paper["max_channels"], paper["n_layers"], paper["norm"]) == (64, 512, 8, "batch")
    assert (paper["lambda_valid"], paper["lambda_hole"], paper["lambda_perceptual"], paper["lambda_style"],
            paper["lambda_tv"]) == (1.0, 6.0, 0.05, 120.0, 0.1)
    assert paper["use_vgg"] and paper["gram_split"] and paper["lr"] == 2e-4
    assert Inpainting.eps_sites == {"adam": 1e-8, "pconv_mask": 1e-8, "gram_divisor": 2.0**14}


def test_no_discriminator_and_paper_adam():
    model, nets = build()
    assert nets.discriminator is None and set(nets.named()) == {"generator"}
    assert model.param_groups(nets) == {"generator": {"lr": 2e-4, "betas": (0.9, 0.999)}}
    assert model.feature_source == "random-init"


def test_eps_site_reaches_every_partial_conv():
    _, nets = build(eps={"pconv_mask": 1e-6})
    convs = [m for m in nets.generator.modules() if isinstance(m, PartialConv2d)]
    assert len(convs) == 2 * 4 and all(c.eps == 1e-6 for c in convs)


def test_paper_architecture():
    model = Inpainting(use_vgg=False)
    nets = model.build("paper", model.resolve_eps(None), SpeedFlags())
    g = nets.generator
    enc = [b.layer for b in g.encoder]
    dec = [b.layer for b in g.decoder]
    assert [layer.conv.kernel_size[0] for layer in enc] == [7, 5, 5, 3, 3, 3, 3, 3]
    assert [layer.conv.stride[0] for layer in enc] == [2] * 8
    assert [layer.conv.out_channels for layer in enc] == [64, 128, 256, 512, 512, 512, 512, 512]
    assert isinstance(enc[0].norm, nn.Identity) and all(isinstance(layer.norm, nn.BatchNorm2d) for layer in enc[1:])
    assert all(isinstance(layer.act, nn.ReLU) for layer in enc)
    # PConv9..16: upsampled features + skip features in, the skip's width out; the last one 64+3 -> 3
    assert [(layer.conv.in_channels, layer.conv.out_channels) for layer in dec] == [
        (1024, 512), (1024, 512), (1024, 512), (1024, 512), (768, 256), (384, 128), (192, 64), (67, 3)]
    assert all(layer.conv.kernel_size[0] == 3 and layer.conv.stride[0] == 1 for layer in dec)
    assert all(isinstance(layer.norm, nn.BatchNorm2d) and isinstance(layer.act, nn.LeakyReLU) for layer in dec[:-1])
    assert isinstance(dec[-1].norm, nn.Identity) and isinstance(dec[-1].act, nn.Identity)
    assert dec[-1].conv.bias is not None and enc[1].conv.bias is None  # bias only where no norm
    n_params = sum(p.numel() for p in g.parameters())
    assert 32e6 < n_params < 34e6, n_params  # the paper's PConv U-Net: ~32.9M


def test_unet_rejects_sizes_it_cannot_halve():
    _, nets = build()
    with pytest.raises(ValueError, match="divisible"):
        nets.generator(torch.zeros(1, 3, 24, 24), torch.ones(1, 1, 24, 24))


# ---------------------------------------------------------------------------- partial convolution


def reference_pconv(conv: nn.Conv2d, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's definition, spelled out in float64 with a full (C_in-channel) mask: for each
    window, W^T (X .* M) * sum(1)/sum(M) + b where sum(M) > 0, else 0; new mask 1 where sum(M) > 0."""
    x, mask = x.double(), mask.double().expand_as(x)
    weight = conv.weight.double()
    ones = torch.ones_like(weight)
    raw = F.conv2d(x * mask, weight, None, conv.stride, conv.padding)
    count = F.conv2d(mask, ones, None, conv.stride, conv.padding)  # same in every output channel
    window = float(ones[0].numel())
    valid = (count > 0).double()
    bias = conv.bias.double().view(1, -1, 1, 1) if conv.bias is not None else 0.0
    out = torch.where(count > 0, raw * window / count.clamp_min(1e-300) + bias, torch.zeros_like(raw))
    return out, valid[:, :1]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_mask", [1, 4])
def test_partial_conv_matches_the_definition(bias, channels_mask):
    torch.manual_seed(0)
    conv = PartialConv2d(4, 6, 3, stride=2, bias=bias, eps=1e-8)
    if bias:
        nn.init.uniform_(conv.bias, -1, 1)
    x = torch.randn(2, 4, 12, 12)
    mask = (torch.rand(2, channels_mask, 12, 12) > 0.6).float()
    mask[:, :, :6, :6] = 0  # whole windows without a valid pixel
    out, new_mask = conv(x, mask)
    expected, expected_mask = reference_pconv(conv, x, mask)
    assert new_mask.shape == (2, 1, 6, 6) and torch.equal(new_mask, expected_mask.float())
    assert (new_mask == 0).any() and (new_mask == 1).any()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert (out[new_mask.expand_as(out) == 0] == 0).all()


def test_partial_conv_on_a_full_mask_is_a_plain_conv_inside():
    torch.manual_seed(0)
    conv = PartialConv2d(3, 5, 5, stride=1)
    x = torch.randn(1, 3, 10, 10)
    out, new_mask = conv(x, torch.ones(1, 1, 10, 10))
    plain = F.conv2d(x, conv.weight, conv.bias, 1, 2)
    assert torch.equal(new_mask, torch.ones(1, 1, 10, 10))
    torch.testing.assert_close(out[..., 2:-2, 2:-2], plain[..., 2:-2, 2:-2])  # borders are re-normalised


def test_holes_never_leak_into_the_output(batch):
    # the generator must not see hole pixels: changing them changes nothing
    model, nets = build()
    nets.generator.eval()
    other = dict(batch, image=torch.where(batch["mask"] > 0, batch["image"], torch.rand_like(batch["image"])))
    with torch.no_grad():
        assert torch.equal(model.complete(nets, batch)[0], model.complete(nets, other)[0])


# ---------------------------------------------------------------------------- (2) shapes and gradients


def test_shapes_and_finite_gradients(batch):
    model, nets = build()
    out = nets.generator(batch["image"] * batch["mask"], batch["mask"])
    assert out.shape == (2, 3, SIZE, SIZE) and out.dtype == torch.float32
    loss, logs = model.generator_loss(nets, batch)
    assert torch.isfinite(loss)
    assert set(logs) == {"g_valid", "g_hole", "g_tv", "g_perceptual", "g_style"}
    assert all(math.isfinite(v) and v >= 0 for v in logs.values())
    hp = Inpainting.presets["tiny"]
    expected = (hp["lambda_valid"] * logs["g_valid"] + hp["lambda_hole"] * logs["g_hole"]
                + hp["lambda_tv"] * logs["g_tv"] + hp["lambda_perceptual"] * logs["g_perceptual"]
                + hp["lambda_style"] * logs["g_style"])
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    loss.backward()
    for name, param in nets.generator.named_parameters():
        assert param.grad is not None, f"generator.{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"generator.{name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"generator.{name} has an all-zero gradient"
    assert all(not p.requires_grad for p in nets.aux.parameters())
    with torch.no_grad():
        nets.generator.eval()
        comp, real = model.samples(nets, batch)
    assert comp.shape == real.shape == (2, 3, SIZE, SIZE)
    assert torch.equal(comp * batch["mask"], real * batch["mask"])  # known pixels are kept exactly


def test_hole_tv_counts_only_the_dilated_holes():
    img = torch.zeros(1, 3, 8, 8)
    img[..., 0, 0] = 1.0  # an edge far from the hole
    mask = torch.ones(1, 1, 8, 8)
    mask[..., 5, 5] = 0  # dilation: rows/cols 4..6
    assert hole_tv_loss(img, mask) == 0
    img[..., 5, 5] = 1.0  # 4 neighbour pairs inside the dilation, per channel
    assert float(hole_tv_loss(img, mask)) == pytest.approx(3 * 4 / img.numel())


# ---------------------------------------------------------------------------- (3) checkpointing


@pytest.mark.parametrize("mode", ["blocks", "all"])
def test_checkpointing_gives_same_generator_grads(batch, mode):
    model, plain = build(seed=1)
    _, ckpt = build(seed=1, checkpointing=mode)
    assert ckpt.generator.checkpoint_blocks and not plain.generator.checkpoint_blocks
    assert_same_generator_grads(model, plain, ckpt, batch, atol=1e-7)
    # the recomputation must not update batch-norm running statistics a second time
    for (name, a), (_, b) in zip(plain.generator.named_buffers(), ckpt.generator.named_buffers()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------- (4) data


def test_data_is_deterministic_and_index_dependent():
    cfg = DataConfig(height=SIZE, width=48, train_samples=12, val_samples=6, seed=3)
    a, b = PhotoInpaintingDataset(cfg, "train"), PhotoInpaintingDataset(cfg, "train")
    first = a[4]
    assert set(first) == {"image", "mask", "bin"}
    assert first["image"].shape == (3, SIZE, 48) and first["image"].dtype == torch.float32
    assert first["mask"].shape == (1, SIZE, 48) and first["mask"].dtype == torch.float32
    assert first["bin"].dtype == torch.int64 and first["bin"].shape == ()
    assert -1 <= first["image"].min() and first["image"].max() <= 1
    assert set(torch.unique(first["mask"]).tolist()) == {0.0, 1.0}
    for key in first:
        assert torch.equal(first[key], a[4][key]) and torch.equal(first[key], b[4][key])
    assert not torch.equal(a[4]["image"], a[5]["image"])
    assert not torch.equal(a[4]["mask"], a[10]["mask"])  # same bin, different mask
    other_seed = PhotoInpaintingDataset(cfg.model_copy(update={"seed": 4}), "train")
    assert not torch.equal(a[4]["image"], other_seed[4]["image"])
    val = PhotoInpaintingDataset(cfg, "val")
    assert len(a) == 12 and len(val) == 6
    assert not torch.equal(a[0]["image"], val[0]["image"])
    assert not set(val.sources) & set(a.sources)  # held-out photos
    assert set(a.sources) == set(TRAIN_PHOTOS) and set(val.sources) == set(VAL_PHOTOS)
    with pytest.raises(IndexError):
        a[12]


def test_every_mask_falls_in_its_bin():
    cfg = DataConfig(height=SIZE, width=SIZE, train_samples=24)
    data = PhotoInpaintingDataset(cfg, "train")
    bins = list(zip(HOLE_BINS, HOLE_BINS[1:]))
    assert data.bins == tuple(bins)
    for i in range(len(data)):
        item = data[i]
        low, high = bins[int(item["bin"])]
        assert int(item["bin"]) == i % len(bins)
        assert low < float(hole_ratio(item["mask"])) <= high, (i, float(hole_ratio(item["mask"])))


@pytest.mark.parametrize("low,high", [(0.0, 0.1), (0.5, 0.6), (0.3, 0.31), (0.9, 1.0)])
def test_irregular_mask_retries_until_in_bin(low, high):
    for index in range(4):
        rng = np.random.default_rng([7, index])
        mask = irregular_mask(rng, 40, 40, low, high)
        ratio = 1 - mask.mean()
        assert low < ratio <= high


def test_data_options_are_validated():
    def make(**options):
        return PhotoInpaintingDataset(DataConfig(height=16, width=16, options=options), "train")

    assert make(hole_bins=[0.0, 0.5, 1.0]).bins == ((0.0, 0.5), (0.5, 1.0))
    assert make(train_photos=["coffee"]).sources == ["coffee"]
    for bad, match in [(dict(hole_binz=[0, 1]), "no option"), (dict(hole_bins=[0.5, 0.2]), "increase"),
                       (dict(train_photos=["lena"]), "unknown photo"), (dict(min_crop=0), "min_crop"),
                       (dict(hole_bins=[0.0, 0.001]), "too narrow")]:
        with pytest.raises(ValueError, match=match):
            make(**bad)


def test_folder_photos(tmp_path):
    from PIL import Image

    for split in ("train_img", "test_img"):
        (tmp_path / split).mkdir()
        for k in range(2):
            rgb = np.random.default_rng(k).integers(0, 256, (40, 50, 3), dtype=np.uint8)
            Image.fromarray(rgb).save(tmp_path / split / f"p{k}.png")
    cfg = DataConfig(kind="folder", root=tmp_path, height=16, width=16, train_samples=4, val_samples=2)
    train = Inpainting().dataset(cfg, "train")
    assert len(train) == 4 and train[1]["image"].shape == (3, 16, 16)
    assert all("train_img" in s for s in train.sources)
    with pytest.raises(ValueError, match="test_img: the val split needs this folder"):
        Inpainting().dataset(cfg.model_copy(update={"root": tmp_path / "train_img"}), "val")


# ---------------------------------------------------------------------------- (5) fp16 hazards


def fully_masked_case() -> tuple[torch.Tensor, torch.Tensor]:
    """A mask whose left half is a hole wider than a 3x3 window, and matching features."""
    torch.manual_seed(0)
    mask = torch.ones(2, 1, 8, 8)
    mask[..., :, :4] = 0
    return torch.randn(2, 4, 8, 8), mask


def test_fp16_mask_ratio_eps_1e8_is_nan_1e6_is_finite():
    """(a) The mask-ratio eps: 1e-8 rounds to 0 in fp16, so window/(sum(M)+eps) is inf on windows
    without a valid pixel and the zeroing multiply makes it NaN; 1e-6 survives (as an fp16
    subnormal), the ratio stays finite, and on valid windows it matches fp32."""
    assert torch.tensor(1e-8, dtype=torch.float16) == 0
    assert torch.tensor(1e-6, dtype=torch.float16) > 0
    conv = PartialConv2d(4, 4, 3)
    _, mask = fully_masked_case()
    count32 = conv.mask_sum(mask)
    count16 = conv.mask_sum(mask.half())
    assert count16.dtype == torch.float16 and (count16 == 0).any()  # fully masked windows exist
    window = conv.window(mask)
    ref = mask_ratio(count32, window, 1e-8)
    assert torch.isfinite(ref).all()

    hazard = mask_ratio(count16, window, 1e-8)
    empty = count16 == 0
    assert torch.isnan(hazard[empty]).all()  # inf * 0
    assert torch.isinf(torch.reciprocal((count16 + 1e-8).float())[empty]).all()

    fixed = mask_ratio(count16, window, 1e-6)
    assert torch.isfinite(fixed).all()
    assert (fixed[empty] == 0).all()
    torch.testing.assert_close(fixed[~empty], ref[~empty], rtol=1e-3, atol=0)


@pytest.mark.parametrize("where", ["half", "autocast"])
def test_fp16_partial_conv_output_nan_with_1e8_matches_fp32_with_1e6(where):
    """(a) through the layer: pure fp16 (O2/O3 weights) and fp32 weights under fp16 autocast (O1)."""
    x, mask = fully_masked_case()
    torch.manual_seed(1)
    outputs = {}
    for eps in (1e-8, 1e-6):
        conv = PartialConv2d(4, 6, 3, eps=eps)
        torch.manual_seed(2)
        nn.init.normal_(conv.weight, std=0.3)
        nn.init.normal_(conv.bias, std=0.3)
        ref, ref_mask = conv(x, mask)  # fp32
        if where == "half":
            out, new_mask = conv.half()(x.half(), mask.half())
        else:
            with torch.autocast("cpu", dtype=torch.float16):
                out, new_mask = conv(x, mask)
        assert out.dtype == torch.float16
        assert torch.equal(new_mask.float(), ref_mask)
        outputs[eps] = (out.float(), ref)
    hazard, _ = outputs[1e-8]
    assert torch.isnan(hazard).any()  # the fully masked windows
    fixed, ref = outputs[1e-6]
    assert torch.isfinite(fixed).all()
    torch.testing.assert_close(fixed, ref, rtol=2e-2, atol=2e-2)


def test_fp16_mask_eps_decides_whether_o1_training_diverges():
    """(a) end to end: O1-fp16 with 1e-8 diverges on masks with big holes, 1e-6 trains; bf16 keeps
    1e-8 and trains."""
    data = DataConfig(height=SIZE, width=SIZE, train_samples=4, val_samples=2,
                      options={"hole_bins": [0.4, 0.6]})  # big holes: windows without a valid pixel
    hazard = make_trainer("inpainting", data, Setting(opt_level="O1", dtype="fp16", batch_size=2)).run(3)
    assert hazard.status == "diverged", hazard
    for dtype, eps in (("fp16", FIX), ("bf16", None)):
        record = make_trainer("inpainting", data, Setting(opt_level="O1", dtype=dtype, batch_size=2,
                                                          eps=eps or {})).run(2)
        assert record.status == "ok", (dtype, record.reason)


def big_features() -> tuple[torch.Tensor, torch.Tensor]:
    """c=512, h=w=64 (the paper's relu4_1 at 512x512): 1/(c h w) = 2**-21, below fp16's normal
    range, and F F^T up to ~4096 * 10**2 / 3, past fp16's 65504."""
    torch.manual_seed(0)
    feats = torch.rand(1, 512, 64, 64) * 10
    flat = feats.reshape(1, 512, -1).double()
    reference = (flat @ flat.transpose(1, 2) / flat[0].numel()).float()
    return feats, reference


def test_fp16_gram_one_step_overflows_two_steps_match_fp32():
    """(b) the Gram factor: a one-step division in fp16 (and its factor) leave fp16's range; two
    steps match fp32."""
    feats, reference = big_features()
    size = 512 * 64 * 64
    assert torch.tensor(1.0 / size, dtype=torch.float16) < FP16_TINY  # an fp16 subnormal...
    other = 500 * 64 * 64  # ...with a few bits at most: off by >1 % for a size that is no power of 2
    assert abs(float(torch.tensor(1.0 / other, dtype=torch.float16)) * other - 1) > 0.01
    half = feats.half()

    fp32 = gram_matrix(feats, split=True)
    torch.testing.assert_close(fp32, reference, rtol=1e-4, atol=0)
    torch.testing.assert_close(gram_matrix(feats, split=False), reference, rtol=1e-4, atol=0)

    one_step = gram_matrix(half, split=False)
    assert one_step.dtype == torch.float16
    assert torch.isinf(one_step).all()  # F F^T overflowed before the division
    one_step_div = gram_matrix(half, split=True, divisor=1e12)  # the eps site can switch it off too
    assert torch.isinf(one_step_div).all()

    two_step = gram_matrix(half, split=True)
    assert two_step.dtype == torch.float16 and torch.isfinite(two_step).all()
    torch.testing.assert_close(two_step.float(), reference, rtol=2e-3, atol=0)
    with torch.autocast("cpu", dtype=torch.float16):  # O1: fp32 features, half matmuls
        assert torch.isinf(gram_matrix(feats, split=False)).all()
        torch.testing.assert_close(gram_matrix(feats, split=True).float(), reference, rtol=2e-3, atol=0)


def test_gram_divisor_eps_site_reaches_the_style_loss(batch, monkeypatch):
    import models.inpainting as inpainting

    seen = []
    real = inpainting.gram_matrix
    monkeypatch.setattr(inpainting, "gram_matrix",
                        lambda f, split, divisor: seen.append((split, divisor)) or real(f, split, divisor))
    model, nets = build(eps={"gram_divisor": 123.0})
    model.generator_loss(nets, batch)
    assert seen and set(seen) == {(True, 123.0)}


# ---------------------------------------------------------------------------- study YAML


def test_search_space_loads():
    config = load_config(ROOT / "search_spaces" / "inpainting.yaml")
    assert config.model.name == "inpainting"
    assert 1e-6 in config.search.eps["pconv_mask"] and 1e-8 in config.search.eps["pconv_mask"]
    assert 2.0**14 in config.search.eps["gram_divisor"]
    assert config.quality.metric == "ssim"


def test_trainer_samples_are_composites():
    trainer = make_trainer("inpainting", DATA, Setting(opt_level="O0", batch_size=2))
    trainer.run(1)
    fake, real = next(trainer.generate(batches=1, batch_size=2))
    val = Inpainting().dataset(DATA, "val")
    mask = default_collate([val[0], val[1]])["mask"]
    assert torch.equal(fake * mask, real.clamp(-1, 1) * mask)


def test_unet_blocks_are_checkpointable_without_grad():
    # checkpointing is skipped under no_grad (eval) and the output is the same
    torch.manual_seed(0)
    plain = PConvUNet(8, 32, 4)
    torch.manual_seed(0)
    ckpt = PConvUNet(8, 32, 4, checkpointing="blocks")
    plain.eval(), ckpt.eval()
    x, m = torch.randn(1, 3, 16, 16), torch.ones(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(plain(x, m), ckpt(x, m))

"""vid2vid: the model contract, networks, losses, synthetic videos with exact flow, and the fp16
warp hazard (grid coordinates in half precision lose sub-pixel flow; the warp is kept in fp32)."""
from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import default_collate

from models.base import Nets
from models.vid2vid import (CompositeGenerator, Vid2Vid, Vid2VidDiscriminator, required_frames, warp,
                            warp_in_input_dtype)
from models import fusion
from orchestrator.config import DataConfig
from orchestrator.data.street import CLASSES
from orchestrator.data.videos import VideoDataset, VideoScene, clip_to_batch, make_video
from orchestrator.settings import SpeedFlags
from tests import model_contract
from tests.model_contract import one_thread  # noqa: F401  (autouse fixture)
from tests.model_contract import (assert_same_generator_grads, check_losses_and_grads, check_registry_and_presets,
                                  contract_tests, generator_grads)

SIZE = 32
FRAMES = 4
DATA = DataConfig(height=SIZE, width=SIZE, train_samples=8, val_samples=4, options={"frames": FRAMES})
# the trainer-level contract runs at 16x16: fp16 on this CPU is ~10x slower than fp32
CONTRACT_DATA = DATA.model_copy(update={"height": 16, "width": 16})


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    data = VideoDataset(DATA, "train")
    return default_collate([data[0], data[1]])


build = partial(model_contract.build, Vid2Vid)


# ---------------------------------------------------------------------------- the contract


(test_trains_under_each_level, test_checkpoint_round_trip_resumes_exactly,
 test_study_yaml_loads) = contract_tests("vid2vid", CONTRACT_DATA)


# ---------------------------------------------------------------------------- model


def test_registry_presets_and_eps_sites():
    paper = check_registry_and_presets(Vid2Vid)
    assert (paper["ngf"], paper["n_downsample"], paper["n_blocks"], paper["n_frames_G"]) == (128, 3, 9, 3)
    assert (paper["ndf"], paper["n_layers"], paper["num_D"], paper["n_frames_D"], paper["n_scales_temporal"]) == (64, 3, 2, 3, 2)
    assert paper["use_vgg"] and paper["lambda_T"] == paper["lambda_F"] == paper["lambda_feat"] == 10
    assert Vid2Vid.eps_sites == {"adam": 1e-8, "instance_norm": 1e-5}


def test_shapes_eps_routing_and_samples(batch):
    model = Vid2Vid()
    nets = model.build("tiny", model.resolve_eps({"instance_norm": 0.1}), SpeedFlags())
    norms = [m for net in (nets.generator, nets.discriminator) for m in net.modules() if isinstance(m, nn.InstanceNorm2d)]
    assert norms and all(m.eps == 0.1 for m in norms)
    assert isinstance(nets.generator, CompositeGenerator) and isinstance(nets.discriminator, Vid2VidDiscriminator)

    assert batch["labels"].shape == (2, FRAMES, 35, SIZE, SIZE) and batch["labels"].dtype == torch.float32
    assert batch["frames"].shape == (2, FRAMES, 3, SIZE, SIZE)
    assert batch["flow"].shape == (2, FRAMES - 1, 2, SIZE, SIZE)
    with torch.no_grad():
        seq = model.generate_sequence(nets, batch["labels"])
        assert seq["frames"].shape == seq["raw"].shape == (2, FRAMES, 3, SIZE, SIZE)
        assert seq["flow"].shape == (2, FRAMES, 2, SIZE, SIZE) and seq["mask"].shape == (2, FRAMES, 1, SIZE, SIZE)
        assert seq["frames"].abs().max() <= 1 and 0 <= seq["mask"].min() and seq["mask"].max() <= 1
        assert torch.equal(seq["frames"][:, 0], seq["raw"][:, 0])  # the first frame is hallucinated only
        assert not torch.equal(seq["frames"][:, 1], seq["raw"][:, 1])  # later ones blend in the warp
        fake, real = model.samples(nets, batch)
    assert fake.shape == real.shape == (2 * FRAMES, 3, SIZE, SIZE)


def test_forward_backward_gives_finite_losses_and_grads(batch):
    model, nets = build()
    # every D parameter: the image D and every temporal scale
    check_losses_and_grads(model, nets, batch, {"d_real", "d_fake", "d_t_real", "d_t_fake"},
                           {"g_gan", "g_feat", "g_t_gan", "g_t_feat", "g_flow", "g_flow_warp", "g_warp", "g_mask"})


@pytest.mark.parametrize("mode", ["blocks", "all"])
def test_checkpointing_gives_same_generator_grads(batch, mode):
    model, plain = build(seed=1)
    _, ckpt = build(seed=1, checkpointing=mode)
    stacks = [ckpt.generator.label_encoder[1], ckpt.generator.image_blocks, ckpt.generator.flow_blocks]
    assert all(s.checkpointing for s in stacks) and not plain.generator.flow_blocks.checkpointing
    assert ckpt.generator.image_up.checkpoint == (mode == "all")
    assert_same_generator_grads(model, plain, ckpt, batch)


def test_fusion_flag_fuses_the_blend_and_losses_without_changing_them(batch):
    model, plain = build(seed=2)
    fused_model, fused_nets = build(seed=2, fusion="jit")
    assert fused_model.fusion == "jit" and fused_nets.generator.fusion == "jit"
    expected, got = generator_grads(model, plain, batch), generator_grads(fused_model, fused_nets, batch)
    for name in expected:  # same maths, reassociated (biases before instance norm: zero up to noise)
        scale = float(expected[name].abs().max())
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-4 * scale + 1e-5, msg=name)
    assert "vid2vid.blend/jit" not in fusion.fallbacks()


def test_temporal_windows_follow_vid2vid_frame_rate_scales():
    model, _ = build(n_frames_D=3, n_scales_temporal=2)
    assert required_frames(3, 2) == 7 and model.required_frames() == 7
    windows = dict(model._windows(10))
    assert windows[1] == [[7, 8, 9], [4, 5, 6], [1, 2, 3]]  # consecutive triplets, every 3 frames
    assert windows[3] == [[3, 6, 9], [0, 3, 6]]  # every 3rd frame
    model, _ = build()  # tiny: pairs at steps 1 and 2
    assert model.required_frames() == 3 and dict(model._windows(4)) == {1: [[2, 3], [0, 1]], 2: [[1, 3]]}


def test_short_clips_are_rejected_with_the_needed_length(batch):
    model, nets = build()
    short = {k: v[:, :2] if k != "flow" else v[:, :1] for k, v in batch.items()}
    with pytest.raises(ValueError, match=">= 3"):
        model.generator_loss(nets, short)
    with pytest.raises(ValueError, match="data.options.frames"):
        model.dataset(DataConfig(height=16, width=16, options={"frames": 2}), "train")
    paper = Vid2Vid()
    paper.hparams = dict(Vid2Vid.presets["paper"])  # default clip length follows the temporal Ds
    assert paper.dataset(DataConfig(height=16, width=16, train_samples=1), "train").frames == 7
    assert Vid2Vid().dataset(DataConfig(height=16, width=16), "val").frames == 4
    with pytest.raises(ValueError, match="allowed: synthetic"):
        Vid2Vid().dataset(DataConfig(kind="folder", root="/tmp"), "train")


def test_composed_flow_matches_the_exact_two_frame_motion():
    """The coarser frame-rate scale's flow, composed from the unit flows, equals the exact
    frame t -> t-2 correspondence (traced through the scene twice) except at object edges."""
    height, width = 32, 48
    scene = VideoScene(0, 1)
    clip = scene.render(4, height, width)
    composed = Vid2Vid._flow_back(torch.from_numpy(clip.flow)[None], 3, 2)[0].numpy()
    aspect = width / height
    y, x = np.meshgrid((np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width, indexing="ij")
    owner = scene.owner(3, x, y, aspect)
    x1, y1 = scene.source_points(3, x, y, owner, aspect)
    owner1 = scene.owner(2, x1, y1, aspect)
    x2, y2 = scene.source_points(2, x1, y1, owner1, aspect)
    exact = np.stack([(x2 - x) * width, (y2 - y) * height])
    assert np.abs(exact).max() > 1  # there is motion to compose
    seen = clip.visible[2] & (owner1 == owner)
    err = np.abs(composed - exact).max(0)[seen]
    assert seen.mean() > 0.8 and (err < 1e-3).mean() > 0.85


def test_losses_need_build(batch):
    with pytest.raises(RuntimeError, match="build"):
        Vid2Vid().generator_loss(Nets(generator=nn.Identity()), batch)


# ---------------------------------------------------------------------------- data


def test_data_is_deterministic_per_index():
    a, b = VideoDataset(DATA, "train"), VideoDataset(DATA, "train")
    first, again, other = a[3], b[3], a[4]
    assert set(first) == {"labels", "frames", "flow"}
    for key in first:
        assert torch.equal(first[key], again[key]), key
        assert torch.equal(first[key], a[3][key]), key
    assert not torch.equal(first["frames"], other["frames"])
    val = VideoDataset(DATA, "val")[3]
    assert not torch.equal(first["frames"], val["frames"])
    seeded = VideoDataset(DATA.model_copy(update={"seed": 1}), "train")[3]
    assert not torch.equal(first["frames"], seeded["frames"])
    state = np.random.get_state()
    VideoDataset(DATA, "train")[0]
    assert np.array_equal(state[1], np.random.get_state()[1]), "the data must not touch the global RNG"


def test_batch_layout_and_value_ranges(batch):
    labels = batch["labels"]
    assert torch.equal(labels.sum(2), torch.ones_like(labels[:, :, 0]))  # one-hot per pixel
    assert batch["frames"].min() >= -1 and batch["frames"].max() <= 1
    clip = make_video(0, 0, 3, 24, 40)
    assert clip.label.shape == (3, 24, 40) and clip.image.shape == (3, 24, 40, 3)
    assert clip.flow.shape == (2, 2, 24, 40) and clip.visible.shape == (2, 24, 40)
    assert clip_to_batch(clip)["labels"].shape == (3, 35, 24, 40)
    assert CLASSES["road"] in clip.label and clip.label.max() < 35  # Cityscapes ids


def test_flow_is_exact():
    """Rendering frame t-1 at ``pixel + flow`` (continuous points) gives frame t's colours exactly
    wherever the point is visible; the flow is not zero; ``start`` renders the same video later."""
    height, width = 40, 56
    scene = VideoScene(5, 2)
    clip = scene.render(4, height, width)
    aspect = width / height
    y, x = np.meshgrid((np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width, indexing="ij")
    moving = 0
    for t in range(1, 4):
        sx = x + clip.flow[t - 1, 0] / width
        sy = y + clip.flow[t - 1, 1] / height
        _, label_prev, _, rgb_prev = scene.render_points(t - 1, sx, sy, aspect)
        vis = clip.visible[t - 1]
        assert vis.mean() > 0.7
        np.testing.assert_allclose(rgb_prev[vis], clip.image[t][vis], atol=1e-5)
        assert np.array_equal(label_prev[vis], clip.label[t][vis])
        moving += int((np.abs(clip.flow[t - 1]).sum(0) > 0.5).sum())
    assert moving > 0
    later = make_video(5, 2, 2, height, width, start=2)
    np.testing.assert_array_equal(later.image, clip.image[2:])
    np.testing.assert_array_equal(later.flow[0], clip.flow[2])


def test_same_video_at_every_resolution():
    small, large = make_video(0, 1, 2, 16, 16), make_video(0, 1, 2, 64, 64)
    # 4x4 blocks of the large frame average to the small frame (up to edges); flow scales with size
    pooled = large.image.reshape(2, 16, 4, 16, 4, 3).mean((2, 4))
    assert np.abs(pooled - small.image).mean() < 0.05
    pooled_flow = large.flow.reshape(1, 2, 16, 4, 16, 4).mean((3, 5)) / 4
    assert np.abs(pooled_flow - small.flow).mean() < 0.03


# ---------------------------------------------------------------------------- fp16 hazard


def _ramp(width: int, height: int = 2) -> torch.Tensor:
    """An fp32 image whose value is the column index: sampling it returns the sampled x position."""
    return torch.arange(width, dtype=torch.float32).view(1, 1, 1, width).expand(1, 1, height, width).contiguous()


def test_fp16_warp_rounds_subpixel_flow_away_and_the_fp32_warp_keeps_it():
    """Sampling coordinates are normalised to [-1, 1]; in fp16 their spacing near +-1 is 2**-11,
    half a pixel at 2048 px, so a 0.3 px flow lands anywhere between ~0.1 and ~0.75 px. ``warp``
    (the model's) casts to fp32 first and realises the flow exactly. Removing that cast fails this."""
    width = 2048
    image = _ramp(width)
    flow = torch.zeros(1, 2, 2, width)
    flow[:, 0] = 0.3
    flow = flow.half()  # the flow itself is exact enough in fp16 (0.2998)
    interior = (..., slice(0, width - 1))  # the last column clamps at the border
    shift_half = (warp_in_input_dtype(image, flow) - image)[interior]
    shift_fixed = (warp(image, flow) - image)[interior]
    expected = float(flow[0, 0, 0, 0])
    # the hazard: the realised shift is garbled by up to ~half a pixel, on average by > 0.1 px
    assert (shift_half - expected).abs().max() > 0.4
    assert (shift_half - expected).abs().mean() > 0.1
    # the fix: fp32 coordinates realise the sub-pixel shift everywhere
    torch.testing.assert_close(shift_fixed, torch.full_like(shift_fixed, expected), atol=2e-3, rtol=0)


def test_fp16_warp_of_half_images_matches_fp64_only_through_the_fp32_path():
    """The whole warp on half tensors (what O2/O3 hand the model): compared with exact arithmetic on
    the same half inputs, the half warp is garbage-level wrong on a wide image, the fp32-kept warp is
    right to fp16 output rounding and returns half."""
    torch.manual_seed(0)
    width = 2048
    image = (torch.rand(1, 3, 2, width) * 2 - 1).half()
    flow = torch.zeros(1, 2, 2, width)
    flow[:, 0] = 0.3
    flow[:, 1] = -0.2
    flow = flow.half()
    reference = warp_in_input_dtype(image.double(), flow.double())
    unprotected = warp_in_input_dtype(image, flow).double()
    protected = warp(image, flow)
    assert protected.dtype == torch.float16
    assert (unprotected - reference).abs().mean() > 0.05
    assert (unprotected - reference).abs().max() > 0.5
    torch.testing.assert_close(protected.double(), reference, atol=2e-3, rtol=0)
    # under CPU autocast too (the trainer's O1/O2 context), the warp stays exact
    with torch.autocast("cpu", dtype=torch.float16):
        autocast_out = warp(image, flow)
    torch.testing.assert_close(autocast_out.double(), reference, atol=2e-3, rtol=0)


def test_bf16_hazard_appears_at_small_widths_too():
    """bf16 keeps 8 mantissa bits: at 256 px its grid spacing near +-1 is already half a pixel."""
    width = 256
    image = _ramp(width)
    flow = torch.zeros(1, 2, 2, width)
    flow[:, 0] = 0.3
    flow = flow.bfloat16()
    expected = float(flow[0, 0, 0, 0])
    shift_half = (warp_in_input_dtype(image, flow) - image)[..., :-1]
    shift_fixed = (warp(image, flow) - image)[..., :-1]
    assert (shift_half - expected).abs().max() > 0.4
    torch.testing.assert_close(shift_fixed, torch.full_like(shift_fixed, expected), atol=2e-3, rtol=0)

"""World-consistent vid2vid: the model contract, the synthetic 3D worlds, guidance images checked
against an independent reference renderer, and the fp16 geometry hazards (each run with its fix
disabled inside the test, where it must fail, and with the fix, where it must not)."""
from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import default_collate

from models.base import Nets, load_model
from models.vid2vid import warp
from models.wc_vid2vid import (NEAR, MultiSPADE, WCVid2Vid, WorldConsistentGenerator, geometric_flow, render_guidance,
                               reproject, rigid_inverse, splat_correspondence, valid_mean_l1)
from orchestrator.config import DataConfig
from orchestrator.data.street import CLASSES
from orchestrator.data.world import WorldDataset, WorldScene, clip_to_batch, make_world_clip
from orchestrator.settings import Setting, SpeedFlags
from orchestrator.trainer import Trainer
from tests import model_contract
from tests.model_contract import one_thread  # noqa: F401  (autouse fixture)
from tests.model_contract import (assert_same_generator_grads, check_losses_and_grads, check_registry_and_presets,
                                  check_search_space, contract_tests, generator_grads)

SIZE = 32
FRAMES = 3
DATA = DataConfig(height=SIZE, width=SIZE, train_samples=8, val_samples=4, options={"frames": FRAMES})
# the trainer-level contract runs at 16x16: fp16 on this CPU is ~10x slower than fp32
CONTRACT_DATA = DATA.model_copy(update={"height": 16, "width": 16})
TOLERANCE = WCVid2Vid.presets["tiny"]["depth_tolerance"]


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    data = WorldDataset(DATA, "train")
    return default_collate([data[0], data[1]])


build = partial(model_contract.build, WCVid2Vid)


def geometry_of(batch: dict[str, torch.Tensor], frames: list[int]):
    """(depth, intrinsics, extrinsics) of the listed frames of a one-clip batch, each (1, ...)."""
    return [(batch["depth"][None, t, 0], batch["intrinsics"][None, t], batch["extrinsics"][None, t]) for t in frames]


# ---------------------------------------------------------------------------- the contract


(test_trains_under_each_level, test_checkpoint_round_trip_resumes_exactly,
 test_study_yaml_loads) = contract_tests("wc_vid2vid", CONTRACT_DATA)


def test_study_yaml_starts_at_the_default_with_enough_frames():
    config = check_search_space("wc_vid2vid")
    assert config.search.eps["instance_norm"][0] == WCVid2Vid.eps_sites["instance_norm"]  # the seed's default
    assert config.data.options["frames"] >= load_model("wc_vid2vid").presets["tiny"]["n_frames_D"]


def test_registry_presets_and_eps_sites():
    paper = check_registry_and_presets(WCVid2Vid)
    assert (paper["ngf"], paper["n_downsample"], paper["n_multi_spade"], paper["spade_hidden"]) == (32, 5, 3, 128)
    assert (paper["flow_ngf"], paper["flow_downsample"], paper["flow_blocks"], paper["flow_multiplier"]) == (32, 5, 6, 40)
    assert (paper["ndf"], paper["n_layers_D"], paper["num_D"], paper["n_frames_D"]) == (64, 3, 2, 3)
    assert paper["lambda_guidance"] == 20 and paper["lambda_flow"] == paper["lambda_feat"] == paper["lambda_vgg"] == 10
    assert WCVid2Vid.eps_sites == {"adam": 1e-8, "instance_norm": 1e-5, "spectral_norm": 1e-12}
    assert {"depth", "intrinsics", "extrinsics"} <= set(WCVid2Vid.fp32_batch_keys)


def test_shapes_eps_routing_and_samples(batch):
    model = WCVid2Vid()
    nets = model.build("tiny", model.resolve_eps({"instance_norm": 0.1, "spectral_norm": 1e-6}), SpeedFlags())
    norms = [m for net in (nets.generator, nets.discriminator) for m in net.modules() if isinstance(m, nn.InstanceNorm2d)]
    assert norms and all(m.eps == 0.1 for m in norms)
    assert all(m.sn_eps == 1e-6 for m in nets.generator.modules() if hasattr(m, "sn_eps"))
    assert isinstance(nets.generator, WorldConsistentGenerator)

    assert batch["labels"].shape == (2, FRAMES, 35, SIZE, SIZE) and batch["frames"].shape == (2, FRAMES, 3, SIZE, SIZE)
    assert batch["depth"].shape == (2, FRAMES, 1, SIZE, SIZE)
    assert batch["intrinsics"].shape == (2, FRAMES, 3, 3) and batch["extrinsics"].shape == (2, FRAMES, 4, 4)
    with torch.no_grad():
        seq = model.generate_sequence(nets, batch)
        assert seq["frames"].shape == (2, FRAMES, 3, SIZE, SIZE) and seq["frames"].abs().max() <= 1
        assert seq["flow"].shape == (2, FRAMES - 1, 2, SIZE, SIZE)
        assert seq["occlusion"].shape == (2, FRAMES - 1, 1, SIZE, SIZE)
        assert seq["guidance"].shape == (2, FRAMES - 1, 4, SIZE, SIZE)
        mask = seq["guidance"][:, :, 3]
        assert set(mask.unique().tolist()) == {0.0, 1.0} and mask.mean() > 0.3  # earlier frames guide a good part
        fake, real = model.samples(nets, batch)
    assert fake.shape == real.shape == (2 * FRAMES, 3, SIZE, SIZE)


def test_forward_backward_gives_finite_losses_and_grads(batch):
    model, nets = build()
    # every parameter of the image D and the temporal one; of G every part: embeddings, flow net, all modulations
    g_logs = check_losses_and_grads(model, nets, batch, {"d_real", "d_fake", "d_t_real", "d_t_fake"},
                                    {"g_gan", "g_feat", "g_t_gan", "g_t_feat", "g_flow", "g_flow_warp", "g_occlusion",
                                     "g_guidance"})
    assert g_logs["g_guidance"] > 0



def test_perceptual_loss_is_wired_for_the_paper_setting(batch):
    model, nets = build(use_vgg=True)
    assert isinstance(nets.aux["vgg"], nn.Module)
    loss, logs = model.generator_loss(nets, batch)
    assert torch.isfinite(loss) and logs["g_vgg"] > 0
    with pytest.raises(RuntimeError, match="vgg"):
        model.generator_loss(Nets(nets.generator, nets.discriminator, None), batch)

def test_guidance_and_warp_modulate_the_frame_and_first_frames_need_neither(batch):
    _, nets = build()
    gen = nets.generator.eval()
    labels, frames = batch["labels"], batch["frames"]
    guidance = torch.cat([frames[:, 0], torch.ones_like(frames[:, 0, :1])], 1)
    with torch.no_grad():
        first, flow, occlusion, warped = gen(labels[:, 0])
        assert flow is None and occlusion is None and warped is None
        guided = gen(labels[:, 1], labels[:, 0], frames[:, 0], guidance)[0]
        other = gen(labels[:, 1], labels[:, 0], frames[:, 0], guidance * torch.tensor([-1, -1, -1, 1]).view(1, 4, 1, 1))[0]
        unguided = gen(labels[:, 1], labels[:, 0], frames[:, 0], None)[0]
        warp_only = gen(labels[:, 1], labels[:, 0], -frames[:, 0], None)[0]
    assert not torch.allclose(guided, other) and not torch.allclose(guided, unguided)
    assert not torch.allclose(unguided, warp_only)
    norm = MultiSPADE(4, [(3, 0), (2, 8)], eps=1e-5)
    x = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(norm(x, None, None), norm.norm(x))  # missing conditions are skipped
    with pytest.raises(ValueError, match="conditioning inputs"):
        norm(x, None)


@pytest.mark.parametrize("mode", ["blocks", "all"])
def test_checkpointing_gives_same_generator_grads(batch, mode):
    model, plain = build(seed=1)
    _, ckpt = build(seed=1, checkpointing=mode)
    assert ckpt.generator.checkpoint_blocks and not plain.generator.checkpoint_blocks
    assert ckpt.generator.label_embedding.checkpoint_stages == (mode == "all")
    assert_same_generator_grads(model, plain, ckpt, batch, rtol=1e-4)


def test_fusion_flag_fuses_the_losses_without_changing_them(batch):
    model, plain = build(seed=2)
    fused_model, fused_nets = build(seed=2, fusion="jit")
    assert fused_model.fusion == "jit"
    expected, got = generator_grads(model, plain, batch), generator_grads(fused_model, fused_nets, batch)
    for name in expected:
        scale = float(expected[name].abs().max())
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-4 * scale + 1e-6, msg=name)


def test_short_clips_bad_sizes_and_missing_build_are_rejected(batch):
    model, nets = build()
    short = {k: v[:, :1] for k, v in batch.items()}
    with pytest.raises(ValueError, match=">= 2"):
        model.generator_loss(nets, short)
    with pytest.raises(ValueError, match="data.options.frames"):
        build(n_frames_D=3)[0].dataset(DataConfig(height=16, width=16, options={"frames": 2}), "train")
    with pytest.raises(ValueError, match="allowed: synthetic"):
        WCVid2Vid().dataset(DataConfig(kind="folder", root="/tmp"), "train")
    with pytest.raises(ValueError, match="not divisible"):
        nets.generator(torch.zeros(1, 35, 18, 18))
    with pytest.raises(RuntimeError, match="build"):
        WCVid2Vid().generator_loss(Nets(generator=nn.Identity()), batch)


# ---------------------------------------------------------------------------- the worlds


def test_data_is_deterministic_per_index_and_leaves_the_global_rng_alone():
    a, b = WorldDataset(DATA, "train"), WorldDataset(DATA, "train")
    first, again, other = a[3], b[3], a[4]
    assert set(first) == {"labels", "frames", "depth", "intrinsics", "extrinsics"}
    for key in first:
        assert first[key].dtype == torch.float32, key
        assert torch.equal(first[key], again[key]), key
    assert not torch.equal(first["frames"], other["frames"])
    assert not torch.equal(first["frames"], WorldDataset(DATA, "val")[3]["frames"])
    assert not torch.equal(first["frames"], WorldDataset(DATA.model_copy(update={"seed": 1}), "train")[3]["frames"])
    state = np.random.get_state()
    WorldDataset(DATA, "train")[0]
    assert np.array_equal(state[1], np.random.get_state()[1]), "the data must not touch the global RNG"
    with pytest.raises(ValueError, match="frames"):
        WorldDataset(DATA.model_copy(update={"options": {"frames": 1}}), "train")
    with pytest.raises(ValueError, match="no option"):
        WorldDataset(DATA.model_copy(update={"options": {"shots": 2}}), "train")


def test_labels_depth_and_cameras_are_consistent(batch):
    labels, depth = batch["labels"], batch["depth"]
    assert torch.equal(labels.sum(2), torch.ones_like(labels[:, :, 0]))  # one-hot per pixel
    sky = labels[:, :, CLASSES["sky"]] > 0
    assert torch.equal(sky, depth[:, :, 0] == 0) and sky.any() and (~sky).any()  # depth 0 exactly on the sky
    present = labels.sum((0, 1, 3, 4)).nonzero().flatten().tolist()
    assert {CLASSES[c] for c in ("road", "sidewalk", "building", "car", "sky")} <= set(present)
    rot = batch["extrinsics"][..., :3, :3]
    torch.testing.assert_close(rot @ rot.transpose(-1, -2), torch.eye(3).expand_as(rot), atol=1e-6, rtol=0)
    assert (batch["extrinsics"][..., :3, 3].norm(dim=-1) > 50).all()  # cameras far from the world origin
    clip = make_world_clip(0, 0, 2, 24, 40)
    assert clip.intrinsics[0, 0, 0] == pytest.approx(40 / (2 * math.tan(math.radians(40))))
    assert clip.intrinsics[0, 0, 2] == 20 and clip.intrinsics[0, 1, 2] == 12


def test_depth_and_cameras_are_exact():
    """Unproject every pixel centre with its depth and the clip's cameras (float64, independent of
    the renderer's own ray set-up), re-cast a ray to that world point from another frame's camera:
    where nothing is in front of it, the analytic world has the very same colour and class there.
    Ground points lie on the ground plane."""
    height, width = 24, 32
    scene = WorldScene(3, 1)
    clip = scene.render(3, height, width)
    rows, cols = np.nonzero(clip.depth[2] > 0)
    d = clip.depth[2][rows, cols].astype(np.float64)
    cam = (np.linalg.inv(clip.intrinsics[2]) @ np.stack([cols + 0.5, rows + 0.5, np.ones_like(d)])) * d
    world = (np.linalg.inv(clip.extrinsics[2]) @ np.vstack([cam, np.ones_like(d)]))[:3].T
    ground = np.isin(clip.label[2][rows, cols], [CLASSES["road"], CLASSES["sidewalk"], CLASSES["terrain"]])
    assert ground.any() and np.abs(world[ground, 1]).max() < 1e-3  # float32 depth: sub-millimetre
    origin = np.linalg.inv(clip.extrinsics[0])[:3, 3]
    s, prim, face = scene.cast(origin, world - origin)
    seen = np.abs(s - 1) < 1e-4
    label, rgb = scene.shade(origin + s[:, None] * (world - origin), prim, face, world - origin)
    assert seen.mean() > 0.6
    np.testing.assert_allclose(rgb[seen], clip.image[2][rows, cols][seen], atol=2e-3)
    assert (label[seen] == clip.label[2][rows, cols][seen]).mean() > 0.99


def test_same_world_at_every_resolution():
    small, large = make_world_clip(0, 1, 2, 16, 16), make_world_clip(0, 1, 2, 64, 64)
    pooled = large.image.reshape(2, 16, 4, 16, 4, 3).mean((2, 4))
    assert np.abs(pooled - small.image).mean() < 0.05
    np.testing.assert_array_equal(large.extrinsics, small.extrinsics)
    later = make_world_clip(0, 1, 2, 16, 16, start=1)
    np.testing.assert_array_equal(later.image[0], small.image[1])


def test_geometric_flow_warps_the_previous_real_frame_onto_the_current_one():
    data = WorldDataset(DataConfig(height=64, width=64, train_samples=4, val_samples=1), "train", frames=3)
    b = default_collate([data[i] for i in range(4)])
    flow, visible = geometric_flow(b["depth"], b["intrinsics"], b["extrinsics"], TOLERANCE)
    real = b["frames"]
    assert flow.dtype == torch.float32 and visible.float().mean() > 0.9 and flow.abs().max() > 5

    def error(prev: torch.Tensor) -> float:
        vis = visible.flatten(0, 1).float()
        return float(((prev - real[:, 1:].flatten(0, 1)).abs() * vis).sum() / (3 * vis.sum()))

    warped = error(warp(real[:, :-1].flatten(0, 1), flow.flatten(0, 1)))
    assert warped < 0.5 * error(real[:, :-1].flatten(0, 1))  # the flow explains most of the change


def test_depth_test_rejects_surfaces_hidden_in_the_current_view():
    """Same camera twice: a wall at 10 m seen before; now an unseen box at 5 m covers the right
    half. The wall's colours must not show through the box; the sky never gets guidance."""
    k = torch.tensor([[[8.0, 0, 4], [0, 8.0, 4], [0, 0, 1]]])
    ext = torch.eye(4)[None]
    before = torch.full((1, 8, 8), 10.0)
    now = before.clone()
    now[:, :, 4:] = 5.0
    now[:, 0] = 0.0  # sky
    _, valid = splat_correspondence(before, k, ext, now, k, ext, TOLERANCE)
    valid = valid.view(8, 8)
    assert valid[1:, :4].all() and not valid[:, 4:].any() and not valid[0].any()


def _encoded_sources(frames: int, height: int, width: int) -> list[np.ndarray]:
    """Source 'images' whose channels are (column, row, frame): guidance then names its source."""
    cols, rows = np.meshgrid(np.arange(width), np.arange(height), indexing="xy")
    return [np.stack([cols, rows, np.full_like(cols, k)], -1).astype(np.float64) for k in range(frames)]


def reference_guidance(sources: list[np.ndarray], depth: np.ndarray, intrinsics: np.ndarray,
                       extrinsics: np.ndarray, tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """An independent rendering of frame ``len(sources)``'s guidance: float64 numpy, points through
    world coordinates with general matrix inverses, one explicit per-point z-buffer loop per earlier
    frame (first point wins a tie), and explicit per-pixel loops for the depth slack and test.
    Earlier frames are visited oldest first; a pixel keeps the first colour it gets."""
    t = len(sources)
    height, width = depth.shape[1:]
    cur = depth[t].astype(np.float64)
    slack = np.zeros((height, width))
    for r in range(height):
        for c in range(width):
            step_x = min(abs(cur[r, c] - cur[r, cc]) for cc in (c - 1, c + 1) if 0 <= cc < width)
            step_y = min(abs(cur[r, c] - cur[rr, c]) for rr in (r - 1, r + 1) if 0 <= rr < height)
            slack[r, c] = step_x + step_y
    out = np.zeros((height, width, sources[0].shape[-1]))
    mask = np.zeros((height, width), bool)
    for k in range(t):
        rows, cols = np.nonzero(depth[k] > 0)
        d = depth[k][rows, cols].astype(np.float64)
        cam = (np.linalg.inv(intrinsics[k]) @ np.stack([cols + 0.5, rows + 0.5, np.ones_like(d)])) * d
        world = np.linalg.inv(extrinsics[k]) @ np.vstack([cam, np.ones_like(d)])
        seen = (extrinsics[t] @ world)[:3]
        pix = intrinsics[t] @ seen
        zbuf = np.full((height, width), np.inf)
        src = np.full((height, width, 2), -1)
        for i in range(len(d)):
            z = seen[2, i]
            if z <= NEAR:
                continue
            u, v = pix[0, i] / pix[2, i], pix[1, i] / pix[2, i]
            if not (0 <= u < width and 0 <= v < height):
                continue
            c, r = math.floor(u), math.floor(v)
            if z < zbuf[r, c]:
                zbuf[r, c], src[r, c] = z, (rows[i], cols[i])
        for r in range(height):
            for c in range(width):
                if mask[r, c] or src[r, c, 0] < 0 or cur[r, c] <= 0:
                    continue
                if abs(zbuf[r, c] - cur[r, c]) <= tolerance * cur[r, c] + slack[r, c]:
                    out[r, c], mask[r, c] = sources[k][src[r, c, 0], src[r, c, 1]], True
    return out, mask


def _found_within_one_pixel(colour: np.ndarray, mask: np.ndarray, other: np.ndarray, other_mask: np.ndarray) -> np.ndarray:
    """For each pixel of ``mask`` (in row-major order): does ``other`` hold, at this pixel or a
    neighbour, a colour naming the same source frame and a source pixel at most one pixel away?"""
    height, width = mask.shape
    found = np.zeros_like(mask)
    for r, c in zip(*np.nonzero(mask)):
        for rr in range(max(r - 1, 0), min(r + 2, height)):
            for cc in range(max(c - 1, 0), min(c + 2, width)):
                if other_mask[rr, cc] and other[rr, cc, 2] == colour[r, c, 2] \
                        and np.abs(other[rr, cc, :2] - colour[r, c, :2]).max() <= 1:
                    found[r, c] = True
    return found[mask]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_guidance_matches_an_independent_reference_rendering_within_one_pixel(index):
    """The model's vectorised torch splatting (relative poses, scatter z-buffer) against the
    per-point reference: every guided pixel of either is found in the other within one pixel, with
    the same source frame and a source pixel at most one pixel away; almost all agree exactly."""
    frames, height, width = 4, 48, 64
    clip = make_world_clip(0, index, frames, height, width)
    batch = clip_to_batch(clip)
    sources = _encoded_sources(frames - 1, height, width)
    ref, ref_mask = reference_guidance(sources, clip.depth, clip.intrinsics, clip.extrinsics, TOLERANCE)

    dst = geometry_of(batch, [frames - 1])[0]
    correspondences = [splat_correspondence(*src, *dst, TOLERANCE) for src in geometry_of(batch, range(frames - 1))]
    images = [torch.from_numpy(s).float().permute(2, 0, 1)[None] for s in sources]
    guidance = render_guidance(images, correspondences)[0]
    got, got_mask = guidance[:3].permute(1, 2, 0).double().numpy(), guidance[3].numpy() > 0

    assert ref_mask.mean() > 0.5 and len(np.unique(ref[ref_mask][:, 2])) > 1  # several earlier frames guide
    assert _found_within_one_pixel(got, got_mask, ref, ref_mask).all()
    assert _found_within_one_pixel(ref, ref_mask, got, got_mask).all()
    exact = got_mask & ref_mask & (got == ref).all(-1)
    assert exact.sum() >= 0.99 * ref_mask.sum()
    # the comparison can fail: guidance shifted by two pixels is not found within one
    shifted = np.roll(got, 2, axis=1)
    assert not _found_within_one_pixel(shifted, np.roll(got_mask, 2, axis=1), ref, ref_mask).all()


def test_guidance_from_real_frames_reproduces_the_real_frame():
    """The geometry end to end: guidance painted with the *real* earlier frames matches the real
    current frame where it exists, far better than the previous frame unwarped does."""
    data = WorldDataset(DataConfig(height=64, width=64, train_samples=4, val_samples=1), "train", frames=4)
    b = default_collate([data[i] for i in range(4)])
    model, _ = build()
    geometry = model.geometry(b)
    real = b["frames"]
    for t in (1, 3):
        guidance = render_guidance([real[:, k] for k in range(t)], geometry["correspondences"][t])
        mask = guidance[:, 3:]
        surface = (b["depth"][:, t] > 0).float()
        assert (mask * surface).sum() > 0.6 * surface.sum()
        assert valid_mean_l1(guidance[:, :3], real[:, t], mask) < 0.5 * valid_mean_l1(real[:, t - 1], real[:, t], mask)


# ---------------------------------------------------------------------------- fp16 hazards


@pytest.fixture(scope="module")
def wide_pair() -> dict[str, torch.Tensor]:
    """Two frames of a world at 1024 px width (16 rows: the hazard is in the x coordinates)."""
    return clip_to_batch(make_world_clip(0, 2, 2, 16, 1024))


def _mismatch(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> float:
    return float(((a[0] != b[0]) | (a[1] != b[1])).float().mean())


def test_fp16_pixel_coordinates_at_1024px_lose_subpixel_precision(wide_pair):
    """Between 512 and 1024, fp16 represents only multiples of 0.5 (bf16: of 4): about a quarter
    of the points splat into the wrong pixel in fp16, three quarters in bf16; fp32 is exact but for
    points within ~1e-4 px of a pixel edge."""
    (d0, k0, e0), (_, k1, e1) = geometry_of(wide_pair, [0, 1])
    pose = (e1 @ rigid_inverse(e0)).double()
    u, _, z, point = reproject(d0.double(), k0.double(), k1.double(), pose, keep_fp32=False)
    u = u[point & (z > 0) & (u >= 512) & (u < 1024)]
    assert u.numel() > 1000

    def wrong(dtype: torch.dtype) -> float:
        return float((u.to(dtype).double().floor() != u.floor()).float().mean())

    assert wrong(torch.float16) > 0.15 and wrong(torch.bfloat16) > 0.5 and wrong(torch.float32) < 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_geometry_misplaces_splats_unless_kept_fp32(wide_pair, dtype):
    """O1: the batch stays fp32 but autocast runs the pose products and point transforms in half;
    the reprojected points are off by pixels (the relative pose of two cameras ~250 m from the
    origin alone loses ~0.1 m). The model's path turns autocast off and matches fp64."""
    (d0, k0, e0), (d1, k1, e1) = geometry_of(wide_pair, [0, 1])
    exact = splat_correspondence(*(x.double() for x in (d0, k0, e0, d1, k1, e1)), TOLERANCE, keep_fp32=False)
    with torch.autocast("cpu", dtype=dtype):
        unprotected = splat_correspondence(d0, k0, e0, d1, k1, e1, TOLERANCE, keep_fp32=False)
        protected = splat_correspondence(d0, k0, e0, d1, k1, e1, TOLERANCE)
    assert exact[1].float().mean() > 0.5
    assert _mismatch(unprotected, exact) > 0.3
    assert _mismatch(protected, exact) < 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_geometry_inputs_cannot_be_repaired_inside_the_model(wide_pair, dtype):
    """O2/O3 cast floating batch entries to half. Depth and cameras cast to half lose what no
    later fp32 cast restores (camera translations ~250 m become multiples of 0.125-1 m): the splats
    are wrong even when the model computes in fp32. Hence ``fp32_batch_keys``."""
    (d0, k0, e0), (d1, k1, e1) = geometry_of(wide_pair, [0, 1])
    exact = splat_correspondence(d0, k0, e0, d1, k1, e1, TOLERANCE)
    rounded = [x.to(dtype) for x in (d0, k0, e0, d1, k1, e1)]
    assert _mismatch(splat_correspondence(*rounded, TOLERANCE), exact) > 0.3


@pytest.mark.parametrize("opt_level", ["O2", "O3"])
def test_trainer_keeps_geometry_fp32_and_without_the_declaration_it_goes_wrong(monkeypatch, opt_level):
    """The fix for the hazard above, end to end: under O2/O3 the trainer hands the model depth and
    cameras bit-exact in fp32 (frames in half), so its guidance correspondences equal the fp32
    ones. With ``fp32_batch_keys`` emptied, the same trainer hands them over in fp16 and the
    correspondences go wrong."""
    data = DataConfig(height=32, width=64, train_samples=2, val_samples=1, options={"frames": 3})
    raw = default_collate([WorldDataset(data, "train")[i] for i in range(2)])
    model = WCVid2Vid()
    model.build("tiny", model.resolve_eps(None), SpeedFlags())
    expected = model.geometry(raw)["correspondences"][2]

    def correspondences() -> tuple[dict[str, torch.Tensor], list]:
        trainer = Trainer(WCVid2Vid(), Setting(opt_level=opt_level, dtype="fp16", batch_size=2, eps={"adam": 1e-4}),
                          preset="tiny", data=data, seed=0, device="cpu")
        batch = trainer._to_device(raw)
        return batch, trainer.model.geometry(batch)["correspondences"][2]

    batch, kept = correspondences()
    assert batch["frames"].dtype == torch.float16
    for key in ("depth", "intrinsics", "extrinsics"):
        assert batch[key].dtype == torch.float32 and torch.equal(batch[key], raw[key]), key
    assert all(_mismatch(a, b) == 0 for a, b in zip(kept, expected))

    monkeypatch.setattr(WCVid2Vid, "fp32_batch_keys", ())
    batch, lost = correspondences()
    assert batch["extrinsics"].dtype == torch.float16
    assert max(_mismatch(a, b) for a, b in zip(lost, expected)) > 0.05


def test_guidance_loss_valid_pixel_count_overflows_fp16_at_1024x512():
    """The guidance loss averages over guided pixels. At 1024x512 the count (x3 channels: 1.5M)
    and the error sum exceed fp16's 65504: summed in half the loss is inf/inf = NaN; the model's
    ``valid_mean_l1`` sums in fp32 and is exact. (bf16 sums do not overflow but round the count.)"""
    fake = torch.full((1, 3, 512, 1024), 0.5, dtype=torch.float16)
    guidance = torch.zeros_like(fake)
    mask = torch.ones(1, 1, 512, 1024, dtype=torch.float16)
    unprotected = valid_mean_l1(fake, guidance, mask, keep_fp32=False)
    assert not torch.isfinite(unprotected)
    protected = valid_mean_l1(fake, guidance, mask)
    assert protected.dtype == torch.float32 and float(protected) == pytest.approx(0.5, abs=1e-6)
    with torch.autocast("cpu", dtype=torch.float16):  # the trainer's context changes nothing
        assert float(valid_mean_l1(fake, guidance, mask)) == pytest.approx(0.5, abs=1e-6)


def test_model_geometry_is_identical_under_autocast(batch):
    """The model's own geometry (flow, visibility, correspondences) does not change at all when
    the losses run under fp16 or bf16 autocast (O1)."""
    model, _ = build()
    plain = model.geometry(batch)
    for dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cpu", dtype=dtype):
            cast = model.geometry(batch)
        assert torch.equal(cast["flow"], plain["flow"]) and torch.equal(cast["visible"], plain["visible"])
        for t, pairs in plain["correspondences"].items():
            assert all(_mismatch(a, b) == 0 for a, b in zip(cast["correspondences"][t], pairs))

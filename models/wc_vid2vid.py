"""World-consistent vid2vid (Mallya et al., ECCV 2020): vid2vid guided by a 3D world it paints.

Every generated frame colours the 3D points it sees; the next frame is conditioned, besides its
labels and the flow-warped previous frame, on a **guidance image**: those colours projected into
its own view, with a mask of where a colour exists. Surfaces keep the colour the earliest frame gave
them, so a street corner looks the same when the camera comes back to it.

Parts (the names below are in this file):

* **Geometry** (fp32, no parameters): the data set (``orchestrator.data.world``) gives per-frame
  depth, intrinsics and world->camera extrinsics. ``splat_correspondence`` unprojects every pixel of
  an earlier frame to 3D, moves it into the current camera, splats it to the pixel it lands in with a
  z-buffer (nearest point wins) and keeps it where a **depth test** against the current depth map
  passes (so surfaces hidden in the current view, or points behind a never-seen foreground, give
  no guidance). ``render_guidance`` gathers the earlier generated frames' colours through those
  correspondences, the oldest frame that saw a surface winning: guidance = 3 colour channels and 1
  mask channel. ``geometric_flow`` gives the exact backward flow between consecutive frames and its
  visibility the same way (sky pixels move as points at infinity). This replaces the published
  model's structure-from-motion point cloud and FlowNet2 reference flow.
* **WorldConsistentGenerator**: a SPADE decoder from the label map at the bottleneck up to full
  resolution, built of ``MultiSPADEResBlock``s whose normalisation is **multi-SPADE**: one parameter-
  free instance norm, then one SPADE modulation per conditioning input in turn, ``x * (1 + gamma) +
  beta``. Every level is modulated by the label embedding; the ``n_multi_spade`` highest-resolution
  levels also by the embedding of (warped previous frame, occlusion mask) and by the raw guidance
  (only with flow, as in the published config). Embeddings come from encoder-decoders
  (``fs_vid2vid.LabelEmbedder``; modulated through a single conv, the published ``num_filters: 0``);
  the guidance through a hidden conv of ``spade_hidden`` channels. Flow and occlusion mask come from
  ``fs_vid2vid.FlowGenerator`` on (label, previous label, previous generated frame); the previous
  frame is warped with ``vid2vid.warp`` (kept in fp32). Decoder convs are spectral-normalised
  (``spade.SNConv2d``, power iteration once per clip, at its first frame).
* **Discriminators**: vid2vid's image (multi-scale PatchGAN on label + frame) and temporal
  (``n_frames_D`` frames stacked with the flows between them, one per frame-rate scale) networks
  (``vid2vid.Vid2VidDiscriminator``), fed the geometric flow; hinge loss (the published config's).
* **Losses**: GAN and feature matching for both discriminators (temporal ones weighted by
  ``lambda_temporal``), L1 of the predicted flow to the geometric flow and of the real previous
  frame warped by it to the real frame (``lambda_flow``) on visible pixels, L1 of the occlusion
  mask to the geometric occlusion, the **guidance loss** (L1 between a generated frame and its
  guidance over the guided pixels, ``lambda_guidance``; the published weight 20) and optional VGG.

Differences from the published model, on purpose: known geometry instead of SfM; the generator
always starts from the label map at the bottleneck (no image encoder for later frames, no
single-image model for the first frame: frame 0 is generated from its labels alone, later frames
add the warp and guidance modulations); one previous frame for the flow network (``n_frames_G`` 2);
the temporal discriminator is kept on (the published Cityscapes config sets its weight to 0).
Gradients do not flow through earlier generated frames (each is detached before reuse).

fp16 numerics (``tests/test_wc_vid2vid.py`` shows each): geometry is computed in fp32 with autocast
off whatever the opt level, and the trainer keeps ``depth``, ``intrinsics`` and ``extrinsics`` fp32
(``fp32_batch_keys``). In half precision a pixel coordinate near 1024 is a multiple of 0.5 (fp16) or
4 (bf16), so splats land a pixel off; camera translations hundreds of metres from the world origin
are multiples of 0.25 m in fp16, which moves near points by many pixels; the guidance loss's count
of valid pixels overflows fp16 past 65504 (a 1024x512 frame has 524288), zeroing the loss.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from models.base import CITYSCAPES_LABEL_NC, TRAINER_FLAGS, Batch, Logs, Nets
from models.fs_vid2vid import FlowGenerator, LabelEmbedder
from models.layers import maybe_checkpoint
from models.losses import VGGLoss, feature_matching_loss, gan_loss
from models.spade import SNConv2d, begin_pass, init_weights
from models.vid2vid import Vid2Vid, Vid2VidDiscriminator, masked_l1, warp
from orchestrator.settings import SpeedFlags

MAX_FILTERS = 1024  # the published max_num_filters
NEAR = 1e-3  # camera-space z below which a reprojected point counts as behind the camera
GUIDANCE_CHANNELS = 4  # rgb + mask
G_LR, D_LR, BETAS = 1e-4, 4e-4, (0.0, 0.999)  # the published TTUR


# --------------------------------------------------------------------------- geometry


@contextlib.contextmanager
def _precision(keep_fp32: bool, device_type: str) -> Iterator[None]:
    """Autocast off when ``keep_fp32`` (the model's path); the ambient autocast otherwise."""
    if keep_fp32:
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    else:
        yield


def _cast(keep_fp32: bool, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.float() if keep_fp32 else t for t in tensors]


def rigid_inverse(extrinsics: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid (..., 4, 4) transforms ``[R t; 0 1]``: ``[R^T, -R^T t; 0 1]`` (exact, and
    defined in any dtype, unlike a general matrix inverse)."""
    rot_t = extrinsics[..., :3, :3].transpose(-1, -2)
    out = torch.zeros_like(extrinsics)
    out[..., :3, :3] = rot_t
    out[..., :3, 3:] = -rot_t @ extrinsics[..., :3, 3:]
    out[..., 3, 3] = 1
    return out


def _pixel_centres(height: int, width: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(u (W,), v (H,)) pixel-centre coordinates ``col + 0.5``, ``row + 0.5`` in ``like``'s dtype."""
    u = torch.arange(width, device=like.device, dtype=like.dtype) + 0.5
    v = torch.arange(height, device=like.device, dtype=like.dtype) + 0.5
    return u, v


def reproject(depth: torch.Tensor, k_src: torch.Tensor, k_dst: torch.Tensor, pose: torch.Tensor, *,
              keep_fp32: bool = True) -> tuple[torch.Tensor, ...]:
    """Where every source pixel's surface point lands in another camera.

    ``depth`` (N, H, W) camera-space z (0: no surface, treated as a point at infinity along the
    pixel's ray), ``k_src``/``k_dst`` (N, 3, 3) skew-free pinholes, ``pose`` (N, 4, 4) source camera
    -> destination camera. Returns ``(u, v, z, point)``, each (N, H*W): destination pixel
    coordinates, camera-space z there (for points at infinity: the direction's z) and whether the
    pixel had a surface. ``keep_fp32`` False computes in the inputs' dtype under the ambient
    autocast (the hazard the tests measure)."""
    with _precision(keep_fp32, depth.device.type):
        depth, k_src, k_dst, pose = _cast(keep_fp32, depth, k_src, k_dst, pose)
        n, height, width = depth.shape
        u0, v0 = _pixel_centres(height, width, depth)
        ray_x = (u0.view(1, 1, width) - k_src[:, 0, 2, None, None]) / k_src[:, 0, 0, None, None]
        ray_y = (v0.view(1, height, 1) - k_src[:, 1, 2, None, None]) / k_src[:, 1, 1, None, None]
        point = depth > 0
        scale = torch.where(point, depth, torch.ones_like(depth))
        cam = torch.stack([ray_x * scale, ray_y * scale, scale], 1).flatten(2)  # (N, 3, HW)
        point = point.flatten(1)
        moved = pose[:, :3, :3] @ cam + pose[:, :3, 3:] * point[:, None].to(cam.dtype)
        z = moved[:, 2]
        u = k_dst[:, 0, 0, None] * moved[:, 0] / z + k_dst[:, 0, 2, None]
        v = k_dst[:, 1, 1, None] * moved[:, 1] / z + k_dst[:, 1, 2, None]
    return u, v, z, point


def _inside(u: torch.Tensor, v: torch.Tensor, z: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return (z > NEAR) & (u >= 0) & (u < width) & (v >= 0) & (v < height)


def _pixel_index(u: torch.Tensor, v: torch.Tensor, inside: torch.Tensor, width: int, outside: int) -> torch.Tensor:
    """Flat index ``row * W + col`` of the pixel containing (u, v); ``outside`` where not ``inside``."""
    col = torch.where(inside, u, torch.zeros_like(u)).floor().long()
    row = torch.where(inside, v, torch.zeros_like(v)).floor().long()
    return torch.where(inside, row * width + col, torch.full_like(col, outside))


def depth_slack(depth: torch.Tensor) -> torch.Tensor:
    """(N, H, W) -> (N, H, W): how much the depth may change within one pixel of a smooth surface,
    the smaller one-sided step to a neighbour along x plus the same along y. Slanted surfaces (the
    ground near the horizon) change depth a lot per pixel; at a depth edge one side is smooth, so the
    edge does not widen the test."""
    def steps(diff: torch.Tensor, dim: int) -> torch.Tensor:
        first, last = diff.narrow(dim, 0, 1), diff.narrow(dim, diff.shape[dim] - 1, 1)
        padded = torch.cat([first, diff, last], dim).abs()
        return torch.minimum(padded.narrow(dim, 0, padded.shape[dim] - 1), padded.narrow(dim, 1, padded.shape[dim] - 1))

    return steps(depth.diff(dim=-1), -1) + steps(depth.diff(dim=-2), -2)


def passes_depth_test(z: torch.Tensor, depth: torch.Tensor, slack: torch.Tensor, tolerance: float) -> torch.Tensor:
    """A point at camera-space ``z`` is the surface the destination sees (``depth`` > 0) when
    ``|z - depth| <= tolerance * depth + slack``."""
    return (depth > 0) & ((z - depth).abs() <= tolerance * depth + slack)


def splat_correspondence(depth_src: torch.Tensor, k_src: torch.Tensor, ext_src: torch.Tensor,
                         depth_dst: torch.Tensor, k_dst: torch.Tensor, ext_dst: torch.Tensor, tolerance: float, *,
                         keep_fp32: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """For every destination pixel, the source pixel whose surface point is seen there.

    Depths (N, H, W), intrinsics (N, 3, 3), world->camera extrinsics (N, 4, 4). Every source pixel
    with a surface is moved into the destination camera and splatted to the pixel it falls in; a
    z-buffer keeps the nearest point per pixel (ties: the lowest source index); the pixel is valid
    when that point passes the depth test against ``depth_dst``. Returns ``(index, valid)``, each
    (N, H*W): flat source pixel index (0 where invalid) and validity."""
    with _precision(keep_fp32, depth_src.device.type):
        depth_dst, ext_src, ext_dst = _cast(keep_fp32, depth_dst, ext_src, ext_dst)
        n, height, width = depth_dst.shape
        hw = height * width
        u, v, z, point = reproject(depth_src, k_src, k_dst, ext_dst @ rigid_inverse(ext_src), keep_fp32=keep_fp32)
        inside = point & _inside(u, v, z, height, width)
        pixel = _pixel_index(u, v, inside, width, outside=hw)  # hw: a bin for points that land nowhere
        far = torch.full_like(z, float("inf"))
        zbuf = torch.full((n, hw + 1), float("inf"), dtype=z.dtype, device=z.device)
        zbuf = zbuf.scatter_reduce(1, pixel, torch.where(inside, z, far), "amin")
        nearest = inside & (z == zbuf.gather(1, pixel))
        ids = torch.arange(hw, device=z.device).expand(n, hw)
        best = torch.full((n, hw + 1), hw, dtype=torch.long, device=z.device)
        best = best.scatter_reduce(1, pixel, torch.where(nearest, ids, torch.full_like(ids, hw)), "amin")[:, :hw]
        target = depth_dst.flatten(1)
        valid = (best < hw) & passes_depth_test(zbuf[:, :hw], target, depth_slack(depth_dst).flatten(1), tolerance)
    return torch.where(valid, best, torch.zeros_like(best)), valid


def render_guidance(frames: list[torch.Tensor], correspondences: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Guidance for one destination view from earlier frames (oldest first, each (N, 3, H, W)) and
    their ``splat_correspondence`` into that view: (N, 4, H, W), the colour of the oldest frame that
    saw each pixel's surface (0 where none did) and the mask (1 where one did), in the frames' dtype."""
    n, _, height, width = frames[0].shape
    rgb = frames[0].new_zeros(n, 3, height * width)
    mask = torch.zeros(n, 1, height * width, dtype=torch.bool, device=rgb.device)
    for frame, (index, valid) in zip(reversed(frames), reversed(correspondences)):  # newest first: oldest wins
        colours = frame.flatten(2).gather(2, index[:, None].expand(-1, 3, -1))
        rgb = torch.where(valid[:, None], colours, rgb)
        mask = mask | valid[:, None]
    return torch.cat([rgb, mask.to(rgb.dtype)], 1).view(n, GUIDANCE_CHANNELS, height, width)


def geometric_flow(depth: torch.Tensor, intrinsics: torch.Tensor, extrinsics: torch.Tensor, tolerance: float, *,
                   keep_fp32: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact backward flow of a clip from its geometry. ``depth`` (N, T, 1, H, W), ``intrinsics``
    (N, T, 3, 3), ``extrinsics`` (N, T, 4, 4) -> ``flow`` (N, T-1, 2, H, W) in pixels (``flow[:, i]``
    belongs to frame i+1 and points into frame i, ``orchestrator.data.videos``' convention) and
    ``visible`` (N, T-1, 1, H, W) bool: the point is in view in frame i and passes its depth test
    (sky: frame i sees sky there). Flow of points that fall behind the earlier camera is 0."""
    with _precision(keep_fp32, depth.device.type):
        depth, intrinsics, extrinsics = _cast(keep_fp32, depth, intrinsics, extrinsics)
        n, t_len, _, height, width = depth.shape
        cur, prev = depth[:, 1:, 0].flatten(0, 1), depth[:, :-1, 0].flatten(0, 1)
        pose = extrinsics[:, :-1].flatten(0, 1) @ rigid_inverse(extrinsics[:, 1:].flatten(0, 1))
        u, v, z, point = reproject(cur, intrinsics[:, 1:].flatten(0, 1), intrinsics[:, :-1].flatten(0, 1), pose,
                                   keep_fp32=keep_fp32)
        u0, v0 = _pixel_centres(height, width, u)
        front = z > NEAR
        limit = float(height + width)  # a reprojection far outside the frame is never visible: clip it
        flow_u = torch.where(front, u - u0.repeat(height), torch.zeros_like(u)).clamp(-limit, limit)
        flow_v = torch.where(front, v - v0.repeat_interleave(width), torch.zeros_like(v)).clamp(-limit, limit)
        inside = _inside(u, v, z, height, width)
        pixel = _pixel_index(u, v, inside, width, outside=0)
        seen = prev.flatten(1).gather(1, pixel)
        slack = depth_slack(prev).flatten(1).gather(1, pixel)
        visible = inside & torch.where(point, passes_depth_test(z, seen, slack, tolerance), seen == 0)
        flow = torch.stack([flow_u, flow_v], 1).view(n, t_len - 1, 2, height, width)
    return flow, visible.view(n, t_len - 1, 1, height, width)


def valid_mean_l1(value: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, eps: float = 1e-6,
                  keep_fp32: bool = True) -> torch.Tensor:
    """Mean |value - target| over the elements where ``mask`` (broadcast over channels) is 1: sums
    in fp32 (a half sum of a 1024x512 mask overflows fp16). ``keep_fp32`` False sums in the inputs'
    dtype (the hazard); ``eps`` keeps an empty mask at 0."""
    if keep_fp32:
        value, target, mask = value.float(), target.float(), mask.float()
    mask = mask.expand_as(value).to(value.dtype)
    return ((value - target).abs() * mask).sum() / (mask.sum() + eps)


# --------------------------------------------------------------------------- generator


class Modulation(nn.Module):
    """One SPADE modulation of normalised features ``x`` by a conditioning map (nearest-resized to
    ``x``): ``x * (1 + gamma) + beta``, gamma and beta from one conv each, after a conv + ReLU of
    ``hidden`` channels when ``hidden`` > 0 (raw images) or directly (embeddings)."""

    def __init__(self, channels: int, cond_channels: int, hidden: int, kernel: int = 3):
        super().__init__()
        pad = kernel // 2
        self.shared = (nn.Sequential(nn.Conv2d(cond_channels, hidden, kernel, padding=pad), nn.ReLU())
                       if hidden else nn.Identity())
        width = hidden or cond_channels
        self.gamma = nn.Conv2d(width, channels, kernel, padding=pad)
        self.beta = nn.Conv2d(width, channels, kernel, padding=pad)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if cond.shape[-2:] != x.shape[-2:]:
            cond = F.interpolate(cond, size=x.shape[-2:], mode="nearest")
        hidden = self.shared(cond)
        return x * (1 + self.gamma(hidden)) + self.beta(hidden)


class MultiSPADE(nn.Module):
    """Parameter-free instance norm, then one ``Modulation`` per conditioning input in turn;
    ``forward(x, *conds)`` skips a ``None`` input (no previous frame, no guidance yet).
    ``conds`` lists (channels, hidden) per input."""

    def __init__(self, channels: int, conds: list[tuple[int, int]], *, eps: float):
        super().__init__()
        self.norm = nn.InstanceNorm2d(channels, eps=eps, affine=False, track_running_stats=False)
        self.modulations = nn.ModuleList(Modulation(channels, c, hidden) for c, hidden in conds)

    def forward(self, x: torch.Tensor, *conds: torch.Tensor | None) -> torch.Tensor:
        if len(conds) != len(self.modulations):
            raise ValueError(f"{len(conds)} conditioning inputs for {len(self.modulations)} modulations")
        out = self.norm(x)
        for modulation, cond in zip(self.modulations, conds):
            if cond is not None:
                out = modulation(out, cond.to(out.dtype))
        return out


class MultiSPADEResBlock(nn.Module):
    """(multi-SPADE, LReLU, spectral-norm conv3x3) twice, plus a multi-SPADE + SN conv1x1 shortcut
    when the width changes; ``forward(x, *conds)``."""

    def __init__(self, fin: int, fout: int, conds: list[tuple[int, int]], *, eps: float, sn_eps: float):
        super().__init__()
        fmid = min(fin, fout)
        self.body = nn.ModuleList([MultiSPADE(fin, conds, eps=eps), SNConv2d(fin, fmid, 3, padding=1, eps=sn_eps),
                                   MultiSPADE(fmid, conds, eps=eps), SNConv2d(fmid, fout, 3, padding=1, eps=sn_eps)])
        self.shortcut = (nn.ModuleList([MultiSPADE(fin, conds, eps=eps), SNConv2d(fin, fout, 1, bias=False, eps=sn_eps)])
                         if fin != fout else None)

    def forward(self, x: torch.Tensor, *conds: torch.Tensor | None) -> torch.Tensor:
        dx = x
        for i in range(0, len(self.body), 2):
            dx = self.body[i + 1](F.leaky_relu(self.body[i](dx, *conds), 0.2))
        skip = x if self.shortcut is None else self.shortcut[1](self.shortcut[0](x, *conds))
        return skip + dx


class WorldConsistentGenerator(nn.Module):
    """One frame: ``forward(label, prev_label=None, prev_frame=None, guidance=None)`` with ``label``
    (N, label_nc, H, W), the previous frame's label and generated frame, and guidance (N, 4, H, W);
    returns ``(frame, flow, occlusion, warped)`` (flow in pixels, occlusion in (0, 1): 1 where the
    warped previous frame is unreliable); the last three are None without a previous frame.
    H and W must be divisible by ``2 ** n_downsample`` and ``2 ** flow_downsample``."""

    def __init__(self, label_nc: int, ngf: int, n_downsample: int, n_multi_spade: int, spade_hidden: int,
                 flow_ngf: int, flow_downsample: int, flow_blocks: int, flow_multiplier: float, *,
                 eps: float = 1e-5, sn_eps: float = 1e-12, checkpointing: str = "none"):
        super().__init__()
        if not 1 <= n_multi_spade <= n_downsample + 1:
            raise ValueError(f"n_multi_spade must be in 1..n_downsample+1 ({n_downsample + 1}), got {n_multi_spade}")
        ch = [min(ngf * 2**i, MAX_FILTERS) for i in range(n_downsample + 1)]
        self.n_downsample, self.n_multi_spade = n_downsample, n_multi_spade
        self.factor = 2 ** max(n_downsample, flow_downsample)
        stages = checkpointing == "all"
        self.checkpoint_blocks = checkpointing in ("blocks", "all")
        self.label_embedding = LabelEmbedder(label_nc, ch, n_downsample, checkpoint_stages=stages)
        self.warp_embedding = LabelEmbedder(3 + 1, ch, n_downsample, checkpoint_stages=stages)  # warped rgb + occlusion
        self.flow = FlowGenerator(label_nc, flow_ngf, flow_downsample, flow_blocks, flow_multiplier, eps=eps,
                                  checkpointing=checkpointing)
        self.head = nn.Conv2d(label_nc, ch[-1], 3, padding=1)  # the label map at the bottleneck -> features
        blocks = []
        for level in range(n_downsample + 1):
            conds = [(ch[level], 0)]
            if level < n_multi_spade:
                conds += [(ch[level], 0), (GUIDANCE_CHANNELS, spade_hidden)]
            fin = ch[min(level + 1, n_downsample)]
            blocks.append(MultiSPADEResBlock(fin, ch[level], conds, eps=eps, sn_eps=sn_eps))
        self.blocks = nn.ModuleList(blocks)  # blocks[level] runs at H / 2**level
        self.to_image = nn.Conv2d(ch[0], 3, 3, padding=1)

    def forward(self, label: torch.Tensor, prev_label: torch.Tensor | None = None,
                prev_frame: torch.Tensor | None = None, guidance: torch.Tensor | None = None):
        if prev_frame is None:
            # a clip's first frame starts a network pass: one power iteration for the whole clip, so
            # a checkpointed block recomputed in backward sees the u, v its forward used
            begin_pass(self)
        _, _, height, width = label.shape
        if height % self.factor or width % self.factor:
            raise ValueError(f"frames of {height}x{width} are not divisible by {self.factor} "
                             "(2 ** max(n_downsample, flow_downsample))")
        cond_label = self.label_embedding(label)
        flow = occlusion = warped = None
        cond_warp: list[torch.Tensor | None] = [None] * (self.n_downsample + 1)
        if prev_frame is not None:
            if prev_label is None:
                raise ValueError("a previous frame needs its label map")
            flow, occlusion = self.flow(label, prev_label, prev_frame)
            warped = warp(prev_frame, flow)
            cond_warp = self.warp_embedding(torch.cat([warped.to(label.dtype), occlusion.to(label.dtype)], 1))
        x = self.head(F.interpolate(label, size=(height >> self.n_downsample, width >> self.n_downsample),
                                    mode="nearest"))
        for level in reversed(range(self.n_downsample + 1)):
            conds = [cond_label[level]]
            if level < self.n_multi_spade:
                conds += [cond_warp[level], guidance]
            x = maybe_checkpoint(self.blocks[level], x, *conds, enabled=self.checkpoint_blocks)
            if level:
                x = F.interpolate(x, scale_factor=2, mode="nearest")
        frame = torch.tanh(self.to_image(F.leaky_relu(x, 0.2)))
        return frame, flow, occlusion, warped


# --------------------------------------------------------------------------- the model


_SHARED = dict(label_nc=CITYSCAPES_LABEL_NC, num_D=2, lambda_feat=10.0, lambda_temporal=1.0, lambda_flow=10.0,
               lambda_guidance=20.0, lambda_vgg=10.0, depth_tolerance=0.02, vgg_weights=None)


class WCVid2Vid(Vid2Vid):
    """World-consistent vid2vid on ``orchestrator.data.world`` clips. Reuses vid2vid's temporal
    windows, flow composition and discriminator plumbing (``_windows``, ``_flow_back``,
    ``_temporal_inputs``, ``_discriminate``) with the geometric flow as the reference."""

    name = "wc_vid2vid"
    supported_flags = TRAINER_FLAGS | {"checkpointing", "fusion"}
    eps_sites = {"adam": 1e-8, "instance_norm": 1e-5, "spectral_norm": 1e-12}
    fp32_batch_keys = ("depth", "intrinsics", "extrinsics")  # geometry: see the module docstring
    presets: dict[str, dict[str, Any]] = {
        # tests: 32x32, 3 frames, batch 2 in well under a second per step on a CPU
        "tiny": dict(_SHARED, ngf=8, n_downsample=2, n_multi_spade=2, spade_hidden=16, flow_ngf=8, flow_downsample=1,
                     flow_blocks=1, flow_multiplier=4.0, ndf=8, n_layers_D=2, n_frames_D=2, n_scales_temporal=1,
                     use_vgg=False),
        "small": dict(_SHARED, ngf=16, n_downsample=3, n_multi_spade=3, spade_hidden=64, flow_ngf=16,
                      flow_downsample=2, flow_blocks=2, flow_multiplier=10.0, ndf=32, n_layers_D=3, n_frames_D=3,
                      n_scales_temporal=1, use_vgg=False),
        # the published Cityscapes network (imaginaire projects/wc_vid2vid, seg_ampO1): 32 filters
        # up to 1024, embeddings with 5 downsamplings, 3 multi-SPADE layers, guidance hidden 128;
        # flow net 32 filters, 5 downsamplings, 6 blocks, x40; D 64 filters, 3 layers, 2 scales,
        # 3 frames; loss weights 10 (features, VGG, flow) and 20 (guidance). Input: multiple of 32.
        "paper": dict(_SHARED, ngf=32, n_downsample=5, n_multi_spade=3, spade_hidden=128, flow_ngf=32,
                      flow_downsample=5, flow_blocks=6, flow_multiplier=40.0, ndf=64, n_layers_D=3, n_frames_D=3,
                      n_scales_temporal=1, use_vgg=True),
    }

    # ------------------------------------------------------------------ networks and data

    def build(self, preset: str, eps: dict[str, float], flags: SpeedFlags) -> Nets:
        arch = self.arch(preset)
        eps = {**self.eps_sites, **eps}
        generator = WorldConsistentGenerator(
            arch["label_nc"], arch["ngf"], arch["n_downsample"], arch["n_multi_spade"], arch["spade_hidden"],
            arch["flow_ngf"], arch["flow_downsample"], arch["flow_blocks"], arch["flow_multiplier"],
            eps=eps["instance_norm"], sn_eps=eps["spectral_norm"], checkpointing=flags.checkpointing)
        init_weights(generator)
        discriminator = Vid2VidDiscriminator(arch["label_nc"], arch["ndf"], arch["n_layers_D"], arch["num_D"],
                                             arch["n_frames_D"], arch["n_scales_temporal"], eps=eps["instance_norm"])
        aux = nn.ModuleDict({"vgg": VGGLoss(arch["vgg_weights"], fusion=flags.fusion)}) if arch["use_vgg"] else None
        self.hparams = arch
        self.fusion = flags.fusion
        return Nets(generator=generator, discriminator=discriminator, aux=aux)

    def dataset(self, data_cfg: Any, split: str) -> torch.utils.data.Dataset:
        """Synthetic 3D worlds (``orchestrator.data.world``). ``data_cfg.options["frames"]`` sets the
        clip length; default 4, or the fewest the temporal discriminators need when that is more."""
        if data_cfg.kind != "synthetic":
            raise ValueError(f"wc_vid2vid has no data kind {data_cfg.kind!r}; allowed: synthetic")
        from orchestrator.data.world import DEFAULT_FRAMES, WorldDataset

        return WorldDataset(data_cfg, split, label_nc=self.label_nc(), frames=self.clip_frames(data_cfg, DEFAULT_FRAMES))

    def param_groups(self, nets: Nets) -> dict[str, dict[str, Any]]:
        return {"generator": {"lr": G_LR, "betas": BETAS}, "discriminator": {"lr": D_LR, "betas": BETAS}}

    # ------------------------------------------------------------------ the sequence

    def geometry(self, batch: Batch) -> dict[str, Any]:
        """Everything the clip's geometry decides, in fp32 and without gradients: ``flow``
        (N, T-1, 2, H, W), ``visible`` (N, T-1, 1, H, W) float, and ``correspondences[t]``: one
        ``splat_correspondence`` into frame ``t`` per earlier frame, oldest first."""
        if self.hparams is None:
            raise RuntimeError("call build() before the losses: the depth tolerance comes from the preset")
        tolerance = self.hparams["depth_tolerance"]
        depth, k, ext = batch["depth"], batch["intrinsics"], batch["extrinsics"]
        n, t_len = depth.shape[:2]
        with torch.no_grad():
            flow, visible = geometric_flow(depth, k, ext, tolerance)
            src = [s for t in range(1, t_len) for s in range(t)]
            dst = [t for t in range(1, t_len) for _ in range(t)]
            index, valid = splat_correspondence(depth[:, src, 0].flatten(0, 1), k[:, src].flatten(0, 1),
                                                ext[:, src].flatten(0, 1), depth[:, dst, 0].flatten(0, 1),
                                                k[:, dst].flatten(0, 1), ext[:, dst].flatten(0, 1), tolerance)
        index, valid = index.unflatten(0, (n, len(src))), valid.unflatten(0, (n, len(src)))
        pairs = {t: [] for t in range(1, t_len)}
        for p, t in enumerate(dst):
            pairs[t].append((index[:, p], valid[:, p]))
        return {"flow": flow, "visible": visible.float(), "correspondences": pairs}

    def generate_sequence(self, nets: Nets, batch: Batch, geometry: dict[str, Any] | None = None) -> dict[str, Any]:
        """Generate a clip frame by frame: ``frames`` (N, T, 3, H, W); for frames 1.. the predicted
        ``flow`` (N, T-1, 2, H, W), ``occlusion`` (N, T-1, 1, H, W) and the ``guidance`` each saw
        (N, T-1, 4, H, W)."""
        geometry = geometry if geometry is not None else self.geometry(batch)
        labels = batch["labels"]
        frames: list[torch.Tensor] = []
        outs: dict[str, list[torch.Tensor]] = {"flow": [], "occlusion": [], "guidance": []}
        for t in range(labels.shape[1]):
            if t == 0:
                frame = nets.generator(labels[:, 0])[0]
            else:
                earlier = [f.detach() for f in frames]
                guidance = render_guidance(earlier, geometry["correspondences"][t]).to(labels.dtype)
                frame, flow, occlusion, _ = nets.generator(labels[:, t], labels[:, t - 1],
                                                           earlier[-1].to(labels.dtype), guidance)
                for key, value in zip(outs, (flow, occlusion, guidance)):
                    outs[key].append(value)
            frames.append(frame)
        return {"frames": torch.stack(frames, 1), **{k: torch.stack(v, 1) for k, v in outs.items()}}

    # ------------------------------------------------------------------ losses

    def discriminator_loss(self, nets: Nets, batch: Batch) -> tuple[torch.Tensor, Logs]:
        self._check(batch)
        labels, real = batch["labels"], batch["frames"]
        geometry = self.geometry(batch)
        with torch.no_grad():
            fake = self.generate_sequence(nets, batch, geometry)["frames"]
        (p_fake, p_real), temporal = self._discriminate(nets, labels, [fake, real], [fake, real], geometry["flow"])
        d_fake = gan_loss(p_fake, False, "hinge", fusion=self.fusion)
        d_real = gan_loss(p_real, True, "hinge", fusion=self.fusion)
        loss = d_fake + d_real
        logs: Logs = {"d_real": d_real.detach(), "d_fake": d_fake.detach()}
        if temporal:
            t_fake = sum(gan_loss(out, False, "hinge", fusion=self.fusion) for out, _ in temporal)
            t_real = sum(gan_loss(out, True, "hinge", fusion=self.fusion) for _, out in temporal)
            loss = loss + self.hparams["lambda_temporal"] * (t_fake + t_real)
            logs.update(d_t_real=t_real.detach(), d_t_fake=t_fake.detach())
        return loss, logs

    def _adversarial(self, fake_out, real_out) -> tuple[torch.Tensor, torch.Tensor]:
        """Hinge G loss and feature matching (summed over layers, averaged over scales)."""
        n_intermediate = len(fake_out[0]) - 1
        return (gan_loss(fake_out, True, "hinge", for_discriminator=False, fusion=self.fusion),
                feature_matching_loss(fake_out, real_out, self.hparams["lambda_feat"] * n_intermediate,
                                      fusion=self.fusion))

    def generator_loss(self, nets: Nets, batch: Batch) -> tuple[torch.Tensor, Logs]:
        self._check(batch)
        hp = self.hparams
        labels, real = batch["labels"], batch["frames"]
        geometry = self.geometry(batch)
        seq = self.generate_sequence(nets, batch, geometry)
        fake = seq["frames"]
        (p_fake, p_real), temporal = self._discriminate(nets, labels, [fake, real], [fake, real], geometry["flow"])
        loss_gan, loss_feat = self._adversarial(p_fake, p_real)
        loss = loss_gan + loss_feat
        logs: Logs = {"g_gan": loss_gan.detach(), "g_feat": loss_feat.detach()}
        if temporal:
            pairs = [self._adversarial(fake_out, real_out) for fake_out, real_out in temporal]
            loss_t_gan, loss_t_feat = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
            loss = loss + hp["lambda_temporal"] * (loss_t_gan + loss_t_feat)
            logs.update(g_t_gan=loss_t_gan.detach(), g_t_feat=loss_t_feat.detach())

        # flow, warp and occlusion against the geometry; guidance against earlier generated colours
        visible = geometry["visible"].flatten(0, 1)
        flow_pred = seq["flow"].flatten(0, 1).float()
        real_prev, real_cur = real[:, :-1].flatten(0, 1).float(), real[:, 1:].flatten(0, 1).float()
        loss_flow = hp["lambda_flow"] * masked_l1(flow_pred, geometry["flow"].flatten(0, 1), visible)
        loss_flow_warp = hp["lambda_flow"] * masked_l1(warp(real_prev, flow_pred), real_cur, visible)
        loss_occlusion = F.l1_loss(seq["occlusion"].flatten(0, 1).float(), 1 - visible)
        guidance = seq["guidance"].flatten(0, 1)
        loss_guidance = hp["lambda_guidance"] * valid_mean_l1(fake[:, 1:].flatten(0, 1), guidance[:, :3],
                                                              guidance[:, 3:])
        loss = loss + loss_flow + loss_flow_warp + loss_occlusion + loss_guidance
        logs.update(g_flow=loss_flow.detach(), g_flow_warp=loss_flow_warp.detach(),
                    g_occlusion=loss_occlusion.detach(), g_guidance=loss_guidance.detach())
        if hp["use_vgg"]:
            loss_vgg = hp["lambda_vgg"] * self.vgg_loss(nets, [fake], real)
            loss = loss + loss_vgg
            logs["g_vgg"] = loss_vgg.detach()
        return loss, logs

    def sample_frames(self, nets: Nets, batch: Batch) -> torch.Tensor:
        return self.generate_sequence(nets, batch)["frames"]

"""vid2vid (Wang et al., 2018): a label-map video -> a photo-realistic video, frame by frame.

Generator (vid2vid's "composite" generator, one spatial scale): for frame ``t`` it sees the label
maps of frames ``t - n_frames_G + 1 .. t`` (channel-stacked) and the ``n_frames_G - 1`` frames it
generated before. Two encoders (labels; previous frames) are summed, then two branches share that
code: an image branch ending in a tanh "hallucinated" frame, and a flow branch ending in a 2-channel
optical flow (x20, vid2vid's output multiplier) and a 1-channel sigmoid occlusion mask ``w``. The
output is ``w * hallucinated + (1 - w) * warp(previous frame, flow)``.

Discriminators (one ``nn.Module`` so the trainer calls it once per loss, DDP-safe): a multi-scale
PatchGAN on (label, frame) pairs, applied to both the output and the hallucinated frame, and one
temporal multi-scale PatchGAN per frame-rate scale ``s`` on ``n_frames_D`` frames taken every
``n_frames_D ** s`` frames, stacked with the reference flows between them (/20, as vid2vid does).

Losses (vid2vid's, LSGAN): GAN + feature matching (weighted ``4 * lambda_feat`` x the mean over
layers and scales, which is vid2vid's exact magnitude) for every discriminator; optional VGG on
both frames; flow L1 to the reference flow (``lambda_F``); the warp of the previous *real* frame by
the predicted flow against the current real frame (``lambda_T``); the output against the
previous *generated* frame warped by the reference flow (``lambda_T``); and the L1 of the mask
toward 0 (prefer warping where the flow is reliable). Flow terms are masked by vid2vid's
confidence rule: a pixel counts where the previous real frame, warped by the reference flow,
matches the current one (squared RGB distance < 0.02).

Differences from the original, on purpose:

* The reference flow is the data set's **exact** ground-truth flow (``orchestrator.data.videos``)
  instead of a pretrained FlowNet2; flows at coarser frame-rate scales are composed from it.
* **First frames** (vid2vid's ``--no_first_img``): the sequence starts from zeros as "previous
  frames" and the first frame is the hallucinated frame alone (nothing to warp); label histories
  before frame 0 repeat frame 0's labels. Every frame of the clip is therefore generated, and
  ``samples`` returns them all.
* Gradients do not flow through previously generated frames (vid2vid's default
  ``max_frames_backpropagate=1``): each frame's inputs are detached.
* Instance norm (not vid2vid's default batch norm), no foreground branch, no instance-edge input,
  one spatial scale; whole clips are processed per step (vid2vid loads a few frames at a time).
* One optimizer for all discriminators (same lr and betas as vid2vid's separate ones).

Speed flags (the vid2vid seed's model-local findings): ``checkpointing`` blocks|all wraps every
residual block (all: also the down/up-sampling stages) in ``maybe_checkpoint``; ``fusion`` jit|compile
runs the output blend and the loss terms as fused pointwise chains (``models.fusion``).

fp16 numerics: the warp is kept in fp32 (inputs cast up, autocast off inside, result cast back),
as vid2vid's fp16 path did. In half precision the sampling grid's normalised coordinates in
[-1, 1] have too few bits: near the border fp16 resolves 2**-11, i.e. about a pixel at 2048 px
width, so sub-pixel flow is rounded away (bf16: already at ~256 px). See ``warp``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.base import CITYSCAPES_LABEL_NC, TRAINER_FLAGS, Batch, GANModel, Logs, Nets
from models.layers import ConvBlock, MultiscaleDiscriminator, ResnetStack, maybe_checkpoint
from models.losses import VGGLoss, feature_matching_loss, gan_loss
from models import fusion
from orchestrator.settings import SpeedFlags

FLOW_SCALE = 20.0  # vid2vid multiplies the flow head's output by 20 (and divides flows by 20 for D_T)
CONF_THRESHOLD = 0.02  # vid2vid's flow confidence: squared RGB warp error below this


# --------------------------------------------------------------------------- warping


def _base_grid(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(1, H, W, 2) sampling grid of the pixel centres in grid_sample's align_corners=True
    coordinates (-1 = first pixel, +1 = last), x first, built in fp32 then cast to ``dtype``."""
    ys = torch.linspace(-1.0, 1.0, height, device=device, dtype=torch.float32)
    xs = torch.linspace(-1.0, 1.0, width, device=device, dtype=torch.float32)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1).unsqueeze(0).to(dtype)


def warp_in_input_dtype(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Backward warp computed entirely in the inputs' dtype (what a model gets when nothing keeps
    the warp in fp32, e.g. under O2/O3 or when autocast runs grid_sample in half). Exposed so the
    fp16 hazard can be measured; models use ``warp``."""
    _, _, height, width = image.shape
    grid = _base_grid(height, width, image.device, flow.dtype)
    offset = torch.stack([flow[:, 0] / ((max(width, 2) - 1) / 2.0),
                          flow[:, 1] / ((max(height, 2) - 1) / 2.0)], dim=-1)
    return F.grid_sample(image, (grid + offset).to(image.dtype), mode="bilinear",
                         padding_mode="border", align_corners=True)


def warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """``image`` (N, C, H, W) sampled at ``pixel + flow`` (flow (N, 2, H, W) in pixels, x then y):
    bilinear, border padding. Always computed in fp32 with autocast off, returned in
    ``image``'s dtype: half-precision grid coordinates lose sub-pixel flow on wide images."""
    dtype = image.dtype
    with torch.autocast(device_type=image.device.type, enabled=False):
        out = warp_in_input_dtype(image.float(), flow.float())
    return out.to(dtype)


@fusion.register("vid2vid.blend")
def blend(raw: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The generator's output: the hallucinated frame where ``mask`` is 1, the warped one where 0
    (a pointwise chain: the ``fusion`` flag scripts or compiles it, as the vid2vid seed did)."""
    return raw * mask + warped * (1.0 - mask)


def masked_l1(value: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """vid2vid's masked L1: mean |value - target| over all elements, masked ones counting as 0."""
    mask = mask.expand_as(value)
    return F.l1_loss(value * mask, target * mask)


# --------------------------------------------------------------------------- networks


def _init_weights(module: nn.Module) -> None:
    """vid2vid's initialisation: conv weights ~ N(0, 0.02)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)


class _Stages(nn.Module):
    """ConvBlocks applied in turn, each checkpointed when ``checkpoint`` (checkpointing='all')."""

    def __init__(self, blocks: list[nn.Module], checkpoint: bool):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = maybe_checkpoint(block, x, enabled=self.checkpoint)
        return x


class CompositeGenerator(nn.Module):
    """One vid2vid generator step: ``forward(labels, prev_frames, use_raw_only)`` with labels
    (N, n_frames_G * label_nc, H, W) and prev_frames (N, 3 * (n_frames_G - 1), H, W), oldest
    first; returns ``(frame, hallucinated, flow, mask)``: (N,3,H,W), (N,3,H,W), (N,2,H,W) in
    pixels, (N,1,H,W) in (0, 1). ``use_raw_only`` (the first frame) returns the hallucinated frame.
    ``fusion`` (none | jit | compile) selects how the blend chain runs.

    The label encoder holds ``n_blocks - n_blocks // 2`` residual blocks after its downsampling,
    the previous-frame encoder an identical copy; each branch then has ``n_blocks // 2``."""

    def __init__(self, label_nc: int, n_frames_g: int, ngf: int, n_downsample: int, n_blocks: int, *,
                 eps: float = 1e-5, checkpointing: str = "none", fusion: str = "none"):
        super().__init__()
        if n_frames_g < 2:
            raise ValueError(f"n_frames_G must be >= 2 (the current frame plus at least one previous), got {n_frames_g}")
        self.n_frames_g = n_frames_g
        self.fusion = fusion
        blocks_on = checkpointing in ("blocks", "all")
        stages_on = checkpointing == "all"
        norm = dict(norm="instance", eps=eps)
        width = ngf * 2**n_downsample

        def encoder(in_channels: int) -> nn.Sequential:
            stages = [ConvBlock(in_channels, ngf, 7, 1, 3, pad_mode="reflect", **norm)]
            stages += [ConvBlock(ngf * 2**i, ngf * 2 ** (i + 1), 3, 2, 1, **norm) for i in range(n_downsample)]
            return nn.Sequential(_Stages(stages, stages_on),
                                 ResnetStack(width, n_blocks - n_blocks // 2, eps=eps, checkpointing=blocks_on))

        def decoder() -> _Stages:
            return _Stages([ConvBlock(ngf * 2 ** (i + 1), ngf * 2**i, 3, 2, 1, transposed=True, **norm)
                            for i in reversed(range(n_downsample))], stages_on)

        self.label_encoder = encoder(label_nc * n_frames_g)
        self.image_encoder = encoder(3 * (n_frames_g - 1))
        self.image_blocks = ResnetStack(width, n_blocks // 2, eps=eps, checkpointing=blocks_on)
        self.image_up = decoder()
        self.image_head = ConvBlock(ngf, 3, 7, 1, 3, pad_mode="reflect", norm="none", act="tanh")
        self.flow_blocks = ResnetStack(width, n_blocks // 2, eps=eps, checkpointing=blocks_on)
        self.flow_up = decoder()
        self.flow_head = ConvBlock(ngf, 2, 7, 1, 3, pad_mode="reflect", norm="none", act="none")
        self.mask_head = ConvBlock(ngf, 1, 7, 1, 3, pad_mode="reflect", norm="none", act="none")
        self.apply(_init_weights)

    def forward(self, labels: torch.Tensor, prev_frames: torch.Tensor,
                use_raw_only: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        code = self.label_encoder(labels) + self.image_encoder(prev_frames)
        raw = self.image_head(self.image_up(self.image_blocks(code)))
        flow_features = self.flow_up(self.flow_blocks(code))
        flow = self.flow_head(flow_features) * FLOW_SCALE
        mask = torch.sigmoid(self.mask_head(flow_features))
        if use_raw_only:
            return raw, raw, flow, mask
        warped = warp(prev_frames[:, -3:], flow)
        return fusion.fused("vid2vid.blend", self.fusion)(raw, warped, mask), raw, flow, mask


class Vid2VidDiscriminator(nn.Module):
    """The image discriminator and the temporal ones behind one ``forward`` (one call per loss).

    ``forward(image_input, temporal_inputs)``: image_input (B, label_nc + 3, H, W); one
    temporal input per frame-rate scale, (B_s, 3 * n_frames_D + 2 * (n_frames_D - 1), H, W).
    Returns (image outputs, [temporal outputs per scale]), each in ``MultiscaleDiscriminator``'s
    per-scale feature-list form."""

    def __init__(self, label_nc: int, ndf: int, n_layers: int, num_d: int, n_frames_d: int,
                 n_scales_temporal: int, *, eps: float = 1e-5):
        super().__init__()
        if n_frames_d < 2 and n_scales_temporal > 0:
            raise ValueError(f"n_frames_D must be >= 2 for a temporal discriminator, got {n_frames_d}")
        self.image = MultiscaleDiscriminator(label_nc + 3, num_d, ndf, n_layers, eps=eps)
        temporal_in = 3 * n_frames_d + 2 * (n_frames_d - 1)
        self.temporal = nn.ModuleList(MultiscaleDiscriminator(temporal_in, num_d, ndf, n_layers, eps=eps)
                                      for _ in range(n_scales_temporal))
        self.apply(_init_weights)

    def forward(self, image_input: torch.Tensor, temporal_inputs: list[torch.Tensor]):
        if len(temporal_inputs) != len(self.temporal):
            raise ValueError(f"{len(temporal_inputs)} temporal inputs for {len(self.temporal)} temporal scales")
        return self.image(image_input), [disc(x) for disc, x in zip(self.temporal, temporal_inputs)]


def _chunk(outputs: list[list[torch.Tensor]], parts: int) -> list[list[list[torch.Tensor]]]:
    """Split discriminator outputs computed on ``parts`` batches concatenated along dim 0."""
    return [[[f.chunk(parts, dim=0)[i] for f in scale] for scale in outputs] for i in range(parts)]


def required_frames(n_frames_d: int, n_scales_temporal: int) -> int:
    """Fewest clip frames that feed every temporal scale (and at least one flow)."""
    if n_scales_temporal <= 0:
        return 2
    return max(2, 1 + n_frames_d ** (n_scales_temporal - 1) * (n_frames_d - 1))


# --------------------------------------------------------------------------- the model


class Vid2Vid(GANModel):
    name = "vid2vid"
    supported_flags = TRAINER_FLAGS | {"checkpointing", "fusion"}
    eps_sites = {"adam": 1e-8, "instance_norm": 1e-5}
    fp32_batch_keys = ("flow",)  # the reference flow, in pixels
    presets: dict[str, dict[str, Any]] = {
        # tests: a 32x32 4-frame batch-2 step takes well under 0.5 s on a CPU
        "tiny": dict(label_nc=CITYSCAPES_LABEL_NC, ngf=8, n_downsample=2, n_blocks=2, n_frames_G=3,
                     ndf=8, n_layers=2, num_D=2, n_frames_D=2, n_scales_temporal=2,
                     lambda_feat=10.0, lambda_T=10.0, lambda_F=10.0, use_vgg=False, vgg_weights=None),
        "small": dict(label_nc=CITYSCAPES_LABEL_NC, ngf=32, n_downsample=3, n_blocks=6, n_frames_G=3,
                      ndf=32, n_layers=3, num_D=2, n_frames_D=2, n_scales_temporal=2,
                      lambda_feat=10.0, lambda_T=10.0, lambda_F=10.0, use_vgg=False, vgg_weights=None),
        # the published street-scene network (composite G: ngf 128, 3 downsamplings, 9 blocks,
        # 3 input frames; D: 64 filters, 3 layers, 2 scales; D_T: 3 frames, 2 frame-rate scales)
        "paper": dict(label_nc=CITYSCAPES_LABEL_NC, ngf=128, n_downsample=3, n_blocks=9, n_frames_G=3,
                      ndf=64, n_layers=3, num_D=2, n_frames_D=3, n_scales_temporal=2,
                      lambda_feat=10.0, lambda_T=10.0, lambda_F=10.0, use_vgg=True, vgg_weights=None),
    }

    # ------------------------------------------------------------------ networks and data

    def build(self, preset: str, eps: dict[str, float], flags: SpeedFlags) -> Nets:
        arch = self.arch(preset)
        eps_norm = eps.get("instance_norm", self.eps_sites["instance_norm"])
        generator = CompositeGenerator(arch["label_nc"], arch["n_frames_G"], arch["ngf"], arch["n_downsample"],
                                       arch["n_blocks"], eps=eps_norm, checkpointing=flags.checkpointing,
                                       fusion=flags.fusion)
        discriminator = Vid2VidDiscriminator(arch["label_nc"], arch["ndf"], arch["n_layers"], arch["num_D"],
                                             arch["n_frames_D"], arch["n_scales_temporal"], eps=eps_norm)
        aux = nn.ModuleDict({"vgg": VGGLoss(arch["vgg_weights"], fusion=flags.fusion)}) if arch["use_vgg"] else None
        self.hparams = arch
        self.fusion = flags.fusion  # the losses' pointwise chains (models.fusion)
        return Nets(generator=generator, discriminator=discriminator, aux=aux)

    def required_frames(self) -> int | None:
        """Fewest frames per clip the built networks need (None before ``build``)."""
        if self.hparams is None:
            return None
        return required_frames(self.hparams["n_frames_D"], self.hparams["n_scales_temporal"])

    def clip_frames(self, data_cfg: Any, default: int) -> Any:
        """Frames per clip: ``data_cfg.options["frames"]``, else ``default`` or the fewest the
        temporal discriminators need when that is more; a clip shorter than they need is an error."""
        needed = self.required_frames()
        frames = data_cfg.options.get("frames", max(default, needed or 0))
        if needed is not None and isinstance(frames, int) and frames < needed:
            raise ValueError(f"data.options.frames={frames} is too short for {self.name}'s temporal discriminators "
                             f"(n_frames_D={self.hparams['n_frames_D']}, n_scales_temporal="
                             f"{self.hparams['n_scales_temporal']}): need >= {needed} frames")
        return frames

    def dataset(self, data_cfg: Any, split: str) -> torch.utils.data.Dataset:
        """Synthetic videos (``orchestrator.data.videos``). ``data_cfg.options["frames"]`` sets the
        clip length; default 4, or the fewest the temporal discriminators need when that is more."""
        if data_cfg.kind != "synthetic":
            raise ValueError(f"vid2vid has no data kind {data_cfg.kind!r}; allowed: synthetic")
        from orchestrator.data.videos import DEFAULT_FRAMES, VideoDataset

        return VideoDataset(data_cfg, split, label_nc=self.label_nc(), frames=self.clip_frames(data_cfg, DEFAULT_FRAMES))

    # ------------------------------------------------------------------ the sequence

    def _check(self, batch: Batch) -> None:
        if self.hparams is None:
            raise RuntimeError("call build() before the losses: the loss weights come from the preset")
        t_len = batch["labels"].shape[1]
        needed = self.required_frames()
        if t_len < needed:
            raise ValueError(f"clips of {t_len} frames are too short for the temporal discriminators: need "
                             f">= {needed} (set data.options.frames)")

    def generate_sequence(self, nets: Nets, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Generate a clip frame by frame. ``labels`` (N, T, label_nc, H, W) -> ``frames``,
        ``raw`` (N, T, 3, H, W), ``flow`` (N, T, 2, H, W), ``mask`` (N, T, 1, H, W)."""
        n, t_len, _, height, width = labels.shape
        t_g = self.hparams["n_frames_G"]
        prev = labels.new_zeros(n, t_g - 1, 3, height, width)
        outs: dict[str, list[torch.Tensor]] = {"frames": [], "raw": [], "flow": [], "mask": []}
        for t in range(t_len):
            history = [max(t - k, 0) for k in range(t_g - 1, -1, -1)]  # oldest first; frame 0 repeated
            frame, raw, flow, mask = nets.generator(labels[:, history].flatten(1, 2), prev.flatten(1, 2), t == 0)
            for key, value in zip(outs, (frame, raw, flow, mask)):
                outs[key].append(value)
            prev = torch.cat([prev[:, 1:], frame.detach().to(prev.dtype).unsqueeze(1)], dim=1)
        return {key: torch.stack(values, dim=1) for key, values in outs.items()}

    def _windows(self, t_len: int) -> list[tuple[int, list[list[int]]]]:
        """Per frame-rate scale: (frame step, windows of n_frames_D frame indices), vid2vid's
        grouping: windows end at the last frame and every n_frames_D frames before it."""
        t_d = self.hparams["n_frames_D"]
        out = []
        for s in range(self.hparams["n_scales_temporal"]):
            step = t_d**s
            span = step * (t_d - 1)
            ends = range(t_len - 1, span - 1, -t_d)
            out.append((step, [list(range(end - span, end + 1, step)) for end in ends]))
        return out

    @staticmethod
    def _flow_back(flow_ref: torch.Tensor, end: int, step: int) -> torch.Tensor:
        """Flow from frame ``end`` to frame ``end - step`` (N, 2, H, W), composed from the
        consecutive reference flows (``flow_ref[:, i]``: frame i+1 -> frame i)."""
        total = flow_ref[:, end - 1]
        for k in range(2, step + 1):
            total = total + warp(flow_ref[:, end - k], total)
        return total

    def _temporal_inputs(self, clips: list[torch.Tensor], flow_ref: torch.Tensor) -> list[torch.Tensor]:
        """For each scale: the windows of every clip in ``clips`` (each (N, T, 3, H, W)), stacked
        with the reference flows between window frames; clips concatenated along the batch."""
        t_len = clips[0].shape[1]
        inputs = []
        with torch.no_grad():
            flows = {}
            for step, windows in self._windows(t_len):
                for window in windows:
                    for end in window[1:]:
                        if (end, step) not in flows:
                            flows[(end, step)] = self._flow_back(flow_ref, end, step) / FLOW_SCALE
        for step, windows in self._windows(t_len):
            per_clip = []
            for clip in clips:
                stacks = []
                for window in windows:
                    frames = clip[:, window].flatten(1, 2)
                    window_flows = torch.cat([flows[(end, step)] for end in window[1:]], dim=1)
                    stacks.append(torch.cat([frames, window_flows.to(frames.dtype)], dim=1))
                per_clip.append(torch.cat(stacks, dim=0))
            inputs.append(torch.cat(per_clip, dim=0))
        return inputs

    @staticmethod
    def confidence(real: torch.Tensor, flow_ref: torch.Tensor) -> torch.Tensor:
        """(N, T-1, 1, H, W) fp32: 1 where the previous real frame warped by the reference flow
        matches the current one (vid2vid's FlowNet confidence rule, here on the exact flow)."""
        with torch.no_grad():
            prev, cur = real[:, :-1].flatten(0, 1).float(), real[:, 1:].flatten(0, 1).float()
            error = (cur - warp(prev, flow_ref.flatten(0, 1))).pow(2).sum(dim=1, keepdim=True)
            conf = (error < CONF_THRESHOLD).float()
        return conf.unflatten(0, (real.shape[0], real.shape[1] - 1))

    def _discriminate(self, nets: Nets, labels: torch.Tensor, image_parts: list[torch.Tensor],
                      clips: list[torch.Tensor], flow_ref: torch.Tensor):
        """One discriminator call: the image D on (labels, part) for each of ``image_parts`` (each
        (N, T, 3, H, W)) and the temporal Ds on windows of each of ``clips``; outputs split back."""
        lab = labels.flatten(0, 1)
        image_input = torch.cat([torch.cat([lab, part.flatten(0, 1).to(lab.dtype)], dim=1) for part in image_parts])
        temporal_inputs = self._temporal_inputs([c.to(lab.dtype) for c in clips], flow_ref)
        image_out, temporal_out = nets.discriminator(image_input, temporal_inputs)
        return _chunk(image_out, len(image_parts)), [_chunk(out, len(clips)) for out in temporal_out]

    # ------------------------------------------------------------------ losses

    def discriminator_loss(self, nets: Nets, batch: Batch) -> tuple[torch.Tensor, Logs]:
        self._check(batch)
        labels, real, flow_ref = batch["labels"], batch["frames"], batch["flow"]
        with torch.no_grad():
            seq = self.generate_sequence(nets, labels)
        (p_fake, p_raw, p_real), temporal = self._discriminate(
            nets, labels, [seq["frames"], seq["raw"], real], [seq["frames"], real], flow_ref)
        # vid2vid scores the real pairs once per generated kind (output and hallucinated frame)
        d_fake = gan_loss(p_fake, False, fusion=self.fusion) + gan_loss(p_raw, False, fusion=self.fusion)
        d_real = 2 * gan_loss(p_real, True, fusion=self.fusion)
        loss = 0.5 * (d_fake + d_real)
        logs = {"d_real": d_real.detach(), "d_fake": d_fake.detach()}
        if temporal:
            t_fake = sum(gan_loss(fake, False, fusion=self.fusion) for fake, _ in temporal)
            t_real = sum(gan_loss(real_out, True, fusion=self.fusion) for _, real_out in temporal)
            loss = loss + 0.5 * (t_fake + t_real)
            logs.update(d_t_real=t_real.detach(), d_t_fake=t_fake.detach())
        return loss, logs

    def generator_loss(self, nets: Nets, batch: Batch) -> tuple[torch.Tensor, Logs]:
        self._check(batch)
        hp = self.hparams
        labels, real, flow_ref = batch["labels"], batch["frames"], batch["flow"]
        seq = self.generate_sequence(nets, labels)
        fake, raw = seq["frames"], seq["raw"]
        (p_fake, p_raw, p_real), temporal = self._discriminate(
            nets, labels, [fake, raw, real], [fake, real], flow_ref)
        feat_weight = 4 * hp["lambda_feat"]  # vid2vid's 4/(n_layers+1) per layer, 1/num_D per scale
        loss_gan = gan_loss(p_fake, True, fusion=self.fusion) + gan_loss(p_raw, True, fusion=self.fusion)
        loss_feat = (feature_matching_loss(p_fake, p_real, feat_weight, fusion=self.fusion)
                     + feature_matching_loss(p_raw, p_real, feat_weight, fusion=self.fusion))
        logs: Logs = {}
        loss = loss_gan + loss_feat
        if temporal:
            loss_t_gan = sum(gan_loss(t_fake, True, fusion=self.fusion) for t_fake, _ in temporal)
            loss_t_feat = sum(feature_matching_loss(t_fake, t_real, feat_weight, fusion=self.fusion)
                              for t_fake, t_real in temporal)
            loss = loss + loss_t_gan + loss_t_feat
            logs.update(g_t_gan=loss_t_gan.detach(), g_t_feat=loss_t_feat.detach())

        # flow, warp and mask terms on frames 1.. (frame 0 has no previous frame)
        conf = self.confidence(real, flow_ref).flatten(0, 1)
        flow_ref_f = flow_ref.flatten(0, 1)
        flow_pred = seq["flow"][:, 1:].flatten(0, 1)
        real_prev, real_cur = real[:, :-1].flatten(0, 1), real[:, 1:].flatten(0, 1)
        loss_flow = hp["lambda_F"] * masked_l1(flow_pred.float(), flow_ref_f.float(), conf)
        loss_flow_warp = hp["lambda_T"] * masked_l1(warp(real_prev.float(), flow_pred), real_cur.float(), conf)
        with torch.no_grad():
            fake_prev_warped = warp(fake[:, :-1].flatten(0, 1).float(), flow_ref_f)
        loss_warp = hp["lambda_T"] * masked_l1(fake[:, 1:].flatten(0, 1).float(), fake_prev_warped, conf)
        mask = seq["mask"][:, 1:].flatten(0, 1).float()
        loss_mask = masked_l1(mask, torch.zeros_like(mask), conf)
        loss = loss + loss_flow + loss_flow_warp + loss_warp + loss_mask
        logs.update(g_gan=loss_gan.detach(), g_feat=loss_feat.detach(),
                    g_flow=loss_flow.detach(), g_flow_warp=loss_flow_warp.detach(),
                    g_warp=loss_warp.detach(), g_mask=loss_mask.detach())
        if hp["use_vgg"]:
            loss_vgg = hp["lambda_feat"] * self.vgg_loss(nets, [fake, raw], real)
            loss = loss + loss_vgg
            logs["g_vgg"] = loss_vgg.detach()
        return loss, logs

    @staticmethod
    def vgg_loss(nets: Nets, clips: list[torch.Tensor], real: torch.Tensor) -> torch.Tensor:
        """The perceptual loss of every frame of each of ``clips`` (N, T, 3, H, W) against ``real``."""
        if nets.aux is None or "vgg" not in nets.aux:
            raise RuntimeError("use_vgg is set but nets.aux has no 'vgg' network")
        real_f = real.flatten(0, 1)
        return sum(nets.aux["vgg"](clip.flatten(0, 1), real_f.to(clip.dtype)) for clip in clips)

    def sample_frames(self, nets: Nets, batch: Batch) -> torch.Tensor:
        """The generated clip (N, T, 3, H, W) that ``samples`` compares with the real one."""
        return self.generate_sequence(nets, batch["labels"])["frames"]

    def samples(self, nets: Nets, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Every generated frame and its real frame, clips flattened: (N * T, 3, H, W) each."""
        if self.hparams is None:
            raise RuntimeError("call build() before samples()")
        return self.sample_frames(nets, batch).flatten(0, 1), batch["frames"].flatten(0, 1)

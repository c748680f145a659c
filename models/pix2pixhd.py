"""pix2pixHD (Wang et al., 2018): label map + instance boundaries -> photo.

Generator: a global encoder / residual blocks / decoder, optionally wrapped by one local enhancer
that runs the global network at half resolution and adds a full-resolution branch. Discriminator:
multi-scale PatchGANs on (generator input, image). Losses: LSGAN, discriminator feature matching
and an optional VGG19 perceptual loss, weighted by ``lambda_feat`` as well (as pix2pixHD does).

``ngf`` is the global generator's base width in every preset; the local enhancer uses ``ngf // 2``
(pix2pixHD's ``--ngf`` names the enhancer's width instead, with the global one twice that).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.base import CITYSCAPES_LABEL_NC, TRAINER_FLAGS, Batch, GANModel, Logs, Nets
from models.layers import ConvBlock, MultiscaleDiscriminator, ResnetStack, instance_edges, maybe_checkpoint
from models.losses import VGGLoss, feature_matching_loss, gan_loss
from orchestrator.settings import SpeedFlags

N_BLOCKS_LOCAL = 3  # residual blocks in the local enhancer (the paper's value)


class GlobalGenerator(nn.Module):
    """7x7 conv, ``n_downsample`` stride-2 convs, ``n_blocks`` residual blocks, as many transposed
    convs back up, and a 7x7 conv + tanh head. ``head=False`` drops the head so a local enhancer
    can use the last ``ngf``-channel features instead."""

    def __init__(self, in_channels: int, ngf: int, n_downsample: int, n_blocks: int, *,
                 eps: float = 1e-5, checkpointing: str = "none", head: bool = True):
        super().__init__()
        self.checkpoint_stages = checkpointing == "all"
        norm = dict(norm="instance", eps=eps)
        down = [ConvBlock(in_channels, ngf, 7, 1, 3, pad_mode="reflect", **norm)]
        down += [ConvBlock(ngf * 2**i, ngf * 2 ** (i + 1), 3, 2, 1, **norm) for i in range(n_downsample)]
        self.down = nn.ModuleList(down)
        self.blocks = ResnetStack(ngf * 2**n_downsample, n_blocks, eps=eps,
                                  checkpointing=checkpointing in ("blocks", "all"))
        self.up = nn.ModuleList(
            ConvBlock(ngf * 2 ** (i + 1), ngf * 2**i, 3, 2, 1, transposed=True, **norm)
            for i in reversed(range(n_downsample))
        )
        self.head = ConvBlock(ngf, 3, 7, 1, 3, pad_mode="reflect", norm="none", act="tanh") if head else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.down:
            x = maybe_checkpoint(stage, x, enabled=self.checkpoint_stages)
        x = self.blocks(x)
        for stage in self.up:
            x = maybe_checkpoint(stage, x, enabled=self.checkpoint_stages)
        return x if self.head is None else self.head(x)


class Pix2PixHDGenerator(nn.Module):
    """The global generator alone (``n_local_enhancers=0``), or global at half resolution plus one
    local enhancer: full-res features (ngf/2 -> ngf, stride 2) + the global's last features, then
    residual blocks, upsampling and a tanh head."""

    def __init__(self, in_channels: int, ngf: int, n_downsample: int, n_blocks: int,
                 n_local_enhancers: int = 0, *, eps: float = 1e-5, checkpointing: str = "none"):
        super().__init__()
        if n_local_enhancers not in (0, 1):
            raise ValueError(f"n_local_enhancers must be 0 or 1, got {n_local_enhancers}")
        self.has_local = n_local_enhancers == 1
        self.global_net = GlobalGenerator(in_channels, ngf, n_downsample, n_blocks, eps=eps,
                                          checkpointing=checkpointing, head=not self.has_local)
        if self.has_local:
            local = max(ngf // 2, 1)
            norm = dict(norm="instance", eps=eps)
            self.local_down = nn.Sequential(
                ConvBlock(in_channels, local, 7, 1, 3, pad_mode="reflect", **norm),
                ConvBlock(local, ngf, 3, 2, 1, **norm),
            )
            self.local_blocks = ResnetStack(ngf, N_BLOCKS_LOCAL, eps=eps,
                                            checkpointing=checkpointing in ("blocks", "all"))
            self.local_up = nn.Sequential(
                ConvBlock(ngf, local, 3, 2, 1, transposed=True, **norm),
                ConvBlock(local, 3, 7, 1, 3, pad_mode="reflect", norm="none", act="tanh"),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_local:
            return self.global_net(x)
        coarse = F.avg_pool2d(x, kernel_size=3, stride=2, padding=1, count_include_pad=False)
        features = self.local_down(x) + self.global_net(coarse)
        return self.local_up(self.local_blocks(features))


class Pix2PixHD(GANModel):
    name = "pix2pixhd"
    supported_flags = TRAINER_FLAGS | {"checkpointing", "fusion"}
    eps_sites = {"instance_norm": 1e-5, "adam": 1e-8}
    presets: dict[str, dict[str, Any]] = {
        # tests: a 64x64 batch-2 step takes a few tens of ms on a CPU
        "tiny": dict(label_nc=CITYSCAPES_LABEL_NC, ngf=8, n_downsample=2, n_blocks=2, n_local_enhancers=0,
                     ndf=8, n_layers=2, num_D=2, lambda_feat=10.0, use_vgg=False, vgg_weights=None),
        "small": dict(label_nc=CITYSCAPES_LABEL_NC, ngf=32, n_downsample=3, n_blocks=6, n_local_enhancers=0,
                      ndf=32, n_layers=3, num_D=2, lambda_feat=10.0, use_vgg=False, vgg_weights=None),
        # the published network (global ngf 64, 4 downsamplings, 9 blocks, one local enhancer)
        "paper": dict(label_nc=CITYSCAPES_LABEL_NC, ngf=64, n_downsample=4, n_blocks=9, n_local_enhancers=1,
                      ndf=64, n_layers=3, num_D=2, lambda_feat=10.0, use_vgg=True, vgg_weights=None),
    }

    # ------------------------------------------------------------------ networks and data

    def build(self, preset: str, eps: dict[str, float], flags: SpeedFlags) -> Nets:
        arch = self.arch(preset)
        eps_norm = eps.get("instance_norm", self.eps_sites["instance_norm"])
        in_channels = arch["label_nc"] + 1  # one-hot labels + instance boundary map
        generator = Pix2PixHDGenerator(
            in_channels, arch["ngf"], arch["n_downsample"], arch["n_blocks"], arch["n_local_enhancers"],
            eps=eps_norm, checkpointing=flags.checkpointing,
        )
        discriminator = MultiscaleDiscriminator(in_channels + 3, arch["num_D"], arch["ndf"], arch["n_layers"],
                                                eps=eps_norm)
        aux = nn.ModuleDict({"vgg": VGGLoss(arch["vgg_weights"], fusion=flags.fusion)}) if arch["use_vgg"] else None
        self.hparams = arch
        self.fusion = flags.fusion  # the losses' pointwise chains (models.fusion)
        return Nets(generator=generator, discriminator=discriminator, aux=aux)

    def dataset(self, data_cfg: Any, split: str) -> torch.utils.data.Dataset:
        if data_cfg.kind == "synthetic":
            from orchestrator.data.street import StreetDataset
            return StreetDataset(data_cfg, split, label_nc=self.label_nc())
        if data_cfg.kind == "folder":
            from orchestrator.data.folders import FolderDataset
            return FolderDataset(data_cfg, split, label_nc=self.label_nc())
        raise ValueError(f"pix2pixhd has no data kind {data_cfg.kind!r}; allowed: synthetic, folder")

    # ------------------------------------------------------------------ losses

    @staticmethod
    def generator_input(batch: Batch) -> torch.Tensor:
        """One-hot labels with the instance-boundary map as one more channel."""
        label = batch["label"]
        return torch.cat([label, instance_edges(batch["inst"]).to(label.dtype)], dim=1)

    def discriminator_loss(self, nets: Nets, batch: Batch) -> tuple[torch.Tensor, Logs]:
        x, real = self.generator_input(batch), batch["image"]
        with torch.no_grad():
            fake = nets.generator(x)
        pred_fake = nets.discriminator(torch.cat([x, fake.to(x.dtype)], dim=1))
        pred_real = nets.discriminator(torch.cat([x, real.to(x.dtype)], dim=1))
        loss_fake = gan_loss(pred_fake, False, fusion=self.fusion)
        loss_real = gan_loss(pred_real, True, fusion=self.fusion)
        loss = 0.5 * (loss_fake + loss_real)
        return loss, {"d_real": loss_real.detach(), "d_fake": loss_fake.detach()}

    def generator_loss(self, nets: Nets, batch: Batch) -> tuple[torch.Tensor, Logs]:
        if self.hparams is None:
            raise RuntimeError("call build() before generator_loss(): the loss weights come from the preset")
        x, real = self.generator_input(batch), batch["image"]
        fake = nets.generator(x)
        pred_fake = nets.discriminator(torch.cat([x, fake.to(x.dtype)], dim=1))
        with torch.no_grad():  # real features are targets only
            pred_real = nets.discriminator(torch.cat([x, real.to(x.dtype)], dim=1))
        loss_gan = gan_loss(pred_fake, True, fusion=self.fusion)
        loss_feat = feature_matching_loss(pred_fake, pred_real, self.hparams["lambda_feat"], fusion=self.fusion)
        loss = loss_gan + loss_feat
        logs = {"g_gan": loss_gan.detach(), "g_feat": loss_feat.detach()}
        if self.hparams["use_vgg"]:
            if nets.aux is None or "vgg" not in nets.aux:
                raise RuntimeError("use_vgg is set but nets.aux has no 'vgg' network")
            loss_vgg = self.hparams["lambda_feat"] * nets.aux["vgg"](fake, real.to(fake.dtype))
            loss = loss + loss_vgg
            logs["g_vgg"] = loss_vgg.detach()
        return loss, logs

    def samples(self, nets: Nets, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        fake = nets.generator(self.generator_input(batch))
        return fake, batch["image"]

"""Small, configurable building blocks shared by the GAN families.

Every block takes its normalisation as a name plus an ``eps`` so a model can route its
``instance_norm`` eps site into every norm layer it builds. Discriminators return
their intermediate features so the generator can use feature matching.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

NormKind = Literal["instance", "batch", "layer", "none"]
ActKind = Literal["relu", "lrelu", "tanh", "none"]
PadMode = Literal["zeros", "reflect", "replicate"]


def norm_layer(kind: NormKind, channels: int, eps: float = 1e-5, affine: bool = False) -> nn.Module:
    """``instance`` (no running stats; no affine unless ``affine``, as in pix2pixHD), ``batch``,
    ``layer`` or ``none``.

    ``layer`` is the CNN layer norm of MUNIT's decoder: statistics over (C, H, W) per sample and a
    per-channel scale and shift, i.e. ``GroupNorm`` with one group (so the precision policy keeps it
    fp32 under O2 like every other norm module)."""
    if kind == "instance":
        return nn.InstanceNorm2d(channels, eps=eps, affine=affine, track_running_stats=False)
    if kind == "batch":
        return nn.BatchNorm2d(channels, eps=eps)
    if kind == "layer":
        return nn.GroupNorm(1, channels, eps=eps)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; allowed: instance, batch, layer, none")


def activation(kind: ActKind) -> nn.Module:
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "lrelu":
        return nn.LeakyReLU(0.2, inplace=True)
    if kind == "tanh":
        return nn.Tanh()
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown activation {kind!r}; allowed: relu, lrelu, tanh, none")


class ConvBlock(nn.Sequential):
    """pad -> conv (or transposed conv) -> norm -> activation.

    ``padding`` is applied by an explicit pad layer for ``reflect``/``replicate`` and by the conv
    itself for ``zeros``. A transposed block doubles the resolution when ``stride=2``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 0,
        *,
        pad_mode: PadMode = "zeros",
        norm: NormKind = "instance",
        eps: float = 1e-5,
        act: ActKind = "relu",
        transposed: bool = False,
    ):
        layers: list[nn.Module] = []
        conv_padding = padding
        if padding and pad_mode != "zeros":
            if transposed:
                raise ValueError("transposed ConvBlock supports only pad_mode='zeros'")
            layers.append(nn.ReflectionPad2d(padding) if pad_mode == "reflect" else nn.ReplicationPad2d(padding))
            conv_padding = 0
        if transposed:
            layers.append(nn.ConvTranspose2d(in_channels, out_channels, kernel_size, stride, conv_padding,
                                             output_padding=stride - 1))
        else:
            layers.append(nn.Conv2d(in_channels, out_channels, kernel_size, stride, conv_padding))
        layers += [norm_layer(norm, out_channels, eps), activation(act)]
        super().__init__(*layers)


class ResnetBlock(nn.Module):
    """x + (conv3-norm-act-conv3-norm)(x), channel count preserved."""

    def __init__(self, channels: int, *, norm: NormKind = "instance", eps: float = 1e-5,
                 pad_mode: PadMode = "reflect", act: ActKind = "relu"):
        super().__init__()
        self.body = nn.Sequential(
            ConvBlock(channels, channels, 3, 1, 1, pad_mode=pad_mode, norm=norm, eps=eps, act=act),
            ConvBlock(channels, channels, 3, 1, 1, pad_mode=pad_mode, norm=norm, eps=eps, act="none"),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def maybe_checkpoint(module: nn.Module, *inputs: torch.Tensor, enabled: bool) -> torch.Tensor:
    """``module(*inputs)``, recomputed in the backward pass instead of storing activations when
    ``enabled`` and autograd is recording. Non-reentrant checkpointing, so parameter gradients flow
    even when no input requires grad. Avoid BatchNorm inside (its running stats update twice)."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(module, *inputs, use_reentrant=False)
    return module(*inputs)


class ResnetStack(nn.Module):
    """``n_blocks`` ResnetBlocks applied in turn, each optionally gradient-checkpointed."""

    def __init__(self, channels: int, n_blocks: int, *, norm: NormKind = "instance", eps: float = 1e-5,
                 pad_mode: PadMode = "reflect", checkpointing: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(
            ResnetBlock(channels, norm=norm, eps=eps, pad_mode=pad_mode) for _ in range(n_blocks)
        )
        self.checkpointing = checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = maybe_checkpoint(block, x, enabled=self.checkpointing)
        return x


def instance_edges(inst: torch.Tensor) -> torch.Tensor:
    """Boundary map (N, 1, H, W) of an instance-id map (N, 1, H, W): 1 where a pixel's id differs
    from a 4-neighbour's, else 0; in ``inst``'s dtype. Ids must be exact in that dtype."""
    diff_x = inst[..., :, 1:] != inst[..., :, :-1]
    diff_y = inst[..., 1:, :] != inst[..., :-1, :]
    edge = torch.zeros_like(inst, dtype=torch.bool)
    edge[..., :, 1:] |= diff_x
    edge[..., :, :-1] |= diff_x
    edge[..., 1:, :] |= diff_y
    edge[..., :-1, :] |= diff_y
    return edge.to(inst.dtype)


class FeatureStack(nn.Module):
    """A chain of ``self.blocks`` whose forward returns every block's output, the prediction map
    last: the feature-matching losses compare a discriminator's intermediate features."""

    blocks: nn.ModuleList

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return features


class NLayerDiscriminator(FeatureStack):
    """PatchGAN: a stride-2 conv without norm, ``n_layers - 1`` more stride-2 conv-norm-lrelu
    blocks (channels doubling up to 512), one stride-1 block, and a 1-channel stride-1 conv.

    ``forward`` returns every block's output; the last entry is the patch prediction map."""

    def __init__(self, in_channels: int, ndf: int = 64, n_layers: int = 3, *,
                 norm: NormKind = "instance", eps: float = 1e-5):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        k, p = 4, 2  # kernel 4 with padding 2 (the PatchGAN receptive-field recipe)
        blocks = [ConvBlock(in_channels, ndf, k, 2, p, norm="none", act="lrelu")]
        channels = ndf
        for i in range(1, n_layers + 1):
            out = min(channels * 2, 512)
            stride = 2 if i < n_layers else 1
            blocks.append(ConvBlock(channels, out, k, stride, p, norm=norm, eps=eps, act="lrelu"))
            channels = out
        blocks.append(ConvBlock(channels, 1, k, 1, p, norm="none", act="none"))
        self.blocks = nn.ModuleList(blocks)


class MultiscaleDiscriminator(nn.Module):
    """``num_d`` independent PatchGANs; the i-th sees the input average-pooled i times by 2.

    ``forward`` returns one feature list per scale, full resolution first."""

    def __init__(self, in_channels: int, num_d: int = 2, ndf: int = 64, n_layers: int = 3, *,
                 norm: NormKind = "instance", eps: float = 1e-5):
        super().__init__()
        if num_d < 1:
            raise ValueError(f"num_D must be >= 1, got {num_d}")
        self.scales = nn.ModuleList(
            NLayerDiscriminator(in_channels, ndf, n_layers, norm=norm, eps=eps) for _ in range(num_d)
        )

    @staticmethod
    def downsample(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, kernel_size=3, stride=2, padding=1, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        outputs = []
        for i, disc in enumerate(self.scales):
            if i > 0:
                x = self.downsample(x)
            outputs.append(disc(x))
        return outputs

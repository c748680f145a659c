"""Partial-convolution inpainting (Liu et al., 2018, arXiv 1804.07723): photo with holes -> photo.

Generator: a U-Net of partial convolutions. Encoder: stride-2 layers with 7x7, 5x5, 5x5 then 3x3
kernels, widths ``ngf * 2**i`` capped at ``max_channels`` (paper: 8 layers, 64..512); batch norm in
every layer but the first; ReLU. Decoder: nearest 2x upsampling of features *and* mask, then
concatenation with the encoder's features and mask of that resolution (the last one with the input
image and its mask), a 3x3 partial conv, batch norm, LeakyReLU(0.2); the output layer has neither.
There is no discriminator: ``build`` returns ``Nets(generator, discriminator=None)`` and the
trainer runs the generator step only.

Loss (the paper's weights): ``1 * valid + 6 * hole + 0.05 * perceptual + 120 * (style_out +
style_comp) + 0.1 * tv``: L1 on the valid pixels and on the holes; L1 between VGG features of the
output and of the composite (output in the holes, input elsewhere) and those of the ground truth;
L1 between their Gram matrices; total variation of the composite on the 1-pixel dilation of the
holes. The paper uses VGG16 pool1..pool3; we use ``models.losses.VGGLoss``'s VGG19 relu2_1,
relu3_1, relu4_1 (same resolutions: 1/2, 1/4, 1/8), with weights from a user path or randomly
initialised (``Inpainting.feature_source`` records which).

fp16 hazards, each an eps site the study can search:

* ``pconv_mask`` - the re-normalisation ``window / (sum(M) + eps)``. The count ``sum(M)`` comes out
  of a conv in the half dtype under AMP and the eps is added there; the reciprocal runs in fp32 (as
  AMP runs ``torch.reciprocal``, which ``window / t`` calls, on CUDA). fp16 rounds 1e-8 to exactly
  0, so a window with no valid pixel gives 1/0 = inf and inf * 0 = NaN; 1e-6 survives as an fp16
  subnormal (NVIDIA's fix, 1e-8 -> 1e-6). bf16 keeps 1e-8.
* ``gram_divisor`` - the Gram matrix ``F F^T / (c h w)``. In fp16, ``F F^T`` overflows (65504) long
  before the division and ``1/(c h w)`` itself falls below fp16's normal range (2**-14) for big
  layers. With ``gram_split`` (a preset key, on by default) a layer whose ``c h w`` exceeds
  ``gram_divisor`` applies the factor in two steps of ``1/sqrt(c h w)``: one on an operand, one as
  ``torch.baddbmm``'s alpha. The default 2**14 splits exactly when ``1/(c h w)`` would be an fp16
  subnormal; a huge value (e.g. 1e12) restores the one-step division of fp32 code.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from models.base import TRAINER_FLAGS, Batch, GANModel, Logs, Nets
from models.layers import maybe_checkpoint
from models.losses import VGGLoss
from models import fusion
from orchestrator.settings import SpeedFlags

FP16_TINY = 2.0**-14  # smallest normal fp16 number
VGG_INIT_SEED = 1804_07723  # fixed init of a VGG without weights (the paper's arXiv id)
VGG_LAYERS = (1, 2, 3)  # indices into VGGLoss.features(): relu2_1, relu3_1, relu4_1


# --------------------------------------------------------------------------- partial convolution


@fusion.register("inpainting.pconv_renorm")
def pconv_renorm(raw_out: torch.Tensor, mask_sum: torch.Tensor, bias: Optional[torch.Tensor],
                 window: float, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Partial convolution's re-normalisation, as AMP training runs it.

    ``raw_out`` = conv(x * M) without bias; ``mask_sum`` = conv(M, ones), the number of valid inputs
    under each window, in the dtype the mask conv produced (half under AMP); ``window`` the window
    size K*K*(mask channels); ``eps`` the ``pconv_mask`` eps site. Returns (output, updated mask):

        valid = clamp(sum(M), 0, 1)
        ratio = window * reciprocal_fp32(sum(M) + eps) * valid        (sum(M) + eps in sum(M)'s dtype)
        out   = (raw_out * ratio + bias) * valid

    Output and updated mask are in ``raw_out``'s dtype."""
    denom = (mask_sum + eps).float()
    valid = torch.clamp(mask_sum.float(), 0.0, 1.0)
    ratio = (torch.reciprocal(denom) * window * valid).to(raw_out.dtype)
    valid_out = valid.to(raw_out.dtype)
    out = raw_out * ratio
    if bias is not None:
        out = out + bias
    return out * valid_out, valid_out


def mask_ratio(mask_sum: torch.Tensor, window: float, eps: float) -> torch.Tensor:
    """The re-normalisation factor ``window / (sum(M) + eps)``, zeroed where no input is valid (the
    ratio ``pconv_renorm`` applies, before its cast to the output dtype): fp32."""
    return torch.reciprocal((mask_sum + eps).float()) * window * torch.clamp(mask_sum.float(), 0.0, 1.0)


class PartialConv2d(nn.Conv2d):
    """A convolution that sees only valid pixels and re-normalises by how many it saw.

    ``forward(x, mask)`` with ``mask`` of shape (N, 1, H, W) (one mask for every channel) or
    (N, C_in, H, W) (one per channel, e.g. after a skip concatenation), 1 = valid, 0 = hole. Returns
    ``(out, new_mask)``; ``new_mask`` is (N, 1, H', W'): 1 wherever the window held a valid pixel.
    ``out = (conv(x * M) * window / (sum(M) + eps) + bias) * new_mask``, where ``sum(M)`` is a
    convolution of the mask's channel sum with a ones kernel and ``window`` = K*K*(mask channels).
    ``eps`` is the ``pconv_mask`` eps site; ``fusion`` the speed flag for the re-normalisation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int | None = None, bias: bool = True, *, eps: float = 1e-8, fusion_mode: str = "none"):
        padding = kernel_size // 2 if padding is None else padding
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias=bias)
        self.eps = float(eps)
        self.fusion_mode = fusion_mode
        self.renorm = fusion.fused("inpainting.pconv_renorm", fusion_mode)
        self.register_buffer("mask_kernel", torch.ones(1, 1, kernel_size, kernel_size), persistent=False)

    def mask_sum(self, mask: torch.Tensor) -> torch.Tensor:
        """Valid inputs under each window: conv(sum over channels of M, ones)."""
        if mask.shape[1] not in (1, self.in_channels):
            raise ValueError(f"mask has {mask.shape[1]} channels; expected 1 or {self.in_channels}")
        summed = mask if mask.shape[1] == 1 else mask.sum(dim=1, keepdim=True)
        return F.conv2d(summed, self.mask_kernel.to(summed.dtype), None, self.stride, self.padding, self.dilation)

    def window(self, mask: torch.Tensor) -> float:
        return float(mask.shape[1] * self.kernel_size[0] * self.kernel_size[1])

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            mask_sum = self.mask_sum(mask)
        raw = F.conv2d(x * mask.to(x.dtype), self.weight, None, self.stride, self.padding, self.dilation)
        bias = None if self.bias is None else self.bias.to(raw.dtype).view(1, -1, 1, 1)
        return self.renorm(raw, mask_sum, bias, self.window(mask), self.eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", eps={self.eps:g}"


class PConvLayer(nn.Module):
    """Partial conv -> optional norm -> optional activation; ``forward(x, mask) -> (x, mask)``.

    ``freeze_stats=True`` normalises a training batch norm with the batch statistics as usual but
    leaves its running statistics (and batch count) untouched: a gradient checkpoint's recomputation
    uses it, so they are updated once per step, as without checkpointing."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, *,
                 norm: str, act: str, eps: float, fusion_mode: str = "none", bn_eps: float = 1e-5):
        super().__init__()
        if norm not in ("batch", "instance", "none"):
            raise ValueError(f"unknown norm {norm!r}; allowed: batch, instance, none")
        self.conv = PartialConv2d(in_channels, out_channels, kernel_size, stride, bias=norm == "none",
                                  eps=eps, fusion_mode=fusion_mode)
        if norm == "batch":
            self.norm: nn.Module = nn.BatchNorm2d(out_channels, eps=bn_eps)
        elif norm == "instance":
            self.norm = nn.InstanceNorm2d(out_channels, eps=bn_eps, affine=True)
        else:
            self.norm = nn.Identity()
        if act == "relu":
            self.act: nn.Module = nn.ReLU(inplace=True)
        elif act == "lrelu":
            self.act = nn.LeakyReLU(0.2, inplace=True)
        elif act == "none":
            self.act = nn.Identity()
        else:
            raise ValueError(f"unknown activation {act!r}; allowed: relu, lrelu, none")

    def forward(self, x: torch.Tensor, mask: torch.Tensor,
                freeze_stats: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        x, mask = self.conv(x, mask)
        norm = self.norm
        if freeze_stats and isinstance(norm, nn.BatchNorm2d) and self.training and norm.track_running_stats:
            # the same op as the first pass (a checkpoint compares what both save), but a momentum
            # of 0 leaves the running statistics exactly as they are
            momentum, norm.momentum = norm.momentum, 0.0
            try:
                x = norm(x)
            finally:
                norm.momentum = momentum
                norm.num_batches_tracked.sub_(1)
        else:
            x = norm(x)
        return self.act(x), mask


def _checkpointed(run, *inputs: torch.Tensor, enabled: bool):
    """``run(*inputs, freeze_stats)`` through ``maybe_checkpoint``; the recomputation in the backward
    pass (the second call of the same closure) freezes batch-norm running statistics."""
    calls = [0]

    def once(*args: torch.Tensor):
        calls[0] += 1
        return run(*args, calls[0] > 1)

    return maybe_checkpoint(once, *inputs, enabled=enabled)


class EncoderBlock(nn.Module):
    def __init__(self, layer: PConvLayer, checkpointing: bool):
        super().__init__()
        self.layer, self.checkpointing = layer, checkpointing

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _checkpointed(self.layer, x, mask, enabled=self.checkpointing)


class DecoderBlock(nn.Module):
    """Nearest 2x upsampling of (features, mask), concatenation with the skip's (features, mask),
    partial conv layer."""

    def __init__(self, layer: PConvLayer, checkpointing: bool):
        super().__init__()
        self.layer, self.checkpointing = layer, checkpointing

    def _run(self, x: torch.Tensor, mask: torch.Tensor, skip: torch.Tensor, skip_mask: torch.Tensor,
             freeze_stats: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        mask = F.interpolate(mask, scale_factor=2.0, mode="nearest")
        skip = skip.to(x.dtype)
        n, c_up, h, w = x.shape
        masks = torch.cat([mask.to(x.dtype).expand(n, c_up, h, w),
                           skip_mask.to(x.dtype).expand(n, skip.shape[1], h, w)], dim=1)
        return self.layer(torch.cat([x, skip], dim=1), masks, freeze_stats)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, skip: torch.Tensor,
                skip_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _checkpointed(self._run, x, mask, skip, skip_mask, enabled=self.checkpointing)


def encoder_kernels(n_layers: int) -> list[int]:
    """The paper's kernel sizes: 7, 5, 5, then 3."""
    return [7, 5, 5, *[3] * max(n_layers - 3, 0)][:n_layers]


class PConvUNet(nn.Module):
    """``forward(image, mask) -> output`` (N, 3, H, W), no output activation (as in the paper).
    ``image`` is the masked photo in [-1, 1]; ``mask`` (N, 1, H, W), 1 = valid. H and W must be
    divisible by ``2**n_layers``."""

    def __init__(self, ngf: int = 64, max_channels: int = 512, n_layers: int = 8, *, norm: str = "batch",
                 eps: float = 1e-8, checkpointing: str = "none", fusion_mode: str = "none", in_channels: int = 3):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        self.n_layers = n_layers
        ckpt = checkpointing in ("blocks", "all")
        self.checkpoint_blocks = ckpt
        widths = [min(ngf * 2**i, max_channels) for i in range(n_layers)]
        common = dict(eps=eps, fusion_mode=fusion_mode)
        self.encoder = nn.ModuleList()
        previous = in_channels
        for i, (width, k) in enumerate(zip(widths, encoder_kernels(n_layers))):
            layer = PConvLayer(previous, width, k, 2, norm="none" if i == 0 else norm, act="relu", **common)
            self.encoder.append(EncoderBlock(layer, ckpt))
            previous = width
        # decoder i (deepest first) joins the upsampled features with encoder level i-1's output
        skips = [in_channels] + widths[:-1]
        self.decoder = nn.ModuleList()
        for j, skip in enumerate(reversed(skips)):
            last = j == n_layers - 1
            out = in_channels if last else skip
            layer = PConvLayer(previous + skip, out, 3, 1, norm="none" if last else norm,
                               act="none" if last else "lrelu", **common)
            self.decoder.append(DecoderBlock(layer, ckpt))
            previous = out

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        factor = 2**self.n_layers
        if image.shape[-2] % factor or image.shape[-1] % factor:
            raise ValueError(f"image size {tuple(image.shape[-2:])} is not divisible by 2**n_layers = {factor}")
        x, m = image, mask
        skips = [(x, m)]
        for block in self.encoder:
            x, m = block(x, m)
            skips.append((x, m))
        skips.pop()  # the bottleneck is the decoder's input, not a skip
        for block in self.decoder:
            skip, skip_mask = skips.pop()
            x, m = block(x, m, skip, skip_mask)
        return x


# --------------------------------------------------------------------------- losses


def gram_matrix(features: torch.Tensor, split: bool = True, divisor: float = 2.0**14) -> torch.Tensor:
    """(N, C, C) Gram matrix ``F F^T / (C H W)`` of (N, C, H, W) features, in their dtype.

    ``split`` and ``C*H*W > divisor``: the factor is applied in two steps of ``1/sqrt(C H W)``, one
    on an operand before the product and one as ``torch.baddbmm``'s alpha, so neither the product
    nor the factor leaves fp16's range. Otherwise one step: ``bmm(F, F^T) / (C H W)`` (fp32 code;
    in fp16 the product overflows first for large layers)."""
    n, c, h, w = features.shape
    flat = features.reshape(n, c, h * w)
    size = c * h * w
    if not split or size <= divisor:
        return torch.bmm(flat, flat.transpose(1, 2)) / size
    first = math.sqrt(size)
    out = torch.empty(n, c, c, dtype=flat.dtype, device=flat.device)
    return torch.baddbmm(out, flat / first, flat.transpose(1, 2), beta=0.0, alpha=1.0 / (size / first))


def hole_tv_loss(comp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Total variation of ``comp`` over neighbouring pixel pairs that both lie in the 1-pixel
    dilation of the holes, each direction's L1 sum divided by ``comp.numel()`` (the paper's L_tv). fp32."""
    region = F.max_pool2d(1.0 - mask.float(), kernel_size=3, stride=1, padding=1)
    comp = comp.float()
    dx = (comp[..., :, 1:] - comp[..., :, :-1]).abs() * (region[..., :, 1:] * region[..., :, :-1])
    dy = (comp[..., 1:, :] - comp[..., :-1, :]).abs() * (region[..., 1:, :] * region[..., :-1, :])
    return (dx.sum() + dy.sum()) / comp.numel()


class Inpainting(GANModel):
    name = "inpainting"
    supported_flags = TRAINER_FLAGS | {"checkpointing", "fusion"}
    # pconv_mask: 1e-8 was the fp32 code's; NVIDIA's fp16 fix is 1e-6. gram_divisor: 2**14 splits
    # the Gram factor exactly when it would be an fp16 subnormal (harmless in fp32)
    eps_sites = {"adam": 1e-8, "pconv_mask": 1e-8, "gram_divisor": 2.0**14}
    presets: dict[str, dict[str, Any]] = {
        # tests: a 32x32 batch-2 fp32 step (VGG included) takes well under 0.5 s on a CPU
        "tiny": dict(ngf=8, max_channels=32, n_layers=4, norm="batch", lambda_valid=1.0, lambda_hole=6.0,
                     lambda_perceptual=0.05, lambda_style=120.0, lambda_tv=0.1, use_vgg=True, vgg_weights=None,
                     gram_split=True, lr=2e-4),
        "small": dict(ngf=32, max_channels=256, n_layers=6, norm="batch", lambda_valid=1.0, lambda_hole=6.0,
                      lambda_perceptual=0.05, lambda_style=120.0, lambda_tv=0.1, use_vgg=True, vgg_weights=None,
                      gram_split=True, lr=2e-4),
        # the published network: 512x512 input, 8 encoder layers 64..512, paper's loss weights and lr
        "paper": dict(ngf=64, max_channels=512, n_layers=8, norm="batch", lambda_valid=1.0, lambda_hole=6.0,
                      lambda_perceptual=0.05, lambda_style=120.0, lambda_tv=0.1, use_vgg=True, vgg_weights=None,
                      gram_split=True, lr=2e-4),
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.eps: dict[str, float] = dict(self.eps_sites)
        self.feature_source: str | None = None  # "random-init" or the VGG weights path, set by build

    # ------------------------------------------------------------------ networks and data

    def build(self, preset: str, eps: dict[str, float], flags: SpeedFlags) -> Nets:
        arch = self.arch(preset)
        self.eps = {**self.eps_sites, **eps}
        generator = PConvUNet(arch["ngf"], arch["max_channels"], arch["n_layers"], norm=arch["norm"],
                              eps=self.eps["pconv_mask"], checkpointing=flags.checkpointing,
                              fusion_mode=flags.fusion)
        aux = None
        self.feature_source = None
        if arch["use_vgg"]:
            # a random-init VGG is part of the loss's definition: the same for every run and seed
            # (the trainer neither seeds nor checkpoints aux networks), and it leaves the global RNG alone
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(VGG_INIT_SEED)
                vgg = VGGLoss(arch["vgg_weights"], fusion=flags.fusion)
            self.feature_source = vgg.weights_source
            aux = nn.ModuleDict({"vgg": vgg})
        self.hparams = arch
        self.fusion = flags.fusion
        return Nets(generator=generator, discriminator=None, aux=aux)

    def dataset(self, data_cfg: Any, split: str) -> torch.utils.data.Dataset:
        if data_cfg.kind not in ("synthetic", "folder"):
            raise ValueError(f"inpainting has no data kind {data_cfg.kind!r}; allowed: synthetic, folder")
        from orchestrator.data.photos import PhotoInpaintingDataset
        return PhotoInpaintingDataset(data_cfg, split)

    def param_groups(self, nets: Nets) -> dict[str, dict[str, Any]]:
        lr = float(self.hparams["lr"]) if self.hparams is not None else float(self.options.get("lr", 2e-4))
        return {"generator": {"lr": lr, "betas": (0.9, 0.999)}}  # the paper's Adam

    # ------------------------------------------------------------------ losses

    @staticmethod
    def complete(nets: Nets, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw output, composite): the generator sees the photo with its holes zeroed; the
        composite keeps the known pixels and takes the output in the holes."""
        real, mask = batch["image"], batch["mask"].to(batch["image"].dtype)
        out = nets.generator(real * mask, mask)
        mask_o = mask.to(out.dtype)
        comp = mask_o * real.to(out.dtype) + (1 - mask_o) * out
        return out, comp

    def generator_loss(self, nets: Nets, batch: Batch) -> tuple[torch.Tensor, Logs]:
        if self.hparams is None:
            raise RuntimeError("call build() before generator_loss(): the loss weights come from the preset")
        hp = self.hparams
        real, mask = batch["image"], batch["mask"]
        out, comp = self.complete(nets, batch)
        mask32 = mask.float()
        diff = (out.float() - real.float()).abs()
        loss_valid = (mask32 * diff).mean()
        loss_hole = ((1 - mask32) * diff).mean()
        loss_tv = hole_tv_loss(comp, mask)
        loss = hp["lambda_valid"] * loss_valid + hp["lambda_hole"] * loss_hole + hp["lambda_tv"] * loss_tv
        logs = {"g_valid": loss_valid.detach(), "g_hole": loss_hole.detach(),
                "g_tv": loss_tv.detach()}
        if hp["use_vgg"]:
            if nets.aux is None or "vgg" not in nets.aux:
                raise RuntimeError("use_vgg is set but nets.aux has no 'vgg' network")
            loss_perc, loss_style = self.feature_losses(nets.aux["vgg"], out, comp, real)
            loss = loss + hp["lambda_perceptual"] * loss_perc + hp["lambda_style"] * loss_style
            logs.update(g_perceptual=loss_perc.detach(), g_style=loss_style.detach())
        return loss, logs

    def feature_losses(self, vgg: VGGLoss, out: torch.Tensor, comp: torch.Tensor,
                       real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(perceptual, style), each summed over the feature layers and over output and composite."""
        l1 = fusion.fused("l1_mean", self.fusion)
        split, divisor = bool(self.hparams["gram_split"]), float(self.eps["gram_divisor"])
        n = out.shape[0]
        feats = vgg.features(torch.cat([out, comp], dim=0))
        with torch.no_grad():
            target = vgg.features(real.to(out.dtype))
        perceptual, style = out.new_zeros((), dtype=torch.float32), out.new_zeros((), dtype=torch.float32)
        for i in VGG_LAYERS:
            f_out, f_comp, f_real = feats[i][:n], feats[i][n:], target[i].to(feats[i].dtype)
            g_real = gram_matrix(f_real, split, divisor)
            for f in (f_out, f_comp):
                perceptual = perceptual + l1(f, f_real)
                style = style + l1(gram_matrix(f, split, divisor), g_real)
        return perceptual, style

    def samples(self, nets: Nets, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        _, comp = self.complete(nets, batch)
        return comp, batch["image"]

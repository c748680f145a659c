"""Building blocks of the unsupervised image-to-image translation family (UNIT, MUNIT, FUNIT,
COCO-FUNIT), as imaginaire structures them: content encoders, style (class) encoders, the MLP that
maps a style code to AdaIN parameters, decoders whose normalisation is adaptive instance norm, and
the discriminators (multi-resolution patch discriminators, the projection discriminator).

Conventions:

* A conv :class:`Unit` is ``pad -> conv -> norm -> act`` (order ``"CNA"``) or the pre-activation
  ``norm -> act -> pad -> conv`` (``"NAC"``). Its norm is described by a :class:`Norm`, so a model
  routes each eps site (``instance_norm``, ``adain``, ``layer_norm``) into exactly the layers it
  names. A unit whose norm is :class:`AdaIN` is *conditional*: it takes the style vector too.
* Spectral norm (``sn_eps`` not None) uses SPADE's :class:`~models.spade.SNConv2d`: its power
  iteration runs once per network pass, in fp32 (see models/spade.py); every network here that may
  hold one calls :func:`~models.spade.begin_pass` at the start of its ``forward``.
* Under O2 the precision policy keeps ``InstanceNorm2d`` and ``GroupNorm`` modules in fp32; AdaIN's
  parameter-free instance norm is such a module, its projection is an ordinary (half) ``Linear``.
* Networks with one sub-network per domain are ``nn.ModuleDict``s keyed ``"a"`` and ``"b"`` with a
  ``forward`` of their own (:class:`TwoDomainDiscriminator`, the models' generators), so the trainer
  calls one module per network (DDP wraps it) as ``models.base.GANModel`` requires.
* :class:`TranslationModel` and :class:`TwoDomainModel` hold what the four ``GANModel``s share.
"""
from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.base import TRAINER_FLAGS, Batch, GANModel, Logs, Nets
from models.layers import FeatureStack, maybe_checkpoint, norm_layer
from models.losses import gan_loss
from models.spade import INIT_POWER_ITERATIONS, SNConv2d, begin_pass
from orchestrator.settings import SpeedFlags

Order = Literal["CNA", "NAC"]
Act = Literal["relu", "lrelu", "tanh", "none"]
INIT_KINDS = ("normal", "orthogonal", "xavier", "kaiming", "none")


# --------------------------------------------------------------------------- norms and units


class AdaIN(nn.Module):
    """Adaptive instance norm: a parameter-free instance norm of ``x`` (eps ``eps``, the ``adain``
    eps site) followed by ``x * (1 + gamma) + beta``, gamma and beta projected from the style vector
    by a linear layer of this layer's own (imaginaire's ``AdaptiveNorm`` with projection)."""

    conditional = True

    def __init__(self, channels: int, cond_dim: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.InstanceNorm2d(channels, eps=eps, affine=False, track_running_stats=False)
        self.fc = nn.Linear(cond_dim, 2 * channels)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.fc(style.to(self.fc.weight.dtype)).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        normalized = self.norm(x)
        return normalized * (1 + gamma.to(normalized.dtype)) + beta.to(normalized.dtype)


@dataclass(frozen=True)
class Norm:
    """How a unit normalises: ``kind`` is ``instance`` (``affine`` optional), ``layer``, ``adain``
    (needs ``cond_dim``) or ``none``; ``eps`` is the eps site's value."""

    kind: str = "none"
    eps: float = 1e-5
    affine: bool = False
    cond_dim: int = 0

    def make(self, channels: int) -> nn.Module:
        if self.kind == "adain":
            if self.cond_dim < 1:
                raise ValueError("an adain norm needs cond_dim >= 1")
            return AdaIN(channels, self.cond_dim, self.eps)
        return norm_layer(self.kind, channels, self.eps, affine=self.affine)  # type: ignore[arg-type]


NO_NORM = Norm()


def param_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s first floating parameter: what its convs compute in without
    autocast (O3), so inputs kept in fp32 (``fp32_batch_keys``) are cast to it on entry."""
    return next(p.dtype for p in module.parameters() if p.is_floating_point())


def make_activation(kind: Act, inplace: bool = True) -> nn.Module:
    if kind == "relu":
        return nn.ReLU(inplace=inplace)
    if kind == "lrelu":
        return nn.LeakyReLU(0.2, inplace=inplace)
    if kind == "tanh":
        return nn.Tanh()
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown activation {kind!r}; allowed: relu, lrelu, tanh, none")


def make_conv(cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, *,
              sn_eps: float | None = None, bias: bool = True) -> nn.Conv2d:
    """A plain conv, or a spectral-normalised one when ``sn_eps`` is given."""
    if sn_eps is None:
        return nn.Conv2d(cin, cout, kernel, stride, padding, bias=bias)
    return SNConv2d(cin, cout, kernel, stride, padding, bias=bias, eps=sn_eps)


class Unit(nn.Module):
    """``pad -> conv -> norm -> act`` (``"CNA"``) or ``norm -> act -> pad -> conv`` (``"NAC"``).

    ``padding`` defaults to ``kernel // 2``; ``pad_mode`` ``reflect`` pads with a layer of its own,
    ``zeros`` inside the conv. The norm acts on the conv's output channels (CNA) or input channels
    (NAC). An activation that comes first in a block without norm does not work in place: it would
    overwrite the block's input, which the residual shortcut still needs."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, *, norm: Norm = NO_NORM,
                 act: Act = "relu", order: Order = "CNA", pad_mode: str = "reflect", padding: int | None = None,
                 sn_eps: float | None = None, bias: bool = True, fp32: bool = False):
        super().__init__()
        if order not in ("CNA", "NAC"):
            raise ValueError(f"unknown order {order!r}; allowed: CNA, NAC")
        if fp32 and (order != "CNA" or norm.kind not in ("instance", "layer", "none")):
            raise ValueError("an fp32 unit must be CNA with an instance, layer or no norm")
        self.fp32 = fp32
        pad = kernel // 2 if padding is None else padding
        self.order = order
        if pad and pad_mode == "reflect":
            self.pad: nn.Module = nn.ReflectionPad2d(pad)
            conv_pad = 0
        elif pad_mode in ("reflect", "zeros"):
            self.pad, conv_pad = nn.Identity(), pad
        else:
            raise ValueError(f"unknown pad_mode {pad_mode!r}; allowed: reflect, zeros")
        self.conv = make_conv(cin, cout, kernel, stride, conv_pad, sn_eps=sn_eps, bias=bias)
        self.norm = norm.make(cout if order == "CNA" else cin)
        self.conditional = isinstance(self.norm, AdaIN)
        self.act = make_activation(act, inplace=not (order == "NAC" and norm.kind == "none"))

    def _norm(self, x: torch.Tensor, style: torch.Tensor | None) -> torch.Tensor:
        return self.norm(x, style) if self.conditional else self.norm(x)

    def forward(self, x: torch.Tensor, style: torch.Tensor | None = None) -> torch.Tensor:
        if self.fp32:
            return self._forward_fp32(x)
        if self.order == "CNA":
            return self.act(self._norm(self.conv(self.pad(x)), style))
        return self.conv(self.pad(self.act(self._norm(x, style))))

    def _forward_fp32(self, x: torch.Tensor) -> torch.Tensor:
        """conv, norm and activation in fp32 whatever the weights' dtype and autocast say; the
        result in ``x``'s dtype. (The functional calls bypass the precision policy's norm hooks,
        which would only cast fp32 to fp32 here.)"""
        conv, norm = self.conv, self.norm
        with torch.autocast(x.device.type, enabled=False):
            weight = conv.normalized_weight() if isinstance(conv, SNConv2d) else conv.weight
            bias = None if conv.bias is None else conv.bias.float()
            y = F.conv2d(self.pad(x.float()), weight.float(), bias, conv.stride, conv.padding)
            affine = [None if t is None else t.float() for t in (getattr(norm, "weight", None),
                                                                 getattr(norm, "bias", None))]
            if isinstance(norm, nn.InstanceNorm2d):
                y = F.instance_norm(y, None, None, affine[0], affine[1], True, 0.0, norm.eps)
            elif isinstance(norm, nn.GroupNorm):
                y = F.group_norm(y, norm.num_groups, affine[0], affine[1], norm.eps)
            y = self.act(y)
        return y.to(x.dtype)


class ResBlock(nn.Module):
    """Two units (``order`` ``"CNA"``: conv-norm-act twice, ``"NAC"``: pre-activation) plus a
    shortcut, optionally after a nearest x2 upsampling of the input (FUNIT's up-residual blocks).

    The hidden width is ``min(cin, cout)`` or ``cout`` (``hidden_is_out``). The shortcut is the
    identity when the widths match and ``learn_shortcut`` is off, else a 1x1 conv unit with
    ``shortcut_norm`` and ``shortcut_act`` (plain 1x1 conv by default)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, *, norm: Norm = NO_NORM, act: Act = "relu",
                 order: Order = "NAC", pad_mode: str = "reflect", sn_eps: float | None = None,
                 upsample: bool = False, hidden_is_out: bool = False, learn_shortcut: bool | None = None,
                 shortcut_norm: Norm = NO_NORM, shortcut_act: Act = "none"):
        super().__init__()
        hidden = cout if hidden_is_out else min(cin, cout)
        unit = dict(norm=norm, act=act, order=order, pad_mode=pad_mode, sn_eps=sn_eps)
        self.unit_0 = Unit(cin, hidden, kernel, **unit)
        self.unit_1 = Unit(hidden, cout, kernel, **unit)
        learn = (cin != cout) if learn_shortcut is None else learn_shortcut
        self.shortcut = (Unit(cin, cout, 1, norm=shortcut_norm, act=shortcut_act, order="CNA", sn_eps=sn_eps)
                         if learn else None)
        self.upsample = upsample
        self.conditional = any(getattr(m, "conditional", False) for m in (self.unit_0, self.unit_1, self.shortcut))

    def forward(self, x: torch.Tensor, style: torch.Tensor | None = None) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        dx = self.unit_1(self.unit_0(x, style), style)
        return (x if self.shortcut is None else self.shortcut(x, style)) + dx


def apply_blocks(blocks: Sequence[nn.Module], x: torch.Tensor, style: torch.Tensor | None,
                 checkpoint_kinds: tuple[type, ...] = ()) -> torch.Tensor:
    """Run ``blocks`` in turn, handing ``style`` to conditional ones; blocks that are instances of
    ``checkpoint_kinds`` are gradient-checkpointed."""
    for block in blocks:
        inputs = (x, style) if getattr(block, "conditional", False) else (x,)
        x = maybe_checkpoint(block, *inputs, enabled=isinstance(block, checkpoint_kinds))
    return x


def checkpoint_kinds(mode: str) -> tuple[type, ...]:
    """Which blocks the ``checkpointing`` flag recomputes: ``blocks`` the residual blocks, ``all``
    every unit too."""
    return {"none": (), "blocks": (ResBlock,), "all": (ResBlock, Unit)}[mode]


# --------------------------------------------------------------------------- encoders, MLP, decoder


class ContentEncoder(nn.Module):
    """7x7 conv unit, ``n_down`` stride-2 4x4 conv units (widths doubling up to ``max_width``), then
    ``n_res`` residual blocks (``res_order`` ``NAC``: imaginaire's pre-activation UNIT/MUNIT
    blocks; ``CNA``: FUNIT's). Every norm is an affine instance norm (the ``instance_norm`` site).

    ``fp32_stem`` computes the first unit (7x7 conv, instance norm, ReLU) in fp32 whatever the
    precision: an image without texture (fog, a snow field, a studio backdrop: one colour plus 8-bit
    dither) makes that conv's output a large offset with a tiny variation, fp16 keeps 11 bits of the
    offset and so loses most of the variation, and the instance norm scales what is left to unit
    size: the fp16 generator then departs from the fp32 one ~10-20x more than on textured images
    (tests/test_funit.py and the others measure it). Its cost is one 3-channel conv layer."""

    def __init__(self, nf: int, n_down: int, n_res: int, *, max_width: int | None = None, eps: float = 1e-5,
                 res_order: Order = "NAC", sn_eps: float | None = None, checkpointing: str = "none",
                 fp32_stem: bool = False):
        super().__init__()
        norm = Norm("instance", eps, affine=True)
        layers: list[nn.Module] = [Unit(3, nf, 7, norm=norm, sn_eps=sn_eps, fp32=fp32_stem)]
        width = nf
        for _ in range(n_down):
            nxt = width * 2 if max_width is None else min(width * 2, max_width)
            layers.append(Unit(width, nxt, 4, 2, padding=1, norm=norm, sn_eps=sn_eps))
            width = nxt
        layers += [ResBlock(width, width, norm=norm, order=res_order, sn_eps=sn_eps) for _ in range(n_res)]
        self.blocks = nn.ModuleList(layers)
        self.out_channels = width
        self.checkpointing = checkpoint_kinds(checkpointing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem = self.blocks[0]
        x = stem(x if stem.fp32 else x.to(param_dtype(stem)))
        return apply_blocks(self.blocks[1:], x.to(param_dtype(self.blocks[1])), None, self.checkpointing)


class StyleEncoder(nn.Module):
    """MUNIT's style encoder, FUNIT's class encoder: a 7x7 conv, two stride-2 4x4 convs doubling the
    width, ``n_down - 2`` more keeping it, global average pooling and a 1x1 conv to ``style_dim``.
    No normalisation (instance norm would remove the very statistics that are the style)."""

    def __init__(self, nf: int, n_down: int, style_dim: int, *, sn_eps: float | None = None):
        super().__init__()
        if n_down < 2:
            raise ValueError(f"the style encoder needs n_down >= 2, got {n_down}")
        layers: list[nn.Module] = [Unit(3, nf, 7, sn_eps=sn_eps)]
        width = nf
        for i in range(n_down):
            nxt = width * 2 if i < 2 else width
            layers.append(Unit(width, nxt, 4, 2, padding=1, sn_eps=sn_eps))
            width = nxt
        self.body = nn.Sequential(*layers)
        self.out = make_conv(width, style_dim, 1, sn_eps=sn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.adaptive_avg_pool2d(self.body(x.to(param_dtype(self))), 1)).flatten(1)


class MLP(nn.Module):
    """``n_layers`` Linear + ReLU layers (the last one too, as imaginaire's): ``in -> hidden ... -> out``."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, n_layers: int):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"an MLP needs n_layers >= 1, got {n_layers}")
        dims = [in_dim] + [hidden] * (n_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.flatten(1))


class Decoder(nn.Module):
    """Residual blocks, upsampling stages and a 7x7 conv + tanh to RGB, as a model assembles them
    (``blocks``); conditional blocks receive the (MLP-mapped) style vector."""

    def __init__(self, blocks: Sequence[nn.Module], out_channels: int, *, checkpointing: str = "none"):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.to_rgb = Unit(out_channels, 3, 7, act="tanh")
        self.checkpointing = checkpoint_kinds(checkpointing)

    def forward(self, x: torch.Tensor, style: torch.Tensor | None = None) -> torch.Tensor:
        return self.to_rgb(apply_blocks(self.blocks, x, style, self.checkpointing))


def upsampling_units(width: int, n_up: int, norm: Norm, sn_eps: float | None = None) -> list[nn.Module]:
    """UNIT's and MUNIT's upsampling: ``n_up`` x (nearest x2, 5x5 conv unit halving the width)."""
    out: list[nn.Module] = []
    for _ in range(n_up):
        out += [nn.Upsample(scale_factor=2, mode="nearest"), Unit(width, width // 2, 5, norm=norm, sn_eps=sn_eps)]
        width //= 2
    return out


# --------------------------------------------------------------------------- discriminators


class PatchDiscriminator(FeatureStack):
    """imaginaire's n-layer patch discriminator: a stride-2 conv + LeakyReLU, ``n_layers`` more
    (widths doubling up to ``max_width``, stride 2 but the last), a conv to one channel; zero
    padding, no norm. ``forward`` returns every layer's output, the prediction map last."""

    def __init__(self, nf: int, n_layers: int, *, kernel: int = 3, max_width: int = 512, sn_eps: float | None = None):
        super().__init__()
        unit = dict(act="lrelu", pad_mode="zeros", sn_eps=sn_eps)
        layers: list[nn.Module] = [Unit(3, nf, kernel, 2, **unit)]
        width = nf
        for i in range(n_layers):
            nxt = min(width * 2, max_width)
            layers.append(Unit(width, nxt, kernel, 2 if i < n_layers - 1 else 1, **unit))
            width = nxt
        layers.append(Unit(width, 1, kernel, act="none", pad_mode="zeros", sn_eps=sn_eps))
        self.blocks = nn.ModuleList(layers)


class MultiResPatchDiscriminator(nn.Module):
    """``num_scales`` patch discriminators, the i-th on the input bilinearly halved i times;
    ``shared`` uses one discriminator for every scale (UNIT's weight-shared variant). Returns one
    feature list per scale (what ``models.losses.gan_loss`` and ``feature_matching_loss`` take)."""

    def __init__(self, nf: int, n_layers: int, num_scales: int, *, shared: bool = False, kernel: int = 3,
                 max_width: int = 512, sn_eps: float | None = None):
        super().__init__()
        if num_scales < 1:
            raise ValueError(f"num_scales must be >= 1, got {num_scales}")
        count = 1 if shared else num_scales
        self.scales = nn.ModuleList(PatchDiscriminator(nf, n_layers, kernel=kernel, max_width=max_width,
                                                       sn_eps=sn_eps) for _ in range(count))
        self.num_scales = num_scales

    def forward(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        outputs = []
        for i in range(self.num_scales):
            if i:
                x = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=True)
            outputs.append(self.scales[min(i, len(self.scales) - 1)](x))
        return outputs


class TwoDomainDiscriminator(nn.ModuleDict):
    """One discriminator per domain (keys ``a``, ``b``); ``forward(x_a, x_b)`` runs both (one
    network pass: one power iteration for every spectral-normalised conv) and returns
    ``(outputs_a, outputs_b)``."""

    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__({"a": a, "b": b})

    def forward(self, x_a: torch.Tensor, x_b: torch.Tensor):
        begin_pass(self)
        return self["a"](x_a.to(param_dtype(self["a"]))), self["b"](x_b.to(param_dtype(self["b"])))


class ProjectionDiscriminator(nn.Module):
    """FUNIT's residual projection discriminator over the training classes: a 7x7 conv, then per
    level two pre-activation residual blocks (LeakyReLU, no norm; the second widens, up to
    ``max_width``) and, between levels, a 3x3 stride-2 average pool; a LeakyReLU + 1x1 conv
    classifier map plus the projection ``<embedding[class], mean-pooled features>``.

    ``forward(images, labels)`` returns ``(logits (N, 1, h, w), pooled features (N, C))``."""

    def __init__(self, nf: int, n_layers: int, num_classes: int, *, max_width: int = 1024,
                 sn_eps: float | None = None):
        super().__init__()
        res = dict(act="lrelu", order="NAC", sn_eps=sn_eps)
        layers: list[nn.Module] = [Unit(3, nf, 7, act="none", sn_eps=sn_eps)]
        width = nf
        for i in range(n_layers):
            nxt = min(width * 2, max_width)
            layers += [ResBlock(width, width, **res), ResBlock(width, nxt, **res)]
            if i != n_layers - 1:
                layers += [nn.ReflectionPad2d(1), nn.AvgPool2d(3, stride=2)]
            width = nxt
        self.body = nn.Sequential(*layers)
        self.classifier = Unit(width, 1, 1, act="lrelu", order="NAC", sn_eps=sn_eps)
        self.embedding = nn.Embedding(num_classes, width)
        self.num_classes = num_classes

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        begin_pass(self)
        features = self.body(images.to(param_dtype(self.body)))
        pooled = features.mean(dim=(2, 3))
        projection = (self.embedding(labels).to(pooled.dtype) * pooled).sum(dim=1)
        logits = self.classifier(features)
        return logits + projection.view(-1, 1, 1, 1).to(logits.dtype), pooled


# --------------------------------------------------------------------------- init and sizes


def init_weights(network: nn.Module, kind: str = "none", gain: float = 1.0) -> None:
    """Initialise every conv and linear weight (``normal``: N(0, gain^2), ``orthogonal``,
    ``xavier`` (normal), ``kaiming`` (normal, fan-in), ``none``: torch's default), zero their biases
    (except with ``none``), then warm-start every spectral-norm power iteration on the new weights.
    Meta tensors (parameter counting) are left alone."""
    if kind not in INIT_KINDS:
        raise ValueError(f"unknown init {kind!r}; allowed: {', '.join(INIT_KINDS)}")
    if any(p.is_meta for p in network.parameters()):
        return
    if kind != "none":
        for module in network.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                if kind == "normal":
                    nn.init.normal_(module.weight, 0.0, gain)
                elif kind == "orthogonal":
                    nn.init.orthogonal_(module.weight, gain=gain)
                elif kind == "xavier":
                    nn.init.xavier_normal_(module.weight, gain=gain)
                else:
                    nn.init.kaiming_normal_(module.weight, a=0, mode="fan_in")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
    for module in network.modules():
        if isinstance(module, SNConv2d):
            module.power_iteration(INIT_POWER_ITERATIONS)


def check_divisible(images: torch.Tensor, factor: int, what: str) -> None:
    """``images`` (..., H, W) must have H and W divisible by ``factor``."""
    h, w = images.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"{what} needs height and width divisible by {factor}, got {h}x{w}")


def count_parameters(module: nn.Module) -> int:
    """Distinct parameters (a weight shared between domains counts once)."""
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- what the models share


def l1(fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Mean absolute error, ``real`` in ``fake``'s dtype."""
    return F.l1_loss(fake, real.to(fake.dtype))


def detached(**values: torch.Tensor) -> Logs:
    """Loss terms as logs: detached fp32 tensors (no host read; bf16 ones numpy cannot average)."""
    return {name: value.detach().float() for name, value in values.items()}


class TranslationModel(GANModel):
    """What UNIT, MUNIT, FUNIT and COCO-FUNIT share: ``build`` resolves the preset into
    ``hparams`` (which holds the loss weights) and hands it to :meth:`networks`; one Adam setting
    per network from the class attributes ``g_lr``, ``d_lr``, ``betas``."""

    supported_flags = TRAINER_FLAGS | {"checkpointing"}
    g_lr, d_lr, betas = 1e-4, 1e-4, (0.5, 0.999)

    @abstractmethod
    def networks(self, arch: dict[str, Any], eps: dict[str, float], checkpointing: str) -> tuple[nn.Module, nn.Module]:
        """(generator, discriminator), initialised, for the resolved preset ``arch``."""

    def build(self, preset: str, eps: dict[str, float], flags: SpeedFlags) -> Nets:
        arch = self.arch(preset)
        generator, discriminator = self.networks(arch, {**self.eps_sites, **eps}, flags.checkpointing)
        self.hparams = arch
        return Nets(generator=generator, discriminator=discriminator)

    def param_groups(self, nets: Nets) -> dict[str, dict[str, Any]]:
        return {"generator": {"lr": self.g_lr, "betas": self.betas},
                "discriminator": {"lr": self.d_lr, "betas": self.betas}}

    def hp(self) -> dict[str, Any]:
        if self.hparams is None:
            raise RuntimeError("call build() before the losses: the loss weights come from the preset")
        return self.hparams


class TwoDomainModel(TranslationModel):
    """UNIT and MUNIT: the two-domain data, and the adversarial losses (``gan_mode``) of one
    discriminator per domain. The generator's ``forward(x_a, x_b, translate_only=True)`` returns
    ``(x_ab, x_ba)``; the discriminator's ``forward(x_a, x_b)`` scores images of each domain."""

    gan_mode = "lsgan"
    # images that meet the content encoders' fp32 stem stay fp32 under O2/O3 (see ContentEncoder)
    fp32_batch_keys = ("image_a", "image_b")

    def dataset(self, data_cfg: Any, split: str) -> torch.utils.data.Dataset:
        if data_cfg.kind != "synthetic":
            raise ValueError(f"{self.name} has no data kind {data_cfg.kind!r}; allowed: synthetic")
        from orchestrator.data.two_domain import TwoDomainDataset
        return TwoDomainDataset(data_cfg, split)

    def discriminator_loss(self, nets: Nets, batch: Batch) -> tuple[torch.Tensor, Logs]:
        real_a, real_b = batch["image_a"], batch["image_b"]
        with torch.no_grad():
            fake_ab, fake_ba = nets.generator(real_a, real_b, translate_only=True)
        # one pass per domain's discriminator over its reals and the translations into it
        out_a, out_b = nets.discriminator(torch.cat([real_a, fake_ba.to(real_a.dtype)]),
                                          torch.cat([real_b, fake_ab.to(real_b.dtype)]))
        na, nb = real_a.shape[0], real_b.shape[0]
        def term(outputs: list, rows: slice, real: bool) -> torch.Tensor:
            return gan_loss([scale[-1][rows] for scale in outputs], real, self.gan_mode)

        loss_real = term(out_a, slice(None, na), True) + term(out_b, slice(None, nb), True)
        loss_fake = term(out_a, slice(na, None), False) + term(out_b, slice(nb, None), False)
        return loss_real + loss_fake, detached(d_real=loss_real, d_fake=loss_fake)

    def generator_pass(self, nets: Nets, batch: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """The generator's training pass and the two terms UNIT and MUNIT share: ``(outputs,
        lambda_gan x the adversarial loss of both translations, lambda_recon x the L1 of both
        within-domain reconstructions)``."""
        hp = self.hp()
        real_a, real_b = batch["image_a"], batch["image_b"]
        out = nets.generator(real_a, real_b)
        pred_ba, pred_ab = nets.discriminator(out["x_ba"], out["x_ab"])
        loss_gan = hp["lambda_gan"] * (gan_loss(pred_ba, True, self.gan_mode, for_discriminator=False)
                                       + gan_loss(pred_ab, True, self.gan_mode, for_discriminator=False))
        loss_recon = hp["lambda_recon"] * (l1(out["x_aa"], real_a) + l1(out["x_bb"], real_b))
        return out, loss_gan, loss_recon

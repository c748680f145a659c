"""GAN losses on multi-scale discriminator outputs, feature matching, and a VGG19 perceptual loss.

Discriminator outputs are taken in any of three shapes: a prediction tensor, a list of per-scale
predictions, or a list of per-scale feature lists whose last entry is the prediction (what
``models.layers.MultiscaleDiscriminator`` returns). Losses are averaged over scales.
"""
from __future__ import annotations

import os
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.fusion import fused

GanMode = Literal["lsgan", "hinge"]
DOutput = torch.Tensor | Sequence[torch.Tensor] | Sequence[Sequence[torch.Tensor]]


def _predictions(outputs: DOutput) -> list[torch.Tensor]:
    """The per-scale prediction maps of a discriminator output."""
    if torch.is_tensor(outputs):
        return [outputs]
    return [out if torch.is_tensor(out) else out[-1] for out in outputs]


def _fused_gan_term(mode: GanMode, target_is_real: bool, for_discriminator: bool) -> str:
    if mode == "lsgan":
        return "lsgan_real" if target_is_real else "lsgan_fake"
    if mode == "hinge":
        if not for_discriminator:
            if not target_is_real:
                raise ValueError("the hinge generator loss is defined for target_is_real=True only")
            return "hinge_g"
        return "hinge_d_real" if target_is_real else "hinge_d_fake"
    raise ValueError(f"unknown GAN loss mode {mode!r}; allowed: lsgan, hinge")


def gan_loss(outputs: DOutput, target_is_real: bool, mode: GanMode = "lsgan",
             for_discriminator: bool = True, fusion: str = "none") -> torch.Tensor:
    """Adversarial loss averaged over scales.

    lsgan: mean squared distance of the predictions to 1 (real) or 0 (fake), same form for D and G.
    hinge: D uses relu(1 - pred) on real and relu(1 + pred) on fake; G uses -pred (call it with
    ``target_is_real=True, for_discriminator=False``).
    ``fusion`` (the speed flag: none | jit | compile) computes each term with the fused chain from
    ``models.fusion`` (fp32 inside, as autocast does for ``mse_loss``)."""
    preds = _predictions(outputs)
    if fusion != "none":
        term = fused(_fused_gan_term(mode, target_is_real, for_discriminator), fusion)
        return sum(term(pred) for pred in preds) / len(preds)
    losses = []
    for pred in preds:
        if mode == "lsgan":
            target = torch.full_like(pred, 1.0 if target_is_real else 0.0)
            losses.append(F.mse_loss(pred, target))
        elif mode == "hinge":
            if for_discriminator:
                losses.append(F.relu(1 - pred).mean() if target_is_real else F.relu(1 + pred).mean())
            else:
                if not target_is_real:
                    raise ValueError("the hinge generator loss is defined for target_is_real=True only")
                losses.append(-pred.mean())
        else:
            raise ValueError(f"unknown GAN loss mode {mode!r}; allowed: lsgan, hinge")
    return sum(losses) / len(losses)


class GANLoss(nn.Module):
    """``gan_loss`` with its mode fixed, for code that prefers a loss object."""

    def __init__(self, mode: GanMode = "lsgan"):
        super().__init__()
        if mode not in ("lsgan", "hinge"):
            raise ValueError(f"unknown GAN loss mode {mode!r}; allowed: lsgan, hinge")
        self.mode = mode

    def forward(self, outputs: DOutput, target_is_real: bool, for_discriminator: bool = True,
                fusion: str = "none") -> torch.Tensor:
        return gan_loss(outputs, target_is_real, self.mode, for_discriminator, fusion)


def feature_matching_loss(fake_outputs: Sequence[Sequence[torch.Tensor]],
                          real_outputs: Sequence[Sequence[torch.Tensor]],
                          weight: float = 10.0, fusion: str = "none") -> torch.Tensor:
    """``weight`` x the mean over scales and intermediate layers of L1(D_feat(fake), D_feat(real)).

    The last entry of each scale (the prediction) is excluded and real features are detached.
    pix2pixHD sums its per-layer terms with weight 4/(n_layers+1) and per-scale weight 1/num_D,
    which equals 4x this mean: pass ``weight=4*lambda_feat`` to reproduce its magnitude exactly.
    ``fusion`` != "none" computes each L1 with the fused ``l1_mean`` chain."""
    if len(fake_outputs) != len(real_outputs):
        raise ValueError(f"{len(fake_outputs)} fake scales vs {len(real_outputs)} real scales")
    l1 = F.l1_loss if fusion == "none" else fused("l1_mean", fusion)
    terms = []
    for fake_feats, real_feats in zip(fake_outputs, real_outputs):
        for fake, real in zip(fake_feats[:-1], real_feats[:-1]):
            terms.append(l1(fake, real.detach()))
    if not terms:
        raise ValueError("feature matching needs discriminators that return intermediate features")
    return weight * (sum(terms) / len(terms))


# --------------------------------------------------------------------------- VGG19 perceptual loss

# VGG19 "features" up to relu5_1: numbers are conv widths, "M" a 2x2 max-pool. The module indices
# this produces match torchvision's ``vgg19().features`` so its state_dict loads unchanged.
_VGG19_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512]
# end index (exclusive) of each slice: relu1_1, relu2_1, relu3_1, relu4_1, relu5_1
_VGG19_SLICES = (2, 7, 12, 21, 30)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _vgg19_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 3
    for item in _VGG19_CFG:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU(inplace=False)]
            channels = item
    return nn.Sequential(*layers)


def _load_vgg_state(features: nn.Sequential, path: str | os.PathLike) -> None:
    """Load a VGG19 state_dict file: either a whole torchvision ``vgg19`` state_dict (keys
    ``features.N.*``, classifier ignored) or a ``features`` one (keys ``N.*``). Layers past relu5_1
    are ignored; every layer this module has must be present."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VGG19 weights file {os.fspath(path)!r} not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"VGG19 weights file {os.fspath(path)!r} does not hold a state_dict")
    if any(k.startswith("features.") for k in state):
        state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    wanted = features.state_dict()
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise ValueError(f"VGG19 weights file {os.fspath(path)!r} lacks {missing}")
    features.load_state_dict({k: state[k] for k in wanted})


class VGGLoss(nn.Module):
    """Perceptual loss: sum over relu1_1..relu5_1 of layer_weight x L1(VGG(fake), VGG(real)).

    Images are in [-1, 1]; they are mapped to ImageNet normalisation first. ``weights`` is a
    state_dict file; without one the network is randomly initialised, which
    ``weights_source == "random-init"`` records so runs can log which features they used.
    The network is frozen (no parameter requires grad)."""

    def __init__(self, weights: str | os.PathLike | None = None,
                 layer_weights: Sequence[float] = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0), fusion: str = "none"):
        super().__init__()
        self.fusion = fusion  # the fusion speed flag: "none" keeps F.l1_loss, else the fused l1_mean
        if len(layer_weights) != len(_VGG19_SLICES):
            raise ValueError(f"need {len(_VGG19_SLICES)} layer weights, got {len(layer_weights)}")
        features = _vgg19_features()
        if weights is None:
            self.weights_source = "random-init"
        else:
            _load_vgg_state(features, weights)
            self.weights_source = os.fspath(weights)
        starts = (0,) + _VGG19_SLICES[:-1]
        self.slices = nn.ModuleList(features[a:b] for a, b in zip(starts, _VGG19_SLICES))
        self.layer_weights = tuple(float(w) for w in layer_weights)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = ((x + 1) / 2 - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        out = []
        for block in self.slices:
            x = block(x)
            out.append(x)
        return out

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        fake_feats = self.features(fake)
        with torch.no_grad():
            real_feats = self.features(real)
        l1 = F.l1_loss if self.fusion == "none" else fused("l1_mean", self.fusion)
        terms = [w * l1(f, r) for w, f, r in zip(self.layer_weights, fake_feats, real_feats)]
        return sum(terms)

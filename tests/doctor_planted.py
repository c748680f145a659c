"""Planted truths for the doctor: the project's models with one seed fp16 fix reverted each, built
as small subclasses (the shipped model files are untouched), and the data that exposes each.

* ``InpaintingHalfReciprocal``: the partial conv's mask ratio ``window / (sum(M) + eps)`` computed
  entirely in the mask sum's dtype (the shipped layer takes the reciprocal in fp32) with the fp32
  code's eps 1e-8 (the seeds moved it to 1e-6);
* the one-step Gram matrix: the shipped ``Inpainting`` with its preset key ``gram_split: False``;
* few-shot vid2vid's label-encoder instance-norm eps 1e-5 (the seeds' fix: 0.1), at the published
  weight-generator structure (``paper`` preset at narrow width, 64x64), where it matters;
* ``SPADEHalfSpectralNorm``: spectral norm's power iteration and sigma computed in the weight's
  own dtype (half under O2), as ``torch.nn.utils.spectral_norm`` does on an fp16 module.
"""
from __future__ import annotations

from typing import Any

import torch

from models.inpainting import Inpainting, PartialConv2d
from models.spade import SPADE, SNConv2d
from orchestrator.config import DataConfig
from orchestrator.settings import SpeedFlags

# masks with big holes: windows of the first partial conv that see no valid pixel
BIG_HOLES = DataConfig(height=32, width=32, train_samples=4, val_samples=2, options={"hole_bins": [0.4, 0.6]})
# few-shot vid2vid's weight generator as published (5 downsamplings, 1x1 example-encoder convs,
# attention after 2) at width 8; 64x64 keeps a 2x2 bottleneck
FS_PAPER_NARROW = dict(preset="paper", options={"ngf": 8, "use_vgg": False},
                       data=DataConfig(height=64, width=64, train_samples=2, val_samples=2,
                                       options={"shots": 2, "frames": 2}))


def half_reciprocal_renorm(raw_out: torch.Tensor, mask_sum: torch.Tensor, bias: torch.Tensor | None,
                           window: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 code's re-normalisation, run in the mask sum's dtype (half under AMP)."""
    valid = torch.clamp(mask_sum, 0.0, 1.0)
    ratio = torch.reciprocal(mask_sum + eps) * window * valid
    out = raw_out * ratio.to(raw_out.dtype)
    if bias is not None:
        out = out + bias
    valid_out = valid.to(raw_out.dtype)
    return out * valid_out, valid_out


class InpaintingHalfReciprocal(Inpainting):
    """Partial-conv inpainting with the mask ratio's reciprocal in half precision."""

    name = "inpainting_half_reciprocal"

    def build(self, preset: str, eps: dict[str, float], flags: SpeedFlags):
        nets = super().build(preset, eps, flags)
        for module in nets.generator.modules():
            if isinstance(module, PartialConv2d):
                module.renorm = half_reciprocal_renorm
        return nets


class HalfSNConv2d(SNConv2d):
    """Spectral norm computed in the weight's own dtype (the shipped layer computes it in fp32)."""

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.weight.dtype


class SPADEHalfSpectralNorm(SPADE):
    """SPADE whose spectral-normalised convs run their power iteration and sigma in half under O2."""

    name = "spade_half_spectral_norm"

    def build(self, preset: str, eps: dict[str, float], flags: SpeedFlags):
        nets = super().build(preset, eps, flags)
        for network in (nets.generator, nets.discriminator):
            for module in network.modules():
                if type(module) is SNConv2d:
                    module.__class__ = HalfSNConv2d
        return nets


def planted_cases() -> dict[str, dict[str, Any]]:
    """name -> diagnose() keyword arguments and the site/module/kind the doctor must name."""
    return {
        "inpainting_half_reciprocal": dict(
            kwargs=dict(model=InpaintingHalfReciprocal(), data=BIG_HOLES, opt_level="O1"),
            site="pconv_mask", kinds={"nonfinite", "eps_vanishes"}),
        "inpainting_one_step_gram": dict(
            kwargs=dict(model="inpainting", options={"gram_split": False}, eps={"pconv_mask": 1e-6},
                        opt_level="O1"),
            callsite="gram_matrix", kinds={"factor"}),
        "fs_vid2vid_label_encoder_eps": dict(
            kwargs=dict(model="fs_vid2vid", eps={"label_encoder_norm": 1e-5, "instance_norm": 0.1},
                        opt_level="O1", **FS_PAPER_NARROW),
            site="label_encoder_norm", kinds={"norm_noise"}),
        "spade_half_spectral_norm": dict(
            kwargs=dict(model=SPADEHalfSpectralNorm(), opt_level="O2"),
            site="spectral_norm", kinds={"eps_vanishes", "nonfinite"}),
    }

"""COCO-FUNIT (Saito, Saenko and Liu, ECCV 2020, "COCO-FUNIT: Few-Shot Unsupervised Image
Translation with a Content Conditioned Style Encoder").

FUNIT (models/funit.py) with its class code made content-conditioned: the decoder's style vector is

    mlp( mlp_style([class code, constant style bias]) * mlp_content(spatial mean of the content code) )

The *constant style bias* is a learned vector of ``usb_dim`` numbers (initialised N(0, 1)), the
same for every image, concatenated to the class code so that part of the style no example can
override; the content branch lets the content image decide which parts of the examples' appearance
apply to it. Both new MLPs have two layers of width ``mlp_dim``. Everything else (encoders, decoder,
projection discriminator, losses, optimizer, data, eps sites) is FUNIT's; the ``paper`` preset is
imaginaire's ``configs/projects/coco_funit/animal_faces/base64_bs8_class149.yaml``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.funit import FUNIT, FUNITGenerator
from models.translation import MLP


class COCOFUNITGenerator(FUNITGenerator):
    """FUNIT's generator with the content-conditioned style path."""

    def __init__(self, arch: dict[str, Any], eps: dict[str, float], checkpointing: str = "none"):
        super().__init__(arch, eps, checkpointing)
        self.usb = nn.Parameter(torch.randn(1, arch["usb_dim"]))
        self.mlp_content = MLP(self.content_encoder.out_channels, arch["style_dim"], arch["mlp_dim"], 2)
        self.mlp_style = MLP(arch["style_dim"] + arch["usb_dim"], arch["style_dim"], arch["mlp_dim"], 2)

    def conditioning(self, content_code: torch.Tensor, class_code: torch.Tensor) -> torch.Tensor:
        n = class_code.shape[0]
        usb = self.usb.expand(n, -1).to(content_code.dtype)
        style = self.mlp_style(torch.cat([class_code.to(content_code.dtype), usb], dim=1))
        return self.mlp(style * self.mlp_content(content_code.mean(dim=(2, 3))))


class COCOFUNIT(FUNIT):
    name = "coco_funit"
    generator_class = COCOFUNITGenerator
    presets: dict[str, dict[str, Any]] = {
        "tiny": dict(FUNIT.presets["tiny"], usb_dim=32),
        "small": dict(FUNIT.presets["small"], usb_dim=256),
        "paper": dict(FUNIT.presets["paper"], usb_dim=1024),
    }

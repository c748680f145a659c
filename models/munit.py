"""MUNIT (Huang, Liu, Belongie and Kautz, ECCV 2018, "Multimodal Unsupervised Image-to-Image
Translation").

Each domain's image is split into a domain-invariant *content* code (a spatial map) and a
domain-specific *style* code (a small vector with a N(0, I) prior). Per domain:

* a content encoder (7x7 conv, stride-2 convs, pre-activation residual blocks, affine instance
  norm: eps site ``instance_norm``);
* a style encoder (convs without normalisation, global average pooling, 1x1 conv to ``style_dim``);
* an MLP from the style code to a ``mlp_dim`` vector, and a decoder whose residual blocks normalise
  with AdaIN (each AdaIN projects that vector to its own scale and shift: eps site ``adain``), then
  nearest-upsampling 5x5 conv units with layer norm (MUNIT's decoder; eps site ``layer_norm``) and a
  7x7 conv + tanh;
* a multi-scale patch discriminator (one set of weights per scale).

Translation a -> b decodes a's content with a style: a random draw from the prior in training, the
style of a given B image for example-guided translation. Losses (imaginaire's
``configs/projects/munit/summer2winter_hd/ampO1.yaml``): hinge GAN on both translations
(``lambda_gan`` 1), L1 image reconstruction within each domain (``lambda_recon`` 10), L1 content
reconstruction of the translations' content codes against the (detached) originals
(``lambda_content`` 1), L1 style reconstruction against the drawn styles (``lambda_style`` 1), L1
cycle reconstruction a -> b -> a with a's own style (``lambda_cycle`` 10). Adam lr 1e-4 (G) and
4e-4 (D), betas (0.5, 0.999); orthogonal init. Spectral norm on the convs of G (all but the RGB output, as
there) and D (the config's ``weight_norm_type: spectral``), computed in fp32 (models/spade.py).

Networks: that config's, with the upsampling units' AdaIN replaced by MUNIT's own layer norm (0.7 %
fewer generator parameters).

fp16: the content encoder's first unit runs in fp32 on fp32 images (``fp32_stem``,
``fp32_batch_keys``; models/translation.py ``ContentEncoder`` says why, tests/test_munit.py shows the
hazard without the fix).

Batch (``orchestrator.data.two_domain``): ``image_a``, ``image_b`` (N, 3, H, W). ``samples``
translates a -> b with the style encoded from the true B image of the same scene (and b -> a with
the true A image's), so the output has a ground truth: (2N, 3, H, W). H and W must be divisible by
``2 ** max(n_down, n_down_style)``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.base import Batch, Logs, Nets
from models.spade import begin_pass
from models.translation import (MLP, ContentEncoder, Decoder, MultiResPatchDiscriminator, Norm, ResBlock, StyleEncoder,
                                TwoDomainDiscriminator, TwoDomainModel, check_divisible, detached, init_weights, l1,
                                upsampling_units)

_LOSSES = dict(lambda_gan=1.0, lambda_recon=10.0, lambda_content=1.0, lambda_style=1.0, lambda_cycle=10.0,
               fp32_stem=True)


class MUNITAutoEncoder(nn.Module):
    """One domain: content encoder, style encoder, style MLP, AdaIN decoder."""

    def __init__(self, arch: dict[str, Any], eps: dict[str, float], checkpointing: str = "none"):
        super().__init__()
        sn = eps["spectral_norm"]
        self.content_encoder = ContentEncoder(arch["nf"], arch["n_down"], arch["n_res"], max_width=arch["max_width"],
                                              eps=eps["instance_norm"], sn_eps=sn, checkpointing=checkpointing,
                                              fp32_stem=arch["fp32_stem"])
        self.style_encoder = StyleEncoder(arch["nf"], arch["n_down_style"], arch["style_dim"], sn_eps=sn)
        self.mlp = MLP(arch["style_dim"], arch["mlp_dim"], arch["mlp_dim"], arch["n_mlp"])
        width = self.content_encoder.out_channels
        adain = Norm("adain", eps["adain"], cond_dim=arch["mlp_dim"])
        blocks = [ResBlock(width, width, norm=adain, order="NAC", sn_eps=sn) for _ in range(arch["n_res"])]
        ups = upsampling_units(width, arch["n_down"], Norm("layer", eps["layer_norm"]), sn_eps=sn)
        self.decoder = Decoder(blocks + ups, width >> arch["n_down"], checkpointing=checkpointing)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.content_encoder(images), self.style_encoder(images)

    def decode(self, content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        return self.decoder(content, self.mlp(style.to(content.dtype)))


class MUNITGenerator(nn.ModuleDict):
    """The two domains' auto-encoders (keys ``a``, ``b``).

    ``forward(x_a, x_b)`` returns every code and image the losses use (a dict), with random styles
    for the translations; ``forward(x_a, x_b, translate_only=True)`` returns ``(x_ab, x_ba)`` with
    random styles, or, given ``style_from=(y_b, y_a)``, with the styles of those images."""

    def __init__(self, arch: dict[str, Any], eps: dict[str, float], checkpointing: str = "none"):
        super().__init__({"a": MUNITAutoEncoder(arch, eps, checkpointing),
                          "b": MUNITAutoEncoder(arch, eps, checkpointing)})
        self.factor = 2 ** max(arch["n_down"], arch["n_down_style"])
        self.style_dim = arch["style_dim"]

    def forward(self, x_a: torch.Tensor, x_b: torch.Tensor, translate_only: bool = False,
                style_from: tuple[torch.Tensor, torch.Tensor] | None = None):
        begin_pass(self)
        check_divisible(x_a, self.factor, "MUNIT")
        a, b = self["a"], self["b"]
        if translate_only:
            c_a, c_b = a.content_encoder(x_a), b.content_encoder(x_b)
            if style_from is None:
                s_b = torch.randn(x_a.shape[0], self.style_dim, device=x_a.device, dtype=c_a.dtype)
                s_a = torch.randn(x_b.shape[0], self.style_dim, device=x_b.device, dtype=c_b.dtype)
            else:
                s_b, s_a = b.style_encoder(style_from[0]), a.style_encoder(style_from[1])
            return b.decode(c_a, s_b), a.decode(c_b, s_a)
        (c_a, s_a), (c_b, s_b) = a.encode(x_a), b.encode(x_b)
        rand_a, rand_b = torch.randn_like(s_a), torch.randn_like(s_b)
        n_a, n_b = x_a.shape[0], x_b.shape[0]
        # one decoder pass per domain: its reconstruction and the translation into it
        x_aa, x_ba = a.decode(torch.cat([c_a, c_b]), torch.cat([s_a, rand_a])).split([n_a, n_b])
        x_bb, x_ab = b.decode(torch.cat([c_b, c_a]), torch.cat([s_b, rand_b])).split([n_b, n_a])
        (c_ba, s_ba), (c_ab, s_ab) = a.encode(x_ba), b.encode(x_ab)
        x_aba, x_bab = a.decode(c_ab, s_a), b.decode(c_ba, s_b)
        return dict(c_a=c_a, c_b=c_b, rand_a=rand_a, rand_b=rand_b, c_ab=c_ab, c_ba=c_ba, s_ab=s_ab, s_ba=s_ba,
                    x_aa=x_aa, x_bb=x_bb, x_ab=x_ab, x_ba=x_ba, x_aba=x_aba, x_bab=x_bab)


class MUNIT(TwoDomainModel):
    name = "munit"
    eps_sites = {"adam": 1e-8, "instance_norm": 1e-5, "adain": 1e-5, "layer_norm": 1e-5, "spectral_norm": 1e-12}
    gan_mode = "hinge"
    g_lr, d_lr, betas = 1e-4, 4e-4, (0.5, 0.999)
    presets: dict[str, dict[str, Any]] = {
        # tests: 16x16-32x32, batch 2 (input: multiple of 8)
        "tiny": dict(_LOSSES, nf=8, n_down=2, n_res=2, max_width=256, n_down_style=3, style_dim=4, mlp_dim=32,
                     n_mlp=2, ndf=8, n_layers_D=3, num_scales=2, max_width_D=1024),
        "small": dict(_LOSSES, nf=32, n_down=2, n_res=3, max_width=256, n_down_style=4, style_dim=8, mlp_dim=128,
                      n_mlp=2, ndf=32, n_layers_D=4, num_scales=3, max_width_D=1024),
        # imaginaire configs/projects/munit/summer2winter_hd/ampO1.yaml (its multi-scale patch D)
        "paper": dict(_LOSSES, nf=64, n_down=3, n_res=4, max_width=256, n_down_style=4, style_dim=8, mlp_dim=256,
                      n_mlp=2, ndf=48, n_layers_D=5, num_scales=3, max_width_D=1024),
    }

    def networks(self, arch: dict[str, Any], eps: dict[str, float], checkpointing: str) -> tuple[nn.Module, nn.Module]:
        generator = MUNITGenerator(arch, eps, checkpointing)

        def patch_d() -> nn.Module:
            return MultiResPatchDiscriminator(arch["ndf"], arch["n_layers_D"], arch["num_scales"],
                                              max_width=arch["max_width_D"], sn_eps=eps["spectral_norm"])

        discriminator = TwoDomainDiscriminator(patch_d(), patch_d())
        init_weights(generator, "orthogonal", 1.0)
        init_weights(discriminator, "orthogonal", 1.0)
        return generator, discriminator

    def generator_loss(self, nets: Nets, batch: Batch) -> tuple[torch.Tensor, Logs]:
        hp = self.hp()
        out, loss_gan, loss_recon = self.generator_pass(nets, batch)
        loss_content = hp["lambda_content"] * (l1(out["c_ab"], out["c_a"].detach())
                                               + l1(out["c_ba"], out["c_b"].detach()))
        loss_style = hp["lambda_style"] * (l1(out["s_ba"], out["rand_a"]) + l1(out["s_ab"], out["rand_b"]))
        loss_cycle = hp["lambda_cycle"] * (l1(out["x_aba"], batch["image_a"]) + l1(out["x_bab"], batch["image_b"]))
        loss = loss_gan + loss_recon + loss_content + loss_style + loss_cycle
        return loss, detached(g_gan=loss_gan, g_recon=loss_recon, g_content=loss_content, g_style=loss_style,
                              g_cycle=loss_cycle)

    def samples(self, nets: Nets, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Example-guided translations: a's content with the style of the true B image of the same
        scene, and b's with the true A image's, against those true images."""
        real_a, real_b = batch["image_a"], batch["image_b"]
        fake_ab, fake_ba = nets.generator(real_a, real_b, translate_only=True, style_from=(real_b, real_a))
        return torch.cat([fake_ab, fake_ba]), torch.cat([real_b, real_a])

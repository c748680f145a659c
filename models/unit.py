"""UNIT (Liu, Breuel and Kautz, NeurIPS 2017, "Unsupervised Image-to-Image Translation Networks").

A shared-latent-space VAE-GAN over two domains. Each domain has an encoder and a decoder; an
image's latent code ``h`` is the mean of a unit-variance Gaussian (``z = h + N(0, I)`` in training,
``z = h`` otherwise), and both domains' codes are pulled towards the same prior N(0, I) by the KL
term, which for a unit-variance posterior is ``mean(h^2) / 2`` up to a constant (the authors'
release drops the half: ``kl = mean(h^2)``). Translation a -> b decodes a's code with b's decoder.
Losses per domain (the authors' PyTorch release, ``mingyuliutw/UNIT`` configs): LSGAN on the
translations (``lambda_gan`` 1), L1 within-domain reconstruction (``lambda_recon`` 10), the KL of
the codes (``lambda_kl`` 0.01), L1 cycle reconstruction a -> b -> a (``lambda_cycle`` 10) and the
KL of the translated images' codes (``lambda_kl_cycle`` 0.01). Adam lr 1e-4, betas (0.5, 0.999).

Networks: imaginaire's improved UNIT (``configs/projects/unit/winter2summer/base48_bs1.yaml``):
a content encoder (7x7 conv, stride-2 convs, pre-activation residual blocks, affine instance norm),
a decoder (pre-activation residual blocks, nearest-upsampling 5x5 conv units, 7x7 conv; a tanh
here, none there), and per domain a multi-resolution patch discriminator with one set of
spectral-normalised weights for every scale. The paper's high-level weight sharing (the last
encoder blocks and first decoder blocks of the two domains are one module) is ``shared_blocks``;
the published configs share nothing (the KL prior and the cycle tie the latent spaces), so the
``paper`` preset has 0 and the smaller presets 1, to keep the mechanism exercised.

fp16: the KL squares the code in fp32 (``latent_kl``), and the content encoder's first unit runs in
fp32 on fp32 images (``fp32_stem``, ``fp32_batch_keys``; models/translation.py ``ContentEncoder``
says why); tests/test_unit.py shows both hazards without their fixes.

Batch (``orchestrator.data.two_domain``): ``image_a``, ``image_b`` (N, 3, H, W). ``samples``
returns both translations (a -> b, then b -> a) against the other domain's image of the same scene
(validation items are paired by construction): (2N, 3, H, W). H and W must be divisible by
``2 ** n_down``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.base import Batch, Logs, Nets
from models.translation import (ContentEncoder, Decoder, MultiResPatchDiscriminator, Norm, ResBlock,
                                TwoDomainDiscriminator, TwoDomainModel, check_divisible, detached, init_weights, l1,
                                upsampling_units)

_LOSSES = dict(lambda_gan=1.0, lambda_recon=10.0, lambda_kl=0.01, lambda_cycle=10.0, lambda_kl_cycle=0.01,
               fp32_stem=True)


class AutoEncoder(nn.Module):
    """One domain's encoder and decoder."""

    def __init__(self, nf: int, n_down: int, n_res: int, max_width: int, *, eps: float, checkpointing: str,
                 fp32_stem: bool = True):
        super().__init__()
        self.encoder = ContentEncoder(nf, n_down, n_res, max_width=max_width, eps=eps, checkpointing=checkpointing,
                                      fp32_stem=fp32_stem)
        width = self.encoder.out_channels
        norm = Norm("instance", eps, affine=True)
        blocks = [ResBlock(width, width, norm=norm, order="NAC") for _ in range(n_res)]
        self.decoder = Decoder(blocks + upsampling_units(width, n_down, norm), width >> n_down,
                               checkpointing=checkpointing)


class UNITGenerator(nn.ModuleDict):
    """The two domains' auto-encoders (keys ``a``, ``b``), the last ``shared_blocks`` encoder
    residual blocks and first ``shared_blocks`` decoder residual blocks being one module.

    ``forward(x_a, x_b)`` in training returns every image and code the losses use (a dict);
    ``forward(x_a, x_b, translate_only=True)`` returns ``(x_ab, x_ba)``. The latent noise is drawn
    only in training mode."""

    def __init__(self, nf: int, n_down: int, n_res: int, max_width: int, shared_blocks: int, *, eps: float,
                 checkpointing: str = "none", fp32_stem: bool = True):
        if not 0 <= shared_blocks <= n_res:
            raise ValueError(f"shared_blocks must be in 0..n_res ({n_res}), got {shared_blocks}")
        ae = dict(eps=eps, checkpointing=checkpointing, fp32_stem=fp32_stem)
        super().__init__({"a": AutoEncoder(nf, n_down, n_res, max_width, **ae),
                          "b": AutoEncoder(nf, n_down, n_res, max_width, **ae)})
        enc_a, enc_b = self["a"].encoder.blocks, self["b"].encoder.blocks
        dec_a, dec_b = self["a"].decoder.blocks, self["b"].decoder.blocks
        for i in range(shared_blocks):
            enc_b[len(enc_b) - 1 - i] = enc_a[len(enc_a) - 1 - i]
            dec_b[i] = dec_a[i]
        self.factor = 2**n_down

    def _latent(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.randn_like(h) if self.training else h

    def forward(self, x_a: torch.Tensor, x_b: torch.Tensor, translate_only: bool = False):
        check_divisible(x_a, self.factor, "UNIT")
        a, b = self["a"], self["b"]
        h_a, h_b = a.encoder(x_a), b.encoder(x_b)
        z_a, z_b = self._latent(h_a), self._latent(h_b)
        if translate_only:
            return b.decoder(z_a), a.decoder(z_b)
        n = x_a.shape[0]
        x_aa, x_ba = a.decoder(torch.cat([z_a, z_b])).split([n, x_b.shape[0]])
        x_bb, x_ab = b.decoder(torch.cat([z_b, z_a])).split([x_b.shape[0], n])
        h_ab, h_ba = b.encoder(x_ab), a.encoder(x_ba)  # the translations' codes
        x_aba, x_bab = a.decoder(self._latent(h_ab)), b.decoder(self._latent(h_ba))
        return dict(h_a=h_a, h_b=h_b, h_ab=h_ab, h_ba=h_ba, x_aa=x_aa, x_bb=x_bb, x_ab=x_ab, x_ba=x_ba,
                    x_aba=x_aba, x_bab=x_bab)


def latent_kl(h: torch.Tensor) -> torch.Tensor:
    """UNIT's KL term of a unit-variance posterior with mean ``h``: ``mean(h^2)``, in fp32."""
    return h.float().pow(2).mean()


class UNIT(TwoDomainModel):
    name = "unit"
    eps_sites = {"adam": 1e-8, "instance_norm": 1e-5, "spectral_norm": 1e-12}
    gan_mode = "lsgan"
    g_lr, d_lr, betas = 1e-4, 1e-4, (0.5, 0.999)
    presets: dict[str, dict[str, Any]] = {
        # tests: 16x16-32x32, batch 2 (input: multiple of 4)
        "tiny": dict(_LOSSES, nf=8, n_down=2, n_res=2, max_width=256, shared_blocks=1, ndf=8, n_layers_D=3,
                     num_scales=2, max_width_D=512),
        "small": dict(_LOSSES, nf=32, n_down=2, n_res=3, max_width=256, shared_blocks=1, ndf=32, n_layers_D=4,
                      num_scales=3, max_width_D=512),
        # imaginaire configs/projects/unit/winter2summer/base48_bs1.yaml (512x512 crops)
        "paper": dict(_LOSSES, nf=48, n_down=2, n_res=4, max_width=256, shared_blocks=0, ndf=48, n_layers_D=4,
                      num_scales=3, max_width_D=512),
    }

    def networks(self, arch: dict[str, Any], eps: dict[str, float], checkpointing: str) -> tuple[nn.Module, nn.Module]:
        generator = UNITGenerator(arch["nf"], arch["n_down"], arch["n_res"], arch["max_width"],
                                  arch["shared_blocks"], eps=eps["instance_norm"], checkpointing=checkpointing,
                                  fp32_stem=arch["fp32_stem"])

        def patch_d() -> nn.Module:
            return MultiResPatchDiscriminator(arch["ndf"], arch["n_layers_D"], arch["num_scales"], shared=True,
                                              max_width=arch["max_width_D"], sn_eps=eps["spectral_norm"])

        discriminator = TwoDomainDiscriminator(patch_d(), patch_d())
        init_weights(generator, "normal", 0.02)  # imaginaire's config: normal init, gain 0.02
        init_weights(discriminator, "normal", 0.02)
        return generator, discriminator

    def generator_loss(self, nets: Nets, batch: Batch) -> tuple[torch.Tensor, Logs]:
        hp = self.hp()
        out, loss_gan, loss_recon = self.generator_pass(nets, batch)
        loss_kl = hp["lambda_kl"] * (latent_kl(out["h_a"]) + latent_kl(out["h_b"]))
        loss_cycle = hp["lambda_cycle"] * (l1(out["x_aba"], batch["image_a"]) + l1(out["x_bab"], batch["image_b"]))
        loss_kl_cycle = hp["lambda_kl_cycle"] * (latent_kl(out["h_ab"]) + latent_kl(out["h_ba"]))
        loss = loss_gan + loss_recon + loss_kl + loss_cycle + loss_kl_cycle
        return loss, detached(g_gan=loss_gan, g_recon=loss_recon, g_kl=loss_kl, g_cycle=loss_cycle,
                              g_kl_cycle=loss_kl_cycle)

    def samples(self, nets: Nets, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """a -> b and b -> a translations against the true images of the same scenes."""
        real_a, real_b = batch["image_a"], batch["image_b"]
        fake_ab, fake_ba = nets.generator(real_a, real_b, translate_only=True)
        return torch.cat([fake_ab, fake_ba]), torch.cat([real_b, real_a])

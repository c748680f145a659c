"""FUNIT (Liu et al., ICCV 2019, "Few-Shot Unsupervised Image-to-Image Translation").

Translates an image of a *source* class into a *target* class known only from ``K`` example images,
classes that may never have been seen in training. The generator:

* a content encoder (7x7 conv, stride-2 convs doubling the width, conv-norm-act residual blocks;
  affine instance norm: eps site ``instance_norm``) maps the content image to a spatial code;
* a class encoder (convs without norm, global average pooling, 1x1 conv to ``style_dim``) maps each
  example image to a code; the K codes are averaged into the class code;
* an MLP maps the class code to the vector every AdaIN layer projects its scale and shift from;
* a decoder: AdaIN residual blocks, then up-residual blocks (nearest x2, two 5x5 conv-AdaIN-ReLU
  units, a learned 1x1 conv-AdaIN-ReLU shortcut), then a 7x7 conv + tanh; every AdaIN's instance
  norm uses the eps site ``adain``.

The discriminator is a residual projection discriminator over the training (source) classes: a
class-conditional score ``classifier(features) + <embedding[class], pooled features>``. Losses
(imaginaire's ``configs/projects/funit/animal_faces/base64_bs8_class149.yaml``): hinge GAN, the
generator's averaged over the translation (scored as the target class) and the reconstruction
(content image with its own class code, scored as the source class) (``lambda_gan`` 1); L1
reconstruction (``lambda_recon`` 0.1); feature matching, L1 between the discriminator's pooled
features of the translation and the mean of the examples' (``lambda_fm`` 1). The discriminator
scores the examples as real and the translation as fake, both as the target class. Adam lr 1e-4,
betas (0, 0.999), torch's default init, spectral norm in the discriminator (fp32 power iteration,
models/spade.py).

Networks: that config's (imaginaire's "improved FUNIT", the COCO-FUNIT paper's baseline), except
that ``n_mlp`` counts the MLP's layers literally (the config says 3, imaginaire builds 2: 66 k more
parameters here).

fp16: the content encoder's first unit runs in fp32 on fp32 content images (``fp32_stem``,
``fp32_batch_keys``; models/translation.py ``ContentEncoder`` says why, tests/test_funit.py shows the
hazard without the fix).

Batch (``orchestrator.data.objects``): ``content`` (N, 3, H, W), ``content_class`` (N,),
``examples`` (N, K, 3, H, W), ``example_class`` (N,), ``target`` (N, 3, H, W): the ground-truth
translation, used only by ``samples`` (never by a loss). H and W must be divisible by
``2 ** max(n_down, n_down_style)``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.base import Batch, Logs, Nets
from models.losses import gan_loss
from models.translation import (MLP, ContentEncoder, Decoder, Norm, ProjectionDiscriminator, ResBlock, StyleEncoder,
                                TranslationModel, check_divisible, detached, init_weights, l1)

_LOSSES = dict(lambda_gan=1.0, lambda_recon=0.1, lambda_fm=1.0, fp32_stem=True)


class FUNITGenerator(nn.Module):
    """``forward(content, examples)`` -> ``(translation, reconstruction)``; with
    ``translate_only=True`` the translation alone. ``examples`` is (N, K, 3, H, W)."""

    def __init__(self, arch: dict[str, Any], eps: dict[str, float], checkpointing: str = "none"):
        super().__init__()
        self.content_encoder = ContentEncoder(arch["nf"], arch["n_down"], arch["n_res"], eps=eps["instance_norm"],
                                              res_order="CNA", checkpointing=checkpointing,
                                              fp32_stem=arch["fp32_stem"])
        self.class_encoder = StyleEncoder(arch["nf"], arch["n_down_style"], arch["style_dim"])
        self.mlp = MLP(arch["style_dim"], arch["mlp_dim"], arch["mlp_dim"], arch["n_mlp"])
        width = self.content_encoder.out_channels
        adain = Norm("adain", eps["adain"], cond_dim=arch["mlp_dim"])
        blocks: list[nn.Module] = [ResBlock(width, width, norm=adain, order="CNA", learn_shortcut=False)
                                   for _ in range(arch["n_res"])]
        for _ in range(arch["n_down"]):
            blocks.append(ResBlock(width, width // 2, 5, norm=adain, order="CNA", upsample=True, hidden_is_out=True,
                                   learn_shortcut=True, shortcut_norm=adain, shortcut_act="relu"))
            width //= 2
        self.decoder = Decoder(blocks, width, checkpointing=checkpointing)
        self.factor = 2 ** max(arch["n_down"], arch["n_down_style"])

    def conditioning(self, content_code: torch.Tensor, class_code: torch.Tensor) -> torch.Tensor:
        """The vector the decoder's AdaIN layers project from (COCO-FUNIT conditions it on the content)."""
        return self.mlp(class_code.to(content_code.dtype))

    def forward(self, content: torch.Tensor, examples: torch.Tensor, translate_only: bool = False):
        check_divisible(content, self.factor, type(self).__name__.removesuffix("Generator"))
        n, shots = examples.shape[:2]
        code = self.content_encoder(content)
        flat = examples.flatten(0, 1).to(content.dtype)
        if translate_only:
            class_code = self.class_encoder(flat).view(n, shots, -1).mean(1)
            return self.decoder(code, self.conditioning(code, class_code))
        styles = self.class_encoder(torch.cat([content, flat]))  # the content image's own code too
        own, class_code = styles[:n], styles[n:].view(n, shots, -1).mean(1)
        codes = torch.cat([code, code])
        return self.decoder(codes, self.conditioning(codes, torch.cat([class_code, own]))).split([n, n])


class FUNIT(TranslationModel):
    name = "funit"
    # images that meet the content encoder's fp32 stem stay fp32 under O2/O3 (see ContentEncoder)
    fp32_batch_keys = ("content",)
    eps_sites = {"adam": 1e-8, "instance_norm": 1e-5, "adain": 1e-5, "spectral_norm": 1e-12}
    g_lr, d_lr, betas = 1e-4, 1e-4, (0.0, 0.999)
    generator_class: type[FUNITGenerator] = FUNITGenerator
    presets: dict[str, dict[str, Any]] = {
        # tests: 16x16-32x32, batch 2 (input: multiple of 8), data with <= num_classes training classes
        "tiny": dict(_LOSSES, nf=8, n_down=2, n_res=2, n_down_style=3, style_dim=16, mlp_dim=32, n_mlp=2, ndf=8,
                     n_layers_D=3, max_width_D=64, num_classes=32),
        "small": dict(_LOSSES, nf=32, n_down=3, n_res=2, n_down_style=4, style_dim=64, mlp_dim=256, n_mlp=3, ndf=32,
                      n_layers_D=4, max_width_D=512, num_classes=64),
        # imaginaire configs/projects/funit/animal_faces/base64_bs8_class149.yaml (256x256 crops)
        "paper": dict(_LOSSES, nf=64, n_down=4, n_res=2, n_down_style=5, style_dim=64, mlp_dim=256, n_mlp=3, ndf=64,
                      n_layers_D=6, max_width_D=1024, num_classes=149),
    }

    def networks(self, arch: dict[str, Any], eps: dict[str, float], checkpointing: str) -> tuple[nn.Module, nn.Module]:
        generator = self.generator_class(arch, eps, checkpointing)
        discriminator = ProjectionDiscriminator(arch["ndf"], arch["n_layers_D"], arch["num_classes"],
                                                max_width=arch["max_width_D"], sn_eps=eps["spectral_norm"])
        init_weights(generator, "none")  # the config's init: torch's defaults
        init_weights(discriminator, "none")
        return generator, discriminator

    def dataset(self, data_cfg: Any, split: str) -> torch.utils.data.Dataset:
        if data_cfg.kind != "synthetic":
            raise ValueError(f"{self.name} has no data kind {data_cfg.kind!r}; allowed: synthetic")
        from orchestrator.data.objects import ObjectClassDataset
        data = ObjectClassDataset(data_cfg, split)
        if self.hparams is not None and data.classes > self.hparams["num_classes"]:
            raise ValueError(f"data.options.classes ({data.classes}) exceeds the discriminator's num_classes "
                             f"({self.hparams['num_classes']}): raise model.options.num_classes")
        return data

    @staticmethod
    def _reals(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The K examples of every item, flattened, and their class."""
        examples = batch["examples"]
        return examples.flatten(0, 1), batch["example_class"].repeat_interleave(examples.shape[1])

    def discriminator_loss(self, nets: Nets, batch: Batch) -> tuple[torch.Tensor, Logs]:
        content, target_class = batch["content"], batch["example_class"]
        with torch.no_grad():
            fake = nets.generator(content, batch["examples"], translate_only=True)
        reals, real_class = self._reals(batch)
        logits, _ = nets.discriminator(torch.cat([reals, fake.to(reals.dtype)]), torch.cat([real_class, target_class]))
        n_real = reals.shape[0]
        loss_real = gan_loss(logits[:n_real], True, "hinge")
        loss_fake = gan_loss(logits[n_real:], False, "hinge")
        return loss_real + loss_fake, detached(d_real=loss_real, d_fake=loss_fake)

    def generator_loss(self, nets: Nets, batch: Batch) -> tuple[torch.Tensor, Logs]:
        hp = self.hp()
        content, examples = batch["content"], batch["examples"]
        n, shots = examples.shape[:2]
        translation, reconstruction = nets.generator(content, examples)
        logits, features = nets.discriminator(torch.cat([translation, reconstruction]),
                                              torch.cat([batch["example_class"], batch["content_class"]]))
        with torch.no_grad():  # the examples' features are targets only
            reals, real_class = self._reals(batch)
            _, real_features = nets.discriminator(reals, real_class)
        loss_gan = hp["lambda_gan"] * 0.5 * (gan_loss(logits[:n], True, "hinge", for_discriminator=False)
                                             + gan_loss(logits[n:], True, "hinge", for_discriminator=False))
        loss_recon = hp["lambda_recon"] * l1(reconstruction, content)
        loss_fm = hp["lambda_fm"] * l1(features[:n], real_features.view(n, shots, -1).mean(1))
        loss = loss_gan + loss_recon + loss_fm
        return loss, detached(g_gan=loss_gan, g_recon=loss_recon, g_fm=loss_fm)

    def samples(self, nets: Nets, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The translation of each content image into its examples' (held-out, on ``val``) class,
        against the same pose rendered in that class."""
        return nets.generator(batch["content"], batch["examples"], translate_only=True), batch["target"]

"""UNIT: the trainer contract, shapes and gradients, the shared-latent parts (KL, weight sharing,
latent noise), checkpointing, the paper's size, and its fp16 hazards (the KL of the latent code;
a textureless image at the content encoder's stem)."""
from __future__ import annotations

import pytest
import torch

from models.base import load_model
from models.translation import MultiResPatchDiscriminator
from models.unit import UNIT, latent_kl
from tests.translation_common import one_thread  # noqa: F401  (autouse fixture)
from tests.translation_common import (assert_within, batch_fixture, build, check_checkpointing, check_losses_and_grads,
                                      check_search_space, check_stem_hazard, contract_tests, eps_of, flat_images,
                                      paper_counts)

SIZE = 32


batch = batch_fixture(UNIT, SIZE)
test_trains_under_each_level, test_checkpoint_round_trip_resumes_exactly = contract_tests("unit")


def test_registry_presets_and_eps_sites():
    model = load_model("unit")
    assert isinstance(model, UNIT)
    assert all(set(p) == set(UNIT.presets["tiny"]) for p in UNIT.presets.values())
    assert UNIT.eps_sites == {"adam": 1e-8, "instance_norm": 1e-5, "spectral_norm": 1e-12}
    _, nets = build(UNIT, eps={"instance_norm": 1e-3, "spectral_norm": 1e-6})
    assert eps_of(nets.generator)["instance"] == {1e-3}
    assert eps_of(nets.discriminator)["spectral"] == {1e-6}
    assert isinstance(nets.discriminator["a"], MultiResPatchDiscriminator)


def test_paper_size_matches_the_published_networks():
    """Published sizes: NVlabs/imaginaire ``configs/projects/unit/winter2summer/base48_bs1.yaml``
    (the released winter<->summer model), counted by building imaginaire's own
    ``imaginaire.generators.unit.Generator`` and ``imaginaire.discriminators.unit.Discriminator``
    from that config (commit c6f7484): generator 12,555,654, discriminator 5,295,042 parameters."""
    g, d = paper_counts(UNIT)
    assert_within(g, 12_555_654, "generator")
    assert_within(d, 5_295_042, "discriminator")


def test_shapes_losses_and_gradients(batch):
    model, nets = build(UNIT)
    out = nets.generator(batch["image_a"], batch["image_b"])
    assert out["x_ab"].shape == out["x_aba"].shape == (2, 3, SIZE, SIZE)
    assert out["h_a"].shape == (2, 32, SIZE // 4, SIZE // 4) and out["x_ab"].abs().max() <= 1
    check_losses_and_grads(model, nets, batch, {"d_real", "d_fake"},
                           {"g_gan", "g_recon", "g_kl", "g_cycle", "g_kl_cycle"})
    nets.generator.eval()
    with torch.no_grad():
        fake, real = model.samples(nets, batch)
    assert fake.shape == real.shape == (4, 3, SIZE, SIZE)
    assert torch.equal(real, torch.cat([batch["image_b"], batch["image_a"]]))


def test_shared_blocks_are_one_module_and_noise_only_in_training(batch):
    _, nets = build(UNIT)  # tiny shares one block: the encoders' last, the decoders' first
    a, b = nets.generator["a"], nets.generator["b"]
    assert a.encoder.blocks[-1] is b.encoder.blocks[-1] and a.encoder.blocks[-2] is not b.encoder.blocks[-2]
    assert a.decoder.blocks[0] is b.decoder.blocks[0] and a.decoder.blocks[1] is not b.decoder.blocks[1]
    _, unshared = build(UNIT, shared_blocks=0)
    shared_params = 2 * sum(p.numel() for p in a.encoder.blocks[-1].parameters())
    assert sum(p.numel() for p in unshared.generator.parameters()) - \
        sum(p.numel() for p in nets.generator.parameters()) == shared_params
    with pytest.raises(ValueError, match="shared_blocks"):
        build(UNIT, shared_blocks=3)
    gen = nets.generator.eval()
    with torch.no_grad():
        first = gen(batch["image_a"], batch["image_b"], translate_only=True)[0]
        assert torch.equal(first, gen(batch["image_a"], batch["image_b"], translate_only=True)[0])
        gen.train()
        noisy = gen(batch["image_a"], batch["image_b"], translate_only=True)[0]
    assert (noisy - first).abs().mean() > 1e-3


@pytest.mark.parametrize("mode", ["blocks", "all"])
def test_checkpointing_gives_same_generator_grads(batch, mode):
    check_checkpointing(UNIT, batch, mode)


def test_rejects_sizes_the_encoder_cannot_halve(batch):
    _, nets = build(UNIT)
    with pytest.raises(ValueError, match="divisible by 4"):
        nets.generator(batch["image_a"][..., :30, :30], batch["image_b"][..., :30, :30])


def test_search_space_loads():
    check_search_space(UNIT, "ssim")


# ---------------------------------------------------------------------------- fp16 hazards
#
# UNIT's KL term is mean(h^2) over the latent code h, a (N, 4*nf, H/4, W/4) map that nothing
# bounds (the encoder ends with pre-activation residual blocks, no norm after the last addition).
# Squared in fp16, one entry above 256 overflows (256^2 > 65504) and the KL becomes inf, which
# skips the step, and step after step ends the run as diverged. CUDA autocast computes ``pow`` in
# fp32, CPU autocast and O3 (no autocast) do not: ``latent_kl`` squares in fp32 whatever the input
# dtype (the fix). Whether a run's codes reach 256 depends on the run; the shape below is the paper's
# latent at 512x512 (192 x 128 x 128), its few large entries are put there by hand.


def _naive_kl(h: torch.Tensor) -> torch.Tensor:
    return h.pow(2).mean()


def test_fp16_kl_overflows_without_the_fp32_square_and_not_with_it():
    torch.manual_seed(0)
    h = torch.randn(1, 192, 128, 128) * 20
    h[0, 0, :4, :4] = 300.0  # a few large activations, well inside fp16's range themselves
    half = h.half()
    assert torch.isfinite(half).all()
    assert not torch.isfinite(_naive_kl(half))                # without the fix: inf
    fixed = latent_kl(half)
    assert torch.isfinite(fixed)
    torch.testing.assert_close(fixed, latent_kl(h), rtol=1e-3, atol=0)


def _translate(generator, inputs):
    return generator(inputs[0], inputs[1], translate_only=True)[0]


@pytest.mark.parametrize("opt_level", ["O1", "O2"])
def test_fp16_textureless_image_hazard_and_the_fp32_stem(batch, opt_level):
    flat = flat_images(2, SIZE)
    check_stem_hazard(UNIT, _translate, [flat, flat.flip(0)], [batch["image_a"], batch["image_b"]], opt_level)

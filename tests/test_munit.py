"""MUNIT: the trainer contract, shapes and gradients, the style path (random and example-guided
styles, AdaIN, the MLP), eps routing, checkpointing, the paper's size, and its fp16 hazard (a
textureless image at the content encoder's stem)."""
from __future__ import annotations

import pytest
import torch

from models.base import load_model
from models.munit import MUNIT
from models.translation import AdaIN, MultiResPatchDiscriminator
from tests.translation_common import one_thread  # noqa: F401  (autouse fixture)
from tests.translation_common import (assert_within, batch_fixture, build, check_checkpointing, check_losses_and_grads,
                                      check_search_space, check_stem_hazard, contract_tests, eps_of, flat_images,
                                      paper_counts)

SIZE = 32


batch = batch_fixture(MUNIT, SIZE, split="val")
test_trains_under_each_level, test_checkpoint_round_trip_resumes_exactly = contract_tests("munit")


def test_registry_presets_and_eps_sites():
    assert isinstance(load_model("munit"), MUNIT)
    assert all(set(p) == set(MUNIT.presets["tiny"]) for p in MUNIT.presets.values())
    assert MUNIT.eps_sites == {"adam": 1e-8, "instance_norm": 1e-5, "adain": 1e-5, "layer_norm": 1e-5,
                               "spectral_norm": 1e-12}
    _, nets = build(MUNIT, eps={"instance_norm": 1e-4, "adain": 1e-3, "layer_norm": 1e-2, "spectral_norm": 1e-6})
    found = eps_of(nets.generator)
    assert found == {"instance": {1e-4}, "adain": {1e-3}, "layer": {1e-2}, "spectral": {1e-6}}
    assert eps_of(nets.discriminator)["spectral"] == {1e-6}
    assert isinstance(nets.discriminator["b"], MultiResPatchDiscriminator)
    assert len(nets.discriminator["b"].scales) == 2  # one set of weights per scale


def test_shapes_losses_and_gradients(batch):
    model, nets = build(MUNIT)
    out = nets.generator(batch["image_a"], batch["image_b"])
    assert out["x_ab"].shape == out["x_bab"].shape == (2, 3, SIZE, SIZE) and out["x_ab"].abs().max() <= 1
    assert out["c_a"].shape == (2, 32, SIZE // 4, SIZE // 4) and out["s_ab"].shape == out["rand_b"].shape == (2, 4)
    check_losses_and_grads(model, nets, batch, {"d_real", "d_fake"},
                           {"g_gan", "g_recon", "g_content", "g_style", "g_cycle"})


def test_style_decides_the_translation_and_samples_are_example_guided(batch):
    model, nets = build(MUNIT)
    gen = nets.generator.eval()
    a, b = batch["image_a"], batch["image_b"]
    with torch.no_grad():
        guided = gen(a, b, translate_only=True, style_from=(b, a))[0]
        other = gen(a, b, translate_only=True, style_from=(b.flip(0), a))[0]
        torch.manual_seed(0)
        random_1 = gen(a, b, translate_only=True)[0]
        random_2 = gen(a, b, translate_only=True)[0]
        fake, real = model.samples(nets, batch)
    assert (guided - other).abs().mean() > 1e-4          # another example, another style
    assert (random_1 - random_2).abs().mean() > 1e-4     # multimodal: every draw its own style
    assert torch.equal(fake[:2], guided) and torch.equal(real, torch.cat([b, a]))
    assert sum(isinstance(m, AdaIN) for m in gen["a"].decoder.modules()) == 2 * 2  # 2 blocks x 2 units


def test_paper_size_matches_the_published_networks():
    """Published sizes: NVlabs/imaginaire ``configs/projects/munit/summer2winter_hd/ampO1.yaml``
    (its multi-scale patch discriminators), counted by building imaginaire's own
    ``imaginaire.generators.munit.Generator`` and ``imaginaire.discriminators.munit.Discriminator``
    from that config (commit c6f7484): generator 32,483,606, discriminator 63,696,198 parameters.
    Ours has MUNIT's layer norm where that config's upsampling units have AdaIN: -0.7 %."""
    g, d = paper_counts(MUNIT)
    assert_within(g, 32_483_606, "generator")
    assert_within(d, 63_696_198, "discriminator")


@pytest.mark.parametrize("mode", ["blocks", "all"])
def test_checkpointing_gives_same_generator_grads(batch, mode):
    check_checkpointing(MUNIT, batch, mode)


def test_search_space_loads():
    assert len(check_search_space(MUNIT, "ssim").search.eps["adain"]) == 2


# ---------------------------------------------------------------------------- fp16 hazard
# (mechanism: tests/translation_common.py, models/translation.py ContentEncoder)


def _guided(generator, inputs):
    return generator(inputs[0], inputs[1], translate_only=True, style_from=(inputs[1], inputs[0]))[0]


@pytest.mark.parametrize("opt_level", ["O1", "O2"])
def test_fp16_textureless_image_hazard_and_the_fp32_stem(batch, opt_level):
    textured = [batch["image_a"], batch["image_b"]]
    check_stem_hazard(MUNIT, _guided, [flat_images(2, SIZE), batch["image_b"]], textured, opt_level)

"""COCO-FUNIT: the trainer contract, the content-conditioned style path and its constant style
bias, the paper's size, and the fp16 hazard it shares with FUNIT (a textureless image at the
content encoder's stem). Everything else it inherits is tested in tests/test_funit.py."""
from __future__ import annotations

import pytest
import torch

from models.base import load_model
from models.coco_funit import COCOFUNIT, COCOFUNITGenerator
from models.funit import FUNIT
from tests.translation_common import one_thread  # noqa: F401  (autouse fixture)
from tests.translation_common import (assert_within, batch_fixture, build, check_few_shot_model, check_search_space,
                                      check_stem_hazard, contract_tests, flat_images, paper_counts)

SIZE = 32


batch = batch_fixture(COCOFUNIT, SIZE)
test_trains_under_each_level, test_checkpoint_round_trip_resumes_exactly = contract_tests("coco_funit")


def test_registry_presets_and_eps_sites():
    assert isinstance(load_model("coco_funit"), COCOFUNIT)
    assert all(set(p) == set(COCOFUNIT.presets["tiny"]) for p in COCOFUNIT.presets.values())
    assert COCOFUNIT.eps_sites == FUNIT.eps_sites
    assert {k: v for k, v in COCOFUNIT.presets["paper"].items() if k != "usb_dim"} == FUNIT.presets["paper"]


def test_shapes_losses_gradients_and_examples(batch):
    check_few_shot_model(COCOFUNIT, batch, SIZE, shots=2)


def test_paper_size_matches_the_published_networks():
    """Published sizes: NVlabs/imaginaire ``configs/projects/coco_funit/animal_faces/base64_bs8_class149.yaml``,
    counted by building imaginaire's own ``imaginaire.generators.coco_funit.Generator`` and
    ``imaginaire.discriminators.funit.Discriminator`` from that config (commit c6f7484): generator
    121,562,307, discriminator 92,038,977 parameters."""
    g, d = paper_counts(COCOFUNIT)
    assert_within(g, 121_562_307, "generator")
    assert_within(d, 92_038_977, "discriminator")


def test_style_is_conditioned_on_the_content_and_carries_the_constant_bias(batch):
    _, nets = build(COCOFUNIT)
    gen: COCOFUNITGenerator = nets.generator.eval()
    assert gen.usb.shape == (1, 32) and gen.usb.requires_grad
    with torch.no_grad():
        code = gen.content_encoder(batch["content"])
        class_code = gen.class_encoder(batch["examples"][:, 0])
        same_class = class_code[:1].expand_as(class_code)
        # one class code, two contents: two style vectors (FUNIT would give one)
        styles = gen.conditioning(code, same_class)
        assert (styles[0] - styles[1]).abs().max() > 1e-5
        # the constant style bias is part of every style vector
        before = gen.conditioning(code, class_code)
        gen.usb.add_(1.0)
        assert (gen.conditioning(code, class_code) - before).abs().max() > 1e-5


def test_search_space_loads():
    check_search_space(COCOFUNIT, "l1")


@pytest.mark.parametrize("opt_level", ["O1", "O2"])
def test_fp16_textureless_image_hazard_and_the_fp32_stem(batch, opt_level):
    def translate(generator, inputs):
        return generator(inputs[0], inputs[1], translate_only=True)

    textured = [batch["content"], batch["examples"]]
    check_stem_hazard(COCOFUNIT, translate, [flat_images(2, SIZE), batch["examples"]], textured, opt_level)

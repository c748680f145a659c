"""FUNIT: the trainer contract, shapes and gradients, the K-shot class code, the projection
discriminator, the data's class limit, eps routing, checkpointing, the paper's size, and its fp16
hazard (a textureless image at the content encoder's stem)."""
from __future__ import annotations

import pytest
import torch

from models.base import load_model
from models.funit import FUNIT
from models.translation import ProjectionDiscriminator
from orchestrator.config import DataConfig
from tests.translation_common import one_thread  # noqa: F401  (autouse fixture)
from tests.translation_common import (assert_within, batch_fixture, build, check_checkpointing, check_few_shot_model,
                                      check_search_space, check_stem_hazard, contract_tests, eps_of, flat_images,
                                      paper_counts)

SIZE = 32


batch = batch_fixture(FUNIT, SIZE, options={"shots": 3})
test_trains_under_each_level, test_checkpoint_round_trip_resumes_exactly = contract_tests("funit")


def test_registry_presets_and_eps_sites():
    assert isinstance(load_model("funit"), FUNIT)
    assert all(set(p) == set(FUNIT.presets["tiny"]) for p in FUNIT.presets.values())
    assert FUNIT.eps_sites == {"adam": 1e-8, "instance_norm": 1e-5, "adain": 1e-5, "spectral_norm": 1e-12}
    _, nets = build(FUNIT, eps={"instance_norm": 1e-4, "adain": 1e-3, "spectral_norm": 1e-6})
    assert eps_of(nets.generator) == {"instance": {1e-4}, "adain": {1e-3}, "layer": set(), "spectral": set()}
    assert eps_of(nets.discriminator)["spectral"] == {1e-6}
    assert isinstance(nets.discriminator, ProjectionDiscriminator) and nets.discriminator.num_classes == 32


def test_paper_size_matches_the_published_networks():
    """Published sizes: NVlabs/imaginaire ``configs/projects/funit/animal_faces/base64_bs8_class149.yaml``,
    counted by building imaginaire's own ``imaginaire.generators.funit.Generator`` and
    ``imaginaire.discriminators.funit.Discriminator`` from that config (commit c6f7484): generator
    120,987,203, discriminator 92,038,977 parameters (ours: +66 k, a third MLP layer, see models/funit.py)."""
    g, d = paper_counts(FUNIT)
    assert_within(g, 120_987_203, "generator")
    assert_within(d, 92_038_977, "discriminator")


def test_shapes_losses_gradients_and_examples(batch):
    check_few_shot_model(FUNIT, batch, SIZE, shots=3)


def test_class_code_is_the_mean_of_the_examples_codes(batch):
    _, nets = build(FUNIT)
    gen = nets.generator.eval()
    examples = batch["examples"]
    repeated = examples[:, :1].expand_as(examples).contiguous()  # K copies of the first example
    with torch.no_grad():
        one = gen(batch["content"], examples[:, :1], translate_only=True)
        same = gen(batch["content"], repeated, translate_only=True)
    torch.testing.assert_close(same, one, rtol=1e-4, atol=1e-5)


def test_data_must_fit_the_discriminator_classes():
    model, _ = build(FUNIT)
    with pytest.raises(ValueError, match="num_classes"):
        model.dataset(DataConfig(options={"classes": 33}), "train")
    assert len(model.dataset(DataConfig(val_samples=3), "val")) == 3
    with pytest.raises(ValueError, match="synthetic"):
        model.dataset(DataConfig(kind="folder", root="/tmp"), "train")


@pytest.mark.parametrize("mode", ["blocks", "all"])
def test_checkpointing_gives_same_generator_grads(batch, mode):
    check_checkpointing(FUNIT, batch, mode)


def test_search_space_loads():
    config = check_search_space(FUNIT, "l1")
    assert config.data.options["classes"] <= FUNIT.presets["tiny"]["num_classes"]


# ---------------------------------------------------------------------------- fp16 hazard
# (mechanism: tests/translation_common.py, models/translation.py ContentEncoder)


def _translate(generator, inputs):
    return generator(inputs[0], inputs[1], translate_only=True)


@pytest.mark.parametrize("opt_level", ["O1", "O2"])
def test_fp16_textureless_image_hazard_and_the_fp32_stem(batch, opt_level):
    textured = [batch["content"], batch["examples"]]
    check_stem_hazard(FUNIT, _translate, [flat_images(2, SIZE), batch["examples"]], textured, opt_level)

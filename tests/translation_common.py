"""Checks shared by the tests of the unsupervised translation models (UNIT, MUNIT, FUNIT,
COCO-FUNIT): building, gradients, gradient checkpointing, parameter counts, eps routing, and the
fp16-vs-fp32 comparison the hazard tests use."""
from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import default_collate

from models.base import GANModel
from models.spade import SNConv2d
from models.translation import AdaIN, count_parameters
from orchestrator.config import DataConfig, StudyConfig
from orchestrator.precision import PrecisionPolicy
from tests import model_contract
from tests.model_contract import one_thread  # noqa: F401  (autouse fixture, imported from here by the test modules)
from tests.model_contract import assert_same_generator_grads, build, check_losses_and_grads


def contract_tests(model_name: str, data: DataConfig = model_contract.CONTRACT_DATA):
    """The trainer half of ``model_contract.contract_tests`` (every opt level trains, a checkpoint
    round trip resumes exactly): the search space is checked, with its metric, by
    ``check_search_space``."""
    return model_contract.contract_tests(model_name, data)[:2]


def batch_of(model: GANModel, size: int, split: str = "train", n: int = 2, **data: Any) -> dict[str, torch.Tensor]:
    dataset = model.dataset(DataConfig(height=size, width=size, train_samples=max(n, 2), val_samples=max(n, 2),
                                       **data), split)
    return default_collate([dataset[i] for i in range(n)])


def batch_fixture(cls: type[GANModel], size: int = 32, split: str = "train", **data: Any):
    """A module-scoped ``batch`` fixture: two items of ``cls``'s data at ``size``."""

    @pytest.fixture(scope="module")
    def batch() -> dict[str, torch.Tensor]:
        return batch_of(cls(), size, split, **data)

    return batch


def check_search_space(cls: type[GANModel], metric: str) -> StudyConfig:
    """``model_contract.check_search_space`` with ``metric``, and a tiny grid (a few minutes of
    profiling on 2 cores)."""
    config = model_contract.check_search_space(cls.name, metric)
    assert len(config.search.candidates()) <= 24
    return config


def check_checkpointing(cls: type[GANModel], batch: dict, mode: str) -> None:
    """Gradient checkpointing changes no generator gradient."""
    model, plain = build(cls, seed=1)
    _, ckpt = build(cls, seed=1, checkpointing=mode)
    assert_same_generator_grads(model, plain, ckpt, batch)


def paper_counts(cls: type[GANModel]) -> tuple[int, int]:
    """(generator, discriminator) parameters of the paper preset, built on the meta device."""
    with torch.device("meta"):
        _, nets = build(cls, "paper")
    return count_parameters(nets.generator), count_parameters(nets.discriminator)


def assert_within(count: int, published: int, what: str, tolerance: float = 0.10) -> None:
    assert abs(count - published) <= tolerance * published, \
        f"{what}: {count:,} parameters vs {published:,} published ({count / published - 1:+.1%})"


def eps_of(module: nn.Module) -> dict[str, set[float]]:
    """The eps of every norm and spectral norm in ``module``, by kind."""
    out: dict[str, set[float]] = {"instance": set(), "adain": set(), "layer": set(), "spectral": set()}
    adain_norms = {id(m.norm) for m in module.modules() if isinstance(m, AdaIN)}
    for m in module.modules():
        if isinstance(m, nn.InstanceNorm2d):
            out["adain" if id(m) in adain_norms else "instance"].add(m.eps)
        elif isinstance(m, nn.GroupNorm):
            out["layer"].add(m.eps)
        elif isinstance(m, SNConv2d):
            out["spectral"].add(m.sn_eps)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp32."""
    return float((a.float() - b.float()).norm() / b.float().norm())


# ---------------------------------------------------------------------------- the stem hazard
#
# Shared by the four models' hazard tests (see ``models.translation.ContentEncoder``): a
# textureless image, one colour quantised to 8 bits with +-1 level of dither (what a camera or a
# JPEG makes of fog, a snow field or a studio backdrop), makes the content encoder's first conv
# output a large offset plus a tiny variation. fp16 keeps 11 bits of the offset, which is coarser
# than the variation; the instance norm right after removes the offset and scales the rounding
# noise up with what is left, and every later norm carries it on. The fix computes that first unit
# in fp32 and keeps the images it reads fp32 under O2/O3 (``fp32_batch_keys``).


def flat_images(n: int, size: int, colour: tuple[float, float, float] = (0.55, 0.62, 0.7),
                seed: int = 1) -> torch.Tensor:
    """(n, 3, size, size) textureless images in [-1, 1]: ``colour`` in 8 bits, +-1 level of dither."""
    gen = torch.Generator().manual_seed(seed)
    levels = (torch.tensor(colour).view(1, 3, 1, 1) * 255).round()
    return (levels + torch.randint(-1, 2, (n, 3, size, size), generator=gen)) / 255 * 2 - 1


def stem_errors(cls: type[GANModel], run: Callable[[nn.Module, list[torch.Tensor]], torch.Tensor],
                inputs: list[torch.Tensor], opt_level: str, fp32_inputs: int) -> dict[bool, float]:
    """fp16-vs-fp32 relative error of ``run(generator, inputs)`` (eval mode) without and with the
    fp32 stem, same weights. The first ``fp32_inputs`` inputs stay fp32 under O2, as the model's
    ``fp32_batch_keys`` keep them in training."""
    errors = {}
    for fixed in (False, True):
        _, nets = build(cls, fp32_stem=fixed)
        generator = nets.generator.eval()
        policy = PrecisionPolicy(opt_level, "fp16", device_type="cpu")
        half = policy.prepare_network(copy.deepcopy(generator))
        low_inputs = [t if i < fp32_inputs else t.to(policy.input_dtype) for i, t in enumerate(inputs)]
        with torch.no_grad():
            full = run(generator, inputs)
            with policy.autocast():
                low = run(half, low_inputs)
        errors[fixed] = rel_err(low, full)
    return errors


def check_stem_hazard(cls: type[GANModel], run: Callable[[nn.Module, list[torch.Tensor]], torch.Tensor],
                      flat_inputs: list[torch.Tensor], textured_inputs: list[torch.Tensor], opt_level: str) -> None:
    """Without the fix a textureless image drives fp16 far from fp32 (measured 3-5 % at the tiny
    presets), several times what textured data does; with the fix it does not (measured < 0.5 %).
    The inputs come in the order of ``cls.fp32_batch_keys`` first; the fix is every preset's default."""
    fp32_inputs = len(cls.fp32_batch_keys)
    errors_flat = stem_errors(cls, run, flat_inputs, opt_level, fp32_inputs)
    errors_textured = stem_errors(cls, run, textured_inputs, opt_level, fp32_inputs)
    broken, fixed = errors_flat[False], errors_flat[True]
    assert broken > 0.02, f"no hazard without the fp32 stem: {broken:.4f}"
    assert fixed < 0.01, f"the fp32 stem did not fix it: {fixed:.4f}"
    assert broken > 4 * fixed
    assert errors_textured[False] < broken / 2, "the hazard is specific to textureless images"
    assert all(preset["fp32_stem"] for preset in cls.presets.values())


# ---------------------------------------------------------------------------- FUNIT and COCO-FUNIT


def check_few_shot_model(cls: type[GANModel], batch: dict, size: int, shots: int) -> None:
    """Shapes, losses and gradients of a few-shot model; its samples translate into the examples'
    class and are compared with the ground-truth rendering; other examples, other output."""
    model, nets = build(cls)
    translation, reconstruction = nets.generator(batch["content"], batch["examples"])
    n = batch["content"].shape[0]
    assert batch["examples"].shape[:2] == (n, shots)
    assert translation.shape == reconstruction.shape == (n, 3, size, size) and translation.abs().max() <= 1
    logits, pooled = nets.discriminator(translation, batch["example_class"])
    assert logits.shape[:2] == (n, 1) and pooled.shape == (n, nets.discriminator.embedding.embedding_dim)
    check_losses_and_grads(model, nets, batch, {"d_real", "d_fake"}, {"g_gan", "g_recon", "g_fm"})
    gen = nets.generator.eval()
    with torch.no_grad():
        fake, real = model.samples(nets, batch)
        other = gen(batch["content"], -batch["examples"], translate_only=True)  # colours inverted
    assert fake.shape == (n, 3, size, size) and torch.equal(real, batch["target"])
    # (at init the class encoder tells classes apart only faintly, and COCO-FUNIT's constant style
    # bias outweighs it: the effect is small, but far above fp32 rounding)
    assert (fake - other).abs().max() > 1e-6, "the examples must drive the translation"

"""Checks shared by the tests of the unsupervised translation models (UNIT, MUNIT, FUNIT,
COCO-FUNIT): building, gradients, gradient checkpointing, parameter counts, eps routing, and the
fp16-vs-fp32 comparison the hazard tests use."""
from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import default_collate

from models.base import GANModel, Nets
from models.spade import SNConv2d
from models.translation import AdaIN, count_parameters
from orchestrator.config import DataConfig, StudyConfig, load_config
from orchestrator.precision import PrecisionPolicy
from orchestrator.settings import SpeedFlags
from tests.model_contract import LEVELS, check_resume, check_trains

# the contract runs at 16x16: fp16 on a CPU is emulated, ~10-75x slower than fp32
CONTRACT_DATA = DataConfig(height=16, width=16, train_samples=8, val_samples=4)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread per test module (import it to use it): on a shared 2-core CPU two
    OpenMP threads competing with other processes make steps many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def contract_tests(model_name: str, data: DataConfig = CONTRACT_DATA):
    """The trainer contract of ``tests/model_contract.py`` as two test functions for a model's test
    module: every opt level trains, and a checkpoint round trip resumes exactly."""

    @pytest.mark.parametrize("opt_level,dtype", LEVELS)
    def test_trains_under_each_level(opt_level, dtype):
        check_trains(model_name, data, opt_level, dtype)

    def test_checkpoint_round_trip_resumes_exactly(tmp_path: Path):
        check_resume(model_name, data, tmp_path)

    return test_trains_under_each_level, test_checkpoint_round_trip_resumes_exactly


def build(cls: type[GANModel], preset: str = "tiny", seed: int = 0, eps: dict | None = None,
          checkpointing: str = "none", **options: Any) -> tuple[GANModel, Nets]:
    model = cls(**options)
    torch.manual_seed(seed)
    return model, model.build(preset, model.resolve_eps(eps), SpeedFlags(checkpointing=checkpointing))


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
    """``search_spaces/<name>.yaml`` loads, names the model, searches only its eps sites (each
    with its default among the values), decides by ``metric``, and stays a tiny grid (a few
    minutes of profiling on 2 cores)."""
    config = load_config(f"search_spaces/{cls.name}.yaml")
    assert config.model.name == cls.name and config.quality.metric == metric
    assert set(config.search.eps) <= set(cls.eps_sites)
    assert all(cls.eps_sites[site] in values for site, values in config.search.eps.items())
    assert len(config.search.candidates()) <= 24
    return config


def assert_finite_grads(module: nn.Module, what: str) -> None:
    for name, param in module.named_parameters():
        assert param.grad is not None, f"{what}.{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{what}.{name} has a non-finite gradient"


def check_losses_and_grads(model: GANModel, nets: Nets, batch: dict, d_logs: set[str], g_logs: set[str]) -> None:
    """The D loss reaches every D parameter and no G parameter; the G loss reaches every G
    parameter (DDP needs no ``find_unused_parameters``); both finite, with the named logs."""
    d_loss, logs = model.discriminator_loss(nets, batch)
    assert torch.isfinite(d_loss) and set(logs) == d_logs
    assert all(not v.requires_grad for v in logs.values()), "logs must be detached tensors"
    d_loss.backward()
    assert_finite_grads(nets.discriminator, "D")
    assert all(p.grad is None for p in nets.generator.parameters()), "the D loss must not reach G"
    nets.discriminator.zero_grad(set_to_none=True)
    g_loss, logs = model.generator_loss(nets, batch)
    assert torch.isfinite(g_loss) and set(logs) == g_logs
    g_loss.backward()
    assert_finite_grads(nets.generator, "G")


def generator_grads(model: GANModel, nets: Nets, batch: dict) -> dict[str, torch.Tensor]:
    nets.generator.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the models' own noise (latent noise, random styles)
    loss, _ = model.generator_loss(nets, batch)
    loss.backward()
    return {name: p.grad.clone() for name, p in nets.generator.named_parameters()}


def check_checkpointing(cls: type[GANModel], batch: dict, mode: str) -> None:
    """Gradient checkpointing changes no generator gradient."""
    model, plain = build(cls, seed=1)
    _, ckpt = build(cls, seed=1, checkpointing=mode)
    expected, got = generator_grads(model, plain, batch), generator_grads(model, ckpt, batch)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


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

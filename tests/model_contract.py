"""What the model test modules share (issue 3, issue 12): the checks every GAN family must pass (a
tiny preset trains under each precision level with finite losses, a checkpoint round trip continues
bit-exactly, its study YAML loads), as test functions a module assigns to its own names, and the
helpers their tests use (building a tiny preset, gradients, one intra-op thread); plus the check of
a finished study's MLflow runs that the end-to-end tests share."""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from models.base import GANModel, Nets, load_model
from orchestrator.config import DataConfig, StudyConfig, load_config
from orchestrator.settings import Setting, SpeedFlags
from orchestrator.trainer import Trainer, unwrap
from search_spaces import default_path

LEVELS = [("O0", "fp16"), ("O1", "bf16"), ("O1", "fp16"), ("O2", "bf16"), ("O2", "fp16")]
# the contract runs at 16x16 by default: fp16 on a CPU is emulated, ~10-75x slower than fp32
CONTRACT_DATA = DataConfig(height=16, width=16, train_samples=8, val_samples=4)


# ---------------------------------------------------------------------------- threads


@contextlib.contextmanager
def intra_op_threads(count: int):
    """torch's intra-op threads set to ``count`` meanwhile: model test modules use 1, since the 2
    cores are shared with other test processes and oversubscribed OpenMP barriers stall steps."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for the module that imports this fixture (on a shared 2-core CPU two
    OpenMP threads competing with other processes made steps up to 10x slower, from 0.1 s to 5 s)."""
    with intra_op_threads(1):
        yield


# ---------------------------------------------------------------------------- the trainer contract


def make_trainer(model_name: str, data: DataConfig, setting: Setting, seed: int = 0, **options) -> Trainer:
    return Trainer(load_model(model_name, **options), setting, preset="tiny", data=data, seed=seed,
                   device="cpu")


def check_trains(model_name: str, data: DataConfig, opt_level: str, dtype: str, steps: int = 3,
                 eps: dict[str, float] | None = None, **options) -> None:
    """``steps`` steps under one precision level: finite losses every step, no divergence."""
    setting = Setting(opt_level=opt_level, dtype=dtype, batch_size=2, eps=eps or {})
    record = make_trainer(model_name, data, setting, **options).run(steps)
    assert record.status == "ok", f"{model_name} {opt_level}-{dtype}: {record.status} ({record.reason})"
    assert record.steps == steps
    for logs in record.losses:
        for key, value in logs.items():
            if key.startswith("loss_"):
                assert math.isfinite(value), f"{model_name} {opt_level}-{dtype}: {key}={value}"


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.detach().clone() for name, net in trainer.nets.named().items()
            for k, v in unwrap(net).state_dict().items()}


def check_resume(model_name: str, data: DataConfig, tmp_path: Path, setting: Setting | None = None,
                 **options) -> None:
    """Train 3 steps, save, train 2 more; a fresh trainer that loads the checkpoint and trains 2
    steps must end with exactly the same weights."""
    setting = setting or Setting(opt_level="O1", dtype="bf16", batch_size=2)
    first = make_trainer(model_name, data, setting, **options)
    first.run(3)
    first.save(tmp_path)
    first.run(2)
    expected = _weights(first)

    second = make_trainer(model_name, data, setting, seed=123, **options)  # different init on purpose
    second.load(tmp_path)
    second.run(2)
    actual = _weights(second)
    assert second.step == first.step
    for key, value in expected.items():
        assert torch.equal(value, actual[key]), f"{model_name}: {key} differs after resume"


def check_search_space(model_name: str, metric: str | None = None) -> StudyConfig:
    """``search_spaces/<name>.yaml`` loads, names the model, searches only its eps sites, each with
    the model's default among the values (the fp32 code's value is always a candidate), and decides
    by ``metric`` where one is given."""
    config = load_config(default_path(model_name))
    eps_sites = load_model(model_name).eps_sites
    assert config.model.name == model_name
    assert set(config.search.eps) <= set(eps_sites)
    assert all(eps_sites[site] in values for site, values in config.search.eps.items()), config.search.eps
    if metric is not None:
        assert config.quality.metric == metric
    return config


def check_registry_and_presets(cls: type[GANModel]) -> dict[str, Any]:
    """``cls`` is registered under its name, has tiny/small/paper presets with the same keys, and
    names an option or eps site it lacks; returns its paper preset (for the model's own checks)."""
    model = load_model(cls.name)
    assert isinstance(model, cls) and model.name == cls.name
    keys = set(cls.presets["tiny"])
    assert set(cls.presets) == {"tiny", "small", "paper"} and all(set(p) == keys for p in cls.presets.values())
    with pytest.raises(ValueError, match="no option"):
        cls(no_such_option=3).arch("tiny")
    with pytest.raises(ValueError, match="no eps site"):
        model.resolve_eps({"no_such_site": 0.1})
    return cls.presets["paper"]


def contract_tests(model_name: str, data: DataConfig = CONTRACT_DATA, fp16_eps: dict[str, float] | None = None):
    """The contract as three test functions for a model's test module to assign to its own names
    (so pytest collects them there): every opt level trains (with ``fp16_eps``, a model's fp16 fix,
    where a level computes in fp16), a checkpoint round trip resumes exactly, and the study YAML
    loads (``check_search_space``)."""

    @pytest.mark.parametrize("opt_level,dtype", LEVELS)
    def test_trains_under_each_level(opt_level, dtype):
        half = dtype == "fp16" and opt_level != "O0"
        check_trains(model_name, data, opt_level, dtype, eps=fp16_eps if half else None)

    def test_checkpoint_round_trip_resumes_exactly(tmp_path: Path):
        check_resume(model_name, data, tmp_path)

    def test_study_yaml_loads():
        check_search_space(model_name)

    return test_trains_under_each_level, test_checkpoint_round_trip_resumes_exactly, test_study_yaml_loads


# ---------------------------------------------------------------------------- networks and gradients


def build(cls: type[GANModel], preset: str = "tiny", seed: int = 0, eps: dict | None = None,
          checkpointing: str = "none", fusion: str = "none", **options: Any) -> tuple[GANModel, Nets]:
    """(model, its networks) of ``cls(**options)`` at ``preset``, initialised from ``seed``. A test
    module binds its class: ``build = functools.partial(model_contract.build, MyModel)``."""
    model = cls(**options)
    torch.manual_seed(seed)
    return model, model.build(preset, model.resolve_eps(eps), SpeedFlags(checkpointing=checkpointing, fusion=fusion))


def assert_finite_grads(module: nn.Module, what: str) -> None:
    for name, param in module.named_parameters():
        assert param.grad is not None, f"{what}.{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{what}.{name} has a non-finite gradient"


def check_losses_and_grads(model: GANModel, nets: Nets, batch: dict, d_logs: set[str],
                           g_logs: set[str]) -> dict[str, torch.Tensor]:
    """The D loss reaches every D parameter and no G parameter; the G loss reaches every G
    parameter (DDP needs no ``find_unused_parameters``); both finite, with the named logs, each a
    finite detached tensor (a float() would wait for the device). Returns the G logs."""
    d_loss, logs = model.discriminator_loss(nets, batch)
    assert torch.isfinite(d_loss) and set(logs) == d_logs
    assert_detached_finite_logs(logs)
    d_loss.backward()
    assert_finite_grads(nets.discriminator, "D")
    assert all(p.grad is None for p in nets.generator.parameters()), "the D loss must not reach G"
    nets.discriminator.zero_grad(set_to_none=True)
    g_loss, logs = model.generator_loss(nets, batch)
    assert torch.isfinite(g_loss) and set(logs) == g_logs
    assert_detached_finite_logs(logs)
    g_loss.backward()
    assert_finite_grads(nets.generator, "G")
    return logs


def assert_detached_finite_logs(logs: dict) -> None:
    for key, value in logs.items():
        assert torch.is_tensor(value) and not value.requires_grad, f"log {key} must be a detached tensor"
        assert torch.isfinite(value), f"log {key} is not finite"


def generator_grads(model: GANModel, nets: Nets, batch: dict) -> dict[str, torch.Tensor]:
    """The generator loss's gradient of every generator parameter, from a fixed seed (the models'
    own noise: VAE reparameterisation, latent noise, random styles)."""
    nets.generator.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    loss, _ = model.generator_loss(nets, batch)
    loss.backward()
    return {name: p.grad.clone() for name, p in nets.generator.named_parameters()}


def assert_same_generator_grads(model: GANModel, expected: Nets, nets: Nets, batch: dict, rtol: float = 1e-5,
                                atol: float = 1e-6) -> None:
    """``nets`` (e.g. with gradient checkpointing) give ``expected``'s generator gradients."""
    want, got = generator_grads(model, expected, batch), generator_grads(model, nets, batch)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=name)


# ---------------------------------------------------------------------------- a finished study


def study_runs(client, experiment: str, rows: int) -> tuple[list, Any, list]:
    """(every run, the parent run, its children) of a study's MLflow ``experiment``: one parent
    run, and one nested child per row of its results table (``rows``)."""
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("amp.kind") == "study"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == rows
    return runs, parents[0], children

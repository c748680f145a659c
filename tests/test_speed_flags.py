"""Speed flags change speed, not arithmetic: checkpointing gives the same gradients (pix2pixHD,
blocks and all), fused and plain Adam agree over several steps, and the trainer with fused Adam,
jit fusion or channels-last trains like the plain one and reports what it used."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import default_collate

from models.base import load_model
from models.pix2pixhd import Pix2PixHD
from orchestrator.config import DataConfig
from orchestrator.data.street import StreetDataset
from orchestrator.precision import PrecisionPolicy
from orchestrator.settings import Setting, SpeedFlags
from orchestrator.trainer import Trainer

SIZE = 32


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    data = StreetDataset(DataConfig(height=SIZE, width=SIZE, train_samples=2), "train")
    return default_collate([data[0], data[1]])


def grads_of_both_losses(checkpointing: str, batch, autocast_dtype: torch.dtype | None = None):
    model = Pix2PixHD()
    torch.manual_seed(3)
    nets = model.build("tiny", model.resolve_eps(None), SpeedFlags(checkpointing=checkpointing))
    out = {}
    for name, fn in (("discriminator", model.discriminator_loss), ("generator", model.generator_loss)):
        net = getattr(nets, name)
        net.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            loss, _ = fn(nets, batch)
        loss.float().backward()
        out[name] = {k: p.grad.clone() for k, p in net.named_parameters()}
    return out


@pytest.mark.parametrize("mode", ["blocks", "all"])
@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["fp32", "O1-bf16"])
def test_checkpointing_gives_the_same_gradients(batch, mode, autocast_dtype):
    plain = grads_of_both_losses("none", batch, autocast_dtype)
    ckpt = grads_of_both_losses(mode, batch, autocast_dtype)
    # recomputation runs the very same ops (autocast state included): equal up to summation order
    tol = dict(rtol=1e-5, atol=1e-6) if autocast_dtype is None else dict(rtol=1e-2, atol=1e-4)
    for net in plain:
        assert plain[net].keys() == ckpt[net].keys()
        for key, grad in plain[net].items():
            torch.testing.assert_close(ckpt[net][key], grad, **tol, msg=f"{net}.{key}")


def _net() -> nn.Module:
    # no conv bias right before a norm: its gradient is mathematically 0, so Adam's m / sqrt(v)
    # there is rounding noise over rounding noise, and any two implementations disagree on it
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.LeakyReLU(0.2), nn.Conv2d(8, 8, 3), nn.LeakyReLU(0.2),
                         nn.Conv2d(8, 1, 3))


def _norm_cancelled_biases(net: nn.Module, prefix: str) -> set[str]:
    """Names of conv biases that an InstanceNorm right after cancels (zero true gradient)."""
    names = set()
    for module_name, module in net.named_modules():
        children = list(module.named_children())
        for (conv_name, conv), (_, nxt) in zip(children, children[1:]):
            if isinstance(conv, nn.modules.conv._ConvNd) and isinstance(nxt, nn.InstanceNorm2d) and conv.bias is not None:
                names.add(f"{prefix}.{module_name}.{conv_name}.bias".replace("..", "."))
    return names


@pytest.mark.parametrize("level,dtype", [("O0", "fp16"), ("O1", "bf16"), ("O2", "bf16")])
def test_fused_and_plain_adam_match_over_steps(level, dtype):
    runs = {}
    for fused in (False, True):
        policy = PrecisionPolicy(level, dtype, loss_names=("net",))
        net = policy.prepare_network(_net())
        opt = policy.make_optimizer("net", net.parameters(), lr=1e-2, betas=(0.5, 0.999), eps=1e-6, fused=fused)
        assert policy.optimizer_impl["net"] == ("fused" if fused else "default")
        g = torch.Generator().manual_seed(1)
        for _ in range(6):
            x = torch.randn(2, 3, 8, 8, generator=g).to(policy.input_dtype)
            with policy.autocast():
                loss = net(x).float().square().mean()
            assert not bool(policy.step("net", loss, opt))  # applied
        masters = getattr(opt, "model_parameters", None)
        runs[fused] = [p.detach().float().clone() for p in net.parameters()]
        if level == "O2":  # compare the fp32 masters too, where the update happens
            runs[(fused, "masters")] = [p.detach().clone() for g_ in opt.param_groups for p in g_["params"]]
        assert masters is None or level == "O2"
    tol = dict(rtol=1e-5, atol=1e-6) if level == "O0" else dict(rtol=2e-2, atol=1e-3)
    for plain, fused in zip(runs[False], runs[True], strict=True):
        torch.testing.assert_close(fused, plain, **tol)
    if level == "O2":
        for plain, fused in zip(runs[(False, "masters")], runs[(True, "masters")], strict=True):
            torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)


def _trained(flags: SpeedFlags, steps: int = 3):
    data = DataConfig(height=SIZE, width=SIZE, train_samples=4)
    trainer = Trainer(load_model("pix2pixhd"), Setting(batch_size=2, flags=flags), preset="tiny", data=data,
                      seed=0, device="cpu")
    record = trainer.run(steps)
    assert record.status == "ok", record.reason
    skip = set().union(*(_norm_cancelled_biases(net, n) for n, net in trainer.nets.named().items()))
    weights = {f"{n}.{k}": p.detach().clone() for n, net in trainer.nets.named().items()
               for k, p in net.named_parameters() if f"{n}.{k}" not in skip}
    assert skip and len(weights) > len(skip)
    return trainer, record, weights


@pytest.fixture(scope="module")
def plain_run():
    return _trained(SpeedFlags())


@pytest.mark.parametrize("flags,tol", [
    (SpeedFlags(fused_optimizer=True), 1e-5),
    (SpeedFlags(fusion="jit"), 1e-4),
    (SpeedFlags(channels_last=True), 1e-3),  # other conv kernels: different summation order
    (SpeedFlags(checkpointing="all"), 1e-5),
], ids=["fused_optimizer", "fusion-jit", "channels_last", "checkpointing-all"])
def test_trainer_with_a_speed_flag_trains_like_the_plain_one(plain_run, flags, tol):
    _, plain_record, plain = plain_run
    trainer, record, got = _trained(flags)
    for a, b in zip(record.losses, plain_record.losses):
        assert a["loss_generator"] == pytest.approx(b["loss_generator"], rel=tol * 10, abs=tol)
        assert a["loss_discriminator"] == pytest.approx(b["loss_discriminator"], rel=tol * 10, abs=tol)
    for key, weight in plain.items():
        torch.testing.assert_close(got[key], weight, rtol=tol * 10, atol=tol, msg=key)
    info = trainer.speed_info
    impl = "fused" if flags.fused_optimizer else "default"
    assert info["optimizer_impl_generator"] == info["optimizer_impl_discriminator"] == impl
    assert info["affinity"] == "off"
    if flags.fusion != "none":
        assert info["fusion"] == flags.fusion and info["fusion_fallbacks"] == "none"
    else:
        assert "fusion" not in info

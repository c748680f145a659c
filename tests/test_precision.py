"""The precision policy on CPU: weight dtypes, autocast, master weights, per-loss scalers, divergence
and exact checkpoint round trips. Tiny tensors only; fp16 on CPU is slow but numerically CUDA's."""
from __future__ import annotations

import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.precision import Diverged, HalfGradScaler, MasterWeightAdam, PrecisionPolicy

LEVELS = ("O0", "O1", "O2", "O3")
DTYPES = ("fp16", "bf16")
ALL = [(level, dtype) for level in LEVELS for dtype in DTYPES]
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Adam eps per dtype for training tests: 1e-8 is 0 in fp16, which makes unfused fp16 Adam (O3) emit
# NaN on a zero gradient (see test_o3_fp16_default_eps_is_caught_as_diverged); 1e-4 survives.
EPS = {"fp16": 1e-4, "bf16": 1e-8}


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(4)  # affine=False: no parameters, still a norm layer
        self.bnorm = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 2)

    def forward(self, x):
        return self.fc(F.relu(self.bnorm(self.inorm(self.conv(x)))).flatten(1))


def make(level, dtype, seed=0, names=("net",), **kwargs):
    torch.manual_seed(seed)
    policy = PrecisionPolicy(level, dtype, loss_names=names, **kwargs)
    nets = {n: policy.prepare_network(TinyNet()) for n in names}
    return policy, nets


def data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 2, generator=g)


def one_net(level, dtype, optimizer: dict, **kwargs):
    """(policy, net, its optimizer, x, y): ``make``'s one net, ``policy.make_optimizer`` with the
    ``optimizer`` options, and ``data()``."""
    policy, nets = make(level, dtype, **kwargs)
    net = nets["net"]
    opt = policy.make_optimizer("net", net.parameters(), **optimizer)
    return (policy, net, opt, *data())


def loss_of(policy, net, x, y):
    with policy.autocast():
        return F.mse_loss(net(x.to(policy.input_dtype)).float(), y)


def snapshot(net):
    return [p.detach().clone() for p in net.parameters()]


def same(a, b):
    a, b = list(a), list(b)
    return len(a) == len(b) and all(torch.equal(p, q) for p, q in zip(a, b))


def applied(policy, name, loss, opt) -> bool:
    """One ``policy.step``, then read whether its update was applied (tests may wait for the device)."""
    return not bool(policy.step(name, loss, opt))


def inject_inf(net):
    """Make the next backward give the conv weight an infinite gradient (a forced overflow)."""
    return net.conv.weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))


# ---------------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("level,dtype", ALL)
def test_parameter_and_buffer_dtypes_after_prepare(level, dtype):
    policy, nets = make(level, dtype)
    net, half = nets["net"], HALF[dtype]
    norm = half if level == "O3" else torch.float32
    other = half if level in ("O2", "O3") else torch.float32
    assert net.conv.weight.dtype == net.conv.bias.dtype == net.fc.weight.dtype == other
    assert net.bnorm.weight.dtype == net.bnorm.bias.dtype == norm
    assert net.bnorm.running_mean.dtype == net.bnorm.running_var.dtype == norm
    assert net.bnorm.num_batches_tracked.dtype == torch.int64
    assert policy.input_dtype == other
    assert policy.half_dtype == half


@pytest.mark.parametrize("dtype", DTYPES)
def test_o2_keeps_every_norm_layer_fp32_and_hooked(dtype):
    policy = PrecisionPolicy("O2", dtype)
    net = policy.prepare_network(nn.Sequential(
        nn.Conv2d(2, 4, 1), nn.GroupNorm(2, 4), nn.InstanceNorm2d(4, affine=True),
        nn.LayerNorm([4, 2, 2]), nn.Flatten(), nn.Linear(16, 4), nn.BatchNorm1d(4)))
    policy.prepare_network(net)  # idempotent: no second set of hooks
    norms = [m for m in net if not isinstance(m, (nn.Conv2d, nn.Linear, nn.Flatten))]
    assert all(p.dtype == torch.float32 for m in norms for p in m.parameters())
    assert all(len(m._forward_pre_hooks) == 1 and len(m._forward_hooks) == 1 for m in norms)
    with policy.autocast():
        out = net(torch.randn(3, 2, 2, 2).to(policy.input_dtype))
    assert out.dtype == HALF[dtype]


@pytest.mark.parametrize("level,dtype", ALL)
def test_activation_dtypes_inside_forward(level, dtype):
    policy, nets = make(level, dtype)
    net, seen = nets["net"], {}
    net.conv.register_forward_hook(lambda m, a, out: seen.__setitem__("conv", out.dtype))
    # registered after the policy's hooks: sees the args the norm computes on, and its final output
    net.inorm.register_forward_hook(lambda m, a, out: seen.update(inorm_in=a[0].dtype, inorm_out=out.dtype))
    x, y = data()
    loss = loss_of(policy, net, x, y)
    compute = torch.float32 if level == "O0" else HALF[dtype]
    assert seen["conv"] == compute
    assert seen["inorm_in"] == (torch.float32 if level in ("O0", "O2") else compute)  # O2: fp32 norm
    assert seen["inorm_out"] == compute  # O2: cast back to the incoming dtype
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("level,dtype", ALL)
def test_master_weights_only_for_o2(level, dtype):
    policy, nets = make(level, dtype)
    net = nets["net"]
    opt = policy.make_optimizer("net", net.parameters(), lr=1e-3, eps=EPS[dtype])
    updated = [p for g in opt.param_groups for p in g["params"]]
    if level == "O2":
        assert isinstance(opt, MasterWeightAdam)
        assert all(p.dtype == torch.float32 for p in updated)
        assert len(opt.master_parameters) == 4  # conv and fc weight + bias; the norm is its own master
        model_ids = {id(p) for p in net.parameters()}
        assert not any(id(m) in model_ids for m in opt.master_parameters)
        assert torch.equal(opt.master_parameters[0], net.conv.weight.float())
    else:
        assert type(opt) is torch.optim.Adam
        assert [id(p) for p in updated] == [id(p) for p in net.parameters()]
        assert not hasattr(opt, "master_parameters")


# ---------------------------------------------------------------------------------- loss scaling


@pytest.mark.parametrize("level", ["O1", "O2", "O3"])
@pytest.mark.parametrize("fused", [False, True])
def test_one_independent_scaler_per_loss(level, fused):
    policy, nets = make(level, "fp16", names=("discriminator", "generator"), init_scale=2.0**8)
    opts = {n: policy.make_optimizer(n, net.parameters(), lr=1e-3, eps=1e-4, fused=fused)
            for n, net in nets.items()}
    assert policy.optimizer_impl == {n: "fused" if fused else "default" for n in nets}
    assert policy.scalers["discriminator"] is not policy.scalers["generator"]
    assert isinstance(policy.scalers["generator"], HalfGradScaler) == (level == "O3")
    x, y = data()
    before = {n: snapshot(net) for n, net in nets.items()}
    masters_before = [m.clone() for m in getattr(opts["discriminator"], "master_parameters", [])]

    handle = inject_inf(nets["discriminator"])
    d_loss = loss_of(policy, nets["discriminator"], x, y)
    d_applied = applied(policy, "discriminator", d_loss, opts["discriminator"])
    handle.remove()
    g_applied = applied(policy, "generator", loss_of(policy, nets["generator"], x, y), opts["generator"])

    assert (d_applied, g_applied) == (False, True)
    stats = policy.stats()
    assert stats["scale_discriminator"] == 2.0**7 and stats["scale_generator"] == 2.0**8
    assert stats["skipped_discriminator"] == 1 and stats["skipped_generator"] == 0
    assert stats["steps"] == 2 and stats["skipped"] == 1 and stats["skip_rate"] == 0.5
    assert same(before["discriminator"], snapshot(nets["discriminator"]))
    assert same(masters_before, getattr(opts["discriminator"], "master_parameters", []))
    assert not same(before["generator"], snapshot(nets["generator"]))
    assert all(p.grad is None for net in nets.values() for p in net.parameters())


@pytest.mark.parametrize("level", ["O1", "O2", "O3"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_are_scaled_for_fp16_only(level, dtype):
    policy, net, opt, x, y = one_net(level, dtype, dict(lr=1e-3, eps=EPS[dtype]), init_scale=2.0**10)
    seen = []
    net.fc.bias.register_hook(lambda g: seen.append(g.detach().float().clone()))
    loss = loss_of(policy, net, x, y)
    expected, = torch.autograd.grad(loss, net.fc.bias, retain_graph=True)
    policy.step("net", loss, opt)
    ratio = (seen[-1] / expected.float()).mean().item()  # seen[0] came from autograd.grad above
    assert policy.uses_scaler == (dtype == "fp16")
    assert policy.scalers["net"].is_enabled() == (dtype == "fp16")
    assert ratio == pytest.approx(2.0**10 if dtype == "fp16" else 1.0, rel=1e-2)
    assert policy.stats()["scale_net"] == (2.0**10 if dtype == "fp16" else 1.0)


# ---------------------------------------------------------------------------------- training


@pytest.mark.parametrize("level,dtype", ALL)
def test_training_reduces_a_regression_loss(level, dtype):
    policy, net, opt, x, y = one_net(level, dtype, dict(lr=1e-2, eps=EPS[dtype]))
    losses = []
    for _ in range(12):
        loss = loss_of(policy, net, x, y)
        losses.append(loss.item())
        policy.step("net", loss, opt)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert policy.stats()["steps_net"] == 12


def test_o2_half_weights_are_rounded_masters_after_each_step():
    policy, net, opt, x, y = one_net("O2", "fp16", dict(lr=1e-2, eps=1e-4))
    for _ in range(3):
        policy.step("net", loss_of(policy, net, x, y), opt)
    assert policy.stats()["skipped_net"] < 3
    for model_param, master in opt._pairs:
        assert torch.equal(model_param, master.half())


def test_o2_rejects_an_optimizer_without_masters():
    policy, nets = make("O2", "bf16")
    opt = torch.optim.Adam(nets["net"].parameters(), lr=1e-3)
    x, y = data()
    with pytest.raises(TypeError, match="make_optimizer"):
        policy.step("net", loss_of(policy, nets["net"], x, y), opt)


def test_fused_request_falls_back_to_foreach_when_unsupported():
    policy = PrecisionPolicy("O0")
    params = [torch.zeros(2, dtype=torch.complex64, requires_grad=True)]  # fused needs real floats
    policy.make_optimizer("generator", params, lr=1e-3, fused=True)
    assert policy.optimizer_impl["generator"] == "foreach"


# ---------------------------------------------------------------------------------- divergence


@pytest.mark.parametrize("level,dtype", ALL)
def test_persistent_nan_loss_diverges_after_patience_without_touching_weights(level, dtype):
    """The fused optimizer skips a non-finite update on the device, with or without a scaler."""
    policy, net, opt, x, y = one_net(level, dtype, dict(lr=1e-3, eps=EPS[dtype], fused=True), nonfinite_patience=3)
    before = snapshot(net)
    for _ in range(2):
        assert applied(policy, "net", loss_of(policy, net, x, y) * float("nan"), opt) is False
    policy.check()  # 2 bad steps: not diverged yet
    # divergence is recorded on the device at step 3 and only raised when read
    policy.step("net", loss_of(policy, net, x, y) * float("nan"), opt)
    assert same(before, snapshot(net))
    policy.step("net", loss_of(policy, net, x, y), opt)
    with pytest.raises(Diverged) as info:
        policy.check()
    assert info.value.step == 3 and info.value.loss_name == "net"
    assert "non-finite net loss for 3 consecutive steps" in info.value.reason
    assert policy.stats()["nonfinite_net"] == 3 and policy.stats()["skipped_net"] == 3


@pytest.mark.parametrize("level,dtype", [("O0", "fp16"), ("O1", "bf16"), ("O2", "bf16")])
def test_unscaled_nonfinite_update_without_device_skip_is_caught_by_the_weight_check(level, dtype):
    """Without loss scaling and without a fused optimizer nothing can skip on the device: the update
    is applied, and the weights' non-finite values are what the next check reports."""
    policy, net, opt, x, y = one_net(level, dtype, dict(lr=1e-3, eps=EPS[dtype]), nonfinite_patience=3,
                                     param_check_interval=1)
    policy.step("net", loss_of(policy, net, x, y) * float("nan"), opt)
    with pytest.raises(Diverged, match="non-finite net weights after the update") as info:
        policy.check()
    assert info.value.step == 1


@pytest.mark.parametrize("level,dtype", ALL)
def test_a_finite_step_resets_the_nonfinite_streak(level, dtype):
    policy, net, opt, x, y = one_net(level, dtype, dict(lr=1e-3, eps=EPS[dtype], fused=True), nonfinite_patience=2)
    for _ in range(3):
        policy.step("net", loss_of(policy, net, x, y) * float("nan"), opt)  # 1 bad step
        policy.step("net", loss_of(policy, net, x, y), opt)  # then a good one: never 2 in a row
    policy.check()
    assert policy.stats()["nonfinite_net"] == 3


def test_loss_scale_collapse_diverges():
    policy, net, opt, x, y = one_net("O1", "fp16", dict(lr=1e-3), init_scale=2.0**-6, min_scale=2.0**-8,
                                     nonfinite_patience=100)
    inject_inf(net)
    assert applied(policy, "net", loss_of(policy, net, x, y), opt) is False  # 2**-7
    assert applied(policy, "net", loss_of(policy, net, x, y), opt) is False  # 2**-8: not below yet
    policy.check()
    policy.step("net", loss_of(policy, net, x, y), opt)
    with pytest.raises(Diverged, match=r"scale collapsed to 2\*\*-9, below min_scale 2\*\*-8") as info:
        policy.check()
    assert info.value.step == 3


@pytest.mark.parametrize("level", ["O1", "O2", "O3"])
def test_single_transient_fp16_overflow_does_not_diverge(level):
    policy, net, opt, x, y = one_net(level, "fp16", dict(lr=1e-3, eps=1e-4), nonfinite_patience=1, init_scale=2.0**8)
    handle = inject_inf(net)
    assert applied(policy, "net", loss_of(policy, net, x, y), opt) is False
    handle.remove()
    for _ in range(3):
        assert applied(policy, "net", loss_of(policy, net, x, y), opt) is True
    policy.check()
    assert policy.stats()["skipped_net"] == 1 and policy.stats()["scale_net"] == 2.0**7


@pytest.mark.parametrize("level,dtype", [("O0", "fp16"), ("O1", "bf16"), ("O2", "bf16"), ("O3", "bf16")])
def test_unscaled_nonfinite_gradients_are_skipped_then_diverge(level, dtype):
    """With a fused optimizer the skip happens on the device, also without loss scaling."""
    policy, net, opt, x, y = one_net(level, dtype, dict(lr=1e-3, fused=True), nonfinite_patience=2)
    before = snapshot(net)
    handle = inject_inf(net)
    assert applied(policy, "net", loss_of(policy, net, x, y), opt) is False  # transient: skipped only
    assert same(before, snapshot(net))
    handle.remove()
    assert applied(policy, "net", loss_of(policy, net, x, y), opt) is True
    inject_inf(net)
    policy.step("net", loss_of(policy, net, x, y), opt)
    policy.check()
    policy.step("net", loss_of(policy, net, x, y), opt)
    with pytest.raises(Diverged, match="non-finite net gradients"):
        policy.check()
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_o3_fp16_default_eps_is_caught_as_diverged():
    """fp16 rounds Adam's eps=1e-8 to 0: a zero gradient gives 0/0 = NaN weights. Warned, then caught."""
    torch.manual_seed(0)
    policy = PrecisionPolicy("O3", "fp16", loss_names=("net",), init_scale=2.0**8)
    net = policy.prepare_network(nn.Linear(2, 1))
    with pytest.warns(UserWarning, match="rounds to 0 in torch.float16"):
        opt = policy.make_optimizer("net", net.parameters(), lr=1e-3, eps=1e-8)
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float16)  # the second weight's gradient is exactly 0
    policy.step("net", net(x).float().pow(2).sum(), opt)
    with pytest.raises(Diverged, match="non-finite net weights after the update"):
        policy.check()


def test_fused_adam_does_not_warn_about_eps():
    policy = PrecisionPolicy("O3", "fp16", loss_names=("net",))
    net = policy.prepare_network(nn.Linear(2, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        policy.make_optimizer("net", net.parameters(), lr=1e-3, eps=1e-8, fused=True)
    assert policy.optimizer_impl["net"] == "fused"


def test_diverged_survives_pickling():
    reason = "non-finite generator loss for 3 consecutive steps"
    error = pickle.loads(pickle.dumps(Diverged(reason, 7, "generator")))
    assert (error.reason, error.step, error.loss_name) == (reason, 7, "generator")
    assert isinstance(error, RuntimeError) and "step 7" in str(error)


# ---------------------------------------------------------------------------------- checkpoints


def _checkpoint(policy, nets, opts):
    buffer = io.BytesIO()
    torch.save({"policy": policy.state_dict(), "nets": {n: m.state_dict() for n, m in nets.items()},
                "opts": {n: o.state_dict() for n, o in opts.items()}}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _train(policy, nets, opts, steps, overflow_at=None):
    x, y = data()
    for i in range(steps):
        for name, net in nets.items():
            handle = inject_inf(net) if (i, name) == overflow_at else None
            policy.step(name, loss_of(policy, net, x + i, y), opts[name])
            if handle:
                handle.remove()


def _build(level, dtype, seed, fused=False):
    policy, nets = make(level, dtype, seed=seed, names=("discriminator", "generator"), growth_interval=2)
    opts = {n: policy.make_optimizer(n, net.parameters(), lr=1e-2, eps=EPS[dtype], fused=fused)
            for n, net in nets.items()}
    return policy, nets, opts


@pytest.mark.parametrize("level,dtype,fused", [
    ("O0", "fp16", False), ("O1", "fp16", False), ("O2", "fp16", False), ("O2", "bf16", False),
    ("O2", "fp16", True), ("O3", "fp16", False), ("O3", "bf16", False),
])
def test_checkpoint_round_trip_continues_bit_exactly(level, dtype, fused):
    policy, nets, opts = _build(level, dtype, seed=0, fused=fused)
    # an overflow is skipped by the scaler or a fused optimizer; an unscaled unfused update would apply it
    overflow = (1, "discriminator") if policy.uses_scaler or fused else None
    _train(policy, nets, opts, 3, overflow_at=overflow)
    saved = _checkpoint(policy, nets, opts)
    _train(policy, nets, opts, 3)

    policy2, nets2, opts2 = _build(level, dtype, seed=123, fused=fused)  # different initial weights
    for name in nets2:
        nets2[name].load_state_dict(saved["nets"][name])
        opts2[name].load_state_dict(saved["opts"][name])
    policy2.load_state_dict(saved["policy"])
    _train(policy2, nets2, opts2, 3)

    for name in nets:
        assert same(snapshot(nets[name]), snapshot(nets2[name]))
        assert same([b for b in nets[name].buffers()], [b for b in nets2[name].buffers()])
        masters, masters2 = (getattr(o[name], "master_parameters", []) for o in (opts, opts2))
        assert same(masters, masters2)
    assert policy.stats() == policy2.stats()
    assert policy.stats()["steps"] == 12
    if policy.uses_scaler:
        assert policy.stats()["skipped_discriminator"] >= 1


def test_o2_round_trip_needs_the_masters():
    """Control for the test above: without the fp32 masters, the half weights lose the low bits."""
    policy, nets, opts = _build("O2", "fp16", seed=0)
    _train(policy, nets, opts, 3)
    saved = _checkpoint(policy, nets, opts)
    _train(policy, nets, opts, 3)

    policy2, nets2, opts2 = _build("O2", "fp16", seed=123)
    for name in nets2:
        nets2[name].load_state_dict(saved["nets"][name])
        state = dict(saved["opts"][name])
        del state["master_params"]
        with pytest.warns(UserWarning, match="no fp32 master weights"):
            opts2[name].load_state_dict(state)
    policy2.load_state_dict(saved["policy"])
    _train(policy2, nets2, opts2, 3)
    assert not all(same(snapshot(nets[n]), snapshot(nets2[n])) for n in nets)


def test_load_state_dict_rejects_another_setting():
    policy, _ = make("O1", "fp16")
    other, _ = make("O2", "fp16")
    with pytest.raises(ValueError, match="O1/fp16"):
        other.load_state_dict(policy.state_dict())


def test_unknown_loss_name_is_an_error():
    policy, nets = make("O1", "bf16")
    opt = policy.make_optimizer("net", nets["net"].parameters(), lr=1e-3)
    x, y = data()
    with pytest.raises(KeyError, match="unknown loss 'generator'"):
        policy.step("generator", loss_of(policy, nets["net"], x, y), opt)


# ---------------------------------------------------------------------------------- tf32


@pytest.mark.parametrize("tf32,expected", [(False, (False, False)), (True, (True, True)),
                                           ("off", (False, False)), ("on", (True, True))])
def test_tf32_flags_are_scoped_to_the_policy(tf32, expected):
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    outside = (matmul.allow_tf32, cudnn.allow_tf32)
    policy = PrecisionPolicy("O0", tf32=tf32)
    assert (matmul.allow_tf32, cudnn.allow_tf32) == outside  # building a policy changes nothing
    seen = []
    with policy.autocast():
        seen.append((matmul.allow_tf32, cudnn.allow_tf32))
    assert seen == [expected]
    assert (matmul.allow_tf32, cudnn.allow_tf32) == outside


def test_tf32_default_restores_torchs_own_flags_even_after_they_changed(monkeypatch):
    """"default" means the flags torch set in this process, not whatever was set since."""
    import orchestrator.precision as precision

    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    monkeypatch.setitem(precision.TORCH_DEFAULT_TF32, "matmul", False)
    monkeypatch.setitem(precision.TORCH_DEFAULT_TF32, "cudnn", True)
    monkeypatch.setattr(matmul, "allow_tf32", True)
    monkeypatch.setattr(cudnn, "allow_tf32", False)
    with PrecisionPolicy("O1", "bf16", tf32="default").autocast():
        assert (matmul.allow_tf32, cudnn.allow_tf32) == (False, True)
    assert (matmul.allow_tf32, cudnn.allow_tf32) == (True, False)
    with pytest.raises(ValueError, match="tf32 must be"):
        PrecisionPolicy("O0", tf32="maybe")

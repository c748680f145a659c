"""Fused pointwise chains: each jit/compile variant equals its eager twin (values and gradients),
failures fall back to eager with a recorded reason, and the losses/pix2pixHD give the same results
with fusion on. Compiling is slow here (~20-40 s for the first function): one compile test, marked
slow, on two representative chains."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import default_collate

from models.losses import VGGLoss, feature_matching_loss, gan_loss
from models.pix2pixhd import Pix2PixHD
from models import fusion
from orchestrator.config import DataConfig
from orchestrator.data.street import StreetDataset
from orchestrator.settings import SpeedFlags


def _inputs(name: str, dtype: torch.dtype = torch.float32) -> tuple:
    """Arguments for chain ``name``: differentiable tensors where the chain is differentiable."""
    g = torch.Generator().manual_seed(0)

    def t(*shape, grad=True, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).requires_grad_(grad)

    if name in ("lsgan_real", "lsgan_fake", "hinge_d_real", "hinge_d_fake", "hinge_g"):
        return (t(2, 1, 9, 9),)
    if name == "l1_mean":
        return t(2, 8, 6, 6), t(2, 8, 6, 6, grad=False)
    if name == "leaky_relu":
        return t(2, 4, 5, 5), 0.2
    if name == "gelu_tanh":
        return (t(2, 4, 5, 5, scale=3.0),)
    if name == "l2_normalize":
        return t(37), 1e-12
    if name == "pconv_renorm":
        mask_sum = torch.randint(0, 10, (2, 1, 6, 6), generator=g).to(dtype)  # valid inputs per 3x3 window
        return t(2, 4, 6, 6), mask_sum, t(1, 4, 1, 1), 9.0, 1e-6
    raise KeyError(name)


@pytest.fixture(autouse=True)
def _forget_test_chains():
    """Chains a test registers (``test_only.*``) don't outlive it."""
    before = set(fusion.names())
    yield
    for name in set(fusion.names()) - before:
        fusion._EAGER.pop(name, None)
    for key in [k for k in fusion.fallbacks() if k.startswith("test_only.")]:
        fusion._FALLBACKS.pop(key, None)


BUILTIN = ["lsgan_real", "lsgan_fake", "hinge_d_real", "hinge_d_fake", "hinge_g", "l1_mean",
           "leaky_relu", "gelu_tanh", "l2_normalize", "pconv_renorm"]


def _outputs_and_grads(fn, args) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    args = tuple(a.detach().clone().requires_grad_(a.requires_grad) if torch.is_tensor(a) else a for a in args)
    out = fn(*args)
    outs = list(out) if isinstance(out, tuple) else [out]
    g = torch.Generator().manual_seed(1)
    total = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs if o.requires_grad)
    leaves = [a for a in args if torch.is_tensor(a) and a.requires_grad]
    grads = list(torch.autograd.grad(total, leaves)) if leaves else []
    return [o.detach() for o in outs], grads


def assert_same(fn_a, fn_b, args, rtol=1e-5, atol=1e-6):
    outs_a, grads_a = _outputs_and_grads(fn_a, args)
    outs_b, grads_b = _outputs_and_grads(fn_b, args)
    for a, b in zip(outs_a, outs_b, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol)
    assert len(grads_a) == len(grads_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol)


def test_registry_lists_the_chains():
    assert set(BUILTIN) <= set(fusion.names())
    assert fusion.fused("lsgan_real", "none") is fusion.lsgan_real
    with pytest.raises(ValueError, match="none, jit, compile"):
        fusion.fused("lsgan_real", "cuda")
    with pytest.raises(KeyError, match="registered"):
        fusion.fused("no_such_chain", "jit")


@pytest.mark.parametrize("name", BUILTIN)
def test_jit_equals_eager_values_and_gradients(name):
    scripted = fusion.fused(name, "jit")
    assert isinstance(scripted, torch.jit.ScriptFunction), fusion.fallbacks()
    args = _inputs(name)
    for _ in range(3):  # the profiling executor specialises on the 2nd/3rd call: check every run
        assert_same(fusion.eager(name), scripted, args)


@pytest.mark.parametrize("name", ["lsgan_real", "hinge_d_fake", "l1_mean", "gelu_tanh", "pconv_renorm"])
def test_jit_equals_eager_in_bf16_and_under_autocast(name):
    scripted = fusion.fused(name, "jit")
    args = _inputs(name, torch.bfloat16)
    assert_same(fusion.eager(name), scripted, args, rtol=1e-2, atol=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_same(fusion.eager(name), scripted, _inputs(name), rtol=1e-2, atol=1e-2)


def test_jit_deprecation_warning_is_silenced_locally_only():
    fusion.register("test_only.double", lambda_free_double)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any escaping warning fails the test
        fusion.fused("test_only.double", "jit")
    with pytest.warns(DeprecationWarning, match="deprecated"):  # outside it still warns
        torch.jit.script(lambda_free_double)


def lambda_free_double(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0


def test_unscriptable_chain_falls_back_with_a_reason():
    def varargs(*xs):  # TorchScript cannot compile *args
        return xs[0]

    fusion.register("test_only.varargs", varargs)
    with pytest.warns(RuntimeWarning, match="runs eagerly"):
        fn = fusion.fused("test_only.varargs", "jit")
    assert fn is varargs
    assert "test_only.varargs/jit" in fusion.fallbacks()
    assert "test_only.varargs/jit" in fusion.status("jit")["fusion_fallbacks"]


class _BrokenCompile:
    """Stands in for torch.compile: compiles fine, fails on the first call like a missing C compiler."""

    def __init__(self, error: Exception):
        self.error, self.calls = error, 0

    def __call__(self, fn, **kwargs):
        def compiled(*args, **kw):
            self.calls += 1
            raise self.error
        return compiled


def test_compile_failure_falls_back_to_eager_and_is_recorded(monkeypatch):
    broken = _BrokenCompile(RuntimeError("InductorError: CppCompileError: C++ compile error\nlong log"))
    monkeypatch.setattr(torch, "compile", broken)
    fusion.register("test_only.gelu", fusion.gelu_tanh)  # a fresh cache entry
    fn = fusion.fused("test_only.gelu", "compile")
    x = torch.randn(5)
    with pytest.warns(RuntimeWarning, match="runs eagerly"):
        out = fn(x)
    torch.testing.assert_close(out, fusion.gelu_tanh(x))
    assert fusion.fallbacks()["test_only.gelu/compile"].startswith("RuntimeError: InductorError")
    fn(x)
    assert broken.calls == 1  # for good: no retry on every call
    assert "test_only.gelu/compile" in fusion.status("compile")["fusion_fallbacks"]


def test_compile_unavailable_at_construction_falls_back(monkeypatch):
    def no_compile(fn, **kwargs):
        raise RuntimeError("Python 3.99 is not supported by torch.compile")

    monkeypatch.setattr(torch, "compile", no_compile)
    fusion.register("test_only.l1", fusion.l1_mean)
    with pytest.warns(RuntimeWarning):
        fn = fusion.fused("test_only.l1", "compile")
    a, b = torch.randn(3), torch.randn(3)
    torch.testing.assert_close(fn(a, b), fusion.l1_mean(a, b))
    assert "not supported" in fusion.fallbacks()["test_only.l1/compile"]


def test_callers_own_errors_are_not_swallowed(monkeypatch):
    broken = _BrokenCompile(RuntimeError("shape mismatch"))
    monkeypatch.setattr(torch, "compile", broken)
    fusion.register("test_only.l1b", fusion.l1_mean)
    fn = fusion.fused("test_only.l1b", "compile")
    with pytest.raises(RuntimeError, match="must match the size"):  # eager fails too: caller's error
        fn(torch.randn(3), torch.randn(4))
    assert "test_only.l1b/compile" not in fusion.fallbacks()


@pytest.mark.slow
def test_compile_equals_eager_values_and_gradients():
    """Two chains (a loss term; the multi-output partial-conv chain with an Optional bias): real
    torch.compile, ~20-60 s on this machine's 2 busy cores."""
    for name in ("lsgan_real", "pconv_renorm"):
        compiled = fusion.fused(name, "compile")
        for _ in range(2):
            assert_same(fusion.eager(name), compiled, _inputs(name), rtol=1e-5, atol=1e-5)
        assert f"{name}/compile" not in fusion.fallbacks(), fusion.fallbacks()
        assert fusion.compile_seconds()[name] > 0
    assert fusion.status("compile")["fusion_compile_seconds"] > 0


# ----------------------------------------------------------------------------- losses and models


def _multiscale(seed: int, requires_grad: bool = True) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(2, c, s, s, generator=g).requires_grad_(requires_grad) for c in (4, 8, 1)]
            for s in (8, 4)]


@pytest.mark.parametrize("mode,real,for_d", [
    ("lsgan", True, True), ("lsgan", False, True), ("hinge", True, True), ("hinge", False, True),
    ("hinge", True, False),
])
def test_gan_loss_with_fusion_equals_without(mode, real, for_d):
    outputs = _multiscale(0)
    expected = gan_loss(outputs, real, mode, for_d)
    expected_grads = torch.autograd.grad(expected, [o[-1] for o in outputs])
    got = gan_loss(outputs, real, mode, for_d, fusion="jit")
    got_grads = torch.autograd.grad(got, [o[-1] for o in outputs])
    torch.testing.assert_close(got, expected)
    for a, b in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, b)


def test_hinge_generator_fake_target_is_rejected_with_fusion():
    with pytest.raises(ValueError, match="target_is_real=True"):
        gan_loss(_multiscale(0), False, "hinge", for_discriminator=False, fusion="jit")


def test_feature_matching_and_vgg_with_fusion_equal_without():
    fake, real = _multiscale(1), _multiscale(2, requires_grad=False)
    torch.testing.assert_close(feature_matching_loss(fake, real, 10.0, fusion="jit"),
                               feature_matching_loss(fake, real, 10.0))
    torch.manual_seed(0)
    plain = VGGLoss()
    torch.manual_seed(0)
    fused_vgg = VGGLoss(fusion="jit")
    x, y = torch.rand(1, 3, 16, 16) * 2 - 1, torch.rand(1, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(fused_vgg(x, y), plain(x, y))


def test_swap_activations_keeps_the_function():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LeakyReLU(0.2, inplace=True), nn.Conv2d(4, 4, 3),
                        nn.GELU(approximate="tanh"), nn.ReLU())
    x = torch.randn(2, 3, 8, 8)
    expected = net(x)
    assert fusion.swap_activations(net, "none") == 0
    assert fusion.swap_activations(net, "jit") == 2
    assert isinstance(net[1], fusion.FusedActivation) and isinstance(net[4], nn.ReLU)
    torch.testing.assert_close(net(x), expected)


@pytest.mark.parametrize("mode", ["jit"])
def test_pix2pixhd_losses_and_gradients_with_fusion(mode):
    data = StreetDataset(DataConfig(height=32, width=32, train_samples=2), "train")
    batch = default_collate([data[0], data[1]])

    def losses_and_grads(fusion_mode):
        model = Pix2PixHD()
        torch.manual_seed(0)
        nets = model.build("tiny", model.resolve_eps(None), SpeedFlags(fusion=fusion_mode))
        assert model.fusion == fusion_mode
        out = {}
        for name, fn in (("discriminator", model.discriminator_loss), ("generator", model.generator_loss)):
            net = getattr(nets, name)
            net.zero_grad(set_to_none=True)
            torch.manual_seed(1)
            loss, _ = fn(nets, batch)
            loss.backward()
            out[name] = (loss.detach(), {k: p.grad.clone() for k, p in net.named_parameters()})
        return out

    plain, fused_out = losses_and_grads("none"), losses_and_grads(mode)
    for name in plain:
        torch.testing.assert_close(fused_out[name][0], plain[name][0], rtol=1e-5, atol=1e-6)
        for key, grad in plain[name][1].items():
            torch.testing.assert_close(fused_out[name][1][key], grad, rtol=1e-4, atol=1e-6, msg=key)

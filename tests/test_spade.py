"""SPADE: the model contract, shapes and gradients, checkpointing, data, and the fp16 spectral-norm
hazard (a naive half-precision power iteration vs ours)."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import default_collate

from models.base import Nets
from models.spade import (SPADE, ParamFreeBatchNorm, SNConv2d, SNMultiscaleDiscriminator, SPADEGenerator,
                          SPADENorm, begin_pass, kld_loss, power_iteration, safe_unit)
from orchestrator.config import DataConfig, load_config
from orchestrator.data.street import StreetDataset
from orchestrator.settings import Setting, SpeedFlags
from tests import model_contract
from tests.model_contract import one_thread  # noqa: F401  (autouse fixture)
from tests.model_contract import (assert_finite_grads, assert_same_generator_grads, check_losses_and_grads,
                                  check_registry_and_presets, check_resume, check_trains, contract_tests)

SIZE = 32
# contract runs at 16x16 (tiny needs a multiple of 8): fp16 on this CPU is ~10-75x slower than fp32
DATA = DataConfig(height=16, width=16, train_samples=8, val_samples=4)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    data = SPADE().dataset(DataConfig(height=SIZE, width=SIZE, train_samples=2), "train")
    return default_collate([data[0], data[1]])


build = partial(model_contract.build, SPADE)


# ---------------------------------------------------------------------------- (1) contract


(test_trains_under_each_level, test_checkpoint_round_trip_resumes_exactly,
 test_study_yaml_loads) = contract_tests("spade", DATA)


def test_vae_trains_in_fp16_o2():
    check_trains("spade", DATA, "O2", "fp16", steps=2, use_vae=True)


def test_checkpoint_round_trip_resumes_exactly_with_vae_and_batch_norm(tmp_path):
    # the reparameterisation noise (global RNG) and the batch-norm running stats must round-trip too
    check_resume("spade", DATA, tmp_path, Setting(opt_level="O0", batch_size=2), use_vae=True,
                 param_free_norm="batch")


# ---------------------------------------------------------------------------- model


def test_registry_presets_and_eps_sites():
    paper = check_registry_and_presets(SPADE)
    assert (paper["ngf"], paper["n_up_blocks"], paper["hidden"]) == (64, 4, 128)
    assert paper["num_upsampling_layers"] == "normal"
    assert (paper["ndf"], paper["n_layers_D"], paper["num_D"], paper["z_dim"]) == (64, 4, 2, 256)
    assert (paper["lambda_feat"], paper["lambda_vgg"], paper["lambda_kld"]) == (10.0, 10.0, 0.05)
    assert paper["use_vgg"] and paper["param_free_norm"] == "batch"
    assert SPADE.eps_sites == {"adam": 1e-8, "instance_norm": 1e-5, "spectral_norm": 1e-12}


def test_ttur_param_groups():
    model, nets = build()
    groups = model.param_groups(nets)
    assert groups == {"generator": {"lr": 1e-4, "betas": (0.0, 0.9)},
                      "discriminator": {"lr": 4e-4, "betas": (0.0, 0.9)}}


def test_eps_sites_reach_every_layer():
    _, nets = build(eps={"instance_norm": 0.1, "spectral_norm": 1e-6}, use_vae=True)
    modules = [m for net in nets.named().values() for m in net.modules()]
    norms = [m for m in modules if isinstance(m, nn.InstanceNorm2d)]
    sns = [m for m in modules if isinstance(m, SNConv2d)]
    assert norms and all(m.eps == 0.1 for m in norms)
    assert sns and all(m.sn_eps == 1e-6 for m in sns)
    assert any(isinstance(m, SNConv2d) for m in nets.generator.encoder.modules())


def test_paper_architecture_matches_spade():
    model = SPADE(use_vgg=False)
    nets = model.build("paper", model.resolve_eps(None), SpeedFlags())
    g, d = nets.generator, nets.discriminator
    assert g.num_up == 5 and g.top == 1024
    assert [(b.conv_0.in_channels, b.conv_1.out_channels) for b in g.up_blocks] == [
        (1024, 512), (512, 256), (256, 128), (128, 64)]
    assert all(b.learned_shortcut for b in g.up_blocks) and not g.head_0.learned_shortcut
    assert isinstance(g.head_0.norm_0.param_free, ParamFreeBatchNorm)
    assert g.head_0.norm_0.shared[0].out_channels == 128
    assert len(d.scales) == 2 and len(d.scales[0].blocks) == 5  # conv, 3 SN blocks, prediction
    assert [type(b[0]) for b in d.scales[0].blocks[1:-1]] == [SNConv2d] * 3
    assert [b[0].stride[0] for b in d.scales[0].blocks[1:-1]] == [2, 2, 1]


def test_shapes_and_finite_gradients(batch):
    model, nets = build()
    seg = model.semantics(batch)
    assert seg.shape == (2, 35 + 1, SIZE, SIZE) and seg.dtype == torch.float32
    assert torch.equal(seg[:, :35].sum(1), torch.ones(2, SIZE, SIZE))
    fake, mu, logvar = nets.generator(seg)
    assert fake.shape == (2, 3, SIZE, SIZE) and fake.abs().max() <= 1 and mu is None and logvar is None
    outs = nets.discriminator(torch.cat([seg, fake], 1))
    assert len(outs) == 2 and all(len(o) == 3 + 1 for o in outs)  # n_layers_D + 1 outputs per scale
    assert outs[0][-1].shape[1] == 1 and outs[1][-1].shape[-1] < outs[0][-1].shape[-1]

    check_losses_and_grads(model, nets, batch, {"d_real", "d_fake"}, {"g_gan", "g_feat"})
    with torch.no_grad():
        fake, real = model.samples(nets, batch)
    assert fake.shape == real.shape == (2, 3, SIZE, SIZE)


def test_vae_encoder_kld_and_deterministic_eval_samples(batch):
    model, nets = build(use_vae=True)
    loss, logs = model.generator_loss(nets, batch)
    assert set(logs) == {"g_gan", "g_feat", "g_kld"} and logs["g_kld"] >= 0
    loss.backward()
    assert_finite_grads(nets.generator, "G")  # encoder included: it trains with G
    nets.generator.eval()
    with torch.no_grad():
        first, _ = model.samples(nets, batch)
        second, _ = model.samples(nets, batch)
    assert torch.equal(first, second)  # eval uses the code's mean
    mu, logvar = torch.zeros(2, 4), torch.zeros(2, 4)
    assert kld_loss(mu, logvar).item() == 0
    assert kld_loss(torch.ones(1, 4), torch.zeros(1, 4)).item() == pytest.approx(2.0)  # 0.5 * sum(mu^2)


def test_feature_matching_has_spade_magnitude(batch):
    """SPADE: lambda_feat / num_D x sum over scales and intermediate layers of L1."""
    model, nets = build()
    seg, real = model.semantics(batch), batch["image"]
    with torch.no_grad():
        fake, _, _ = nets.generator(seg)
        pred_fake, pred_real = model._discriminate(nets, seg, fake, real)
        expected = sum(F.l1_loss(f, r) for pf, pr in zip(pred_fake, pred_real)
                       for f, r in zip(pf[:-1], pr[:-1])) * 10.0 / len(pred_fake)
        torch.manual_seed(0)
        _, logs = model.generator_loss(nets, batch)
    # generator_loss reruns G and D (one more power iteration each): compare loosely
    assert logs["g_feat"] == pytest.approx(float(expected), rel=0.05)


def test_generator_needs_divisible_size_and_build_before_losses(batch):
    gen = SPADEGenerator(4, ngf=2, n_up_blocks=1, hidden=4)  # 2 upsamplings: multiples of 4
    with pytest.raises(ValueError, match="divisible by 4"):
        gen(torch.zeros(1, 4, 6, 8))
    with pytest.raises(RuntimeError, match="build"):
        SPADE().generator_loss(Nets(generator=nn.Identity()), batch)


def test_more_and_most_upsampling_variants(batch):
    model = SPADE(num_upsampling_layers="most", n_up_blocks=1)  # 1 + 1 + 2 upsamplings: 32 -> 2x2 start
    nets = model.build("tiny", model.resolve_eps(None), SpeedFlags())
    assert nets.generator.num_up == 4 and nets.generator.last.conv_1.out_channels == 4
    fake, _, _ = nets.generator(model.semantics(batch))
    assert fake.shape == (2, 3, SIZE, SIZE)
    assert SPADE(num_upsampling_layers="more").build("tiny", SPADE.eps_sites, SpeedFlags()).generator.num_up == 4


# ---------------------------------------------------------------------------- (3) checkpointing


@pytest.mark.parametrize("mode", ["blocks", "all"])
def test_checkpointing_gives_same_generator_grads(batch, mode):
    model, plain = build(seed=1, use_vae=True)
    _, ckpt = build(seed=1, checkpointing=mode, use_vae=True)
    assert ckpt.generator.checkpoint_blocks and not plain.generator.checkpoint_blocks
    assert_same_generator_grads(model, plain, ckpt, batch)


def test_checkpointing_with_batch_norm_updates_running_stats_and_u_once(batch):
    model, plain = build(seed=2, param_free_norm="batch")
    _, ckpt = build(seed=2, checkpointing="blocks", param_free_norm="batch")
    assert_same_generator_grads(model, plain, ckpt, batch)
    plain_bufs, ckpt_bufs = dict(plain.generator.named_buffers()), dict(ckpt.generator.named_buffers())
    assert any(k.endswith("running_mean") for k in plain_bufs) and any(k.endswith("weight_u") for k in plain_bufs)
    for name, value in plain_bufs.items():  # the recompute during backward must not count again
        torch.testing.assert_close(ckpt_bufs[name], value, rtol=1e-6, atol=1e-7, msg=name)
    assert int(plain_bufs["head_0.norm_0.param_free.num_batches_tracked"]) == 1


# ---------------------------------------------------------------------------- (4) data


def test_data_is_deterministic_and_holds_integer_ids():
    cfg = DataConfig(height=SIZE, width=SIZE, train_samples=4, val_samples=2, seed=7)
    first, second = SPADE().dataset(cfg, "train"), SPADE().dataset(cfg, "train")
    a, b, again = first[1], second[1], first[1]
    for key in a:
        assert torch.equal(a[key], b[key]) and torch.equal(a[key], again[key]), key
    assert a["label"].dtype == torch.int64 and a["inst"].dtype == torch.int32
    assert a["label"].shape == (1, SIZE, SIZE) and a["image"].shape == (3, SIZE, SIZE)
    assert not torch.equal(first[0]["image"], a["image"])
    assert not torch.equal(SPADE().dataset(cfg, "val")[1]["image"], a["image"])
    # the ids are those of the street scene itself
    street = StreetDataset(cfg, "train")[1]
    assert torch.equal(a["label"][0], street["label"].argmax(0)) and torch.equal(a["inst"].float(), street["inst"])
    assert len(first) == 4 and len(SPADE().dataset(cfg, "val")) == 2


def test_semantics_from_int_ids_survive_half_inputs(batch):
    model, _ = build()
    half = dict(batch, image=batch["image"].half())
    seg = model.semantics(half)
    assert seg.dtype == torch.float16
    assert torch.equal(seg.float(), model.semantics(batch))


# ---------------------------------------------------------------------------- spectral norm


def test_sn_conv_sigma_converges_to_the_largest_singular_value():
    torch.manual_seed(0)
    conv = SNConv2d(6, 8, 3)
    conv.power_iteration(200)
    true = torch.linalg.matrix_norm(conv.weight.detach().flatten(1).double(), 2)
    assert conv.sigma().item() == pytest.approx(true.item(), rel=1e-5)
    normalized = conv.normalized_weight().detach().flatten(1).double()
    assert torch.linalg.matrix_norm(normalized, 2).item() == pytest.approx(1.0, rel=1e-5)


def test_power_iteration_runs_once_per_training_pass_and_never_in_eval():
    torch.manual_seed(0)
    disc = SNMultiscaleDiscriminator(3, num_d=2, ndf=4, n_layers=3)
    sn = [m for m in disc.modules() if isinstance(m, SNConv2d)]
    before = [m.weight_u.clone() for m in sn]
    disc(torch.randn(2, 3, 16, 16))
    expected = []
    for module, u in zip(sn, before):  # replay exactly one iteration from the old u
        w = module.weight.detach().flatten(1)
        expected.append(power_iteration(w, u, module.weight_v.clone(), 1e-12, 1)[0])
    for module, u in zip(sn, expected):
        torch.testing.assert_close(module.weight_u, u)
    disc.eval()
    frozen = [m.weight_u.clone() for m in sn]
    disc(torch.randn(2, 3, 16, 16))
    assert all(torch.equal(m.weight_u, u) for m, u in zip(sn, frozen))


def test_param_free_batch_norm_counts_each_pass_once():
    norm = SPADENorm(4, label_nc=3, hidden=4, norm="batch")
    x, seg = torch.randn(2, 4, 8, 8), torch.rand(2, 3, 8, 8)
    norm(x, seg)
    norm(x, seg)  # unmanaged: behaves like nn.BatchNorm2d
    assert int(norm.param_free.num_batches_tracked) == 2
    holder = nn.ModuleDict({"norm": norm})
    begin_pass(holder)
    norm(x, seg)
    norm(x, seg)  # same pass (a checkpoint recompute): same output, no second update
    assert int(norm.param_free.num_batches_tracked) == 3


# ---------------------------------------------------------------------------- (5) fp16 hazards


def naive_half_spectral_norm(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, iterations: int):
    """torch's own ``nn.utils.spectral_norm`` on an fp16 conv (what an fp16 module gets under O2/O3):
    its power iteration normalises fp16 ``W^T u`` and ``W v`` with ``F.normalize(eps=1e-12)``.
    Returns (normalised weight, sigma implied by it)."""
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[2], bias=False).half()
    with torch.no_grad():
        conv.weight.copy_(weight)
    conv = nn.utils.spectral_norm(conv, n_power_iterations=iterations)
    with torch.no_grad():
        conv.weight_u.copy_(u)
        conv.weight_v.copy_(v)
    conv(torch.zeros(1, weight.shape[1], weight.shape[2], weight.shape[3], dtype=torch.float16))
    normalized = conv.weight.detach().float().flatten()
    raw = weight.float().flatten()
    return conv.weight.detach(), (raw @ raw) / (normalized @ raw)


def ours(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, iterations: int) -> SNConv2d:
    conv = SNConv2d(weight.shape[1], weight.shape[0], weight.shape[2], bias=False).to(weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.weight_u.copy_(u)
        conv.weight_v.copy_(v)
    conv.power_iteration(iterations)
    return conv


def hazard_weight(std: float, channels: int = 32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(channels, channels, 3, 3, generator=gen) * std).half()
    u = F.normalize(torch.randn(channels, generator=gen), dim=0)
    v = F.normalize(torch.randn(channels * 9, generator=gen), dim=0)
    # the fp32 value: the same iteration on the same (fp16-stored) weight, in fp32
    reference = ours(weight.float(), u, v, 20)
    return weight, u, v, reference.sigma().item()


def test_fp16_hazard_large_weights_overflow_sigma():
    """sigma ~1e5 > 65504: the naive fp16 iteration's norms and sigma overflow to inf and the
    normalised weight is NaN; ours (fp32 iteration) matches the fp32 sigma and stays finite."""
    weight, u, v, reference = hazard_weight(std=6000.0)
    assert reference > torch.finfo(torch.float16).max  # the hazard: not representable in fp16
    naive_weight, _ = naive_half_spectral_norm(weight, u.half(), v.half(), 20)
    assert not torch.isfinite(naive_weight).all()

    conv = ours(weight, u.half(), v.half(), 20)
    assert conv.sigma().item() == pytest.approx(reference, rel=1e-3)
    normalized = conv.normalized_weight()
    assert normalized.dtype == torch.float16 and torch.isfinite(normalized).all()
    assert torch.linalg.matrix_norm(normalized.float().flatten(1), 2).item() == pytest.approx(1.0, rel=5e-3)
    out = conv(torch.randn(1, 32, 5, 5, dtype=torch.float16))
    assert torch.isfinite(out).all()


def test_fp16_hazard_subnormal_weights_give_wrong_sigma():
    """Weights around 5e-8 sit at the bottom of fp16's subnormal range (its smallest step is 6e-8):
    the naive fp16 ``W^T u`` and ``W v`` keep a bit or two and sigma is off by percent; ours
    computes on the same stored weights in fp32 and matches the fp32 value to 1e-3."""
    weight, u, v, reference = hazard_weight(std=5e-8, channels=64)
    assert (weight == 0).float().mean() < 0.5 and weight.abs().max() < torch.finfo(torch.float16).tiny
    _, naive_sigma = naive_half_spectral_norm(weight, u.half(), v.half(), 20)
    assert abs(naive_sigma.item() / reference - 1) > 0.01
    conv = ours(weight, u.half(), v.half(), 20)
    assert conv.sigma().item() == pytest.approx(reference, rel=1e-3)


def test_fp16_hazard_eps_rounds_to_zero_and_zero_weights_give_nan():
    """1e-12 is 0 in fp16, so normalising a zero vector in fp16 is 0/0; ours applies the eps site
    in fp32, where 1e-12 survives: a zero weight normalises to zeros, as in fp32."""
    assert torch.tensor(1e-12, dtype=torch.float16).item() == 0.0
    assert torch.tensor(1e-6, dtype=torch.float16).item() > 0.0  # the fp16-safe candidate survives
    zero16 = torch.zeros(8, dtype=torch.float16)
    assert torch.isnan(F.normalize(zero16, dim=0, eps=1e-12)).all()  # torch's normalisation in fp16
    assert torch.isnan(safe_unit(zero16, 1e-12)).all()  # ours too, were it run in fp16
    assert torch.equal(safe_unit(zero16.float(), 1e-12), torch.zeros(8))

    weight = torch.zeros(4, 4, 3, 3, dtype=torch.float16)
    u, v = F.normalize(torch.ones(4), dim=0), F.normalize(torch.ones(36), dim=0)
    naive_weight, _ = naive_half_spectral_norm(weight, u.half(), v.half(), 1)
    assert torch.isnan(naive_weight).all()
    conv = ours(weight, u.half(), v.half(), 1)
    assert torch.isfinite(conv.weight_u).all() and torch.equal(conv.normalized_weight(), weight)
    fp32 = ours(weight.float(), u, v, 1)
    assert torch.equal(fp32.normalized_weight(), weight.float())


def test_safe_unit_survives_squares_outside_the_dtype_range():
    """bf16 weights keep fp32's range, so even fp32 squares can overflow (1e30^2) or vanish
    (1e-25^2, with an eps below that norm): measuring the norm after dividing by max|x| keeps the
    unit vector exact where ``F.normalize`` returns 0 or garbage."""
    unit = torch.tensor([0.6, 0.8])
    for scale, eps in ((1e30, 1e-12), (1e-25, 1e-35)):
        x = torch.tensor([3.0, 4.0]) * scale
        torch.testing.assert_close(safe_unit(x, eps), unit)
        assert not torch.allclose(F.normalize(x, dim=0, eps=eps), unit)
    assert torch.equal(safe_unit(torch.tensor([3e-30, 4e-30]), 1e-12), torch.tensor([3e-18, 4e-18]))  # eps floor


def test_sn_runs_in_fp32_under_autocast_and_returns_the_weight_dtype():
    conv = SNConv2d(4, 4, 3, padding=1)
    with torch.autocast("cpu", dtype=torch.float16):
        w = conv.normalized_weight()
        assert w.dtype == torch.float32  # fp32 weight in, fp32 weight out; the conv autocasts
        assert conv(torch.randn(1, 4, 6, 6)).dtype == torch.float16
    half = SNConv2d(4, 4, 3, padding=1).half()
    assert half.normalized_weight().dtype == torch.float16


# ---------------------------------------------------------------------------- search space


def test_search_space_loads_with_the_eps_sites():
    config = load_config(ROOT / "search_spaces" / "spade.yaml")
    assert config.model.name == "spade"
    assert set(config.search.eps) == {"instance_norm", "spectral_norm"}
    assert 1e-12 in config.search.eps["spectral_norm"] and 1e-6 in config.search.eps["spectral_norm"]
    assert config.quality.metric == "ssim"

"""A recommendation used outside the project: a plain torch.amp loop built from the loaded file,
any optimizer class, and the Lightning / Accelerate values (checked against the values each
library documents, without importing either)."""
from __future__ import annotations

import itertools

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.recommend import load_recommended_setting, recommend, write_recommendation
from orchestrator.settings import Setting, SpeedFlags
from orchestrator.usage import (ACCELERATE_MIXED_PRECISIONS, LIGHTNING_PRECISIONS, accelerate_mixed_precision,
                                autocast_kwargs, backend_flags, framework_settings, grad_scaler_kwargs,
                                input_dtype, lightning_precision, make_optimizer, prepare_networks)
from tests.test_recommend import REFERENCE, SSIM, candidate, reference_rows

ALL = [Setting(opt_level=level, dtype=dtype, batch_size=2) for level, dtype in
       itertools.product(("O0", "O1", "O2", "O3"), ("fp16", "bf16"))]


def test_a_plain_torch_amp_loop_trains_from_a_loaded_recommendation(tmp_path):
    chosen = Setting(opt_level="O1", dtype="bf16", batch_size=2, eps={"adam": 1e-6},
                     flags=SpeedFlags(fused_optimizer=True, channels_last=True))
    frame = pd.DataFrame(reference_rows() + [candidate(chosen, 1.8, 1.7, 1.9, ssim=(0.001, 0.002))])
    path = write_recommendation(recommend(frame, model="m", preset="tiny", quality=SSIM, reference=REFERENCE), tmp_path)
    setting = load_recommended_setting(path)
    assert setting == chosen

    torch.manual_seed(0)
    (net,) = prepare_networks(setting, nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.InstanceNorm2d(4),
                                                     nn.Conv2d(4, 3, 3, padding=1)))
    optimizer = make_optimizer(setting, torch.optim.AdamW, net.parameters(), lr=1e-2)
    assert optimizer.defaults["eps"] == 1e-6 and optimizer.defaults["fused"] is True
    scaler = torch.amp.GradScaler(**grad_scaler_kwargs(setting, "cpu"))
    x = torch.randn(2, 3, 8, 8).to(input_dtype(setting)).contiguous(memory_format=torch.channels_last)
    before = [p.detach().clone() for p in net.parameters()]
    with torch.autocast(**autocast_kwargs(setting, "cpu")):
        out = net(x)
        assert out.dtype == torch.bfloat16  # autocast ran the convs in bf16
        loss = F.mse_loss(out.float(), x.float())
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_any_optimizer_class_gets_only_the_arguments_it_takes():
    setting = Setting(opt_level="O1", dtype="fp16", eps={"adam": 1e-4}, flags=SpeedFlags(fused_optimizer=True))
    sgd = make_optimizer(setting, torch.optim.SGD, [nn.Parameter(torch.ones(2))], lr=0.1)
    assert "eps" not in sgd.defaults and sgd.defaults["fused"] is True
    rmsprop = make_optimizer(setting, torch.optim.RMSprop, [nn.Parameter(torch.ones(2))], lr=0.1)
    assert rmsprop.defaults["eps"] == 1e-4


@pytest.mark.parametrize("setting", ALL, ids=lambda s: s.label())
def test_framework_values_are_ones_the_libraries_accept_or_say_why_not(setting):
    lightning, lightning_gap = lightning_precision(setting)
    accelerate, accelerate_gap = accelerate_mixed_precision(setting)
    assert lightning is None or lightning in LIGHTNING_PRECISIONS
    assert accelerate is None or accelerate in ACCELERATE_MIXED_PRECISIONS
    if setting.opt_level == "O2":
        assert lightning is None and "master weights" in lightning_gap
        assert accelerate is None and "master weights" in accelerate_gap
    if setting.opt_level == "O1" and setting.dtype == "fp16":
        assert (lightning, accelerate) == ("16-mixed", "fp16") and "one per loss" in lightning_gap
    if setting.opt_level == "O0":
        assert (lightning, accelerate) == ("32-true", "no")


def test_the_recommendation_file_says_how_to_apply_it(tmp_path):
    chosen = Setting(opt_level="O2", dtype="bf16", batch_size=4, flags=SpeedFlags(tf32="on", checkpointing="blocks"))
    frame = pd.DataFrame(reference_rows() + [candidate(chosen, 1.8, 1.7, 1.9, ssim=(0.001, 0.002))])
    rec = recommend(frame, model="m", preset="tiny", quality=SSIM, reference=REFERENCE)
    apply = rec["recommended"]["apply"]
    assert apply == framework_settings(chosen)
    assert apply["lightning"]["precision"] is None and apply["backend_flags"]["torch.backends.cudnn.allow_tf32"]
    assert any("checkpointing" in line for line in apply["set_by_hand"])
    assert backend_flags(Setting(flags=SpeedFlags(tf32="default"))) is None

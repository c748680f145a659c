"""The doctor (orchestrator/doctor.py): it names each reverted seed fp16 fix (planted truths in
tests/doctor_planted.py), raises no hazard on the models as shipped where their training is fine,
finds and checks the eps value a study should search, and expands ``search.eps: auto``.

The doctor runs real fp16 steps on the CPU (emulated, slow): cases use the tiny presets and the
paired pass only (``steps=0``: its forward and backward traced), no per-layer profile, unless that
is what they test."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from orchestrator.config import ConfigError, load_config
from orchestrator.doctor import DtypeFacts, diagnose, expand_auto_eps
from tests.doctor_planted import BIG_HOLES, planted_cases

ROOT = Path(__file__).resolve().parents[1]
PLANTED_USER = "examples/planted_user_model.py:HintColorizer"
QUICK = dict(steps=0, profile=False, suggest=False)  # the paired pass, its ops traced


def named(diagnosis, case: dict) -> list:
    """The hazards that name the planted site (or call site) with one of the expected kinds."""
    out = []
    for f in diagnosis.hazards:
        if f.kind not in case["kinds"]:
            continue
        if "site" in case and f.site == case["site"]:
            out.append(f)
        elif "callsite" in case and case["callsite"] in (f.callsite or ""):
            out.append(f)
    return out


# ---------------------------------------------------------------------------- dtype facts


def test_dtype_facts():
    fp16, bf16 = DtypeFacts.of("fp16"), DtypeFacts.of("bf16")
    assert fp16.max == 65504 and fp16.tiny == 2.0**-14 and fp16.subnormal == 2.0**-24
    assert fp16.kept(1e-8) == "rounds to 0" and fp16.kept(1e-6).startswith("subnormal")
    assert bf16.kept(1e-8) == "normal" and bf16.kept(1e-12) == "normal"
    assert fp16.safe_eps() == 1e-6  # the seeds' partial-conv fix, derived
    assert fp16.headroom(65504 / 8) == pytest.approx(3.0) and fp16.headroom(1e5) < 0


# ---------------------------------------------------------------------------- planted truths


CASES = planted_cases()


@pytest.mark.parametrize("name", ["inpainting_half_reciprocal", "inpainting_one_step_gram",
                                  "spade_half_spectral_norm"])
def test_names_each_reverted_seed_fix(name):
    case = CASES[name]
    kwargs = dict(case["kwargs"])
    model = kwargs.pop("model")
    if name == "inpainting_half_reciprocal":
        kwargs["options"] = {"use_vgg": False}  # the hazard is in the generator: skip the VGG loss
    diagnosis = diagnose(model, **QUICK, **kwargs)
    hits = named(diagnosis, case)
    assert hits, [f.title for f in diagnosis.findings]
    if name == "inpainting_half_reciprocal":
        first = diagnosis.first_nonfinite
        assert first["phase"] == "forward" and first["op"] == "reciprocal"
        assert first["module"].startswith("generator.encoder.0") and first["eps"]["site"] == "pconv_mask"
        assert "doctor_planted.py" in first["where"]
    if name == "inpainting_one_step_gram":
        assert hits[0].phase == "loss" and "two steps" in hits[0].action
        assert hits[0].bf16.startswith("prefer bf16")
    if name == "spade_half_spectral_norm":
        assert any("safe_unit" in line or "normalized_weight" in line for line in hits[0].evidence)


@pytest.mark.slow
def test_names_few_shot_label_encoder_eps_and_finds_the_fix():
    """The published weight-generator structure (narrow): eps 1e-5 in the label encoder's norms is
    named, and the value the doctor finds and checks is within a decade of the seeds' 0.1."""
    case = CASES["fs_vid2vid_label_encoder_eps"]
    kwargs = dict(case["kwargs"])
    diagnosis = diagnose(kwargs.pop("model"), steps=0, profile=False, batch_size=1, max_probes=2, **kwargs)
    hits = named(diagnosis, case)
    assert hits and all(f.site == "label_encoder_norm" for f in hits), [f.title for f in diagnosis.findings]
    assert hits[0].module.startswith("generator.weight_generator.label_encoder")
    assert 0.01 <= hits[0].suggested[0] <= 0.1 and "ok" in hits[0].verified
    assert "bf16 does not help" in hits[0].bf16
    assert not any(f.site == "instance_norm" for f in diagnosis.hazards)  # held at 0.1 here


# ---------------------------------------------------------------------------- no false alarms


@pytest.mark.parametrize("model,opt_level,kwargs", [
    ("pix2pixhd", "O1", {}),
    ("examples/user_model.py:Colorizer", "O2", {}),
    ("inpainting", "O1", {"eps": {"pconv_mask": 1e-6}, "data": BIG_HOLES, "options": {"use_vgg": False}}),
])
def test_no_false_alarm_on_models_as_shipped(model, opt_level, kwargs):
    diagnosis = diagnose(model, opt_level=opt_level, **QUICK, **kwargs)
    assert diagnosis.status == "ok"
    assert not diagnosis.hazards, [(f.title, f.evidence) for f in diagnosis.hazards]
    # dynamic loss scaling overflowing the backward is not an fp16 hazard
    assert all(o["phase"] == "backward" for o in diagnosis.origins)


@pytest.mark.slow
@pytest.mark.parametrize("model,opt_level,kwargs", [
    ("spade", "O2", {}),
    ("examples/user_model.py:Colorizer", "O1", {"steps": 2}),
    ("vid2vid", "O1", {}),
    ("fs_vid2vid", "O2", {}),
    ("inpainting", "O2", {"eps": {"pconv_mask": 1e-6}, "data": BIG_HOLES}),
])
def test_no_false_alarm_on_the_other_models_as_shipped(model, opt_level, kwargs):
    diagnosis = diagnose(model, opt_level=opt_level, **{**QUICK, **kwargs})
    assert not diagnosis.hazards, [(f.title, f.evidence) for f in diagnosis.hazards]


def test_bf16_keeps_the_reverted_eps():
    """The reverted partial conv in bf16: 1e-8 is a normal bf16 number, nothing goes non-finite."""
    case = CASES["inpainting_half_reciprocal"]["kwargs"]
    bf16 = diagnose(case["model"], data=case["data"], options={"use_vgg": False}, dtype="bf16", **QUICK)
    assert not bf16.hazards and not bf16.origins


# ---------------------------------------------------------------------------- the planted user model


@pytest.fixture(scope="module")
def planted_user():
    return diagnose(PLANTED_USER, steps=2, profile=True, suggest=True)


def test_planted_user_model_hazard_fix_and_bf16(planted_user):
    d = planted_user
    hits = [f for f in d.hazards if f.site == "hint_norm"]
    assert len(hits) == 1, [f.title for f in d.findings]
    f = hits[0]
    first = d.first_nonfinite
    assert first["op"] == "div" and first["module"] == "generator.hints" and first["phase"] == "forward"
    assert "planted_user_model.py" in first["where"] and first["eps"]["site"] == "hint_norm"
    assert f.suggested == [1e-6, 1e-5] and "1e-06 ok" in f.verified  # checked by re-running the doctor
    assert f.bf16.startswith("prefer bf16")
    assert d.suggested_eps == {"hint_norm": [1e-6, 1e-5]}
    use = next(u for u in d.eps_uses if u["site"] == "hint_norm")
    assert use["kept"] == "rounds to 0" and use["operand_zero_share"] > 0.3 and use["consumers"]["div"]["nonfinite"]
    site = next(s for s in d.sites if s["site"] == "hint_norm")
    assert site["modules"] == ["generator.hints"] and site["applied"] == ["fp16"]


def test_per_layer_breakdown_side_by_side(planted_user):
    rows = {r["module"]: r for r in planted_user.profile}
    conv = rows["generator.stem"]
    assert conv["fp32_fwd_ms"] > 0 and conv["half_fwd_ms"] > 0 and conv["half_bwd_ms"] > 0
    assert conv["half_fwd_dtype"] == "fp16" and conv["fp32_fwd_dtype"] == "fp32"
    assert rows["discriminator.body.0"]["half_bwd_dtype"] == "fp16"


def test_module_and_gradient_numerics(planted_user):
    modules = {m["module"]: m for m in planted_user.modules}
    hints = modules["generator.hints"]
    assert hints["out_dtype"] == "fp16" and hints["nonfinite_share"] > 0
    assert math.isfinite(modules["discriminator.body.0"]["headroom_pow2"])
    params = {p["name"]: p for p in planted_user.parameters}
    assert params["generator.stem.weight"]["scale"] < 65536  # the scaler backed off from the NaN loss
    assert all(0 <= p["flushed_share"] <= 1 for p in params.values())


def test_report_files(planted_user, tmp_path):
    files = planted_user.write(tmp_path)
    text = files["doctor.md"].read_text()
    assert "hint_norm" in text and "## Per-layer breakdown" in text and "## First inf/NaN" in text
    data = json.loads(files["doctor.json"].read_text())
    assert data["suggested_eps"] == {"hint_norm": [1e-6, 1e-5]}
    assert data["first_nonfinite"]["op"] == "div"
    assert "hint_norm" in planted_user.summary()


# ---------------------------------------------------------------------------- search.eps: auto


def planted_space(tmp_path: Path, **search) -> Path:
    raw = yaml.safe_load((ROOT / "search_spaces" / "planted_user.yaml").read_text())
    raw["search"].update(search)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_config_accepts_auto_and_refuses_to_grid_it(tmp_path):
    config = load_config(planted_space(tmp_path))
    assert config.search.eps == {"hint_norm": "auto"} and config.search.auto_eps
    with pytest.raises(ValueError, match="expand"):
        config.search.candidates()
    assert load_config(planted_space(tmp_path, eps="auto")).search.eps == "auto"
    with pytest.raises(ConfigError, match="no eps site"):
        load_config(planted_space(tmp_path, eps={"hint_nrom": "auto"}))
    with pytest.raises(ConfigError, match="search.eps.hint_norm.0"):  # a bad value is still named
        load_config(planted_space(tmp_path, eps={"hint_norm": [-1.0]}))
    assert config.model_dump(mode="json")["search"]["eps"] == {"hint_norm": "auto"}


def test_auto_eps_searches_the_doctors_values(tmp_path):
    config = load_config(planted_space(tmp_path, dtype=["fp16"]))
    lines: list[str] = []
    expanded = expand_auto_eps(config, log=lines.append)
    assert expanded.search.eps == {"hint_norm": [1e-8, 1e-6, 1e-5]}
    assert not expanded.search.auto_eps
    labels = {s.label() for s in expanded.search.candidates()}
    assert "O1-fp16-b2 eps.hint_norm=1e-06" in labels and "O1-fp16-b2 eps.hint_norm=1e-08" in labels
    assert any("hint_norm" in line for line in lines)
    assert config.search.eps == {"hint_norm": "auto"}  # the input is left alone


def test_auto_eps_without_hazard_keeps_the_default(tmp_path):
    """bf16 keeps 1e-8: nothing to search beyond the default."""
    config = load_config(planted_space(tmp_path, dtype=["bf16"]))
    expanded = expand_auto_eps(config, log=None)
    assert expanded.search.eps == {"hint_norm": [1e-8]}


# ---------------------------------------------------------------------------- command line, MLflow


def test_cli_writes_reports_and_an_mlflow_run(tmp_path):
    out = tmp_path / "doctor"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run([sys.executable, "-m", "orchestrator", "doctor", "--model", PLANTED_USER, "--steps", "1",
                           "--no-profile", "--no-suggest", "--output", str(out), "--tracking-uri", uri],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[hazard] eps site `hint_norm`" in done.stdout
    assert (out / "doctor.md").is_file() and json.loads((out / "doctor.json").read_text())["findings"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("doctor").experiment_id])
    assert len(runs) == 1 and runs[0].data.params["dtype"] == "fp16" and runs[0].data.metrics["hazards"] >= 1
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id)} >= {"doctor.md", "doctor.json"}


def test_cli_rejects_a_bad_model():
    done = subprocess.run([sys.executable, "-m", "orchestrator", "doctor", "--model", "no_such_model"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "unknown model" in done.stderr


def test_doctor_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    diagnose("examples/user_model.py:Colorizer", steps=0, profile=False, suggest=False)
    assert torch.equal(state, torch.get_rng_state())


# ---------------------------------------------------------------------------- a study with search.eps: auto


@pytest.mark.slow
def test_study_with_auto_eps_searches_the_doctors_fix(tmp_path):
    """The planted user model's study (search.eps: auto, fp16 only, minimal budget): the doctor's
    values reach the study, the planted 1e-8 diverges there and the doctor's values do not."""
    import pandas as pd

    space = planted_space(tmp_path, dtype=["fp16"])
    raw = yaml.safe_load(space.read_text())
    raw["data"].update(train_samples=16, val_samples=4)
    raw["budget"] = {"profile_warmup": 1, "profile_steps": 2, "profile_rounds": 2, "train_samples": 8,
                     "reference_seeds": 2, "max_trials": 1, "checkpoint_every": 4, "keep_slower": True}
    space.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "run_experiment.py", "--search-space", str(space), "--output", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "search.eps: hint_norm: [1e-08, 1e-06, 1e-05]" in done.stdout
    rows = pd.read_parquet(out / "results.parquet")
    fp16 = rows[(rows["kind"] == "candidate") & (rows["opt_level"] == "O1")]
    by_eps = {(None if pd.isna(e) else float(e)): status for e, status in zip(fp16["eps.hint_norm"], fp16["status"])}
    assert by_eps[None] == "diverged"  # the default, 1e-8
    assert by_eps[1e-6] != "diverged" and by_eps[1e-5] != "diverged"

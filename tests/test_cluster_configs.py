"""The cluster-launcher configs, checked with Ray's own schema and the rules the design depends on
(no cloud access, no SSH, a few seconds).

Ray validates a config in two steps before it contacts a provider: ``validate_config`` (the JSON
schema ray ships, ``ray/autoscaler/ray-schema.json``) on the file as written, then
``prepare_config`` (defaults merged, the `local` provider's node type filled in) and the schema
again. Both run here, on every config, exactly as ``ray up`` calls them.
"""
from __future__ import annotations

import copy
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from orchestrator import search

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
ONPREM = ROOT / "examples" / "cluster-onprem.yaml"
LOCAL_TEST = ROOT / "examples" / "cluster-local-test.yaml"
CONFIGS = [CLUSTER, ONPREM, LOCAL_TEST]
MLFLOW_SCRIPT = ROOT / "scripts" / "start_mlflow_server.sh"
COMMAND_KEYS = ["initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"]


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def commands(config: dict) -> list[str]:
    return [c for key in COMMAND_KEYS for c in config.get(key) or []]


def _ray_start_head(config: dict) -> str:
    return next(c for c in config["head_start_ray_commands"] if "ray start --head" in c)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_valid_for_rays_own_schema(path):
    config = load(path)
    validate_config(copy.deepcopy(config))  # as written
    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` hands the provider
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_schema_check_is_real():
    """The same call rejects a mistake (a misspelt key), so the passing test above means something."""
    import jsonschema

    config = load(CLUSTER)
    config["setup_comands"] = ["true"]
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_command_is_valid_bash(path):
    for command in commands(load(path)):
        shlex.split(command)  # balanced quotes
        checked = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert checked.returncode == 0, f"{command!r}: {checked.stderr}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_no_command_is_cut_by_a_yaml_comment(path):
    """In a plain (unquoted) YAML scalar, ' #' starts a comment and silently cuts the command there;
    commands containing ' #' must be quoted (or block scalars, where '#' is text)."""
    in_commands, block_indent = False, None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if re.match(r"^[a-z_]+:", line):
            in_commands, block_indent = line.split(":")[0] in COMMAND_KEYS, None
            continue
        if not in_commands or not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        if block_indent is not None and indent > block_indent:
            continue  # inside a '>-' / '|' block scalar
        block_indent = None
        item = line.strip()[2:] if line.strip().startswith("- ") else line.strip()
        if item.endswith((">-", ">", "|", "|-")):
            block_indent = indent
            continue
        assert " #" not in item or item[:1] in "'\"", f"{path.name}:{number}: quote this command: {line}"


@pytest.mark.parametrize("path", [CLUSTER, ONPREM], ids=lambda p: p.name)
def test_nodes_install_torch_then_the_mounted_project(path):
    config = load(path)
    assert config["file_mounts"]["~/amp-study"] == "."
    assert ".gitignore" in config["rsync_filter"]  # runs/, mlflow.db, build output stay behind
    setup = config["setup_commands"]
    torch = next(i for i, c in enumerate(setup) if "torch==" in c)
    project = next(i for i, c in enumerate(setup) if "-e ~/amp-study" in c)
    assert torch < project
    # the launcher requires the cluster's Ray to be the laptop's: keep the pin in step
    pins = re.findall(r"ray\[[a-z,]+\]==([\w.]+)", " ".join(setup))
    assert pins == [ray.__version__]
    # the project's Python on PATH for the launcher's login shells (`ray submit` runs `python`)
    assert any("amp-venv/bin" in c and ".bashrc" in c for c in setup)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_the_project_builds_without_the_system_pythons_build_tools(path):
    """A fresh Python 3.11 has setuptools 65.5 and no `wheel`: building with them
    (`--no-build-isolation`) fails with "invalid command 'bdist_wheel'". Every config installs the
    project into a venv with its own installer (pip from ensurepip, or uv) and builds it in an isolated
    environment with the build requirements pyproject.toml names."""
    setup = load(path)["setup_commands"]
    text = " ".join(setup)
    assert "--no-build-isolation" not in text and "--without-pip" not in text
    venv = next(c for c in setup if "amp-venv" in c and ("venv " in c or "-m venv" in c))
    assert "--seed" in venv or ("-m venv" in venv and "--without-pip" not in venv)  # the venv's own pip
    install = next(c for c in setup if "-e ~/amp-study" in c)
    assert "amp-venv/bin/python -m pip install" in install or "--python ~/amp-venv/bin/python" in install
    requires = re.search(r"requires = \[([^\]]*)\]", (ROOT / "pyproject.toml").read_text()).group(1)
    assert "setuptools>=" in requires  # what the isolated build fetches: one that builds wheels itself


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_head_starts_mlflow_before_ray_and_keeps_services_internal(path):
    config = load(path)
    head = config["head_start_ray_commands"]
    mlflow = next(i for i, c in enumerate(head) if "start_mlflow_server.sh" in c)
    ray_start = next(i for i, c in enumerate(head) if "ray start --head" in c)
    assert mlflow < ray_start  # so `ray start` passes MLFLOW_TRACKING_URI on to `ray job submit` jobs
    assert "--dashboard-host=127.0.0.1" in _ray_start_head(config)
    text = "\n".join(commands(config))
    assert not re.search(r"(?<![\d.])0\.0\.0\.0(?![\d/])", text) and "--allow-public" not in text  # no wildcard binds


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_ray_token_auth_on_every_node(path):
    config = load(path)
    setup, head_setup = " ".join(config["setup_commands"]), config["head_setup_commands"]
    assert "export RAY_AUTH_MODE=token" in setup
    assert any(c.startswith("ray get-auth-token --generate") and c.endswith("> /dev/null") for c in head_setup)
    if config["provider"].get("worker_ips") != []:  # a cluster with workers: they get the head's token
        assert "~/.ray/auth_token" in config["cluster_synced_files"]


def test_cloud_cluster_autoscales_gpu_workers():
    config = load(CLUSTER)
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0  # the head holds the driver, trials' CPUs and MLflow
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert workers and all(t["resources"]["GPU"] >= 1 and t["resources"]["CPU"] >= 1 for t in workers.values())
    assert any(t["max_workers"] > t.get("min_workers", 0) for t in workers.values())  # autoscaling
    assert config["max_workers"] >= max(t["max_workers"] for t in workers.values())
    assert "boto3" in " ".join(config["head_setup_commands"])  # the head's autoscaler launches EC2 nodes


def test_onprem_binds_mlflow_and_ray_to_the_head_ip():
    config = load(ONPREM)
    assert config["provider"]["type"] == "local"
    head_ip = config["provider"]["head_ip"]
    assert config["max_workers"] == len(config["provider"]["worker_ips"])
    node_type = prepare_config(copy.deepcopy(config))["available_node_types"]["local.cluster.node"]
    assert node_type["min_workers"] == node_type["max_workers"] == len(config["provider"]["worker_ips"])
    head = " ".join(config["head_start_ray_commands"])
    assert f"--host {head_ip} " in head and f"--node-ip-address={head_ip} " in head


def test_local_test_config_stays_on_loopback():
    config = load(LOCAL_TEST)
    assert config["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    head = " ".join(config["head_start_ray_commands"])
    assert "--host 127.0.0.1" in head and "--node-ip-address=127.0.0.1" in head
    # its ports and temp dir come from the launcher script's environment (free ports, private dir)
    for variable in ("AMP_E2E_GCS_PORT", "AMP_E2E_MLFLOW_PORT", "AMP_E2E_RAY_TMP", "AMP_E2E_AGENT_PORT"):
        assert f"${{{variable}:-" in head


@pytest.mark.parametrize("path", CONFIGS + [MLFLOW_SCRIPT, ROOT / "scripts" / "launcher_e2e.sh"],
                         ids=lambda p: p.name)
def test_no_credentials_committed(path):
    text = path.read_text()
    for pattern in (r"AKIA[0-9A-Z]{16}", r"aws_secret_access_key", r"-----BEGIN [A-Z ]*PRIVATE KEY",
                    r"(?i)password\s*[:=]\s*\S", r"(?i)token\s*[:=]\s*[0-9a-f]{16,}"):
        assert not re.search(pattern, text), f"{path.name}: {pattern}"
    if path.suffix == ".yaml":
        auth = load(path).get("auth", {})
        assert "ssh_private_key" not in auth or auth["ssh_private_key"].startswith(("~", "/"))  # a path


def _mlflow_script(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(MLFLOW_SCRIPT), *args, "--dir", str(tmp_path / "mlflow"), "--bashrc", "none"],
                          capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin",
                                                                           "HOME": str(tmp_path),
                                                                           "PYTHON": sys.executable})


@pytest.mark.parametrize("host,message", [("0.0.0.0", "every interface"), ("8.8.8.8", "public address")])
def test_mlflow_server_refuses_wildcard_and_public_addresses(tmp_path, host, message):
    done = _mlflow_script("--host", host, "--port", "1", tmp_path=tmp_path)
    assert done.returncode != 0 and message in done.stderr
    assert not (tmp_path / "mlflow" / "server.pid").exists()


def test_mlflow_server_script_help(tmp_path):
    done = _mlflow_script("--help", tmp_path=tmp_path)
    assert done.returncode == 0 and "cluster-internal address" in done.stdout and "set -euo" not in done.stdout


def test_cluster_tracking_uri(tmp_path, monkeypatch):
    assert search.cluster_tracking_uri(tmp_path / "missing") is None
    (tmp_path / "tracking_uri").write_text("\n")
    assert search.cluster_tracking_uri(tmp_path / "tracking_uri") is None
    (tmp_path / "tracking_uri").write_text("http://10.0.1.5:5000\n")
    assert search.cluster_tracking_uri(tmp_path / "tracking_uri") == "http://10.0.1.5:5000"
    monkeypatch.setenv("AMP_MLFLOW_DIR", str(tmp_path))  # where the script's --dir put it
    assert search.cluster_tracking_uri() == "http://10.0.1.5:5000"
    monkeypatch.setenv("AMP_MLFLOW_DIR", str(tmp_path / "elsewhere"))
    assert search.cluster_tracking_uri() is None


@pytest.mark.parametrize("path", [CLUSTER, ONPREM], ids=lambda p: p.name)
def test_multi_node_clusters_share_the_study_output(path):
    """Ray Train checkpoints go to <output>/ray, which workers on other machines must reach: the
    head exports /mnt/amp-shared, workers mount it at the same path, and ~/runs (the default output
    of a `ray submit`ted run_experiment.py) points into it."""
    config = load(path)
    head, workers = " ".join(config["head_setup_commands"]), " ".join(config["worker_setup_commands"])
    assert "/mnt/amp-shared " in head and "exportfs" in head and "ln -s /mnt/amp-shared/runs ~/runs" in head
    assert '"$RAY_HEAD_IP":/mnt/amp-shared /mnt/amp-shared' in workers
    assert "0.0.0.0/0" not in head and "*(" not in head  # exported to private addresses only

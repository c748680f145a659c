"""Which MLflow the study logs to, and how the user is told to open it."""
from __future__ import annotations

from pathlib import Path

from orchestrator.tracking import browse_hint, resolve_tracking_uri


def test_the_explicit_uri_wins_over_the_found_one(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    head = "http://10.0.0.5:5000"
    assert resolve_tracking_uri(None, None, tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolve_tracking_uri(None, None, tmp_path, discovered=head) == head
    assert resolve_tracking_uri(None, "http://config:1", tmp_path, discovered=head) == "http://config:1"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:2")
    assert resolve_tracking_uri(None, "http://config:1", tmp_path, discovered=head) == "http://env:2"
    assert resolve_tracking_uri("http://cli:3", "http://config:1", tmp_path, discovered=head) == "http://cli:3"


def test_relative_sqlite_paths_become_absolute(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("sqlite:///runs/m.db", None, Path("out")) == f"sqlite:///{tmp_path / 'runs' / 'm.db'}"


def test_browse_hint_fits_the_store():
    assert browse_hint("sqlite:////x/mlflow.db") == "mlflow ui --backend-store-uri sqlite:////x/mlflow.db"
    server = browse_hint("http://10.0.0.5:5000")
    assert server.startswith("open http://10.0.0.5:5000") and "ray attach cluster.yaml -p 5000" in server

"""tracking.py against a real MLflow SQLite store; results are read back with MlflowClient."""

import json
import logging
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from ajepa.tracking import (
    GIT_COMMIT_TAG,
    GIT_DIRTY_TAG,
    NullTracker,
    Tracker,
    default_tracking_uri,
    find_run,
    git_commit,
    git_tags,
    ui_command,
)
from mlflow import MlflowClient


@pytest.fixture(scope="module")
def uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One store for the module: creating a SQLite store runs MLflow's migrations (seconds)."""
    uri = default_tracking_uri(tmp_path_factory.mktemp("mlflow"))
    MlflowClient(uri).search_experiments()
    return uri


@pytest.fixture
def client(uri: str) -> MlflowClient:
    return MlflowClient(uri)


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_params_metrics_artifacts_round_trip(uri: str, client: MlflowClient, tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.bin").write_bytes(b"\x00\x01")
    (tmp_path / "notes.txt").write_text("hello")
    with Tracker.start(uri, "round-trip", "run-a", tags={"job": "pretrain"}) as t:
        t.log_params({"optim": {"lr": 1e-3, "betas": (0.9, 0.95)}, "model": {"depth": 2}, "name": "x" * 7000})
        for step in range(3):
            t.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1 * step}, step=step * 10)
        t.log_artifact(tmp_path / "notes.txt")
        t.log_artifact(tmp_path / "notes.txt", "docs")
        t.log_artifact(tmp_path / "ckpt")
        t.log_text("some text", "text/a.txt")
        t.log_dict({"a": 1, "b": [1, 2]}, "cfg.yaml")
        t.log_dict({"a": 1}, "cfg.json")
        t.set_tags({"phase": "done", "n": 3})
    run = client.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run-a"
    assert run.data.params["optim.lr"] == "0.001"
    assert run.data.params["optim.betas"] == "(0.9, 0.95)"
    assert run.data.params["model.depth"] == "2"
    assert run.data.params["name"] == "x" * 6000  # MLflow's limit
    assert run.data.tags["job"] == "pretrain" and run.data.tags["phase"] == "done" and run.data.tags["n"] == "3"
    assert history(client, t.run_id, "loss") == [(0, 1.0), (10, 0.5), (20, 1 / 3)]
    assert history(client, t.run_id, "lr") == [(0, 0.0), (10, 0.1), (20, 0.2)]
    # Artifacts live next to the database, not in the current working directory.
    db_dir = Path(uri.removeprefix("sqlite:///")).parent
    assert Path(run.info.artifact_uri).is_relative_to(db_dir)
    root = Path(mlflow.artifacts.download_artifacts(run_id=t.run_id, tracking_uri=uri, dst_path=str(tmp_path / "d")))
    assert (root / "notes.txt").read_text() == "hello" and (root / "docs" / "notes.txt").read_text() == "hello"
    assert (root / "ckpt" / "model.bin").read_bytes() == b"\x00\x01"
    assert (root / "text" / "a.txt").read_text() == "some text"
    assert yaml.safe_load((root / "cfg.yaml").read_text()) == {"a": 1, "b": [1, 2]}
    assert json.loads((root / "cfg.json").read_text()) == {"a": 1}


def test_git_commit_is_tagged(uri: str, client: MlflowClient) -> None:
    with Tracker.start(uri, "round-trip", "git") as t:
        pass
    assert client.get_run(t.run_id).data.tags.get(GIT_COMMIT_TAG) == git_commit()


def test_non_finite_metrics_are_logged_and_warned_once(uri: str, client: MlflowClient,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ajepa.tracking"), Tracker.start(uri, "nan", "nan") as t:
        t.log_metrics({"loss": 1.0, "grad": 1.0}, step=0)
        t.log_metrics({"loss": float("nan"), "grad": float("inf")}, step=1)
        t.log_metrics({"loss": float("nan"), "grad": float("-inf")}, step=2)
    loss = history(client, t.run_id, "loss")
    assert loss[0] == (0, 1.0) and [s for s, _ in loss] == [0, 1, 2] and all(math.isnan(v) for _, v in loss[1:])
    assert history(client, t.run_id, "grad") == [(0, 1.0), (1, sys.float_info.max), (2, -sys.float_info.max)]
    warned = [r.getMessage() for r in caplog.records if r.name == "ajepa.tracking"]
    assert len(warned) == 2 and any("loss" in m for m in warned) and any("grad" in m for m in warned)


def test_nested_runs(uri: str, client: MlflowClient, monkeypatch: pytest.MonkeyPatch) -> None:
    parent = Tracker.start(uri, "sweep", "sweep-1")
    children = [Tracker.start(uri, "sweep", f"trial-{i}", parent_run_id=parent.run_id) for i in range(2)]
    for i, child in enumerate(children):
        child.log_metrics({"probe_acc": 0.5 + i / 10}, step=1)
        child.finish()
    parent.finish()
    assert all(client.get_run(c.run_id).data.tags["mlflow.parentRunId"] == parent.run_id for c in children)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # mlflow.search_runs reads the global URI
    exp = client.get_experiment_by_name("sweep")
    found = mlflow.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}'",
                               output_format="list")
    assert {r.info.run_id for r in found} == {c.run_id for c in children}


def test_attach_continues_the_run(uri: str, client: MlflowClient) -> None:
    first = Tracker.start(uri, "resume", "resumable")
    first.log_params({"lr": 0.1, "depth": 2})
    first.log_metrics({"loss": 3.0}, step=0)
    first.log_metrics({"loss": 2.0}, step=1)
    first.finish("FAILED")  # the worker group died
    again = Tracker.attach(uri, first.run_id)
    assert client.get_run(first.run_id).info.status == "RUNNING"
    again.log_params({"lr": 0.1, "depth": 2})  # a resumed job logs its config again
    again.log_metrics({"loss": 1.0}, step=2)
    again.finish()
    assert history(client, first.run_id, "loss") == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert client.get_run(first.run_id).info.status == "FINISHED"


def test_attach_from_another_process(uri: str, client: MlflowClient, tmp_path: Path) -> None:
    """As a restarted Ray worker does: a fresh process, another working directory, only (uri, run_id)."""
    t = Tracker.start(uri, "resume", "cross-process")
    t.log_metrics({"loss": 2.0}, step=0)
    code = ("import sys; from ajepa.tracking import Tracker\n"
            "with Tracker.attach(sys.argv[1], sys.argv[2]) as t:\n"
            "    t.log_metrics({'loss': 1.0}, step=1); t.log_text('hi', 'worker.txt')\n")
    subprocess.run([sys.executable, "-c", code, uri, t.run_id], cwd=tmp_path, check=True, capture_output=True)
    assert history(client, t.run_id, "loss") == [(0, 2.0), (1, 1.0)]
    assert client.get_run(t.run_id).info.status == "FINISHED"
    assert [f.path for f in client.list_artifacts(t.run_id)] == ["worker.txt"]
    assert list(tmp_path.iterdir()) == []  # nothing written to the worker's cwd


def test_changed_param_becomes_a_tag(uri: str, client: MlflowClient, caplog: pytest.LogCaptureFixture) -> None:
    t = Tracker.start(uri, "params", "changed")
    t.log_params({"optim": {"lr": 0.1}, "seed": 0})
    t.log_params({"optim": {"lr": 0.1}, "seed": 0})
    with caplog.at_level(logging.WARNING, logger="ajepa.tracking"):
        t.log_params({"optim": {"lr": 0.2}, "seed": 0, "extra": "new"})
    data = client.get_run(t.run_id).data
    assert data.params == {"optim.lr": "0.1", "seed": "0", "extra": "new"}
    assert data.tags["param_changed.optim.lr"] == "0.2"
    assert "optim.lr" in caplog.text
    t.finish()


def test_large_batches_are_logged_completely(uri: str, client: MlflowClient) -> None:
    with Tracker.start(uri, "params", "large") as t:
        t.log_params({f"p{i}": i for i in range(250)})
        t.log_metrics({f"m{i}": float(i) for i in range(2500)}, step=7)
    data = client.get_run(t.run_id).data
    assert data.params == {f"p{i}": str(i) for i in range(250)}
    assert data.metrics == {f"m{i}": float(i) for i in range(2500)}


def test_context_manager_marks_failed(uri: str, client: MlflowClient) -> None:
    with pytest.raises(RuntimeError), Tracker.start(uri, "status", "boom") as t:
        raise RuntimeError("boom")
    info = client.get_run(t.run_id).info
    assert info.status == "FAILED" and info.end_time is not None


def test_find_run(uri: str) -> None:
    first = Tracker.start(uri, "find", "named")
    time.sleep(0.01)  # start times have millisecond resolution
    second = Tracker.start(uri, "find", "named")
    Tracker.start(uri, "find", "other's")
    assert find_run(uri, "find", "named") == second.run_id != first.run_id
    assert find_run(uri, "find", "other's") is not None
    assert find_run(uri, "find", "missing") is None
    assert find_run(uri, "no-such-experiment", "named") is None


def test_default_tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert default_tracking_uri(tmp_path / "a") == "http://mlflow.example:5000"
    assert not (tmp_path / "a").exists()
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri(Path("runs/x")) == f"sqlite:///{tmp_path.resolve()}/runs/x/mlflow.db"
    assert (tmp_path / "runs" / "x").is_dir()


def test_ui_command() -> None:
    assert ui_command("sqlite:////tmp/runs/mlflow.db") == "mlflow ui --backend-store-uri sqlite:////tmp/runs/mlflow.db"
    assert ui_command("sqlite:////tmp/my runs/mlflow.db") == (
        "mlflow ui --backend-store-uri 'sqlite:////tmp/my runs/mlflow.db'")
    assert ui_command("https://mlflow.example") == "open https://mlflow.example"


def test_git_commit(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "a.txt").write_text("a")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    sha = git_commit(repo)
    assert sha is not None and re.fullmatch(r"[0-9a-f]{40}", sha)
    assert git_tags(repo) == {GIT_COMMIT_TAG: sha, GIT_DIRTY_TAG: "false"}
    (repo / "a.txt").write_text("b")
    assert git_tags(repo)[GIT_DIRTY_TAG] == "true"
    (tmp_path / "plain").mkdir()
    assert git_commit(tmp_path / "plain") is None and git_tags(tmp_path / "plain") == {}
    assert git_commit(tmp_path / "missing") is None


def test_null_tracker_does_nothing(tmp_path: Path) -> None:
    with NullTracker() as t:
        assert t.run_id is None and t.uri is None
        t.log_params({"a": {"b": 1}})
        t.log_metrics({"loss": float("nan")}, step=0)
        t.log_artifact(tmp_path / "missing.bin")
        t.log_text("x", "a.txt")
        t.log_dict({"a": 1}, "a.yaml")
        t.set_tags({"a": 1})
        t.finish("FAILED")
    assert list(tmp_path.iterdir()) == []

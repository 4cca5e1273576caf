"""MLflow tracking: the only module that imports mlflow.

A `Tracker` drives one MLflow run through `MlflowClient` with an explicit run id, never through
`mlflow.start_run`'s process-global active run, so it works in any Ray worker process or thread, and a
restarted worker group (or a run resumed from a checkpoint) continues the same run with `Tracker.attach`.
Rank 0 logs; every other rank, and runs with tracking off, get a `NullTracker` with the same methods.

MLflow 3.17 facts this relies on (checked against its SQLite store):
- A fresh SQLite store takes ~4-6 s to create (schema migrations); opening an existing one ~1 s per process.
- Without an explicit artifact location, a SQLite store puts artifacts in `./mlruns` of the current working
  directory, which differs between the driver and Ray workers: experiments created here keep them in
  `mlartifacts/` next to the database instead.
- `log_batch` accepts non-finite metrics: NaN reads back as NaN, +-inf is stored as +-1.797e308.
- Re-logging a param with the same value is accepted; a different value fails the whole batch.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from ajepa import storage
from ajepa.config import ConfigError
from ajepa.runtime import verbose
from ajepa.storage import Location

logger = logging.getLogger(__name__)
if not verbose():  # MLflow logs its SQLite schema migrations at INFO: not for a job's output
    logging.getLogger("mlflow").setLevel(logging.WARNING)

Status = Literal["FINISHED", "FAILED", "KILLED"]
T = TypeVar("T")

# MLflow's limits (mlflow.utils.validation): longer values are rejected, bigger batches too.
_MAX_PARAM_LEN, _MAX_TAG_LEN = 6000, 8000
_MAX_PARAMS_PER_BATCH, _MAX_TAGS_PER_BATCH, _MAX_METRICS_PER_BATCH = 100, 100, 1000
_MAX_SEARCH_RESULTS = 1000  # runs per page of a search

GIT_COMMIT_TAG = "mlflow.source.git.commit"
GIT_DIRTY_TAG = "ajepa.git.dirty"
PARENT_TAG = "mlflow.parentRunId"


def default_tracking_uri(out_dir: str | os.PathLike[str] | Location) -> str:
    """`MLFLOW_TRACKING_URI` if set, else a SQLite store in a local `out_dir` (created).

    An out dir in object storage (s3://, gs://) cannot hold a SQLite database, and no local default would be
    reachable from the cluster's other nodes or after it is gone: there the tracking server must be named."""
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    out = storage.resolve(out_dir)
    if not out.is_local:
        raise ConfigError(f"--out {out_dir}: runs in object storage need an MLflow tracking server; set "
                          "MLFLOW_TRACKING_URI (e.g. http://<head node>:5000, the server cluster.yaml starts), "
                          "or use a local or shared-filesystem --out for the default SQLite store")
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{out_dir / 'mlflow.db'}"


def ui_command(uri: str) -> str:
    """The shell command that shows the runs stored at `uri`."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)}"


def _git(repo: Path | None, *args: str) -> str | None:
    repo = repo or Path(__file__).resolve().parent  # the checkout this code runs from, not the cwd
    try:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit(repo: Path | None = None) -> str | None:
    """HEAD of the git checkout at `repo` (default: this package's), None when there is none."""
    return _git(repo, "rev-parse", "HEAD")


def git_tags(repo: Path | None = None) -> dict[str, str]:
    """Run tags naming the code version: commit and whether tracked files differ from it; {} outside git.

    A run started on a node without the checkout (a Ray worker gets a copy of the package) gets none:
    compute them in the driver and pass them to `Tracker.start(tags=...)` there.
    """
    commit = git_commit(repo)
    if commit is None:
        return {}
    tags = {GIT_COMMIT_TAG: commit}
    status = _git(repo, "status", "--porcelain", "--untracked-files=no")
    if status is not None:
        tags[GIT_DIRTY_TAG] = str(bool(status)).lower()
    return tags


def _artifact_location(uri: str) -> str | None:
    """Artifacts next to a SQLite database; other stores (servers) choose their own."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///").split("?")[0]).resolve()
    return str(db.parent / "mlartifacts")


def _experiment_id(client: MlflowClient, uri: str, name: str) -> str:
    if (exp := client.get_experiment_by_name(name)) is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(uri))
    except MlflowException as e:  # a parallel sweep trial created it first
        if e.error_code != "RESOURCE_ALREADY_EXISTS" or (exp := client.get_experiment_by_name(name)) is None:
            raise
        return exp.experiment_id


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts to dotted keys; every value (tuples and lists too) as a string MLflow accepts."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)[:_MAX_PARAM_LEN]
    return flat


def _chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def find_run(uri: str, experiment: str, run_name: str) -> str | None:
    """Id of the most recently started live run named `run_name`, to resume a run by name."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    quote = '"' if "'" in run_name else "'"
    runs = client.search_runs([exp.experiment_id], f"attributes.run_name = {quote}{run_name}{quote}",
                              max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def run_status(uri: str, run_id: str) -> str:
    """RUNNING, FINISHED, FAILED or KILLED: how the run ended, or that it has not (or was cut off before it could)."""
    return MlflowClient(uri).get_run(run_id).info.status


@dataclass(frozen=True)
class RunSummary:
    """One run as a search returns it: `metrics` holds each metric's latest value."""

    run_id: str
    name: str
    status: str
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]


def _tag_filter(tags: Mapping[str, str]) -> str:
    quoted = []
    for key, value in tags.items():
        quote = '"' if "'" in value else "'"
        quoted.append(f"tags.`{key}` = {quote}{value}{quote}")
    return " and ".join(quoted)


def child_runs(uri: str, parent_run_id: str, tags: Mapping[str, str] | None = None) -> list[RunSummary]:
    """The runs nested under `parent_run_id` (those with these tag values, when given), oldest first."""
    client = MlflowClient(uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    where = _tag_filter({PARENT_TAG: parent_run_id, **(tags or {})})
    found, token = [], None
    while True:
        page = client.search_runs([experiment_id], where, max_results=_MAX_SEARCH_RESULTS, page_token=token,
                                  order_by=["attributes.start_time ASC"])
        found += [RunSummary(r.info.run_id, r.info.run_name, r.info.status, dict(r.data.params), dict(r.data.tags),
                             dict(r.data.metrics)) for r in page]
        token = page.token
        if not token:
            return found


class BaseTracker:
    """What training code sees. Every method here does nothing; `Tracker` logs to MLflow.

    As a context manager the run ends FINISHED, FAILED on an exception, KILLED on Ctrl-C.
    """

    @property
    def run_id(self) -> str | None:
        return None

    @property
    def uri(self) -> str | None:
        return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_dict(self, d: Mapping[str, Any], artifact_file: str) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def finish(self, status: Status = "FINISHED") -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")


class NullTracker(BaseTracker):
    """Tracking off (non-zero ranks, `--no-tracking`): every call is a no-op."""


class Tracker(BaseTracker):
    """One MLflow run, addressed by (uri, run_id). Create it with `start` or `attach`."""

    def __init__(self, uri: str, run_id: str) -> None:
        self._uri, self._run_id = uri, run_id
        self._client = MlflowClient(uri)
        self._warned: set[str] = set()  # metric keys already reported non-finite

    @classmethod
    def start(cls, uri: str, experiment: str, run_name: str, *, tags: Mapping[str, Any] | None = None,
              parent_run_id: str | None = None) -> Tracker:
        """A new run in `experiment` (created if needed); a child run of `parent_run_id` when given."""
        client = MlflowClient(uri)
        run_tags = {**git_tags(), **{k: str(v) for k, v in (tags or {}).items()}}
        if parent_run_id is not None:
            run_tags[PARENT_TAG] = parent_run_id
        run = client.create_run(_experiment_id(client, uri, experiment), run_name=run_name, tags=run_tags)
        return cls(uri, run.info.run_id)

    @classmethod
    def attach(cls, uri: str, run_id: str) -> Tracker:
        """Continue an existing run (worker group restarted, run resumed): marks it RUNNING again."""
        tracker = cls(uri, run_id)
        tracker._client.update_run(run_id, status="RUNNING")
        return tracker

    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def uri(self) -> str:
        return self._uri

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log (nested) params. Already-logged keys are skipped when equal (a resumed run logs its config
        again); a changed value cannot replace an MLflow param, so it becomes tag `param_changed.<key>`."""
        logged = self._client.get_run(self._run_id).data.params
        new: list[Param] = []
        changed: dict[str, str] = {}
        for key, value in _flatten(params).items():
            if key not in logged:
                new.append(Param(key, value))
            elif logged[key] != value:
                logger.warning("param %s was %r, now %r: logged as tag param_changed.%s", key, logged[key],
                               value, key)
                changed[f"param_changed.{key}"] = value
        for chunk in _chunks(new, _MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self._run_id, params=chunk)
        self.set_tags(changed)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log metrics at `step`. Non-finite values are logged too (a NaN loss must show in the UI) with
        one warning per key; MLflow keeps NaN and stores +-inf as +-1.797e308."""
        now = int(time.time() * 1000)
        batch: list[Metric] = []
        for key, value in metrics.items():
            value = float(value)
            if not math.isfinite(value) and key not in self._warned:
                self._warned.add(key)
                logger.warning("metric %s is %s at step %d (run %s)", key, value, step, self._run_id)
            batch.append(Metric(key, value, now, step))
        for chunk in _chunks(batch, _MAX_METRICS_PER_BATCH):
            self._client.log_batch(self._run_id, metrics=chunk)

    def metrics_at(self, step: int) -> dict[str, float]:
        """The metrics logged at `step` (the last value of each where one was logged twice: a restarted step)."""
        found: dict[str, Metric] = {}
        for key in self._client.get_run(self._run_id).data.metrics:
            for metric in self._client.get_metric_history(self._run_id, key):
                if metric.step == step and (key not in found or metric.timestamp >= found[key].timestamp):
                    found[key] = metric
        return {key: metric.value for key, metric in found.items()}

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a directory's contents under `artifact_path` (default: its own name)."""
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self._run_id, str(path), artifact_path or path.name)
        else:
            self._client.log_artifact(self._run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._client.log_text(self._run_id, text, artifact_file)

    def log_dict(self, d: Mapping[str, Any], artifact_file: str) -> None:
        """YAML when `artifact_file` ends in .yaml/.yml, JSON otherwise."""
        self._client.log_dict(self._run_id, dict(d), artifact_file)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        batch = [RunTag(key, str(value)[:_MAX_TAG_LEN]) for key, value in tags.items()]
        for chunk in _chunks(batch, _MAX_TAGS_PER_BATCH):
            self._client.log_batch(self._run_id, tags=chunk)

    def finish(self, status: Status = "FINISHED") -> None:
        self._client.set_terminated(self._run_id, status)

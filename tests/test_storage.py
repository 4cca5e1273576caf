"""Stores, run folders, checkpoints and resume on a local path, a file:// URI, a real S3 server (moto, started on
127.0.0.1 by the `s3_server` fixture) and a GCS emulator (`gcs_server`): the same jobs, through storage.py."""

import csv
import json
import re
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from ajepa import data, storage, tracking
from ajepa.config import ConfigError, load_config
from ajepa.eval import load_encoder
from ajepa.storage import Location, StorageError
from ajepa.train import pretrain
from conftest import micro_cfg, write_low_high_tones
from safetensors.torch import load

ROOT = Path(__file__).resolve().parents[1]


def folder(kind: str, name: str, request, tmp_path: Path) -> str:
    """A folder that does not exist yet: a local path, the same as a file:// URI, or a prefix in a new bucket."""
    if kind == "s3":
        return f"{request.getfixturevalue('s3_bucket')}/{name}"
    if kind == "gs":
        return request.getfixturevalue("gcs_bucket")(name)
    return str(tmp_path / name) if kind == "path" else f"file://{tmp_path}/{name}"


@pytest.fixture(params=["path", "file", "s3", "gs"])
def where(request, tmp_path) -> str:
    return folder(request.param, "data", request, tmp_path)


# ------------------------------------------------------------------------------------------ the helper


def test_local_paths_and_file_uris_are_absolute_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = storage.resolve("runs")  # run.out_dir's default: absolute on the driver, whatever the workers' cwd
    assert runs.is_local and str(runs) == str(tmp_path / "runs") and Path(runs) == tmp_path / "runs"
    assert storage.resolve(f"file://{tmp_path}/runs") == runs
    assert str(storage.resolve("~/x")) == str(Path.home() / "x")


def test_files_folders_and_copies_behave_the_same_everywhere(where, tmp_path):
    root = storage.resolve(where)
    assert not root.exists() and root.files() == []
    (root / "a" / "step_00000002" / "x.pt").write_text("two")
    (root / "a" / "step_00000001" / "x.pt").write_bytes(b"one")
    (root / "a" / "notes.txt").write_text("n")
    assert (root / "a").is_dir() and (root / "a" / "notes.txt").is_file()
    assert [f.name for f in (root / "a").files()] == ["notes.txt", "step_00000001", "step_00000002"]
    assert [f.parent.name for f in (root / "a").glob("step_*/*.pt")] == ["step_00000001", "step_00000002"]
    local = tmp_path / "up"
    (local / "sub").mkdir(parents=True)
    (local / "sub" / "w.bin").write_bytes(b"\0\1")
    (local / "top.bin").write_bytes(b"\2")
    (root / "b").upload(local)
    assert (root / "b" / "sub" / "w.bin").read_bytes() == b"\0\1" and (root / "b" / "top.bin").read_bytes() == b"\2"
    (root / "single" / "top.bin").upload(local / "top.bin")
    assert (root / "single" / "top.bin").read_bytes() == b"\2"
    (root / "single" / "whole.bin").upload_whole(local / "sub" / "w.bin")
    assert [f.name for f in (root / "single").files()] == ["top.bin", "whole.bin"], "a partial file was left"
    assert (root / "single" / "whole.bin").read_bytes() == b"\0\1"
    with (root / "b").local_copy() as copy:
        assert (copy / "sub" / "w.bin").read_bytes() == b"\0\1"
    (root / "a").move_to(root / "c")
    assert not (root / "a").exists() and (root / "c" / "step_00000002" / "x.pt").read_text() == "two"
    with (root / "c" / "plot.txt").local_file() as out:
        out.write_text("drawn")
    assert (root / "c" / "plot.txt").read_text() == "drawn"
    (root / "c").delete()
    assert not (root / "c").exists()


def test_bad_uris_are_refused_naming_them(s3_bucket):
    with pytest.raises(StorageError, match=r"^ftp://host/runs: unknown storage scheme ftp://; use a local path"):
        storage.resolve("ftp://host/runs")
    with pytest.raises(StorageError, match=r"^s3:/bucket/runs: looks like a URI that lost a slash"):
        storage.resolve("s3:/bucket/runs")
    with pytest.raises(StorageError, match=r"^s3://no-such-bucket/runs: bucket 'no-such-bucket' does not exist"):
        storage.resolve("s3://no-such-bucket/runs")
    with pytest.raises(StorageError, match=r"^s3://x/runs\?endpoint_override=http://127.0.0.1:9: cannot reach"):
        storage.resolve("s3://x/runs?endpoint_override=http://127.0.0.1:9")  # nothing listens on port 9
    assert not storage.resolve(s3_bucket).is_local
    assert isinstance(storage.StorageError("x"), ConfigError)  # the jobs print it and exit 2


def test_bad_gcs_uris_are_refused_naming_them_without_the_clients_15_minutes_of_retries(gcs_bucket, gcs_server,
                                                                                        monkeypatch):
    monkeypatch.setattr(storage, "GCS_CHECK_RETRY_SECONDS", 1)
    query = f"scheme=http&endpoint_override={gcs_server}"
    with pytest.raises(StorageError, match=rf"^gs://no-such-bucket/runs\?{query}: bucket 'no-such-bucket' does not"):
        storage.resolve(f"gs://no-such-bucket/runs?{query}")
    unreachable = "gs://x/runs?scheme=http&endpoint_override=127.0.0.1:9"  # nothing listens on port 9
    start = time.monotonic()
    with pytest.raises(StorageError, match=rf"^{re.escape(unreachable)}: cannot reach the storage"):
        storage.resolve(unreachable)
    assert time.monotonic() - start < 30
    runs = storage.resolve(gcs_bucket("runs"))
    assert not runs.is_local and str(runs) == gcs_bucket("runs") and str(runs / "a") == gcs_bucket("runs/a")
    (runs / "a").write_text("x")
    assert storage.resolve(gcs_bucket("runs/a").replace("gs://", "gcs://")).read_text() == "x"  # the other name


def test_a_public_gcs_bucket_is_read_without_credentials_through_every_uri_made_from_it(gcs_bucket, monkeypatch):
    """gs://anonymous@bucket/...: pyarrow's anonymous credentials, kept in the URIs that runs record (a store's)."""
    written = storage.resolve(gcs_bucket("public/stats.json"))
    written.write_text("{}")
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS")  # with default credentials this machine has none
    public = storage.resolve(gcs_bucket("public").replace("gs://", "gs://anonymous@"))
    assert str(public / "stats.json") == gcs_bucket("public/stats.json").replace("gs://", "gs://anonymous@")
    assert storage.resolve(str(public / "stats.json")).read_text() == "{}"


def test_a_location_pickles_with_its_endpoint(s3_bucket, monkeypatch):
    """Ray ships Locations to tasks and workers: they reach the driver's endpoint without its env vars."""
    import pickle

    root = storage.resolve(s3_bucket) / "p"
    root.write_text("here")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    assert pickle.loads(pickle.dumps(root)).read_text() == "here"


def test_runs_in_object_storage_need_a_tracking_server(s3_bucket, monkeypatch):
    with pytest.raises(ConfigError, match=f"--out {s3_bucket}/runs: runs in object storage need an MLflow "
                                          "tracking server; set MLFLOW_TRACKING_URI"):
        tracking.default_tracking_uri(storage.resolve(f"{s3_bucket}/runs"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking.default_tracking_uri(f"{s3_bucket}/runs") == "http://mlflow.example:5000"


# ------------------------------------------------------------------------------ store, run, resume


@pytest.fixture(scope="module")
def tones(tmp_path_factory) -> Path:
    """A manifest of 32 low and high tones (16 train, 8 val, 8 test)."""
    root = tmp_path_factory.mktemp("tones")
    rows = write_low_high_tones(root)
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    return root / "manifest.csv"


@pytest.fixture(scope="module")
def local_store(tones, tmp_path_factory, ray_local) -> Location:
    return data.build_store(tones, tmp_path_factory.mktemp("local") / "store", load_config(None).audio).out


# Locally in process (run.workers=0): Ray Train's workers on local folders are every other test's; on a bucket they
# are these, as they resolve the URIs with the credentials and endpoints in their own processes. Each bucket scheme
# goes through Ray Train's workers once (~45 s a run): S3 here, GCS in the sweep below; both behave the same in
# storage.py's own tests above.
@pytest.mark.slow
@pytest.mark.parametrize("store_at, out_at, workers", [("path", "file", 0), ("s3", "s3", 1)])
def test_store_build_pretraining_checkpoint_and_resume(store_at, out_at, workers, tones, local_store, tmp_path,
                                                       monkeypatch, request):
    """The store built into a local folder (or a bucket), a pretraining run (in process, or one Ray Train worker
    on a bucket) with --out a file:// URI (or the bucket) writing its checkpoints, and a resume from them by the run
    folder's URI: the run continues at its checkpoint, in the same run folder. (A resume by name: test_pretrain.)"""
    if out_at == "file":  # the SQLite default is only for local out dirs (tested above)
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    where = folder(store_at, "store", request, tmp_path)
    store = data.build_store(tones, where, load_config(None).audio).out
    assert str(store) == str(storage.resolve(where))
    assert not [f for f in store.parent.files() if f.name.startswith(".")], "staging folder left behind"
    ours, theirs = data.load_store(store), data.load_store(local_store)
    assert ours.ids == theirs.ids and np.array_equal(ours.fbank, theirs.fbank)
    assert data.read_stats(store)["counts"] == {"train": 16, "val": 8, "test": 8}

    out = folder(out_at, "runs", request, tmp_path)
    cfg = micro_cfg(f"run.workers={workers}", "run.cpus_per_worker=1", "run.torch_threads=1", "optim.steps=4",
                    "run.log_every=2", "run.checkpoint_every=2", "eval.every=4", "run.name=run", f"run.out_dir={out}")
    first = pretrain.run_pretrain(cfg, store=where)
    run_dir = storage.resolve(out) / "run"
    assert str(first.run_dir) == str(run_dir) and first.step == 4
    assert [c.name for c in pretrain.local_checkpoints(run_dir)] == ["step_00000002", "step_00000004"]
    assert str(first.checkpoint) == str(run_dir / "step_00000004")
    assert json.loads((run_dir / pretrain.RUN_FILE).read_text())["store"] == str(store)
    assert {"config.yaml", "masks.png", "encoder.safetensors"} <= {f.name for f in run_dir.files()}
    assert load((run_dir / "encoder.safetensors").read_bytes())
    # The encoder loads by its run's URI or folder, as fine-tuning and evaluation take it.
    assert load_encoder(str(run_dir), storage.resolve(out), "target").step == 4

    # A run folder's URI resumes it from anywhere (no --out).
    resumed = pretrain.run_pretrain(load_config(None), resume=str(run_dir), overrides=["optim.steps=6"])
    assert resumed.step == 6 and resumed.name == "run", "continued from step 4, not from 0"
    client = mlflow.MlflowClient(resumed.tracking_uri)
    assert [m.step for m in client.get_metric_history(resumed.mlflow_run_id, "loss")] == [2, 4, 6]


@pytest.mark.slow
@pytest.mark.parametrize("bucket", ["gs"])  # S3 through Ray Train's workers: the run and resume above
def test_a_sweep_keeps_its_trials_and_tunes_state_in_the_bucket(bucket, tones, ray_local, tmp_path, monkeypatch,
                                                                request):
    """The store built into the bucket; Tune's storage (RunConfig and restore with storage_filesystem), each trial's
    run folder and the results in object storage; the trials resolve the sweep's and the store's URIs in their own
    processes."""
    from ajepa.sweep import COMPLETED, SweepSettings, run_sweep

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    store = data.build_store(tones, folder(bucket, "store", request, tmp_path), load_config(None).audio).out
    assert data.read_stats(store)["counts"] == {"train": 16, "val": 8, "test": 8}
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {grid: [1.0e-3]}\n")
    out = folder(bucket, "runs", request, tmp_path)
    cfg = micro_cfg("data.batch_size=2", "run.cpus_per_worker=0.25", "run.torch_threads=1", "run.log_every=2",
                    "run.checkpoint_every=2", "optim.steps=4", "eval.every=4", "eval.max_clips=8", "run.name=sweep",
                    f"run.out_dir={out}")
    result = run_sweep(cfg, space, SweepSettings(scheduler="fifo"), store=store)
    assert [t.reason for t in result.trials] == [COMPLETED]
    sweep_dir = storage.resolve(out) / "sweep"
    assert str(result.run_dir) == str(sweep_dir) and str(result.results) == str(sweep_dir / "results.csv")
    assert len((sweep_dir / "results.csv").read_text().splitlines()) == 2
    trial = result.trials[0].name
    assert (sweep_dir / trial / "encoder.safetensors").is_file()
    assert [c.name for c in pretrain.local_checkpoints(sweep_dir / trial)] == ["step_00000002", "step_00000004"]
    assert (sweep_dir / "tune").is_dir() and (sweep_dir / "space.yaml").read_text() == space.read_text()

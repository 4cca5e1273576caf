"""Which Ray a job uses (runtime.cluster_address), and jobs on one real `ray start` head with token auth: one
started on the node without RAY_ADDRESS (as `ray exec` / `ray attach` do) joins it; `ray job submit --working-dir .`
runs the store build (its Ray Data workers import ajepa) and pretraining with the job's own runtime_env; a job
without room for its workers (in all, or on any one node) says what it waits for."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import mlflow
import pytest
import soundfile as sf
from ajepa import runtime
from conftest import MICRO, RAY, free_port, ray_head, submit_job, tone

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ray_tmp(tmp_path, monkeypatch) -> Path:
    """This test's Ray temp root, where `ray start` would record its cluster."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "ray").mkdir()
    return tmp_path


def record(ray_tmp: Path, address: str) -> None:
    (ray_tmp / "ray" / "ray_current_cluster").write_text(address)


def test_no_address_and_no_cluster_on_the_node_starts_a_local_ray(ray_tmp):
    assert runtime.cluster_address() == (None, "no RAY_ADDRESS and no `ray start` cluster on this node")


def test_a_live_recorded_cluster_is_joined(ray_tmp):
    with socket.socket() as gcs:  # something listening where the record points: the cluster's GCS
        gcs.bind(("127.0.0.1", 0))
        gcs.listen()
        address = f"127.0.0.1:{gcs.getsockname()[1]}"
        record(ray_tmp, address)
        assert runtime.cluster_address()[0] == address


def test_a_stale_record_of_a_dead_cluster_is_ignored(ray_tmp):
    with socket.socket() as s:  # a port that nothing listens on any more
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    record(ray_tmp, dead)
    assert runtime.cluster_address() == (None, f"the `ray start` cluster recorded on this node ({dead}) is not running")


def test_ray_address_wins_and_local_forces_a_local_ray(ray_tmp, monkeypatch):
    with socket.socket() as gcs:
        gcs.bind(("127.0.0.1", 0))
        gcs.listen()
        record(ray_tmp, f"127.0.0.1:{gcs.getsockname()[1]}")
        monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
        assert runtime.cluster_address() == ("10.0.0.5:6379", "RAY_ADDRESS")
        monkeypatch.setenv("RAY_ADDRESS", "local")
        assert runtime.cluster_address() == (None, "RAY_ADDRESS=local")


def test_a_submitted_jobs_runtime_env_wins_where_both_set_a_field(monkeypatch):
    """Ray 2.60 refuses to merge a job's and ray.init's runtime_env when both set a field or an env var."""
    ours = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "AJEPA_X": "1"}
    monkeypatch.delenv(runtime.JOB_CONFIG_ENV, raising=False)
    assert runtime._runtime_env(ours) == {"env_vars": ours, "py_modules": [runtime.package_dir()]}
    job = {"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "1"}, "py_modules": ["s3://bucket/ajepa.zip"]}
    monkeypatch.setenv(runtime.JOB_CONFIG_ENV, json.dumps({"runtime_env": job, "metadata": {}}))
    assert runtime._runtime_env(ours) == {"env_vars": {"AJEPA_X": "1"}}
    monkeypatch.setenv(runtime.JOB_CONFIG_ENV, json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg.zip"}}))
    assert runtime._runtime_env(ours) == {"env_vars": ours, "py_modules": [runtime.package_dir()]}


# ------------------------------------------------------------------------------------ a real `ray start` head


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    home = tmp_path_factory.mktemp("head-home")
    with ray_head(home) as h:
        # The README's commands on a machine that has never run Ray: the token was made by
        # `ray get-auth-token --generate` in the fresh HOME.
        assert (home / ".ray" / "auth_token").read_text().strip() != ""
        yield h


@pytest.fixture(scope="module")
def joined(head, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A store built by `python jobs/prepare_data.py` run in a shell on the head node without RAY_ADDRESS, as
    after `ray attach cluster.yaml`: (the store, the finished job)."""
    root = tmp_path_factory.mktemp("join")
    for label, freq in (("low", 200.0), ("high", 2000.0)):
        (root / "audio" / label).mkdir(parents=True)
        for i in range(12):
            sf.write(root / "audio" / label / f"{i}.wav", tone(1.0, 16000, freq=freq * (1 + 0.05 * i), seed=i), 16000)
    assert "RAY_ADDRESS" not in head.env
    done = subprocess.run([sys.executable, str(ROOT / "jobs" / "prepare_data.py"), "--input", str(root / "audio"),
                           "--out", str(root / "store")], env=head.env, capture_output=True, text=True, timeout=300)
    return root / "store", done


@pytest.mark.slow
def test_a_job_on_a_cluster_node_without_ray_address_joins_that_cluster(head, joined):
    store, done = joined
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (f"joining the Ray cluster at {head.gcs} (the cluster `ray start` runs on this node; --address local for "
            "a separate local Ray)") in done.stdout.splitlines()
    assert "24 clips written, 0 failed" in done.stdout
    # The head's State API lists the job's driver: it ran there, not on a Ray of its own.
    jobs = subprocess.run([RAY, "list", "jobs", "--address", head.dashboard, "--format", "json", "--detail"],
                          env=head.env, capture_output=True, text=True, check=True, timeout=60)
    assert any("prepare_data.py" in (job.get("entrypoint") or "") for job in json.loads(jobs.stdout)), jobs.stdout


@pytest.mark.slow
def test_a_submitted_job_with_its_own_runtime_env_runs_and_sees_its_env_vars(head, joined, tmp_path):
    """`--runtime-env-json` env vars reach the job; one that init_ray sets too (the print patch) is the job's.
    The run folder is a file:// URI, as a bucket's would be a URI."""
    store, _ = joined
    tracking = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    job_env = {"env_vars": {"MLFLOW_TRACKING_URI": tracking, "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
    sets = [*(kv for kv in MICRO if not kv.startswith("optim.steps=")),  # --steps says how many
            "run.cpus_per_worker=0.5", "run.torch_threads=1", "run.log_every=1", "eval.every=0"]
    done = submit_job(head, [
        "--working-dir", str(ROOT), "--runtime-env-json", json.dumps(job_env), "--", "python", "jobs/pretrain.py",
        "--data", str(store), "--out", (tmp_path / "runs").as_uri(), "--workers", "1", "--steps", "2",
        *(arg for kv in sets for arg in ("--set", kv))])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"joining the Ray cluster at {head.gcs} (RAY_ADDRESS)" in done.stdout
    assert f"open with: mlflow ui --backend-store-uri {tracking}" in done.stdout
    client = mlflow.MlflowClient(tracking)
    (run,) = client.search_runs([client.get_experiment_by_name("ajepa").experiment_id])
    assert run.info.status == "FINISHED"
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "run.json").exists() and [p.parent.name for p in run_dir.glob("step_*/pretrain.pt")] == [
        "step_00000002"]


def line_starting(job: subprocess.Popen, prefix: str, timeout_s: float = 120) -> str:
    """The job's first output line that starts with `prefix`; the job is killed if none came in `timeout_s`."""
    killer = threading.Timer(timeout_s, job.kill)
    killer.start()
    try:
        while not (line := job.stdout.readline()).startswith(prefix):
            assert line, f"the job ended (or was killed after {timeout_s:g} s) without a line starting {prefix!r}"
        return line
    finally:
        killer.cancel()


@pytest.mark.slow
def test_a_job_without_room_on_the_cluster_says_what_it_waits_for_and_trains_once_a_node_joins(head, joined, tmp_path):
    """Train would wait for its workers' resources saying nothing; on a cluster (unlike a local Ray, refused in
    test_sweep) an autoscaler may add them, as the node started here does. A worker larger than any node waits
    too, whatever the cluster's total."""
    store, _ = joined
    sets = [*(kv for kv in MICRO if not kv.startswith("optim.steps=")), "data.batch_size=2",
            "run.cpus_per_worker=1", "run.torch_threads=1", "run.log_every=1", "eval.every=0"]
    pretrain = [sys.executable, str(ROOT / "jobs" / "pretrain.py"), "--data", str(store), "--out",
                str(tmp_path / "runs"), "--steps", "2", *(arg for kv in sets for arg in ("--set", kv))]
    job = subprocess.Popen([*pretrain, "--workers", "3"], env=head.env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    node = None
    try:
        line = line_starting(job, "waiting for room")
        assert re.fullmatch(r"waiting for room: 3 workers x 1 CPU, and the cluster has 2 CPUs and \d+ GPUs? now; "
                            r"training starts when nodes join \(an autoscaler adds them; Ctrl-C to stop\)\n", line)
        ports = [f"--{name}={free_port()}" for name in (
            "node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
            "runtime-env-agent-port", "metrics-export-port")]
        node = subprocess.Popen([RAY, "start", f"--address={head.gcs}", "--num-cpus=1", "--block", *ports],
                                env=head.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        rest = job.communicate(timeout=300)[0]
        assert job.returncode == 0, rest[-3000:]
        assert re.search(r"pretrained pretrain-\S+: 2 steps", rest), rest[-3000:]
        # Now 3 CPUs in all, but a worker's 3 CPUs must be on one node, and neither has them.
        job = subprocess.Popen([*pretrain, "--workers", "1", "--set", "run.cpus_per_worker=3"], env=head.env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = line_starting(job, "waiting for room")
        assert re.fullmatch(r"waiting for room: 1 worker x 3 CPU, and the cluster has 3 CPUs and \d+ GPUs? now, on "
                            r"nodes that hold 0 of those workers \(the largest has 2 CPUs and \d+ GPUs?\); training "
                            r"starts when nodes join \(an autoscaler adds them; Ctrl-C to stop\)\n", line)
    finally:
        job.kill()
        if node is not None:
            os.killpg(node.pid, signal.SIGTERM)
            node.wait(timeout=60)


@pytest.mark.slow
def test_prepare_data_job_runs_on_a_submitted_cluster(head, tmp_path):
    src = tmp_path / "audio"
    for label, freq in (("low", 200.0), ("high", 2000.0)):
        (src / label).mkdir(parents=True)
        for i in range(3):
            sf.write(src / label / f"{i}.wav", tone(1.0, 16000, freq=freq, seed=i), 16000)
    done = submit_job(head, ["--working-dir", str(ROOT), "--", "python", "jobs/prepare_data.py", "--input", str(src),
                             "--out", str(tmp_path / "store")])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "6 clips written, 0 failed" in done.stdout
    assert (tmp_path / "store" / "stats.json").exists()

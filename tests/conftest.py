import contextlib
import csv
import io
import json
import os
import pty
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

# Per-user state the code under test reads or writes: the Ray auth token (~/.ray), the demo cache
# (~/.cache/ajepa), MLflow's default store, a cluster to join. Tests see none of the developer's.
USER_STATE_VARS = ("AJEPA_CACHE", "MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                   "RAY_AUTH_TOKEN_PATH", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME")
REAL_HOME = Path.home()
RAY = str(Path(sys.executable).parent / "ray")
_home_key = pytest.StashKey[Path]()
_ray_tmp_key = pytest.StashKey[Path]()
# Object storage: the tests' own S3 server (moto, on 127.0.0.1) and dummy credentials, never the developer's.
S3_ENDPOINT_ENV = "AWS_ENDPOINT_URL_S3"
S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "ajepa-test", "AWS_SECRET_ACCESS_KEY": "ajepa-test", "AWS_REGION": "us-east-1"}
# Google Cloud Storage: the tests' own emulator (gcp-storage-emulator, on 127.0.0.1), reached through the URI's
# `scheme` and `endpoint_override`, with a service-account key made for the session. pyarrow's GCS client signs
# its own tokens with such a key (self-signed JWTs), so nothing asks Google's token server.
GCS_PROJECT = "ajepa-test"


def fresh_user_env(home: Path) -> dict[str, str]:
    """The environment of a user who has never run anything here: `home` as HOME, no per-user variables."""
    home.mkdir(parents=True, exist_ok=True)
    return {**{k: v for k, v in os.environ.items() if k not in USER_STATE_VARS}, "HOME": str(home)}


def pytest_configure(config: pytest.Config) -> None:
    """This process and every process it starts (Ray, jobs, MLflow) get a fresh HOME, as on a clean machine:
    a token left in the real ~/.ray by earlier runs once hid a missing `ray get-auth-token` step."""
    home = Path(tempfile.mkdtemp(prefix="ajepa-test-home-"))
    config.stash[_home_key] = home
    from ajepa.storage import CREDENTIAL_ENV

    for key in (*USER_STATE_VARS, *CREDENTIAL_ENV):
        os.environ.pop(key, None)
    os.environ["HOME"] = str(home)
    # Ray's temp root too (sessions, and the record of a `ray start` cluster that a job without RAY_ADDRESS
    # joins): a cluster someone started on this machine, or another checkout's test head, must not be joined.
    # Short, in /tmp: Ray's Unix sockets live under it and their paths must stay under 107 characters.
    config.stash[_ray_tmp_key] = ray_tmp = Path(tempfile.mkdtemp(prefix="ajepa-ray-", dir="/tmp"))
    os.environ["RAY_TMPDIR"] = str(ray_tmp)
    # torch.compile's kernel and graph caches default to /tmp/torchinductor_<user>, outside HOME: compile tests
    # must compile as a fresh machine does, not reuse what earlier runs left.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(home / "torchinductor")
    # Set before any Ray starts, so its workers have them too; the servers start with `s3_server`, `gcs_server`.
    os.environ.update(S3_TEST_ENV)
    os.environ[S3_ENDPOINT_ENV] = f"http://127.0.0.1:{_free_port()}"
    os.environ["GOOGLE_APPLICATION_CREDENTIALS"] = str(_service_account_key(home / "gcs-key.json"))


def _service_account_key(path: Path) -> Path:
    """A Google service-account key file with a fresh RSA key: the credentials of a real deployment, for the
    emulator (which accepts any token)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    path.write_text(json.dumps({
        "type": "service_account", "project_id": GCS_PROJECT, "private_key_id": "ajepa-test", "private_key": pem,
        "client_email": f"tests@{GCS_PROJECT}.iam.gserviceaccount.com", "client_id": "1",
        "token_uri": "http://127.0.0.1:9/token",  # never asked: the client signs its own tokens
    }))
    return path


def pytest_unconfigure(config: pytest.Config) -> None:
    if (home := config.stash.get(_home_key, None)) is not None:
        os.environ["HOME"] = str(REAL_HOME)
        shutil.rmtree(home, ignore_errors=True)
    if (ray_tmp := config.stash.get(_ray_tmp_key, None)) is not None:
        os.environ.pop("RAY_TMPDIR", None)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's standalone server) on 127.0.0.1, at the endpoint the session's
    AWS_ENDPOINT_URL_S3 names; yields that endpoint."""
    endpoint = os.environ[S3_ENDPOINT_ENV]
    port = endpoint.rsplit(":", 1)[1]
    proc = _serve(["moto.server", "-H", "127.0.0.1", "-p", port], int(port), "the moto server")
    yield endpoint
    proc.terminate()
    proc.wait(timeout=30)


def _serve(args: list[str], port: int, name: str) -> subprocess.Popen:
    """A test server started as `python -m ...`, once its port accepts connections."""
    proc = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{name} did not start on 127.0.0.1:{port}")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def gcs_server():
    """A GCS emulator (gcp-storage-emulator, in memory) on 127.0.0.1; yields its host:port."""
    port = _free_port()
    proc = _serve(["gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"],
                  port, "the GCS emulator")
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def gcs_bucket(gcs_server) -> Callable[[str], str]:
    """A new, empty bucket on the GCS emulator: a function from a path inside it to its gs:// URI, whose query
    (`scheme`, `endpoint_override`) reaches the emulator."""
    import pyarrow.fs as pafs

    name = f"ajepa-{uuid.uuid4().hex[:12]}"
    pafs.GcsFileSystem(anonymous=True, scheme="http", endpoint_override=gcs_server,
                       project_id=GCS_PROJECT).create_dir(name)
    return lambda path="": f"gs://{name}/{path}?scheme=http&endpoint_override={gcs_server}"


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A new, empty bucket on the test S3 server: its s3:// URI."""
    import pyarrow.fs as pafs

    name = f"ajepa-{uuid.uuid4().hex[:12]}"
    pafs.S3FileSystem(endpoint_override=s3_server, allow_bucket_creation=True).create_dir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray cluster (2 CPUs) shared by the tests that need it."""
    import ray
    from ajepa.runtime import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class RayHead:
    env: dict[str, str]  # a shell on the head node: its HOME (token), Ray temp root, RAY_AUTH_MODE=token, venv
    dashboard: str  # the job server, http://127.0.0.1:PORT
    gcs: str  # host:port, as `ray start` recorded it in <RAY_TMPDIR>/ray/ray_current_cluster


@contextlib.contextmanager
def ray_head(home: Path, timeout: float = 120) -> Iterator[RayHead]:
    """A real head started with `ray start` as the README says, on a machine that has never run Ray: a fresh
    HOME (no ~/.ray/auth_token), `ray get-auth-token --generate`, token auth on. Its own Ray temp root, so
    its `ray start` record is seen only by processes given its env. Stopped through its process group:
    `ray stop` would stop every Ray on the machine, other users' too."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="ajepa-head-", dir="/tmp"))  # short: Ray's socket paths live under it
    # The venv is "activated" so that a submitted job's `python` is the one ajepa's dependencies live in.
    env = {**fresh_user_env(home), "RAY_AUTH_MODE": "token", "RAY_TMPDIR": str(ray_tmp),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True, text=True, check=True)
    dashboard = free_port()
    # Every port on free ones: the suite's own local cluster holds the default agent ports, and a second
    # node agent on a taken port never registers ("No available agent to submit job").
    ports = [f"--{name}={free_port()}" for name in ("port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                     "runtime-env-agent-port", "metrics-export-port")]
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--num-cpus=2", "--disable-usage-stats", *ports,
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        record = ray_tmp / "ray" / "ray_current_cluster"
        deadline = time.monotonic() + timeout
        while not record.exists():  # written once the head is up
            assert head.poll() is None and time.monotonic() < deadline, "the head did not start"
            time.sleep(0.5)
        yield RayHead(env, f"http://127.0.0.1:{dashboard}", record.read_text().strip())
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:  # a clean stop takes ~30 s (its dashboard and GCS wind down); nothing of it is checked
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def submit_job(head: RayHead, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`ray job submit --address <head> ARGS`, retried while the job server and its agent come up (a few
    seconds, longer on a busy machine)."""
    deadline = time.monotonic() + 180
    while True:
        done = subprocess.run([RAY, "job", "submit", "--address", head.dashboard, *args], env=head.env,
                              capture_output=True, text=True, timeout=timeout)
        not_up = any(m in done.stdout + done.stderr for m in ("Failed to connect", "No available agent"))
        if done.returncode == 0 or not not_up or time.monotonic() > deadline:
            return done
        time.sleep(3)


def tone(seconds: float, rate: int, channels: int = 1, freq: float = 440.0, seed: int = 0) -> np.ndarray:
    """A noisy sine: real signal content, deterministic."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    wave = 0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.size)
    return np.repeat(wave[:, None], channels, axis=1).astype(np.float32)


def write_low_high_tones(root: Path) -> list[tuple[str, str, str]]:
    """16 low and 16 high tones under `root/audio`, in train, val and test: (path, label, split) rows of a
    labelled task that even a random encoder separates."""
    (root / "audio").mkdir()
    rows = []
    for label, base in (("low", 150.0), ("high", 3000.0)):
        for i in range(16):
            sf.write(root / "audio" / f"{label}{i}.wav", tone(1.0, 16000, freq=base * (1 + 0.05 * i), seed=i), 16000)
            rows.append((f"audio/{label}{i}.wav", label, ("train", "train", "val", "test")[i % 4]))
    return rows


def encode(samples: np.ndarray, rate: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def failures(store: Path) -> dict[str, str]:
    """A store's failures.csv as {path: reason}."""
    with (store / "failures.csv").open() as fh:
        return {row["path"]: row["reason"] for row in csv.DictReader(fh)}


def run_in_terminal(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run `cmd` with stdout and stderr on a pseudo-terminal, as from a person's shell: (exit code, output
    with the terminal's \\r\\n line ends turned back into \\n)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    chunk = os.read(master, 1 << 16)
                except OSError:  # EIO: every writer closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return proc.wait(timeout=60), out.decode(errors="replace").replace("\r\n", "\n")


# A model small enough for many CPU steps a test: the tiny config, narrower and shallower.
MICRO = ["model.embed_dim=64", "model.depth=2", "model.num_heads=2", "model.pred_dim=32", "model.pred_depth=1",
         "model.pred_heads=2", "data.batch_size=8", "optim.steps=40", "optim.lr=1e-3"]


def micro_cfg(*extra: str):
    from ajepa.config import load_config

    return load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml", [*MICRO, *extra])


def fake_batch(seed: int, batch: int = 8):
    """A host batch as the store hands it over: (fbank (B, 128, 128) float16, n_frames (B,) of 98 real frames)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    fbank = (torch.randn(batch, 128, 128, generator=g) * 4 - 8).half()
    return fbank, torch.full((batch,), 98, dtype=torch.long)

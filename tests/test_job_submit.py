"""`ray job submit --working-dir .` against a real head node: the job and its Ray Data workers import ajepa."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf
from conftest import fresh_user_env, tone

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_prepare_data_job_runs_on_a_submitted_cluster(tmp_path):
    src = tmp_path / "audio"
    for label in ("low", "high"):
        (src / label).mkdir(parents=True)
        for i in range(3):
            freq = 200.0 if label == "low" else 2000.0
            sf.write(src / label / f"{i}.wav", tone(1.0, 16000, freq=freq, seed=i), 16000)
    dashboard = free_port()
    # The README's commands on a machine that has never run Ray (a fresh HOME: no ~/.ray/auth_token): make a
    # token, then start the head and submit with token auth on. The venv is "activated" so that the job's
    # `python` is the one ajepa's dependencies live in.
    env = {**fresh_user_env(tmp_path / "home"), "RAY_AUTH_MODE": "token",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    token = subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True, text=True, check=True)
    assert (tmp_path / "home" / ".ray" / "auth_token").read_text().strip() == token.stdout.strip() != ""
    # Every port on free ones: the suite's own local cluster holds the default agent ports, and a second
    # node agent on a taken port never registers ("No available agent to submit job").
    ports = [f"--{name}={free_port()}" for name in ("port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                     "runtime-env-agent-port", "metrics-export-port")]
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--num-cpus=2", "--disable-usage-stats", *ports,
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        submit = [RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
                  "python", "jobs/prepare_data.py", "--input", str(src), "--out", str(tmp_path / "store")]
        deadline = time.monotonic() + 180
        while True:  # the job server and its agent take a few seconds to come up (longer on a busy machine)
            done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=300)
            not_up = any(m in done.stdout + done.stderr for m in ("Failed to connect", "No available agent"))
            if done.returncode == 0 or not not_up or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "6 clips written, 0 failed" in done.stdout
        assert (tmp_path / "store" / "stats.json").exists()
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        # `ray start` records its address for later `ray.init()` calls; the cluster is gone, so is the record.
        Path("/tmp/ray/ray_current_cluster").unlink(missing_ok=True)

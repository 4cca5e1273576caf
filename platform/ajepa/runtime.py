"""Joining or starting Ray, the same way for every job, and how much of Ray's output a job shows.

Which Ray a job uses (`cluster_address`): RAY_ADDRESS when set (`ray job submit` sets it; `local` asks for
a new local Ray); else the cluster that `ray start` runs on this node, when one does (a job started with
`ray exec` or `ray attach` on a cluster node joins it instead of starting a second, GPU-less Ray); else a
new local Ray. Workers on other nodes get the `ajepa` package through `runtime_env.py_modules`, because
`--working-dir .` puts the repo root on their path, not `platform/`.

A job prints what it is doing, its progress and a summary; Ray's own logs (workers, Train controller,
Ray Data operators) stay in the session folder (`/tmp/ray/session_latest/logs`). `--verbose` or
AJEPA_VERBOSE=1 brings them back to the terminal.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

import ajepa
from ajepa import storage

VERBOSE_ENV = "AJEPA_VERBOSE"
STARTUP_CONCURRENCY = 8
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"  # where Ray's State API clients in workers find the dashboard
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
# Set by Ray's job supervisor in a submitted job's driver: the job's own runtime_env (from `ray job submit
# --runtime-env(-json)`, `--working-dir`), which Ray 2.60 merges with the one passed to ray.init.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
GCS_PROBE_TIMEOUT_S = 2.0


def package_dir() -> str:
    return str(Path(ajepa.__file__).resolve().parent)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def cluster_address() -> tuple[str | None, str]:
    """The Ray cluster a job joins, and why: (address, reason); address None means start a local Ray."""
    from ray._private.utils import read_ray_address

    if address := os.environ.get("RAY_ADDRESS"):
        return (None, "RAY_ADDRESS=local") if address == "local" else (address, "RAY_ADDRESS")
    # `ray start` records its cluster's GCS address in <temp dir>/ray/ray_current_cluster (temp dir:
    # RAY_TMPDIR, else TMPDIR, else /tmp) and `ray stop` removes it; a crashed or killed cluster leaves it
    # behind. Plain `ray.init()` joins whatever it names and hangs when that cluster is dead, so the record
    # counts only while its GCS accepts connections.
    recorded = read_ray_address()
    if not recorded:
        return None, "no RAY_ADDRESS and no `ray start` cluster on this node"
    if not _accepts_connections(recorded):
        return None, f"the `ray start` cluster recorded on this node ({recorded}) is not running"
    return recorded, "the cluster `ray start` runs on this node; --address local for a separate local Ray"


def init_ray(num_cpus: int | None = None) -> None:
    import ray
    import ray.data

    if ray.is_initialized():
        return
    loud = verbose()
    if not loud:
        _quiet_driver_logs()
    # Train V2's print patch would show every worker line twice in the driver's output. Storage credentials and
    # endpoint from the driver's environment (storage.py): workers on a cluster's nodes do not inherit it.
    env_vars = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **storage.worker_env()}
    kwargs: dict[str, Any] = {"log_to_driver": loud, "logging_level": logging.INFO if loud else logging.WARNING}
    address, reason = cluster_address()
    if address is not None:
        # Said every time: a job that joins a cluster uses its resources and its logs live there.
        print(f"joining the Ray cluster at {address} ({reason})", flush=True)
        ray.init(address=address, runtime_env=_runtime_env(env_vars), **kwargs)
    else:
        if reason.endswith("is not running"):  # the one surprising case; a plain local start stays quiet
            print(f"starting a local Ray: {reason}", flush=True)
        # The dashboard serves the State API, which Train V2's placement-group cleaner polls every second: when
        # a Train controller dies (a sweep trial that ASHA stopped is killed with it), the cleaner frees its
        # workers' placement group. Without an address it guesses the cluster from the Ray instances running on
        # the machine and fails when there are several, and the group's CPUs stay reserved for good: so the
        # workers are told this cluster's dashboard.
        # Train V2 (controller, placement-group cleaner, workers), Ray Data (split coordinator, tasks) and our
        # progress queue start 8 or more Python processes, nearly all idle and CPU-free; the raylet expects
        # at most 4x `worker_maximum_startup_concurrency` (default: the CPU count, 2 on a laptop-sized
        # node) and warns mid-run otherwise. Sized for what these jobs really start.
        dashboard = _free_port()
        env_vars[API_SERVER_ENV] = f"http://127.0.0.1:{dashboard}"
        # A local Ray is this machine alone: a notice that its node is preempted leaves nothing to move the run
        # to, so Train's preemption watcher (an actor per run, ~2 CPU-s to start) would watch for nothing.
        if PREEMPTION_WATCHER_ENV not in os.environ:
            env_vars[PREEMPTION_WATCHER_ENV] = "0"
        # "local", not None: None would join whatever `ray start` recorded, checked above.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=dashboard,
                 _system_config={"worker_maximum_startup_concurrency": max(num_cpus or os.cpu_count() or 1,
                                                                           STARTUP_CONCURRENCY)},
                 runtime_env=_runtime_env(env_vars), **kwargs)
    ray.data.DataContext.get_current().enable_progress_bars = False  # jobs draw their own (progress.py)


def _runtime_env(env_vars: dict[str, str]) -> dict[str, Any]:
    """Our runtime_env, less what a submitted job's own runtime_env sets. Ray 2.60 merges the two and refuses
    (ValueError) any field or environment variable that both set: the job's settings win."""
    job = json.loads(os.environ.get(JOB_CONFIG_ENV, "{}")).get("runtime_env") or {}
    runtime_env: dict[str, Any] = {"env_vars": {k: v for k, v in env_vars.items() if k not in job.get("env_vars", {})}}
    if "py_modules" not in job:  # a job that ships its own py_modules must include ajepa (or install it)
        runtime_env["py_modules"] = [package_dir()]
    return runtime_env


def _accepts_connections(address: str) -> bool:
    """Whether something listens at a GCS address, `host:port` or `[v6 host]:port`."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=GCS_PROBE_TIMEOUT_S):
            return True
    except (OSError, ValueError):
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quiet_driver_logs() -> None:
    """Ray's messages in the driver that we cannot act on, named one by one."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # "Starting execution of Dataset ...", plans
    # Ray Data warns once that its progress bars are off; they are, on purpose (see init_ray).
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # Ray >= 2.59 turns token auth on for every new local cluster (making ~/.ray/auth_token if there is
    # none) and warns each time that it did. We want it on; setting RAY_AUTH_MODE=token here instead does
    # not work: Ray read its config when imported, so it makes no token and its GCS dies for want of one.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)

"""Joining or starting Ray, the same way for every job, and how much of Ray's output a job shows.

No RAY_ADDRESS: a local cluster on this machine. With one (as under `ray job submit`): join it. Workers
on other nodes get the `ajepa` package through `runtime_env.py_modules`, because `--working-dir .` puts
the repo root on their path, not `platform/`.

A job prints what it is doing, its progress and a summary; Ray's own logs (workers, Train controller,
Ray Data operators) stay in the session folder (`/tmp/ray/session_latest/logs`). `--verbose` or
AJEPA_VERBOSE=1 brings them back to the terminal.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import ajepa
from ajepa import storage

VERBOSE_ENV = "AJEPA_VERBOSE"
STARTUP_CONCURRENCY = 8
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"  # where Ray's State API clients in workers find the dashboard


def package_dir() -> str:
    return str(Path(ajepa.__file__).resolve().parent)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


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
    kwargs = {"runtime_env": {"py_modules": [package_dir()], "env_vars": env_vars},
              "log_to_driver": loud, "logging_level": logging.INFO if loud else logging.WARNING}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
    else:
        # "local", not None: None would join any cluster `ray start` left on this machine (even a dead one).
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
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=dashboard,
                 _system_config={"worker_maximum_startup_concurrency": max(num_cpus or os.cpu_count() or 1,
                                                                           STARTUP_CONCURRENCY)},
                 **kwargs)
    ray.data.DataContext.get_current().enable_progress_bars = False  # jobs draw their own (progress.py)


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

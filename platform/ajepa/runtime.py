"""Joining or starting Ray, the same way for every job.

No RAY_ADDRESS: a local cluster on this machine. With one (as under `ray job submit`): join it. Workers
on other nodes get the `ajepa` package through `runtime_env.py_modules`, because `--working-dir .` puts
the repo root on their path, not `platform/`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ajepa


def package_dir() -> str:
    return str(Path(ajepa.__file__).resolve().parent)


def init_ray(num_cpus: int | None = None, quiet: bool = True) -> None:
    import ray
    import ray.data

    if ray.is_initialized():
        return
    # Train V2's print patch would show every worker line twice in the driver's output.
    env_vars = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    kwargs = {"runtime_env": {"py_modules": [package_dir()], "env_vars": env_vars}}
    if quiet:
        kwargs["logging_level"] = logging.WARNING
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
    else:
        # "local", not None: None would join any cluster `ray start` left on this machine (even a dead one).
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
    ray.data.DataContext.get_current().enable_progress_bars = not quiet
    if quiet:
        logging.getLogger("ray.data").setLevel(logging.WARNING)

"""The run machinery every training job shares (pretraining, fine-tuning).

Driver side: the store a job reads, run naming, the run folder with its `run.json` record, `--resume`, the
MLflow run (FINISHED, FAILED on any error, KILLED on Ctrl-C) and the Ray Train `TorchTrainer` with its failure
handling and the progress line. Worker side: the rank's batches from the restored step on, checkpoints reported
through the collective `ray.train.report` and uploaded while training goes on, `restore()` from the newest
complete checkpoint and the fault hook.

A job plugs in its loop and its trainer. A trainer is any object with `step`, `save(path)`, `load(path)`
(raising `CheckpointError`) and `checkpoint_file`, the file name inside each `step_XXXXXXXX` folder.

Run folders, stores and checkpoints are `storage.Location`s: a local path or a URI (s3://, gs://, file://). Ray
Train gets the run folder's parent as `RunConfig(storage_path, storage_filesystem)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from ajepa import storage
from ajepa.config import Config, ConfigError, config_from_dict, save_config
from ajepa.storage import Location

if TYPE_CHECKING:
    from ajepa.data import TrainFiles

RUN_FILE = "run.json"
KEEP_CHECKPOINTS = 2
FAULT_ENV = "AJEPA_FAULT_AT_STEP"  # test hook: the last rank dies once at this step
CONTROLLER_POLL_ENV, CONTROLLER_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 0.5  # see `fit`
logger = logging.getLogger(__name__)
# A worker's checkpoint uploads, one at a time, each started as soon as rank 0 has written it (see `report`).
_uploads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ajepa-checkpoint-upload")
# Checkpoints on rank 0's local disk: the one uploading and the one being written. Where uploads take longer than
# run.checkpoint_every's steps, training waits for them instead of queueing copies of the state until the disk fills.
LOCAL_CHECKPOINTS = 2
_local_checkpoints = threading.BoundedSemaphore(LOCAL_CHECKPOINTS)
_local_copies_folder = threading.Lock()  # a copy's folder is made in, or the last removed with, its run's folder


class CheckpointError(RuntimeError):
    """A checkpoint cannot be loaded; the message names the file."""


class Trainer(Protocol):
    checkpoint_file: str
    step: int

    def save(self, path: Path) -> None: ...

    def load(self, path: Path | Location) -> None: ...


def read_checkpoint(path: Path | Location, kind: str, keys: set[str]) -> dict[str, Any]:
    """Read a checkpoint (a local file or in object storage) safely (weights_only), with an error that names the
    file and what it lacks."""
    try:
        with storage.resolve(path).local_copy() as local:
            state = torch.load(local, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint file is missing") from None
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"{path}: corrupt or unreadable checkpoint ({type(exc).__name__}: {exc})") from None
    missing = keys - set(state) if isinstance(state, dict) else keys
    if missing:
        raise CheckpointError(f"{path}: not an ajepa {kind} checkpoint (missing {', '.join(sorted(missing))})")
    return state


# ------------------------------------------------------------------------------------------ Ray worker


@dataclass
class Worker:
    """What a loop needs of its place in the worker group."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    tracker: Any  # tracking.Tracker on rank 0, NullTracker elsewhere


def worker_setup(config: dict[str, Any]) -> Worker:
    """The loop's config, rank and device (CPU threads set), and rank 0's MLflow run."""
    import ray.train
    import ray.train.torch

    from ajepa.tracking import NullTracker, Tracker

    cfg = config_from_dict(config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cfg.run.torch_threads or max(1, round(cfg.run.cpus_per_worker)))
    tracker = Tracker.attach(config["tracking_uri"], config["mlflow_run_id"]) if rank == 0 else NullTracker()
    return Worker(cfg, rank, world, device, tracker)


def host_batches(config: dict[str, Any], worker: Worker, start: int, columns: tuple[str, ...] = ()
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
    """This worker's batches without end, from its micro-batch `start` of the run on (the restored step, times
    grad_accum where a step takes several): (fbank, n_frames, {column: numpy array} for `columns`).

    In `data.train_batches`' order: a function of (run.seed, epoch), the same number of full batches per epoch
    on every rank (no DDP hang), so a restarted or resumed run continues the unbroken run's batches exactly."""
    from ajepa.data import decode_fbank, train_batches

    cfg, shape, pin = worker.cfg, tuple(config["fbank_shape"]), worker.device.type == "cuda"
    files: TrainFiles = config["train_files"]
    tables = train_batches(files, ["fbank", "n_frames", *columns], cfg.data.batch_size, cfg.run.seed, worker.rank,
                           worker.world, cfg.data.shuffle_window, start)
    for table in tables:
        # One copy from Arrow's bytes into (pinned) memory that torch owns.
        fbank = torch.empty((table.num_rows, *shape), dtype=torch.float16, pin_memory=pin)
        decode_fbank(table.column("fbank").to_pylist(), shape, out=fbank.numpy())
        n_frames = torch.from_numpy(table.column("n_frames").to_numpy().astype(np.int64))
        yield fbank, n_frames, {c: table.column(c).to_numpy() for c in columns}


def maybe_fail(config: dict[str, Any], step: int, worker: Worker) -> None:
    """The fault-injection hook: the last rank dies once, hard, when it is about to train `FAULT_ENV`'s step,
    after the checkpoints it reported are uploaded, so that a test knows which one the restart takes (a death
    during an upload is tested apart)."""
    if config.get("fault_at_step") == step and worker.rank == worker.world - 1:
        marker: Location = config["fault_marker"]
        if not marker.exists():
            marker.write_bytes(b"")
            _uploads.submit(lambda: None).result()  # runs after every upload before it
            os._exit(1)  # a hard worker death, as from an OOM kill or a lost node


class LogWindow:
    """The steps since the last log step of a training loop: their wall time and this worker's model FLOPs."""

    def __init__(self, global_batch: int, peak_flops: float | None):
        self.global_batch, self.peak_flops = global_batch, peak_flops
        self.reset()

    def reset(self) -> None:
        self.start, self.steps, self.flops = time.perf_counter(), 0, 0.0

    def add(self, flops: float) -> None:
        self.steps += 1
        self.flops += flops

    def metrics(self) -> dict[str, float]:
        """step_time, samples_per_s, this worker's model TFLOP/s (MFU is per device) and, where its device has a
        known peak, its model FLOPs utilisation."""
        elapsed = time.perf_counter() - self.start
        rate = self.flops / elapsed
        return {"step_time": elapsed / self.steps, "samples_per_s": self.global_batch * self.steps / elapsed,
                "model_tflops": rate / 1e12, **({"mfu": rate / self.peak_flops} if self.peak_flops else {})}


def mfu_text(metrics: dict[str, float]) -> str:
    """The progress line's MFU, where the run has one."""
    return f", MFU {100 * metrics['mfu']:.1f}%" if "mfu" in metrics else ""


def report(trainer: Trainer, metrics: dict[str, float], with_checkpoint: bool, step: int, run_dir: Location,
           in_process: bool) -> None:
    """Every rank calls report the same number of times (it is a collective); rank 0 attaches the state.

    Rank 0 writes the state into a folder of its own, and that write is all the ranks wait for: the upload into
    the run folder (`publish_checkpoint`, which then deletes the folder) runs on a thread of ours while training
    goes on, and Ray's `CheckpointUploadMode.ASYNC` waits for it on Ray's own upload thread, then registers the
    checkpoint, in report order. Ray's thread alone would start an upload only after every earlier report has
    been handed to the controller, which takes one report a worker per poll (every 2 s): reports closer than
    that would delay uploads more and more. A report without a checkpoint is asynchronous too: a synchronous
    one would wait for the upload before it, as Ray hands reports on in order. Rank 0 holds at most
    LOCAL_CHECKPOINTS states on its disk: a checkpoint that finds them all still uploading waits for the oldest.

    In local mode (run.workers=0, `in_process`) Ray Train uploads nothing and keeps no copy of a reported
    checkpoint, so it is published here, into the run folder, where Ray would have put it, and the newest two
    are kept, as Ray keeps them."""
    import ray.train

    if not with_checkpoint:
        ray.train.report(metrics, checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
        return
    name = f"step_{step:08d}"
    if in_process:
        checkpoint = publish_checkpoint(run_dir, _write_checkpoint(trainer, run_dir), name)
        for old in local_checkpoints(run_dir)[:-KEEP_CHECKPOINTS]:
            old.delete()
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
        return
    waiting = time.perf_counter()
    _local_checkpoints.acquire()
    if (waited := time.perf_counter() - waiting) > 1:
        logger.warning("checkpoint %s waited %.1f s for the upload of the one before: uploads take longer than "
                       "run.checkpoint_every's steps", name, waited)
    try:
        checkpoint = _write_checkpoint(trainer, run_dir)
        upload = _uploads.submit(publish_checkpoint, run_dir, checkpoint, name)
    except BaseException:
        _local_checkpoints.release()
        raise
    upload.add_done_callback(lambda _: _local_checkpoints.release())
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name,
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                     checkpoint_upload_fn=lambda _checkpoint, _name: upload.result(),
                     delete_local_checkpoint_after_upload=False)


def _local_copies(run_dir: Location) -> Path:
    """Where a run's rank 0 writes its states before their upload: a folder of the run's in the node's temp folder."""
    return Path(tempfile.gettempdir()) / f"ajepa-checkpoints-{run_dir.name}"


def _write_checkpoint(trainer: Trainer, run_dir: Location) -> Any:
    """The trainer's state in a local folder of its own, as a Checkpoint: it lives until `publish_checkpoint`."""
    import ray.train

    with _local_copies_folder:
        _local_copies(run_dir).mkdir(exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=_local_copies(run_dir)))
    trainer.save(folder / trainer.checkpoint_file)
    return ray.train.Checkpoint.from_directory(folder)


def publish_checkpoint(run_dir: Location, checkpoint: Any, name: str) -> Any:
    """Copy a checkpoint's local folder to `run_dir / name` and delete the folder; returns the copy's Checkpoint.

    Each file appears whole or not at all (`Location.upload_whole`): a worker killed during the upload, which
    in asynchronous mode overlaps training, leaves no `step_*/*.pt` that `restore` would try. (Ray's own upload
    writes the files in place.) A run folder this node cannot see (a local path on another node) stops the
    run, as Ray's own upload would: the files would land on this node's disk, where no restart finds them."""
    import ray.train

    if not (run_dir / RUN_FILE).exists():
        raise RuntimeError(f"{run_dir}: this worker's node does not see the run folder; run.out_dir must be "
                           "storage every node reaches (a shared file system, s3://, gs://)")
    folder, where = Path(checkpoint.path), run_dir / name
    for file in sorted(folder.iterdir()):
        (where / file.name).upload_whole(file)
    with _local_copies_folder:
        shutil.rmtree(folder)
        if folder.parent == _local_copies(run_dir):  # the run's folder goes with its last copy: none left behind
            with contextlib.suppress(OSError):  # not empty: another copy is waiting for its upload
                folder.parent.rmdir()
    return ray.train.Checkpoint(where.path, filesystem=where.fs)


def restore(trainer: Trainer, run_dir: Path | Location, registered: Any) -> None:
    """Load the newest complete checkpoint of the run, if any.

    Ray Train restores only the checkpoints its controller has registered, and it registers a reported one
    once its background upload has finished and the controller next polls the workers, every 2 s. On a GPU
    that is tens of steps: a worker that dies between the upload and the poll would restart the run from an
    older checkpoint, or from scratch, although the newer one sits complete in the run folder. So the run
    folder comes first, newest first. An upload cut short leaves no checkpoint file there (`publish_checkpoint`
    writes each file whole or not at all); one that cannot be read all the same is skipped. Ray's own is the
    fallback where the run folder is not on this node's file system.

    Called before training, when this attempt has begun no upload, so it first clears what a worker killed
    during an upload left: the run's local copies of the state in this node's temp folder (a state each, GBs for
    ViT-B) and hidden partial files in the run folder's checkpoint folders."""
    run_dir = storage.resolve(run_dir)
    shutil.rmtree(_local_copies(run_dir), ignore_errors=True)
    for partial in run_dir.glob("step_*/.*.partial"):
        with contextlib.suppress(FileNotFoundError):  # every rank clears them; another may have been first
            partial.delete()
    for folder in reversed(local_checkpoints(run_dir)):
        try:
            trainer.load(folder / trainer.checkpoint_file)
            return
        except CheckpointError as err:
            logger.warning("skipping a checkpoint that cannot be read: %s", err)
    if registered is not None:
        with registered.as_directory() as folder:
            trainer.load(Path(folder) / trainer.checkpoint_file)


def local_checkpoints(run_dir: Path | Location) -> list[Location]:
    """A run folder's checkpoint folders (a `step_*` folder holding a .pt file), oldest first; the run folder is
    a local path or a URI."""
    folders = {p.parent.path: p.parent for p in storage.resolve(run_dir).glob("step_*/*.pt")}
    return [folders[path] for path in sorted(folders)]


# -------------------------------------------------------------------------------------------- driver


def workers_text(workers: int) -> str:
    """Where a run's training loop runs, for the job's first line: run.workers=0 is this process (Ray Train's
    local mode), not one worker."""
    if workers == 0:
        return "in this process (run.workers=0)"
    return f"on {workers} worker{'s' if workers > 1 else ''}"


def check_cluster_room(plan: RunPlan, driver_cpus: float = 0.0) -> None:
    """Start Ray (or join the cluster) and check that it has the CPUs and GPUs of the run's Train workers
    (run.workers x run.cpus_per_worker, x run.gpus_per_worker) and `driver_cpus` more (a sweep trial's own
    process), with each worker's share on one node: Train would otherwise wait for them for good, saying nothing.
    A local Ray without them is refused before anything is written; a cluster's autoscaler may still add nodes,
    so a job that joins one is told what it waits for, and waits. A sweep's trial is not checked: its sweep
    checked the room for one."""
    import ray

    from ajepa.runtime import cluster_address, init_ray

    init_ray()
    run = plan.cfg.run
    if run.workers == 0 or plan.trial is not None:  # in this process: no workers to place; a trial: see above
        return
    worker = {"CPU": run.cpus_per_worker, "GPU": run.gpus_per_worker}
    need = {kind: run.workers * amount for kind, amount in worker.items()}
    need["CPU"] += driver_cpus
    have = ray.cluster_resources()
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    # Train places each worker's bundle whole on one node: the cluster's total can hold workers its nodes cannot.
    places = sum(min(math.floor(node.get(kind, 0.0) / amount + 1e-9) for kind, amount in worker.items() if amount)
                 for node in nodes)
    in_total = all(have.get(kind, 0.0) + 1e-9 >= amount for kind, amount in need.items())
    if in_total and places >= run.workers:
        return
    asked = f"{run.workers} worker{'s' if run.workers > 1 else ''} x {run.cpus_per_worker:g} CPU" + (
        f" and {run.gpus_per_worker:g} GPU" if run.gpus_per_worker else "") + (
        f" (and {driver_cpus:g} CPU for the trial's own process)" if driver_cpus else "")
    held = _resources_text(have)
    if cluster_address()[0] is None:  # one node: its total is what a worker's bundle can use
        key = "run.gpus_per_worker" if have.get("GPU", 0.0) + 1e-9 < need["GPU"] else "run.workers"
        raise ConfigError(f"{key}: {asked} do not fit the local Ray (this machine: {held}), and Train would wait "
                          "for them for good; give fewer workers (--workers N, or 0 to train in this process), "
                          "fewer CPUs or GPUs each (run.cpus_per_worker, --gpus-per-worker), or join a cluster "
                          "(RAY_ADDRESS)", key)
    on_nodes = ""
    if in_total or places == 0:  # the nodes, not only the total, keep the workers out
        largest = max(nodes, key=lambda node: (node.get("GPU", 0.0), node.get("CPU", 0.0)))
        on_nodes = f", on nodes that hold {places} of those workers (the largest has {_resources_text(largest)})"
    print(f"waiting for room: {asked}, and the cluster has {held} now{on_nodes}; training starts when nodes join "
          "(an autoscaler adds them; Ctrl-C to stop)", flush=True)


def _resources_text(resources: dict[str, float]) -> str:
    """`2 CPUs and 1 GPU`: a node's or a cluster's CPUs and GPUs."""
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    return f"{cpus:g} CPU{'' if cpus == 1 else 's'} and {gpus:g} GPU{'' if gpus == 1 else 's'}"


def resolve_store(cfg: Config, store: str | Path | Location | None) -> Location:
    """--data, else data.store, else the built-in demo store (built on first use): a local path or a URI."""
    from ajepa import data

    if store:
        return storage.resolve(store)
    if cfg.data.store:
        return storage.resolve(cfg.data.store)
    return storage.resolve(data.demo_store(cfg.audio)[0])


def resumed_store(plan: RunPlan, given: str | Path | Location | None) -> Location:
    """The store a resumed run started with. Named again (--data, or data.store in an override), it must be that
    one: a resume continues the run's own batches, which another store would not hold."""
    recorded = plan.record["store"]
    if given is None and "data.store" in plan.changes:
        given = plan.changes["data.store"][1]
    if given is not None and str(storage.resolve(given)) != recorded:
        raise ConfigError(f"--resume {plan.name}: {given} is not the store the run reads ({recorded}); a resumed run "
                          "keeps its store", "data.store")
    return storage.resolve(recorded)


def check_store(cfg: Config, stats: dict[str, Any], store: Location, workers: int) -> None:
    from ajepa.data import check_version

    check_version(stats, store)
    audio = stats["audio"]
    if audio["num_mel_bins"] != cfg.audio.num_mel_bins:
        raise ConfigError(f"audio.num_mel_bins: config says {cfg.audio.num_mel_bins}, store {store} has "
                          f"{audio['num_mel_bins']}")
    per_rank = stats["counts"]["train"] // max(workers, 1)
    if per_rank < cfg.data.batch_size:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} is larger than the {per_rank} training rows each "
                          f"of {max(workers, 1)} workers gets from {store}")


def new_run_name(job: str) -> str:
    return f"{job}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def resolve_resume(resume: str, out: Location) -> tuple[Location, str]:
    """`--resume` takes a run folder (a path or a URI) or a run name under --out; returns (out, name)."""
    named = storage.is_uri(resume) or Path(resume).is_absolute() or Path(resume).exists()
    candidates = [storage.resolve(resume), out / resume] if named else [out / resume]
    for candidate in candidates:
        if (candidate / RUN_FILE).exists():
            return candidate.parent, candidate.name
    looked = " and ".join(str(c / RUN_FILE) for c in candidates)
    raise ConfigError(f"--resume {resume}: no run found (looked for {looked})")


def read_run_file(path: Location) -> dict[str, Any]:
    try:
        saved = json.loads(path.read_text())
        missing = {"config", "store", "mlflow_run_id", "tracking_uri"} - set(saved)
    except (OSError, json.JSONDecodeError, TypeError) as exc:
        raise ConfigError(f"{path}: unreadable run record ({exc})") from None
    if missing:
        raise ConfigError(f"{path}: run record lacks {', '.join(sorted(missing))}")
    return saved


@dataclass(frozen=True)
class SweepTrial:
    """What makes a run one trial of a sweep (sweep.py): its MLflow run is a child of the sweep's run, in the
    sweep's store, with the trial's tags, and its Train run reports through `callbacks` (Tune's)."""

    tracking_uri: str
    parent_run_id: str
    tags: dict[str, str]
    callbacks: list[Any]


@dataclass
class RunPlan:
    """Where a run lives and the config it runs with; `record` is its run.json (read on resume, written by
    `open_run` for a new run); `trial` when the run is a sweep's trial."""

    job: str  # pretrain | finetune | sweep: run names, the MLflow tag, the progress line
    cfg: Config
    out: Location  # run.out_dir: an absolute local path or a URI
    name: str
    resumed: bool
    record: dict[str, Any] | None
    trial: SweepTrial | None = None
    start_step: int = 0  # a resumed run's last checkpoint: where it continues
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # key -> (the run's value, the resume's)

    @property
    def finishing(self) -> bool:
        """A resumed training run whose last checkpoint is its last step: it was stopped after it, before its export
        (or a sweep's trial is started again)."""
        return self.resumed and self.job in STEPS_KEY and self.start_step == self.cfg.flat()[STEPS_KEY[self.job]]

    def resume_text(self) -> str:
        """What a resume continues from, for the job's first line; empty for a new run."""
        if not self.resumed:
            return ""
        finish = ": its last step, so it only finishes (the export)" if self.finishing else ""
        return (f", resumed at step {self.start_step}{finish}"
                + (f" ({changes_text(self.changes)})" if self.changes else ""))

    @property
    def run_dir(self) -> Location:
        return self.out / self.name


def changes_text(changes: dict[str, tuple[Any, Any]]) -> str:
    """`key before -> after; ...`: a resume's changes to its run's config."""
    return "; ".join(f"{key} {before} -> {after}" for key, (before, after) in changes.items())


STEPS_KEY = {"pretrain": "optim.steps", "finetune": "finetune.steps"}  # what --steps sets, per training job
_ENCODER_SHAPE = ("model.patch_size", "model.embed_dim", "model.depth", "model.num_heads", "model.mlp_ratio")
# The settings that make the weights a job's checkpoints hold: a resumed run keeps them, since other values would
# not load those weights (or would read them as another model's).
CHECKPOINT_SHAPE = {"pretrain": _ENCODER_SHAPE + ("model.pred_dim", "model.pred_depth", "model.pred_heads"),
                    "finetune": _ENCODER_SHAPE + ("finetune.head_norm",)}


def check_resumable(job: str, steps: int, changes: dict[str, tuple[Any, Any]], run_dir: Location,
                    resume: str, finished: Callable[[], bool]) -> int:
    """The step a resume continues from (its last checkpoint's, 0 without one). Refused, before anything is
    written or started: `changes` (the overrides' effect on the run's config) to its model, or a step count
    that the last checkpoint has already reached, which would train nothing. A last checkpoint at the last step
    of a run that has not `finished` is not refused: the run stopped before its export, and the job finishes it
    (without changes: nothing trains with them)."""
    if model := [key for key in CHECKPOINT_SHAPE[job] if key in changes]:
        values = "; ".join(f"{key} {changes[key][1]} (the run's is {changes[key][0]})" for key in model)
        raise ConfigError(f"--resume {resume}: {values}: a resumed run keeps the model its checkpoints hold; start "
                          "a new run for another", model[0])
    checkpoints = local_checkpoints(run_dir)
    reached = int(checkpoints[-1].name.removeprefix("step_")) if checkpoints else 0
    steps_key = STEPS_KEY[job]
    if reached == steps and not finished():
        if changes:
            raise ConfigError(f"--resume {resume}: {changes_text(changes)}: its last checkpoint is its last step "
                              f"({reached}), so the resume only finishes the run (the export) and nothing would "
                              "train with that; resume without it, or give more steps (--steps N) to train on",
                              next(iter(changes)))
        return reached
    if reached >= steps:
        raise ConfigError(f"--resume {resume}: nothing to train: its last checkpoint is step {reached} and "
                          f"{steps_key} is {steps}; give more steps (--steps N, every schedule scales to the new "
                          "total) to train on", steps_key)
    return reached


def plan_run(job: str, cfg: Config, resume: str | None, overrides: list[str],
             trial: SweepTrial | None = None) -> RunPlan:
    """A new run (name from run.name or generated; it must not exist) or the run `--resume` names, with its
    saved config and `overrides` on top. Nothing is written yet.

    A local run.out_dir is made absolute here, on the driver: Ray Train's workers (on any node) and a sweep's
    trials get that path, not one relative to their own working directory."""
    out = storage.resolve(cfg.run.out_dir)
    if resume:
        out, name = resolve_resume(resume, out)
        saved = read_run_file(out / name / RUN_FILE)
        cfg = config_from_dict(saved["config"], overrides, source=str(out / name / RUN_FILE))
        before, after = config_from_dict(saved["config"]).flat(), cfg.flat()
        changes = {key: (before[key], after[key]) for key in after
                   if before[key] != after[key] and key != "run.out_dir"}  # where it lives is its folder's
        if job not in STEPS_KEY:  # a sweep
            if changes:  # Tune resumes its started trials with their own configs: a change would reach only the rest
                raise ConfigError(f"--resume {resume}: {changes_text(changes)}: a resumed sweep runs its trials with "
                                  "the config it started with, as its earlier trials ran; start a new sweep for "
                                  "another", next(iter(changes)))
            return RunPlan(job, cfg, out, name, True, saved, trial)

        def finished() -> bool:
            # Tune starts again a trial whose job had not returned, even one whose run had just ended: a trial
            # always finishes; a user's --resume of a finished run is refused.
            from ajepa.tracking import run_status

            return trial is None and run_status(saved["tracking_uri"], saved["mlflow_run_id"]) == "FINISHED"

        start = check_resumable(job, after[STEPS_KEY[job]], changes, out / name, resume, finished)
        return RunPlan(job, cfg, out, name, True, saved, trial, start, changes)
    name = cfg.run.name or new_run_name(job)
    if (out / name).exists():
        raise ConfigError(f"run.name: {out / name} already exists; use --resume {name} to continue it")
    return RunPlan(job, cfg, out, name, False, None, trial)


@contextlib.contextmanager
def open_run(plan: RunPlan, store: Location, params: dict[str, Any], record: dict[str, Any] | None = None
             ) -> Iterator[Any]:
    """The run folder and its MLflow run (a resumed run continues its own). A new run saves its config, logs
    it with `params`, and writes run.json (with `record`'s fields too). The MLflow run ends FINISHED, or
    FAILED on any error in the body (also after fit(): export, upload), KILLED on Ctrl-C. A sweep trial's run
    ends here only when its job returns: on an error or a stop the sweep's driver ends it (sweep.TrialEnds),
    because Tune stops a trial by tearing its process down, which the job would see as an error and record as
    FAILED, possibly after the driver recorded KILLED."""
    from ajepa import tracking

    trial = plan.trial
    if plan.resumed:
        uri, run_id = plan.record["tracking_uri"], plan.record["mlflow_run_id"]
        tracker = tracking.Tracker.attach(uri, run_id)
    else:
        uri = trial.tracking_uri if trial else tracking.default_tracking_uri(plan.out)  # before anything is written
        plan.run_dir.mkdir()
        tracker = tracking.Tracker.start(uri, plan.cfg.run.experiment, plan.name,
                                         tags={"ajepa.job": plan.job, **(trial.tags if trial else {})},
                                         parent_run_id=trial.parent_run_id if trial else None)
    with tracker if trial is None else _finished_on_return(tracker):
        if not plan.resumed:
            tracker.log_params({**plan.cfg.flat(), **params})
            plan.record = {"name": plan.name, "store": str(store), "mlflow_run_id": tracker.run_id,
                           "tracking_uri": uri, "config": plan.cfg.to_dict(), **(record or {})}
            _save_config(plan, tracker)
        elif plan.changes:
            # The resume's overrides are the run's config from its checkpoint on, so a later --resume continues
            # with them; the MLflow params keep the values the run started with, and a tag says what changed when.
            tracker.set_tags({f"ajepa.changed_at_step_{plan.start_step}": changes_text(plan.changes)})
            plan.record["config"] = plan.cfg.to_dict()
            _save_config(plan, tracker)
        yield tracker


def _save_config(plan: RunPlan, tracker: Any) -> None:
    """config.yaml (also an MLflow artifact) and run.json: the config the run trains with."""
    with (plan.run_dir / "config.yaml").local_file() as config_file:
        save_config(plan.cfg, config_file)
        tracker.log_artifact(config_file)
    (plan.run_dir / RUN_FILE).write_text(json.dumps(plan.record, indent=2))


@contextlib.contextmanager
def _finished_on_return(tracker: Any) -> Iterator[Any]:
    yield tracker
    tracker.finish("FINISHED")


def fit(plan: RunPlan, loop: Callable[[dict[str, Any]], None], loop_config: dict[str, Any], store: Location,
        total: int, describe: Callable[[dict[str, float]], str], train_files: TrainFiles | None = None) -> Any:
    """Run `loop` on Ray Train and return its Result. The loop gets `loop_config` plus the shared keys: config,
    train_files (the `train_files` given, else the store's train split; `train_batches` reads it), tracking_uri,
    mlflow_run_id, progress (a
    queue for rank 0's metrics, which the driver prints as `<job>: step/total steps, describe(metrics), ETA`),
    run_dir (where `report` publishes checkpoints), fault_marker and fault_at_step. Locations travel with their
    filesystem: every worker reaches the same bucket endpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from ajepa import data
    from ajepa.runtime import init_ray

    cfg, run_dir = plan.cfg, plan.run_dir
    # Listed once, here: every rank computes the data order from the same files and row counts.
    train_files = train_files or data.train_files(store)
    init_ray()  # before any Ray call (the queue's actor): one would start a default Ray of its own
    progress = Queue(actor_options={"num_cpus": 0})  # rank 0's metrics at every log step, for the driver
    loop_config = {**loop_config, "config": cfg.to_dict(), "train_files": train_files,
                   "tracking_uri": plan.record["tracking_uri"], "mlflow_run_id": plan.record["mlflow_run_id"],
                   "progress": progress, "fault_marker": run_dir / "fault_injected", "run_dir": run_dir}
    if os.environ.get(FAULT_ENV):
        loop_config["fault_at_step"] = int(os.environ[FAULT_ENV])
    # Train's controller collects one report per worker each time it polls them (every 2 s by default): reports
    # that come faster queue up (asynchronous mode) and the run's end waits for them, 2 s a report. Its env var
    # reaches the controller from this process; a value set by the user stays.
    os.environ.setdefault(CONTROLLER_POLL_ENV, str(CONTROLLER_POLL_S))
    use_gpu = cfg.run.gpus_per_worker > 0
    resources = {"CPU": cfg.run.cpus_per_worker, **({"GPU": cfg.run.gpus_per_worker} if use_gpu else {})}
    storage_path, storage_filesystem = plan.out.ray_storage()
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.run.workers, use_gpu=use_gpu,
                                     resources_per_worker=resources if cfg.run.workers else None),
        run_config=RunConfig(name=plan.name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                             checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
                             failure_config=FailureConfig(max_failures=cfg.run.max_failures),
                             callbacks=plan.trial.callbacks if plan.trial else None),
    )
    with _ctrl_c_is_keyboard_interrupt(), _training_progress(progress, total, plan.job, describe):
        return trainer.fit()


@dataclass
class Trained:
    """What a job's training ends with: the final state, the checkpoint it is read from, the last step's metrics."""

    state: dict[str, Any]
    checkpoint: Location
    metrics: dict[str, Any]


def train(plan: RunPlan, loop: Callable[[dict[str, Any]], None], loop_config: dict[str, Any], store: Location,
          total: int, describe: Callable[[dict[str, float]], str], load: Callable[[Any], dict[str, Any]],
          tracker: Any, train_files: TrainFiles | None = None) -> Trained:
    """`fit`, and the state `load` reads from the checkpoint folder it ended with. A run that is `finishing` has
    trained every step: its last checkpoint and what its rank 0 logged at the last step are what fit returned."""
    if plan.finishing:
        folder = local_checkpoints(plan.run_dir)[-1]
        return Trained(load(folder), folder, tracker.metrics_at(total))
    result = fit(plan, loop, loop_config, store, total, describe, train_files)
    with result.checkpoint.as_directory() as folder:
        state = load(Path(folder))
    checkpoint = dataclasses.replace(plan.out, path=result.checkpoint.path)  # Ray's path, in the run's filesystem
    return Trained(state, checkpoint, dict(result.metrics or {}))


@contextlib.contextmanager
def _ctrl_c_is_keyboard_interrupt() -> Iterator[None]:
    """Train V2's fit() installs a SIGINT handler that aborts the run and raises SystemExit, and leaves it
    installed after fit() returns. Here a Ctrl-C stays a KeyboardInterrupt, during fit() and after it."""
    main = threading.current_thread() is threading.main_thread()  # only there can handlers change
    handler = signal.getsignal(signal.SIGINT)
    try:
        yield
    except SystemExit as exc:  # only Train's SIGINT handler exits from inside fit()
        raise KeyboardInterrupt from exc
    finally:
        if main:
            signal.signal(signal.SIGINT, handler)


@contextlib.contextmanager
def _training_progress(queue: Any, total: int, job: str, describe: Callable[[dict[str, float]], str]) -> Iterator[None]:
    """Print what rank 0 puts on `queue` while the body (fit) runs: the step, `describe(metrics)` and the ETA."""
    from ajepa.progress import Progress, polling

    bar = Progress(f"{job}:", total, "steps", keep=True)
    first: list[tuple[float, int]] = []  # (time, step) of the first report, for an ETA that spans probes' stalls

    def poll() -> None:
        for m in queue.get_nowait_batch(queue.qsize()):
            now, step = time.monotonic(), int(m["step"])
            first[:] = first or [(now, step)]
            step_time = (now - first[0][0]) / (step - first[0][1]) if step > first[0][1] else m["step_time"]
            bar.update(step, describe(m), eta_s=(total - step) * step_time)

    try:
        with polling(poll):
            yield
    finally:
        bar.close()

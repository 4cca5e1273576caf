"""A-JEPA pretraining: one optimizer step (`Pretrainer`), the Ray Train loop around it, and the driver.

`Pretrainer` holds everything a step needs and nothing of Ray, so the benchmark and unit tests drive it
directly. `train_loop_per_worker` adds the Ray parts: its data shard, checkpoints through the collective
`ray.train.report`, and MLflow metrics from rank 0. `run_pretrain` is what `jobs/pretrain.py` calls.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ajepa.audio import apply_augmentation, normalize
from ajepa.config import Config, ConfigError, config_from_dict, save_config
from ajepa.eval import EvalError, ProbeSet, load_probe_sets, probe
from ajepa.masking import tf_probability, validate_masks
from ajepa.models.ajepa import AJEPA
from ajepa.train import schedules
from ajepa.train.inputs import HostBatch, MicroBatch, Prefetcher, plan_step

CHECKPOINT_FILE = "pretrain.pt"
RUN_FILE = "run.json"
ENCODER_FILE = "encoder.safetensors"
KEEP_CHECKPOINTS = 2
logger = logging.getLogger(__name__)
FAULT_ENV = "AJEPA_FAULT_AT_STEP"  # test hook: the last rank dies once at this step


class CheckpointError(RuntimeError):
    """A checkpoint cannot be loaded; the message names the file."""


def patch_grid(cfg: Config) -> tuple[int, int]:
    return cfg.data.crop_frames // cfg.model.patch_size, cfg.audio.num_mel_bins // cfg.model.patch_size


class Pretrainer:
    """Model, EMA target, optimizer and the global step: one `train_step` per optimizer step."""

    def __init__(self, cfg: Config, mean: float, std: float, device: torch.device, rank: int = 0,
                 world_size: int = 1):
        self.cfg, self.mean, self.std = cfg, mean, std
        self.device, self.rank = device, rank
        self.grid = patch_grid(cfg)
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        self.model = AJEPA(cfg.model, cfg.audio.num_mel_bins, max_frames=cfg.data.crop_frames).to(device)
        if cfg.run.compile:
            self.model.compile_blocks()
        self.net: torch.nn.Module = self.model
        if world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.model.param_groups(cfg.optim.weight_decay[0]), lr=cfg.optim.lr,
                                           betas=cfg.optim.betas, fused=device.type == "cuda")
        self.amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        self.step = 0
        # (loss, target_std, pred_std) since the last `metrics()`, kept on device: no host sync per step
        self._pending: list[Tensor] = []

    # -------------------------------------------------------------------------------------------- steps
    def plan(self, step: int, batches: list[HostBatch]) -> list[MicroBatch]:
        """Host batches of optimizer `step` -> MicroBatches with all of the step's random draws (pure)."""
        return plan_step(self.cfg, self.grid, self.rank, step, batches)

    def prefetch(self, batches: Iterator[HostBatch], depth: int = 2) -> Prefetcher:
        """Device-ready steps from this trainer's current step on, planned and copied ahead of time."""
        return Prefetcher(self.plan, batches, self.cfg.optim.grad_accum, self.step, self.device, depth)

    def set_schedules(self) -> None:
        lr = schedules.learning_rate(self.step, self.cfg.optim)
        wd = schedules.weight_decay(self.step, self.cfg.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if group.get("name") == "decay":
                group["weight_decay"] = wd

    def model_input(self, micro: MicroBatch) -> Tensor:
        """Stored float16 spectrograms -> augmented, normalised model input (B, crop_frames, mel), on device."""
        x = apply_augmentation(micro.fbank, micro.aug)
        return normalize(x, self.mean, self.std) if self.cfg.data.normalize else x

    def train_step(self, micro_batches: list[MicroBatch] | list[HostBatch],
                   lap: Callable[[str], None] | None = None) -> dict[str, float]:
        """One optimizer step over `grad_accum` micro-batches: planned ones (from `prefetch`, ideally already
        on the device) or host (fbank, n_frames) pairs, which are planned here.

        Nothing in it waits for the device. `lap(phase)` is called as each phase ends (data, forward,
        backward, grad_norm, optimizer, ema, other): the throughput benchmark passes one that syncs the
        device and reads a clock."""
        lap = lap or _no_lap
        start = time.perf_counter()
        if not isinstance(micro_batches[0], MicroBatch):
            micro_batches = self.plan(self.step, micro_batches)
        if micro_batches[0].step != self.step:
            raise ValueError(f"micro-batches planned for step {micro_batches[0].step}, trainer is at {self.step}")
        self.set_schedules()
        data_time = time.perf_counter() - start
        lap("other")
        for i, micro in enumerate(micro_batches):
            start = time.perf_counter()
            micro = micro.to(self.device, non_blocking=True)
            x = self.model_input(micro)
            data_time += time.perf_counter() - start
            lap("data")
            last = i == len(micro_batches) - 1
            sync = self.net.no_sync() if (not last and self.net is not self.model) else contextlib.nullcontext()
            with sync:
                with self.amp:
                    loss, aux = self.net(x, micro.context, micro.targets)
                lap("forward")
                (loss / len(micro_batches)).backward()
            self._pending.append(torch.stack([loss.detach(), aux["target_std"], aux["pred_std"]]))
            lap("backward")
        if self.cfg.optim.clip_grad > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.clip_grad)
        else:  # the norm alone, for the logs: clip_grad_norm_(inf) would also rescale every gradient by 1
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        lap("grad_norm")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lap("optimizer")
        self.step += 1
        self.model.update_target(schedules.ema_momentum(self.step, self.cfg.optim))
        lap("ema")
        self._grad_norm = grad_norm.detach()
        n = len(micro_batches)
        info = {
            "context_fraction": sum(m.context_fraction for m in micro_batches) / n,
            "target_fraction": sum(m.target_fraction for m in micro_batches) / n,
            "tf_batch": float(micro_batches[0].family == "tf"),
            "data_time": data_time,
        }
        lap("other")
        return info

    def metrics(self) -> dict[str, float]:
        """Scalars for logging; the one host sync of the logging interval happens here."""
        nan = float("nan")
        loss, target_std, pred_std = torch.stack(self._pending).mean(0).tolist() if self._pending else (nan,) * 3
        self._pending.clear()
        return {
            "loss": loss,
            "target_std": target_std,  # both fall towards 0 if the representations collapse
            "pred_std": pred_std,
            "grad_norm": float(self._grad_norm.item()),
            "lr": schedules.learning_rate(self.step - 1, self.cfg.optim),
            "wd": schedules.weight_decay(self.step - 1, self.cfg.optim),
            "ema_momentum": schedules.ema_momentum(self.step, self.cfg.optim),
            "tf_probability": tf_probability(self.cfg.mask, self.step - 1, self.cfg.optim.steps),
        }

    # ---------------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                "config": self.cfg.to_dict()}

    def save(self, path: Path) -> None:
        torch.save(self.state_dict(), path)

    def load(self, path: Path) -> None:
        state = load_checkpoint(path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a pretraining checkpoint safely (weights_only), with an error that names the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint file is missing") from None
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"{path}: corrupt or unreadable checkpoint ({type(exc).__name__}: {exc})") from None
    missing = {"model", "optimizer", "step", "config"} - set(state) if isinstance(state, dict) else {"model"}
    if missing:
        raise CheckpointError(f"{path}: not an ajepa pretraining checkpoint (missing {', '.join(sorted(missing))})")
    return state


def _no_lap(phase: str) -> None:
    return None


# ------------------------------------------------------------------------------------------ Ray worker


def _batches(shard: Any, batch_size: int, shape: tuple[int, int], pin: bool) -> Iterator[HostBatch]:
    """Endless full batches from this worker's shard. The trainer splits with equal=True and we drop the
    last partial batch, so every rank sees the same number of batches per epoch (no DDP hang)."""
    from ajepa.data import decode_fbank

    while True:
        for batch in shard.iter_batches(batch_size=batch_size, drop_last=True, batch_format="numpy"):
            # One copy from Arrow's read-only bytes into (pinned) memory that torch owns.
            fbank = torch.empty((batch_size, *shape), dtype=torch.float16, pin_memory=pin)
            decode_fbank(batch["fbank"], shape, out=fbank.numpy())
            yield fbank, torch.from_numpy(batch["n_frames"].astype(np.int64))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from ajepa.tracking import NullTracker, Tracker

    cfg = config_from_dict(config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cfg.run.torch_threads or max(1, round(cfg.run.cpus_per_worker)))
    trainer = Pretrainer(cfg, config["mean"], config["std"], device, rank, world)
    local_run_dir = config["local_run_dir"]
    restore(trainer, Path(config["run_dir"]), ray.train.get_checkpoint())
    tracker = Tracker.attach(config["tracking_uri"], config["mlflow_run_id"]) if rank == 0 else NullTracker()
    probe_sets = load_probe_sets(config["eval_store"], cfg.eval.max_clips) if cfg.eval.every and rank == 0 else None
    batches = _batches(ray.train.get_dataset_shard("train"), cfg.data.batch_size, tuple(config["fbank_shape"]),
                       pin=device.type == "cuda")
    steps = trainer.prefetch(batches)
    fault_step = config.get("fault_at_step")
    total, accum = cfg.optim.steps, cfg.optim.grad_accum
    global_batch = cfg.data.batch_size * accum * world
    window_start, window_steps, window_data = time.perf_counter(), 0, 0.0
    while trainer.step < total:
        if fault_step is not None and trainer.step == fault_step and rank == world - 1:
            marker = Path(config["fault_marker"])
            if not marker.exists():
                marker.touch()
                os._exit(1)  # a hard worker death, as from an OOM kill or a lost node
        step_info = trainer.train_step(next(steps))
        window_steps += 1
        window_data += step_info["data_time"]
        step = trainer.step
        log_now = step % cfg.run.log_every == 0 or step == total
        save_now = step % cfg.run.checkpoint_every == 0 or step == total
        probe_now = cfg.eval.every > 0 and (step % cfg.eval.every == 0 or step == total)
        if not (log_now or save_now or probe_now):
            continue
        elapsed = time.perf_counter() - window_start
        metrics = {**trainer.metrics(), **{k: v for k, v in step_info.items() if k != "data_time"},
                   "step": step, "step_time": elapsed / window_steps, "data_time": window_data / window_steps,
                   "samples_per_s": global_batch * window_steps / elapsed}
        if probe_sets is not None and probe_now:  # rank 0 only; the others wait at the next collective
            metrics.update(online_probe(trainer, probe_sets))
            metrics["probe/cost"] = metrics["probe/seconds"] / (cfg.eval.every * metrics["step_time"])
        if rank == 0:
            tracker.log_metrics(metrics, step)
            config["progress"].put(metrics)  # the driver prints it: workers' own output stays in Ray's logs
        _report(trainer, metrics, save_now and rank == 0, step, local_run_dir)
        window_start, window_steps, window_data = time.perf_counter(), 0, 0.0
    steps.close()


def online_probe(trainer: Pretrainer, probe_sets: list[ProbeSet]) -> dict[str, float]:
    """The frozen-encoder probe of eval.py on the encoder being trained, at its current step."""
    cfg = trainer.cfg
    encoder = trainer.model.target_encoder if cfg.eval.encoder == "target" else trainer.model.context_encoder
    return probe(encoder, probe_sets, cfg.data.crop_frames, cfg.eval, trainer.device, cfg.data.normalize)


def _report(trainer: Pretrainer, metrics: dict[str, float], with_checkpoint: bool, step: int,
            local_run_dir: str) -> None:
    """Every rank calls report the same number of times (it is a collective); rank 0 attaches the state.

    In local mode (run.workers=0) Ray Train keeps no copy of a reported checkpoint, so it is written straight
    into the run folder, where Ray would have put it, and the newest two are kept, as Ray keeps them."""
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if with_checkpoint:
            where = Path(local_run_dir) / f"step_{step:08d}" if local_run_dir else Path(folder)
            where.mkdir(exist_ok=True)
            trainer.save(where / CHECKPOINT_FILE)
            checkpoint = ray.train.Checkpoint.from_directory(str(where))
            for old in local_checkpoints(Path(local_run_dir))[:-KEEP_CHECKPOINTS] if local_run_dir else []:
                shutil.rmtree(old)
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_dir_name=f"step_{step:08d}" if checkpoint is not None else None)


def restore(trainer: Pretrainer, run_dir: Path, registered: Any) -> None:
    """Load the newest complete checkpoint of the run, if any.

    Ray Train restores only the checkpoints its controller has registered, and it registers a reported one
    when it next polls the workers, every few seconds. On a GPU that is tens of steps: a worker that dies
    between its report and the poll would restart the run from an older checkpoint, or from scratch,
    although the newer one sits complete in the run folder. So the run folder comes first, newest first,
    skipping one a dying worker left half-written; Ray's own is the fallback where the run folder is not on
    this node's file system."""
    for folder in reversed(local_checkpoints(run_dir)):
        try:
            trainer.load(folder / CHECKPOINT_FILE)
            return
        except CheckpointError as err:
            logger.warning("skipping a checkpoint that cannot be read: %s", err)
    if registered is not None:
        with registered.as_directory() as folder:
            trainer.load(Path(folder) / CHECKPOINT_FILE)


def local_checkpoints(run_dir: Path) -> list[Path]:
    """A run folder's checkpoint folders, oldest first."""
    return sorted(p.parent for p in run_dir.glob(f"step_*/{CHECKPOINT_FILE}"))


# -------------------------------------------------------------------------------------------- driver


@dataclass
class PretrainResult:
    run_dir: Path
    name: str
    step: int
    metrics: dict[str, Any]
    checkpoint: Path
    encoder: Path
    mlflow_run_id: str
    tracking_uri: str
    store: Path


def resolve_store(cfg: Config, store: str | Path | None) -> Path:
    """--data, else data.store, else the built-in demo store (built on first use)."""
    from ajepa import data

    if store:
        return Path(store)
    if cfg.data.store:
        return Path(cfg.data.store)
    return data.demo_store(cfg.audio)[0]


def _check_store(cfg: Config, stats: dict[str, Any], store: Path, workers: int) -> None:
    audio = stats["audio"]
    if audio["num_mel_bins"] != cfg.audio.num_mel_bins:
        raise ConfigError(f"audio.num_mel_bins: config says {cfg.audio.num_mel_bins}, store {store} has "
                          f"{audio['num_mel_bins']}")
    per_rank = stats["counts"]["train"] // max(workers, 1)
    if per_rank < cfg.data.batch_size:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} is larger than the {per_rank} training rows each "
                          f"of {max(workers, 1)} workers gets from {store}")


def _check_eval_store(cfg: Config, store: Path) -> str:
    """The online probe's store (eval.store, else the training store), loaded once here so that a store
    without labels, or with a label set that differs between splits, stops the run before Ray starts."""
    if not cfg.eval.every:
        return ""
    eval_store = Path(cfg.eval.store) if cfg.eval.store else store
    try:
        load_probe_sets(eval_store, cfg.eval.max_clips)
    except EvalError as exc:
        raise ConfigError(f"eval.every={cfg.eval.every}: {exc} (set eval.store to a labelled store, or "
                          "eval.every=0)") from None
    return str(eval_store)


def new_run_name() -> str:
    return f"pretrain-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def resolve_resume(resume: str, out: Path) -> tuple[Path, str]:
    """`--resume` takes a run folder or a run name under --out; returns (out, name)."""
    path = Path(resume)
    candidates = [path, out / resume] if path.is_absolute() or path.exists() else [out / resume]
    for candidate in candidates:
        if (candidate / RUN_FILE).exists():
            return candidate.parent.absolute(), candidate.name
    looked = " and ".join(str(c / RUN_FILE) for c in candidates)
    raise ConfigError(f"--resume {resume}: no run found (looked for {looked})")


def _read_run_file(path: Path) -> dict[str, Any]:
    try:
        saved = json.loads(path.read_text())
        missing = {"config", "store", "mlflow_run_id", "tracking_uri"} - set(saved)
    except (OSError, json.JSONDecodeError, TypeError) as exc:
        raise ConfigError(f"{path}: unreadable run record ({exc})") from None
    if missing:
        raise ConfigError(f"{path}: run record lacks {', '.join(sorted(missing))}")
    return saved


def run_pretrain(cfg: Config, *, store: str | Path | None = None, resume: str | None = None,
                 overrides: list[str] = ()) -> PretrainResult:
    """Pretrain on Ray Train. Everything that can be checked is checked before a cluster is started."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from ajepa import data, tracking
    from ajepa.masking import plot_mask_examples
    from ajepa.runtime import init_ray

    out = Path(cfg.run.out_dir).expanduser().absolute()
    if resume:
        out, name = resolve_resume(resume, out)
        saved = _read_run_file(out / name / RUN_FILE)
        cfg = config_from_dict(saved["config"], overrides, source=str(out / name / RUN_FILE))
        store, run_id, uri = saved["store"], saved["mlflow_run_id"], saved["tracking_uri"]
    else:
        name = cfg.run.name or new_run_name()
        if (out / name).exists():
            raise ConfigError(f"run.name: {out / name} already exists; use --resume {name} to continue it")
    grid = patch_grid(cfg)
    validate_masks(cfg.mask, grid)
    store = resolve_store(cfg, store)
    stats = data.read_stats(store)
    _check_store(cfg, stats, store, cfg.run.workers)
    eval_store = _check_eval_store(cfg, store)

    run_dir = out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        tracker = tracking.Tracker.attach(uri, run_id)
    else:
        uri = tracking.default_tracking_uri(out)
        tracker = tracking.Tracker.start(uri, cfg.run.experiment, name, tags={"ajepa.job": "pretrain"})
        run_id = tracker.run_id
    # The run ends FINISHED, or FAILED on any error (also after fit(): export, upload), KILLED on Ctrl-C.
    with tracker:
        if not resume:
            save_config(cfg, run_dir / "config.yaml")
            tracker.log_params({**cfg.flat(), "data.store_path": str(store),
                                "data.train_clips": stats["counts"]["train"], "data.mean": stats["mean"],
                                "data.std": stats["std"]})
            tracker.log_artifact(run_dir / "config.yaml")
            tracker.log_artifact(Path(store) / "stats.json", "data")
            tracker.log_artifact(plot_mask_examples(cfg.mask, grid, run_dir / "masks.png"))
            (run_dir / RUN_FILE).write_text(json.dumps({"name": name, "store": str(store), "mlflow_run_id": run_id,
                                                        "tracking_uri": uri, "config": cfg.to_dict()}, indent=2))
        print(f"pretraining {name}: {cfg.optim.steps} steps on {max(cfg.run.workers, 1)} worker(s), data {store}",
              flush=True)
        init_ray()
        progress = Queue(actor_options={"num_cpus": 0})  # rank 0's metrics at every log step, for the driver
        loop_config = {"config": cfg.to_dict(), "mean": stats["mean"], "std": stats["std"],
                       "fbank_shape": data.fbank_shape(stats["audio"]),
                       "tracking_uri": uri, "mlflow_run_id": run_id, "progress": progress,
                       "fault_marker": str(run_dir / "fault_injected"), "eval_store": eval_store,
                       "run_dir": str(run_dir), "local_run_dir": str(run_dir) if cfg.run.workers == 0 else ""}
        if os.environ.get(FAULT_ENV):
            loop_config["fault_at_step"] = int(os.environ[FAULT_ENV])
        use_gpu = cfg.run.gpus_per_worker > 0
        resources = {"CPU": cfg.run.cpus_per_worker, **({"GPU": cfg.run.gpus_per_worker} if use_gpu else {})}
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=cfg.run.workers, use_gpu=use_gpu,
                                         resources_per_worker=resources if cfg.run.workers else None),
            run_config=RunConfig(name=name, storage_path=str(out),
                                 checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
                                 failure_config=FailureConfig(max_failures=cfg.run.max_failures)),
            datasets={"train": data.read_store(store, "train", columns=["fbank", "n_frames"]).random_shuffle()},
        )
        with _ctrl_c_is_keyboard_interrupt(), _training_progress(progress, cfg.optim.steps):
            result = trainer.fit()
        with result.checkpoint.as_directory() as folder:
            state = load_checkpoint(Path(folder) / CHECKPOINT_FILE)
        encoder = export_encoder(state, run_dir / ENCODER_FILE, stats)
        tracker.log_artifact(encoder)
    return PretrainResult(run_dir, name, int(state["step"]), dict(result.metrics or {}),
                          Path(result.checkpoint.path), encoder, run_id, uri, Path(store))


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
def _training_progress(queue: Any, total: int) -> Iterator[None]:
    """Print what rank 0 puts on `queue` while the body (fit) runs: step, loss, lr, samples/s and ETA."""
    from ajepa.progress import Progress, polling

    bar = Progress("pretrain:", total, "steps", keep=True)
    first: list[tuple[float, int]] = []  # (time, step) of the first report, for an ETA that spans epoch stalls

    def poll() -> None:
        for m in queue.get_nowait_batch(queue.qsize()):
            now, step = time.monotonic(), int(m["step"])
            first[:] = first or [(now, step)]
            step_time = (now - first[0][0]) / (step - first[0][1]) if step > first[0][1] else m["step_time"]
            bar.update(step, f"loss {m['loss']:.4f}, lr {m['lr']:.2e}, {m['samples_per_s']:.1f} samples/s"
                       + _probe_text(m), eta_s=(total - step) * step_time)

    try:
        with polling(poll):
            yield
    finally:
        bar.close()


def _probe_text(m: dict[str, float]) -> str:
    """The online probe's part of a progress line, when this log step ran it."""
    metric = "map" if "probe/linear_map" in m else "acc"
    if f"probe/linear_{metric}" not in m:
        return ""
    return (f", probe linear {100 * m[f'probe/linear_{metric}']:.1f}% knn {100 * m[f'probe/knn_{metric}']:.1f}% "
            f"({m['probe/seconds']:.1f} s, {100 * m['probe/cost']:.1f}% of training time)")


def export_encoder(state: dict[str, Any], path: Path, stats: dict[str, Any]) -> Path:
    """The target (EMA) encoder's weights as safetensors: what fine-tuning, probes and `ajepa.hear` load.

    Metadata: `config` (the model config), `step`, and `input`: what turns audio into this encoder's input, so
    the file stands alone: the store's audio settings and statistics (`stats`, as in its stats.json), the crop
    the encoder was trained on and whether training normalised."""
    from safetensors.torch import save_file

    prefix = "target_encoder."
    weights = {k[len(prefix):]: v.contiguous() for k, v in state["model"].items() if k.startswith(prefix)}
    data_cfg = state["config"]["data"]
    spec = {"audio": stats["audio"], "mean": stats["mean"], "std": stats["std"],
            "crop_frames": data_cfg["crop_frames"], "normalize": data_cfg["normalize"]}
    save_file(weights, str(path), metadata={"config": json.dumps(state["config"]["model"]), "step": str(state["step"]),
                                            "input": json.dumps(spec)})
    return path


"""A-JEPA pretraining: one optimizer step (`Pretrainer`), the Ray Train loop around it, and the driver.

`Pretrainer` holds everything a step needs and nothing of Ray, so the benchmark and unit tests drive it
directly. `train_loop_per_worker` adds the Ray parts: its data shard, checkpoints through the collective
`ray.train.report`, and MLflow metrics from rank 0. `run_pretrain` is what `jobs/pretrain.py` calls. The run
machinery under both (run folder, resume, MLflow run, TorchTrainer, restore) is `runs.py`, shared with fine-tuning.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ajepa import storage
from ajepa.audio import apply_augmentation, normalize
from ajepa.config import Config, ConfigError
from ajepa.eval import EvalError, ProbeSet, load_probe_sets, probe
from ajepa.masking import tf_probability, validate_masks
from ajepa.models.ajepa import AJEPA
from ajepa.models.flops import device_peak_flops, masks_flops_split
from ajepa.storage import Location
from ajepa.train import runs, schedules
from ajepa.train.inputs import HostBatch, MicroBatch, Prefetcher, plan_step
from ajepa.train.runs import FAULT_ENV as FAULT_ENV  # re-exported: the run machinery's names, where they were
from ajepa.train.runs import RUN_FILE as RUN_FILE
from ajepa.train.runs import CheckpointError as CheckpointError
from ajepa.train.runs import local_checkpoints as local_checkpoints
from ajepa.train.runs import restore as restore

CHECKPOINT_FILE = "pretrain.pt"
ENCODER_FILE = "encoder.safetensors"


def patch_grid(cfg: Config) -> tuple[int, int]:
    return cfg.data.crop_frames // cfg.model.patch_size, cfg.audio.num_mel_bins // cfg.model.patch_size


class Pretrainer:
    """Model, EMA target, optimizer and the global step: one `train_step` per optimizer step."""

    checkpoint_file = CHECKPOINT_FILE

    def __init__(self, cfg: Config, mean: float, std: float, device: torch.device, rank: int = 0,
                 world_size: int = 1):
        self.cfg, self.mean, self.std = cfg, mean, std
        self.device, self.rank = device, rank
        self.grid = patch_grid(cfg)
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        self.model = AJEPA(cfg.model, cfg.audio.num_mel_bins, max_frames=cfg.data.crop_frames).to(device)
        if cfg.run.compile:
            self.model.compile_blocks(cfg.run.compile_mode)
        self.net: torch.nn.Module = self.model
        if world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.model.param_groups(cfg.optim.weight_decay[0]), lr=cfg.optim.lr,
                                           betas=cfg.optim.betas, fused=device.type == "cuda")
        self.amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        self.peak_flops = device_peak_flops(device)  # what MFU is measured against; None on a CPU
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
                    loss, aux = self.net(x, micro.context, micro.targets, micro.context_pad)
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
            "model_flops": sum(self.step_flops(m) for m in micro_batches),
        }
        lap("other")
        return info

    def step_flops(self, micro: MicroBatch) -> float:
        """Model FLOPs of one micro-batch on this rank, from its mask shapes. With mask.pad_context the padded
        context is counted: the model computes it."""
        per_clip = masks_flops_split(self.cfg.model, self.grid, micro.context, micro.targets)
        return micro.targets.shape[0] * sum(per_clip.values())

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

    def load(self, path: Path | Location) -> None:
        state = load_checkpoint(path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])


def load_checkpoint(path: Path | Location) -> dict[str, Any]:
    """Read a pretraining checkpoint safely (weights_only), with an error that names the file."""
    return runs.read_checkpoint(path, "pretraining", {"model", "optimizer", "step", "config"})


def _no_lap(phase: str) -> None:
    return None


# ------------------------------------------------------------------------------------------ Ray worker


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train

    worker = runs.worker_setup(config)
    cfg, rank, world, device, tracker = worker.cfg, worker.rank, worker.world, worker.device, worker.tracker
    trainer = Pretrainer(cfg, config["mean"], config["std"], device, rank, world)
    runs.restore(trainer, config["run_dir"], ray.train.get_checkpoint())
    probe_sets = load_probe_sets(config["eval_store"], cfg.eval.max_clips) if cfg.eval.every and rank == 0 else None
    batches = ((fbank, n_frames) for fbank, n_frames, _ in runs.host_batches(
        config, worker, start=trainer.step * cfg.optim.grad_accum))
    steps = trainer.prefetch(batches)
    total, accum = cfg.optim.steps, cfg.optim.grad_accum
    window, window_data = runs.LogWindow(cfg.data.batch_size * accum * world, trainer.peak_flops), 0.0
    while trainer.step < total:
        runs.maybe_fail(config, trainer.step, worker)
        step_info = trainer.train_step(next(steps))
        window.add(step_info.pop("model_flops"))
        window_data += step_info.pop("data_time")
        step = trainer.step
        log_now = step % cfg.run.log_every == 0 or step == total
        save_now = step % cfg.run.checkpoint_every == 0 or step == total
        probe_now = cfg.eval.every > 0 and (step % cfg.eval.every == 0 or step == total)
        if not (log_now or save_now or probe_now):
            continue
        metrics = {**trainer.metrics(), **step_info, "step": step, "data_time": window_data / window.steps,
                   **window.metrics()}
        if probe_sets is not None and probe_now:  # rank 0 only; the others wait at the next collective
            metrics.update(online_probe(trainer, probe_sets))
            metrics["probe/cost"] = metrics["probe/seconds"] / (cfg.eval.every * metrics["step_time"])
        if rank == 0:
            tracker.log_metrics(metrics, step)
            config["progress"].put(metrics)  # the driver prints it: workers' own output stays in Ray's logs
        runs.report(trainer, metrics, save_now and rank == 0, step, config["run_dir"], cfg.run.workers == 0)
        window.reset()
        window_data = 0.0
    steps.close()


def online_probe(trainer: Pretrainer, probe_sets: list[ProbeSet]) -> dict[str, float]:
    """The frozen-encoder probe of eval.py on the encoder being trained, at its current step."""
    cfg = trainer.cfg
    encoder = trainer.model.target_encoder if cfg.eval.encoder == "target" else trainer.model.context_encoder
    return probe(encoder, probe_sets, cfg.data.crop_frames, cfg.eval, trainer.device, cfg.data.normalize)


# -------------------------------------------------------------------------------------------- driver


@dataclass
class PretrainResult:
    """Where a run's outputs are: local paths or URIs (a `str()` of each is what to print)."""

    run_dir: Location
    name: str
    step: int
    metrics: dict[str, Any]
    checkpoint: Location
    encoder: Location
    mlflow_run_id: str
    tracking_uri: str
    store: Location


def _check_eval_store(cfg: Config, store: Location) -> Location | None:
    """The online probe's store (eval.store, else the training store), loaded once here so that a store
    without labels, or with a label set that differs between splits, stops the run before Ray starts."""
    if not cfg.eval.every:
        return None
    eval_store = storage.resolve(cfg.eval.store) if cfg.eval.store else store
    try:
        load_probe_sets(eval_store, cfg.eval.max_clips)
    except EvalError as exc:
        raise ConfigError(f"eval.every={cfg.eval.every}: {exc} (set eval.store to a labelled store, or "
                          "eval.every=0)") from None
    return eval_store


def run_pretrain(cfg: Config, *, store: str | Path | Location | None = None, resume: str | None = None,
                 overrides: list[str] = (), trial: runs.SweepTrial | None = None) -> PretrainResult:
    """Pretrain on Ray Train. Everything that can be checked is checked before a cluster is started, then that
    the cluster has room for the run's workers."""
    from ajepa import data
    from ajepa.masking import plot_mask_examples

    plan = runs.plan_run("pretrain", cfg, resume, overrides, trial)
    cfg = plan.cfg
    grid = patch_grid(cfg)
    validate_masks(cfg.mask, grid)
    store = runs.resumed_store(plan, store) if plan.resumed else runs.resolve_store(cfg, store)
    stats = data.read_stats(store)
    runs.check_store(cfg, stats, store, cfg.run.workers)
    eval_store = _check_eval_store(cfg, store)
    runs.check_cluster_room(plan)

    params = {"data.store_path": str(store), "data.train_clips": stats["counts"]["train"], "data.mean": stats["mean"],
              "data.std": stats["std"]}
    with runs.open_run(plan, store, params) as tracker:
        if not plan.resumed:
            with (store / "stats.json").local_copy() as stats_file:
                tracker.log_artifact(stats_file, "data")
            with (plan.run_dir / "masks.png").local_file() as masks:
                tracker.log_artifact(plot_mask_examples(cfg.mask, grid, masks))
        print(f"pretraining {plan.name}: {cfg.optim.steps} steps {runs.workers_text(cfg.run.workers)}, "
              f"data {store}{plan.resume_text()}", flush=True)
        loop_config = {"mean": stats["mean"], "std": stats["std"], "fbank_shape": data.fbank_shape(stats["audio"]),
                       "eval_store": eval_store}
        trained = runs.train(plan, train_loop_per_worker, loop_config, store, cfg.optim.steps, _progress_text,
                             lambda folder: load_checkpoint(folder / CHECKPOINT_FILE), tracker)
        encoder = plan.run_dir / ENCODER_FILE
        with encoder.local_file() as encoder_file:
            tracker.log_artifact(export_encoder(trained.state, encoder_file, stats))
    return PretrainResult(plan.run_dir, plan.name, int(trained.state["step"]), trained.metrics, trained.checkpoint,
                          encoder, plan.record["mlflow_run_id"], plan.record["tracking_uri"], store)


def _progress_text(m: dict[str, float]) -> str:
    return (f"loss {m['loss']:.4f}, lr {m['lr']:.2e}, {m['samples_per_s']:.1f} samples/s{runs.mfu_text(m)}"
            + _probe_text(m))


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


"""Fine-tuning (method.md §5): one optimizer step (`Finetuner`), the Ray Train loop around it, and the driver.

A pretrained encoder (the target, EMA, encoder by default) gets a mean-pool -> LayerNorm -> Linear head and is
trained end to end: AdamW with layer-wise lr decay, drop path, warm-up then cosine, SpecAugment time and
frequency masks, mixup, and a token regulariser (regularized masking by default). Cross-entropy for
single-label stores, one sigmoid per class (BCE) for multi-label ones; accuracy or mAP as eval.py scores them.
The run machinery (run folder, resume, checkpoints, faults, MLflow, progress) is `runs.py`'s, as pretraining's.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ajepa import storage
from ajepa.audio import apply_augmentation, draw_augmentation, normalize
from ajepa.config import Config, ConfigError
from ajepa.eval import EvalError, Labels, encode_labels, label_sets, mean_average_precision, score
from ajepa.models.classifier import Classifier, draw_token_masks
from ajepa.models.flops import classifier_flops, device_peak_flops
from ajepa.storage import Location
from ajepa.train import runs, schedules

CHECKPOINT_FILE = "finetune.pt"
MODEL_FILE = "model.safetensors"
EVAL_SPLITS = ("val", "test")


@dataclass(frozen=True)
class Task:
    """What the head predicts: the store's classes, whether a clip may carry several, and the loss."""

    classes: list[str]
    multi_label: bool
    loss: str  # ce | bce

    @property
    def metric(self) -> str:
        return "map" if self.multi_label else "acc"

    def targets(self, labels: list[str]) -> Tensor:
        """Class indices for ce, a 0/1 matrix for bce."""
        encoded = encode_labels(labels, self.classes, self.multi_label)
        if self.loss == "bce" and not self.multi_label:
            return F.one_hot(encoded.targets, len(self.classes)).float()
        return encoded.targets

    def labels(self, labels: list[str]) -> Labels:
        return encode_labels(labels, self.classes, self.multi_label)


def spec_augment(x: Tensor, time_mask: int, freq_mask: int, generator: torch.Generator) -> Tensor:
    """One time and one frequency mask per clip (SpecAugment, as AudioMAE fine-tunes): widths uniform in
    [0, max], positions uniform; masked values set to 0, the mean of normalised input."""
    b, frames, bins = x.shape
    keep = torch.ones(b, frames, bins, dtype=torch.bool)
    for dim, size, most in ((1, frames, time_mask), (2, bins, freq_mask)):
        if most <= 0:
            continue
        width = torch.randint(0, min(most, size) + 1, (b,), generator=generator)
        start = (torch.rand(b, generator=generator) * (size - width + 1)).floor().long()
        pos = torch.arange(size)[None, :]
        hit = (pos >= start[:, None]) & (pos < (start + width)[:, None])  # (B, size)
        keep &= ~(hit[:, :, None] if dim == 1 else hit[:, None, :])
    return x * keep.to(x.device)


class Finetuner:
    """Classifier, optimizer and the global step: one `train_step` per optimizer step, Ray-free."""

    checkpoint_file = CHECKPOINT_FILE

    def __init__(self, cfg: Config, task: Task, mean: float, std: float, device: torch.device,
                 encoder_state: dict[str, Tensor] | None = None, rank: int = 0, world_size: int = 1):
        self.cfg, self.task, self.mean, self.std = cfg, task, mean, std
        self.device, self.rank = device, rank
        ft = cfg.finetune
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank (and the same random init)
        model_cfg = dataclasses.replace(cfg.model, drop_path=ft.drop_path)
        self.model = Classifier(model_cfg, len(task.classes), cfg.audio.num_mel_bins, cfg.data.crop_frames,
                                ft.head_norm)
        if encoder_state is not None:
            self.model.encoder.load_state_dict(encoder_state)
        self.model.to(device)
        self.net: torch.nn.Module = self.model
        if world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = torch.optim.AdamW(self.model.param_groups(ft.weight_decay, ft.layer_decay), lr=ft.lr,
                                           betas=cfg.optim.betas, fused=device.type == "cuda")
        self.amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        self.peak_flops = device_peak_flops(device)  # what MFU is measured against; None on a CPU
        self.step = 0
        self.best = {"value": float("-inf"), "step": 0}  # best val metric so far; checkpointed with the step
        self._losses: list[Tensor] = []

    def model_input(self, fbank: Tensor, n_frames: Tensor, generator: torch.Generator) -> Tensor:
        """Stored spectrograms -> the training input: random crop / roll / gain as pretraining draws them,
        normalised as the data section says, then SpecAugment."""
        data, ft = self.cfg.data, self.cfg.finetune
        aug = draw_augmentation(n_frames, fbank.shape[1], data.crop_frames, data.roll, data.gain_db, generator)
        x = apply_augmentation(fbank, aug.to(fbank.device))
        x = normalize(x, self.mean, self.std) if data.normalize else x
        return spec_augment(x, ft.time_mask, ft.freq_mask, generator)

    def train_step(self, fbank: Tensor, n_frames: Tensor, targets: Tensor) -> float:
        """One optimizer step; returns its model FLOPs on this rank. Every random draw comes from a generator
        seeded by (seed, step, rank), so a resumed run draws what the unbroken run would have."""
        ft = self.cfg.finetune
        seed = int(np.random.SeedSequence([self.cfg.run.seed, self.step, self.rank]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # drop path draws from torch's global generator(s)
        x = self.model_input(fbank, n_frames, generator)
        y = targets if self.task.loss == "bce" else F.one_hot(targets, len(self.task.classes)).float()
        if ft.mixup > 0:  # one weight per batch, each clip mixed with the clip at the mirrored position
            lam = float(np.random.default_rng(seed).beta(ft.mixup, ft.mixup))
            x, y = lam * x + (1 - lam) * x.flip(0), lam * y + (1 - lam) * y.flip(0)
        grid = (x.shape[1] // self.model.encoder.patch_embed.patch_size) * self.model.encoder.grid_f
        masks = draw_token_masks(ft.token_reg, ft.token_ratio, x.shape[0], grid, self.model.encoder.depth,
                                 ft.rm_per_layer, generator)
        self.set_schedules()
        self.model.train()
        with self.amp:
            logits = self.net(x.to(self.device), masks.to(self.device))
        loss = self.loss(logits.float(), y.to(self.device))
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._losses.append(loss.detach())
        self.step += 1
        tokens = masks.keep.shape[1] if masks.keep is not None else grid
        return x.shape[0] * classifier_flops(self.cfg.model, grid, tokens, len(self.task.classes))

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        if self.task.loss == "bce":
            return F.binary_cross_entropy_with_logits(logits, y)
        return F.cross_entropy(logits, y)  # y: (mixed) class probabilities

    def set_schedules(self) -> None:
        lr = schedules.learning_rate(self.step, self.cfg.finetune)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]

    def metrics(self) -> dict[str, float]:
        """Scalars since the last call; the one host sync of the logging interval happens here."""
        loss = float(torch.stack(self._losses).mean()) if self._losses else float("nan")
        self._losses.clear()
        return {"loss": loss, "lr": schedules.learning_rate(self.step - 1, self.cfg.finetune)}

    @torch.no_grad()
    def predict(self, fbank: np.ndarray, batch_size: int) -> Tensor:
        """(N, C) float32 scores of stored clips (sigmoid for bce, softmax for ce): crop at frame 0 (padded if
        shorter), normalised, full attention, no augmentation."""
        self.model.eval()
        crop, out = self.cfg.data.crop_frames, []
        for start in range(0, len(fbank), batch_size):
            x = torch.from_numpy(fbank[start:start + batch_size, :crop].astype(np.float32))
            x = F.pad(x, (0, 0, 0, crop - x.shape[1])).to(self.device)
            x = normalize(x, self.mean, self.std) if self.cfg.data.normalize else x
            with self.amp:
                logits = self.model(x).float()
            out.append((logits.sigmoid() if self.task.loss == "bce" else logits.softmax(-1)).cpu())
        self.model.train()
        return torch.cat(out)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                "config": self.cfg.to_dict(), "classes": self.task.classes, "best": dict(self.best)}

    def save(self, path: Path) -> None:
        torch.save(self.state_dict(), path)

    def load(self, path: Path | Location) -> None:
        state = load_checkpoint(path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.best = int(state["step"]), dict(state["best"])


def load_checkpoint(path: Path | Location) -> dict[str, Any]:
    """Read a fine-tuning checkpoint safely (weights_only), with an error that names the file."""
    return runs.read_checkpoint(path, "fine-tuning", {"model", "optimizer", "step", "config", "classes", "best"})


# ------------------------------------------------------------------------------------------ evaluation


@dataclass
class EvalSet:
    """The val and test splits in memory, for rank 0's evaluations."""

    fbank: dict[str, np.ndarray]
    labels: dict[str, Labels]

    @classmethod
    def load(cls, store: str | Location, task: Task) -> EvalSet:
        from ajepa.data import load_store

        arrays = {split: load_store(store, split) for split in EVAL_SPLITS}
        return cls({s: a.fbank for s, a in arrays.items()}, {s: task.labels(a.labels) for s, a in arrays.items()})


def evaluate(trainer: Finetuner, eval_set: EvalSet, split: str) -> tuple[float, Tensor]:
    scores = trainer.predict(eval_set.fbank[split], trainer.cfg.eval.batch_size)
    return score(scores, eval_set.labels[split]), scores


def class_report(scores: Tensor, labels: Labels) -> list[dict[str, Any]]:
    """Per class: support and, single-label, precision / recall / F1 of the arg-max; multi-label, its AP."""
    rows = []
    for c, name in enumerate(labels.classes):
        if labels.multi_label:
            positives = int(labels.targets[:, c].sum())
            ap = mean_average_precision(scores[:, c:c + 1], labels.targets[:, c:c + 1]) if positives else float("nan")
            rows.append({"class": name, "support": positives, "ap": ap})
            continue
        predicted, actual = scores.argmax(1) == c, labels.targets == c
        hits = int((predicted & actual).sum())
        precision = hits / int(predicted.sum()) if predicted.any() else 0.0
        recall = hits / int(actual.sum()) if actual.any() else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"class": name, "support": int(actual.sum()), "precision": precision, "recall": recall, "f1": f1})
    return rows


def format_report(rows: list[dict[str, Any]]) -> str:
    keys = [k for k in rows[0] if k != "class"]
    width = max(len("class"), *(len(r["class"]) for r in rows))
    lines = [f"{'class':<{width}}  " + "  ".join(f"{k:>9}" for k in keys)]
    for r in rows:
        lines.append(f"{r['class']:<{width}}  " + "  ".join(
            f"{r[k]:>9d}" if isinstance(r[k], int) else f"{r[k]:>9.3f}" for k in keys))
    return "\n".join(lines) + "\n"


def plot_confusion(scores: Tensor, labels: Labels, path: Path) -> Path:
    """Row-normalised confusion matrix of the test split (rows: true class, columns: predicted)."""
    import matplotlib

    matplotlib.use("Agg")  # workers have no display
    import matplotlib.pyplot as plt

    n = len(labels.classes)
    counts = torch.zeros(n, n)
    counts.index_put_((labels.targets, scores.argmax(1)), torch.ones(len(labels.targets)), accumulate=True)
    rates = counts / counts.sum(1, keepdim=True).clamp(min=1)
    size = 2 + 0.4 * n
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels.classes, rotation=90)
    ax.set_yticks(range(n), labels.classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            if counts[i, j]:
                ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def final_report(trainer: Finetuner, eval_set: EvalSet, tracker: Any) -> dict[str, float]:
    """Test metric of the final model, and its per-class report and confusion matrix as MLflow artifacts."""
    m = trainer.task.metric
    value, scores = evaluate(trainer, eval_set, "test")
    labels = eval_set.labels["test"]
    rows = class_report(scores, labels)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "per_class.txt").write_text(format_report(rows))
        tracker.log_artifact(Path(folder) / "per_class.txt", "test")
        tracker.log_dict({"metric": m, "value": value, "classes": rows}, "test/per_class.json")
        if not labels.multi_label:
            tracker.log_artifact(plot_confusion(scores, labels, Path(folder) / "confusion.png"), "test")
    return {f"test/{m}": value}


# ------------------------------------------------------------------------------------------ Ray worker


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train

    worker = runs.worker_setup(config)
    cfg, rank, world, device, tracker = worker.cfg, worker.rank, worker.world, worker.device, worker.tracker
    task = Task(**config["task"])
    trainer = Finetuner(cfg, task, config["mean"], config["std"], device, config["encoder_state"], rank, world)
    runs.restore(trainer, config["run_dir"], ray.train.get_checkpoint())
    eval_set = EvalSet.load(config["store"], task) if rank == 0 else None
    batches = runs.host_batches(config, worker, start=trainer.step, columns=("label",))
    ft, m = cfg.finetune, task.metric
    total, window = ft.steps, runs.LogWindow(cfg.data.batch_size * world, trainer.peak_flops)
    while trainer.step < total:
        runs.maybe_fail(config, trainer.step, worker)
        fbank, n_frames, columns = next(batches)
        window.add(trainer.train_step(fbank.to(device, non_blocking=True), n_frames,
                                      task.targets(list(columns["label"]))))
        step = trainer.step
        log_now = step % cfg.run.log_every == 0 or step == total
        save_now = step % cfg.run.checkpoint_every == 0 or step == total
        eval_now = step == total or (ft.eval_every > 0 and step % ft.eval_every == 0)
        if not (log_now or save_now or eval_now):
            continue
        metrics = {**trainer.metrics(), "step": step, **window.metrics()}
        if eval_set is not None and eval_now:  # rank 0 only; the others wait at the next collective
            value, _ = evaluate(trainer, eval_set, "val")
            if value > trainer.best["value"]:
                trainer.best = {"value": value, "step": step}
            metrics.update({f"val/{m}": value, f"val/best_{m}": trainer.best["value"],
                            "val/best_step": trainer.best["step"]})
            if step == total:
                metrics.update(final_report(trainer, eval_set, tracker))
        if rank == 0:
            tracker.log_metrics(metrics, step)
            config["progress"].put(metrics)  # the driver prints it: workers' own output stays in Ray's logs
        runs.report(trainer, metrics, save_now and rank == 0, step, config["run_dir"], cfg.run.workers == 0)
        window.reset()


# -------------------------------------------------------------------------------------------- driver


@dataclass
class FinetuneResult:
    """Where a run's outputs are: local paths or URIs (a `str()` of each is what to print)."""

    run_dir: Location
    name: str
    step: int
    metrics: dict[str, Any]
    checkpoint: Location
    model: Location
    source: str
    mlflow_run_id: str
    tracking_uri: str
    store: Location


def task_of(cfg: Config, store: Location) -> Task:
    """The store's classes and label kind, checked on every split, and the loss the config asks for."""
    from ajepa.data import StoreError, read_labels

    try:
        labels = {split: read_labels(store, split) for split in ("train", *EVAL_SPLITS)}
    except StoreError as exc:
        raise EvalError(f"{exc}; fine-tuning needs train, val and test clips") from None
    classes, multi = label_sets(labels, str(store))
    if multi and cfg.finetune.loss == "ce":
        raise ConfigError(f"finetune.loss: ce takes one label per clip, but {store} is multi-label (labels a;b): "
                          "use bce or auto")
    loss = cfg.finetune.loss if cfg.finetune.loss != "auto" else ("bce" if multi else "ce")
    return Task(classes, multi, loss)


def pretrained_encoder(cfg: Config, checkpoint: str) -> tuple[dict[str, Tensor] | None, str, str]:
    """The encoder weights fine-tuning starts from, where they came from, and the file they were read from (a run
    resolves to its newest checkpoint, which later steps of that run would change; `none` stays `none`). `none`: a
    random init (the from-scratch baseline). A checkpoint of another model size than the config's is an error
    naming the fields."""
    from ajepa.eval import load_encoder

    if checkpoint == "none":
        return None, f"none (random init, seed {cfg.run.seed})", "none"
    loaded = load_encoder(checkpoint, storage.resolve(cfg.run.out_dir), cfg.finetune.encoder)
    encoder, block = loaded.encoder, loaded.encoder.blocks[0]
    theirs = {"model.embed_dim": encoder.embed_dim, "model.depth": encoder.depth,
              "model.num_heads": block.attn.num_heads, "model.patch_size": encoder.patch_embed.patch_size,
              "model.mlp_ratio": block.mlp.fc1.out_features / encoder.embed_dim,
              "audio.num_mel_bins": encoder.grid_f * encoder.patch_embed.patch_size}
    ours = {"model.embed_dim": cfg.model.embed_dim, "model.depth": cfg.model.depth,
            "model.num_heads": cfg.model.num_heads, "model.patch_size": cfg.model.patch_size,
            "model.mlp_ratio": cfg.model.mlp_ratio, "audio.num_mel_bins": cfg.audio.num_mel_bins}
    differ = [f"{k}: config {ours[k]}, checkpoint {theirs[k]}" for k in ours if ours[k] != theirs[k]]
    if differ:
        raise ConfigError(f"--checkpoint {checkpoint}: {loaded.source} is another model size than the config's "
                          f"({'; '.join(differ)}); fine-tune with the config it was pretrained with")
    return encoder.state_dict(), loaded.source, str(loaded.file)


def recorded_checkpoint(checkpoint: str) -> str:
    """--checkpoint as run.json records it: a local path made absolute, so that --resume finds it from any working
    directory; a run name, a URI or `none` as given."""
    local = not storage.is_uri(checkpoint) and Path(checkpoint).exists()
    return str(Path(checkpoint).absolute()) if local else checkpoint


def run_finetune(cfg: Config, checkpoint: str | None = None, *, store: str | Path | Location | None = None,
                 resume: str | None = None, overrides: list[str] = (),
                 trial: runs.SweepTrial | None = None) -> FinetuneResult:
    """Fine-tune on Ray Train. The checkpoint, the store's labels and the loss are checked before Ray starts, then
    that the cluster has room for the run's workers."""
    from ajepa import data

    plan = runs.plan_run("finetune", cfg, resume, overrides, trial)
    cfg = plan.cfg
    if plan.resumed:
        store = runs.resumed_store(plan, store)
        if checkpoint is not None and recorded_checkpoint(checkpoint) != plan.record["checkpoint"]:
            raise ConfigError(f"--resume {plan.name}: --checkpoint {checkpoint} is not the encoder the run started "
                              f"from ({plan.record['checkpoint']}); a resumed run keeps it")
        checkpoint = plan.record.get("encoder", plan.record["checkpoint"])  # the file it started from
        if plan.start_step and checkpoint != "none" and not storage.resolve(checkpoint).exists():
            # Deleted since (a pretraining run keeps its newest checkpoints only): the run's own checkpoint holds
            # every weight it resumes with, so the encoder is only checked, as it was named.
            checkpoint = plan.record["checkpoint"]
    if checkpoint is None:
        raise ConfigError("--checkpoint is required: a pretraining run, checkpoint or encoder export, or none (the "
                          "from-scratch baseline)")
    encoder_state, source, encoder_file = pretrained_encoder(cfg, checkpoint)  # before a demo store is built
    if not plan.resumed:
        store = runs.resolve_store(cfg, store)
    stats = data.read_stats(store)
    runs.check_store(cfg, stats, store, cfg.run.workers)
    task = task_of(cfg, store)
    train_files = data.train_files(store, cfg.finetune.train_fraction)
    if (clips := sum(train_files.rows)) < cfg.data.batch_size * max(cfg.run.workers, 1):
        raise ConfigError(f"finetune.train_fraction: {cfg.finetune.train_fraction} of {store}'s train clips is "
                          f"{clips}, less than one batch of {cfg.data.batch_size} on each of "
                          f"{max(cfg.run.workers, 1)} workers")
    runs.check_cluster_room(plan)

    params = {"checkpoint": source, "data.store_path": str(store), "data.train_clips": clips,
              "data.mean": stats["mean"], "data.std": stats["std"], "classes": len(task.classes),
              "multi_label": task.multi_label, "finetune.loss_used": task.loss}
    record = {"checkpoint": recorded_checkpoint(checkpoint), "encoder": encoder_file}
    with runs.open_run(plan, store, params, record) as tracker:
        subset = "" if train_files.keep is None else f" ({clips} of its {stats['counts']['train']} train clips)"
        print(f"fine-tuning {plan.name}: {cfg.finetune.steps} steps {runs.workers_text(cfg.run.workers)}, "
              f"{len(task.classes)} classes ({task.metric}), encoder {source}, data {store}{subset}"
              f"{plan.resume_text()}", flush=True)
        loop_config = {"mean": stats["mean"], "std": stats["std"], "fbank_shape": data.fbank_shape(stats["audio"]),
                       "store": store, "task": dataclasses.asdict(task), "encoder_state": encoder_state}
        trained = runs.train(plan, train_loop_per_worker, loop_config, store, cfg.finetune.steps, _progress_text,
                             lambda folder: load_checkpoint(folder / CHECKPOINT_FILE), tracker, train_files)
        model = plan.run_dir / MODEL_FILE
        with model.local_file() as model_file:
            tracker.log_artifact(export_model(trained.state, task, model_file, stats))
    return FinetuneResult(plan.run_dir, plan.name, int(trained.state["step"]), trained.metrics, trained.checkpoint,
                          model, source, plan.record["mlflow_run_id"], plan.record["tracking_uri"], store)


def _progress_text(m: dict[str, float]) -> str:
    text = f"loss {m['loss']:.4f}, lr {m['lr']:.2e}, {m['samples_per_s']:.1f} samples/s{runs.mfu_text(m)}"
    for split in EVAL_SPLITS:
        for metric in ("acc", "map"):
            if f"{split}/{metric}" in m:
                text += f", {split} {metric} {100 * m[f'{split}/{metric}']:.1f}%"
    return text


def export_model(state: dict[str, Any], task: Task, path: Path, stats: dict[str, Any]) -> Path:
    """The fine-tuned classifier's weights as safetensors, with what using it needs in the metadata: the model
    config, its head norm, the classes and label kind, and the input settings (store audio config, mean/std, crop,
    normalise)."""
    from safetensors.torch import save_file

    data_cfg = state["config"]["data"]
    spec = {"audio": stats["audio"], "mean": stats["mean"], "std": stats["std"],
            "crop_frames": data_cfg["crop_frames"], "normalize": data_cfg["normalize"]}
    weights = {k: v.contiguous() for k, v in state["model"].items()}
    save_file(weights, str(path), metadata={"config": json.dumps(state["config"]["model"]), "step": str(state["step"]),
                                            "head_norm": state["config"]["finetune"]["head_norm"],
                                            "task": json.dumps(dataclasses.asdict(task)), "input": json.dumps(spec)})
    return path

"""Frozen-encoder evaluation (method.md §5): embeddings, a linear probe and cosine kNN, accuracy or mAP.

One protocol for every encoder, random or pretrained, so that their numbers compare:
- each clip is cropped at frame 0 to the encoder's input length, normalised with its store's statistics,
  encoded, and its tokens averaged over the time patches that hold real (not padded) frames: over all of them
  (`eval.pool` mean), or over time within each frequency row, the rows concatenated (freq);
- linear probe: logistic regression on standardised features (softmax for single-label tasks, one sigmoid
  per class for multi-label ones), full-batch L-BFGS from zeros, so it is deterministic. The L2 strength is
  chosen on val from `L2_GRID`, then the probe is refitted on train + val and scored on test;
- kNN: cosine similarity to the train + val clips, the k nearest vote with weights (1 + similarity) / 2;
- single-label tasks report accuracy, multi-label ones (labels `a;b`) mean average precision.

Pure torch on arrays: the offline job (`run_evaluate`) and the online probe during pretraining share it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ajepa import storage
from ajepa.audio import normalize
from ajepa.config import Config, EvalConfig, config_from_dict
from ajepa.models.vit import VisionTransformer
from ajepa.storage import Location

if TYPE_CHECKING:  # data.py imports pyarrow, which the GPU benchmarks' machines need not have
    from ajepa.data import StoreArrays

L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # strongest last; ties on val go to the stronger one
SPLITS = ("train", "val", "test")


class EvalError(ValueError):
    """The store or the checkpoint cannot be evaluated; the message names it."""


# ------------------------------------------------------------------------------------------------ labels


@dataclass(frozen=True)
class Labels:
    """A labelled split: targets as class indices (single-label) or a 0/1 matrix (multi-label)."""

    classes: list[str]
    multi_label: bool
    targets: Tensor  # (N,) int64 or (N, C) float32


def label_sets(labels: dict[str, list[str]], store: str) -> tuple[list[str], bool]:
    """Classes (from train) and whether the task is multi-label; errors name the store and the split."""
    if not any(lab for lab in labels["train"]):
        raise EvalError(f"{store}: the train split has no labels; evaluation needs a labelled store")
    multi = any(";" in lab for split in labels.values() for lab in split)
    classes = sorted({c for lab in labels["train"] for c in lab.split(";") if c})
    for split, values in labels.items():
        unlabelled = sum(1 for lab in values if not lab)
        if unlabelled:
            raise EvalError(f"{store}: {unlabelled} clips of split {split} have no label")
        unknown = sorted({c for lab in values for c in lab.split(";")} - set(classes))
        if unknown:
            raise EvalError(f"{store}: split {split} has labels that train lacks: {', '.join(unknown[:5])}; "
                            "the label set must be the same in every split")
    return classes, multi


def encode_labels(values: list[str], classes: list[str], multi_label: bool) -> Labels:
    index = {c: i for i, c in enumerate(classes)}
    if multi_label:
        targets = torch.zeros(len(values), len(classes))
        for row, lab in enumerate(values):
            targets[row, [index[c] for c in lab.split(";")]] = 1.0
    else:
        targets = torch.tensor([index[lab] for lab in values], dtype=torch.int64)
    return Labels(classes, multi_label, targets)


# ------------------------------------------------------------------------------------------- embeddings


@torch.no_grad()
def embed(encoder: VisionTransformer, arrays: StoreArrays, crop_frames: int, mean: float, std: float,
          batch_size: int, device: torch.device, normalize_input: bool = True, pool: str = "mean") -> Tensor:
    """Clip embeddings: crop at 0 (pad if shorter), normalise (as the encoder was trained: `normalize_input`),
    encode, and average the tokens of the time patches that hold real frames (padding would pull every short
    clip towards one point). `pool` "mean": over those tokens, (N, D); "freq": over time within each frequency
    row, the rows concatenated, (N, Fp * D). Float32 on the CPU."""
    was_training = encoder.training
    encoder.eval()
    patch, grid_f = encoder.patch_embed.patch_size, encoder.grid_f
    out = []
    for start in range(0, len(arrays), batch_size):
        fbank = torch.from_numpy(arrays.fbank[start:start + batch_size, :crop_frames].astype(np.float32))
        if fbank.shape[1] < crop_frames:
            fbank = F.pad(fbank, (0, 0, 0, crop_frames - fbank.shape[1]))
        x = fbank.to(device)
        tokens = encoder(normalize(x, mean, std) if normalize_input else x)  # (B, Tp * Fp, D), time-major
        tokens = tokens.view(tokens.shape[0], -1, grid_f, tokens.shape[-1])
        real = torch.from_numpy(np.minimum(arrays.n_frames[start:start + batch_size], crop_frames))
        cols = ((real + patch - 1) // patch).clamp(min=1).to(device)  # time patches touching real frames
        keep = (torch.arange(tokens.shape[1], device=device)[None, :] < cols[:, None]).to(tokens.dtype)
        rows = (tokens * keep[:, :, None, None]).sum(1) / keep.sum(1)[:, None, None]  # (B, Fp, D)
        out.append((rows.mean(1) if pool == "mean" else rows.flatten(1)).float().cpu())
    encoder.train(was_training)
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------- metrics


def accuracy(scores: Tensor, targets: Tensor) -> float:
    return float((scores.argmax(1) == targets).double().mean())


def mean_average_precision(scores: Tensor, targets: Tensor) -> float:
    """Mean over classes with at least one positive of the average precision (the mean, over the positives,
    of the precision at each positive's rank when ranked by score)."""
    aps = []
    for c in range(targets.shape[1]):
        positives = targets[:, c] > 0
        if not positives.any():
            continue
        order = torch.argsort(scores[:, c], descending=True, stable=True)
        hits = positives[order].double()
        precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1, dtype=torch.float64)
        aps.append(float((precision * hits).sum() / hits.sum()))
    return float(np.mean(aps)) if aps else float("nan")


def score(scores: Tensor, labels: Labels) -> float:
    return mean_average_precision(scores, labels.targets) if labels.multi_label else accuracy(scores, labels.targets)


# -------------------------------------------------------------------------------------------------- probes


def _standardise(fit: Tensor, *others: Tensor) -> list[Tensor]:
    mu, sd = fit.mean(0), fit.std(0).clamp(min=1e-6)
    return [(x - mu) / sd for x in (fit, *others)]


def fit_logistic(x: Tensor, labels: Labels, l2: float, max_iter: int = 100) -> tuple[Tensor, Tensor]:
    """Weights (D, C) and bias (C,) minimising the mean log loss + l2/2 · |W|², by full-batch L-BFGS."""
    x = x.float()
    n_classes = len(labels.classes)
    w = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    y = labels.targets.float() if labels.multi_label else labels.targets
    loss_fn = F.binary_cross_entropy_with_logits if labels.multi_label else F.cross_entropy
    optimizer = torch.optim.LBFGS([w, b], max_iter=max_iter, tolerance_grad=1e-6, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = loss_fn(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return w.detach(), b.detach()


@dataclass(frozen=True)
class ProbeResult:
    test: float
    l2: float
    val_by_l2: dict[float, float]


def linear_probe(feats: dict[str, Tensor], labels: dict[str, Labels]) -> ProbeResult:
    """L2 chosen on val (train-fitted), then refit on train + val and scored on test."""
    train, val = _standardise(feats["train"], feats["val"])
    val_by_l2 = {}
    for l2 in L2_GRID:
        w, b = fit_logistic(train, labels["train"], l2)
        val_by_l2[l2] = score(val @ w + b, labels["val"])
    best = max(reversed(L2_GRID), key=lambda l2: val_by_l2[l2])  # reversed: ties go to the stronger L2
    fit_labels = _concat_labels(labels["train"], labels["val"])
    fit, test = _standardise(torch.cat([feats["train"], feats["val"]]), feats["test"])
    w, b = fit_logistic(fit, fit_labels, best)
    return ProbeResult(score(test @ w + b, labels["test"]), best, val_by_l2)


def knn_scores(bank: Tensor, bank_labels: Labels, queries: Tensor, k: int) -> Tensor:
    """(Q, C) votes of each query's k most cosine-similar bank clips, weighted by (1 + similarity) / 2."""
    sims = F.normalize(queries, dim=1) @ F.normalize(bank, dim=1).T
    top, idx = sims.topk(min(k, bank.shape[0]), dim=1)
    onehot = bank_labels.targets.float() if bank_labels.multi_label else F.one_hot(
        bank_labels.targets, len(bank_labels.classes)).float()
    return ((1 + top) / 2)[..., None].mul(onehot[idx]).sum(1)


def knn_probe(feats: dict[str, Tensor], labels: dict[str, Labels], k: int) -> float:
    bank = torch.cat([feats["train"], feats["val"]])
    return score(knn_scores(bank, _concat_labels(labels["train"], labels["val"]), feats["test"], k), labels["test"])


def _concat_labels(a: Labels, b: Labels) -> Labels:
    return Labels(a.classes, a.multi_label, torch.cat([a.targets, b.targets]))


# ------------------------------------------------------------------------------------------ the protocol


TASK_COLUMN = "task"  # a store whose rows carry it holds several tasks, each probed on its own


@dataclass(frozen=True)
class ProbeSet:
    """The labelled splits of one task of a store, in memory, with what embedding them needs."""

    store: str
    task: str  # "" when the store is one task
    arrays: dict[str, StoreArrays]
    labels: dict[str, Labels]
    mean: float
    std: float
    num_mel_bins: int

    @property
    def metric(self) -> str:
        return "map" if self.labels["train"].multi_label else "acc"

    @classmethod
    def load(cls, store: str | Path | Location, max_clips: int | None = None, task: str = "") -> ProbeSet:
        """The store's labelled splits (the rows of `task` only, when given); with `max_clips`, that many clips
        of each split, evenly spaced through it (a fixed set that spans the store's listing order, and so its
        classes). Labels are checked on the whole split first."""
        from ajepa.data import StoreError, load_store, read_labels, read_stats

        stats = read_stats(store)
        where = f"{store} (task {task})" if task else str(store)
        try:
            every = {split: read_labels(store, split) for split in SPLITS}
            tasks = {split: read_labels(store, split, TASK_COLUMN) if task else None for split in SPLITS}
        except StoreError as exc:
            raise EvalError(f"{exc}; a probe needs train, val and test clips") from None
        rows = {split: [i for i, t in enumerate(tasks[split]) if t == task] if task else list(range(len(labels)))
                for split, labels in every.items()}
        full = {split: [every[split][i] for i in r] for split, r in rows.items()}
        if not all(full.values()):
            empty = ", ".join(s for s, labels in full.items() if not labels)
            raise EvalError(f"{where}: no {empty} clips; a probe needs train, val and test clips")
        classes, multi = label_sets(full, where)
        picked = {split: _spread(r, max_clips) for split, r in rows.items()}
        arrays = {split: load_store(store, split, rows=None if len(r) == len(every[split]) else r)
                  for split, r in picked.items()}
        labels = {s: encode_labels(a.labels, classes, multi) for s, a in arrays.items()}
        return cls(str(store), task, arrays, labels, stats["mean"], stats["std"], stats["audio"]["num_mel_bins"])


def load_probe_sets(store: str | Path | Location, max_clips: int | None = None) -> list[ProbeSet]:
    """One ProbeSet per task of the store (by its `task` column), or one for the whole store."""
    from ajepa.data import read_labels, store_columns

    if TASK_COLUMN not in store_columns(store):
        return [ProbeSet.load(store, max_clips)]
    tasks = sorted(set(read_labels(store, None, TASK_COLUMN)))
    return [ProbeSet.load(store, max_clips, task) for task in tasks]


def _spread(rows: list[int], at_most: int | None) -> list[int]:
    """At most `at_most` of `rows`, evenly spaced through them."""
    if at_most is not None and len(rows) > at_most:
        rows = [rows[i] for i in np.unique(np.linspace(0, len(rows) - 1, at_most).round().astype(np.int64))]
    return rows


def probe(encoder: VisionTransformer, probe_sets: list[ProbeSet], crop_frames: int, cfg: EvalConfig,
          device: torch.device, normalize_input: bool = True) -> dict[str, float]:
    """`probe/linear_<metric>`, `probe/knn_<metric>` (test), `probe/linear_val_<metric>` (the train-fitted
    probe's val score at the chosen L2: what a sweep may select on without looking at test), the chosen L2 and
    the seconds it all took.

    With several tasks each is probed on its own (`probe/<task>/linear_acc`, ...) and the plain names hold
    the mean over tasks, the one number a sweep can rank trials by."""
    start = time.perf_counter()
    metrics: dict[str, float] = {}
    for probe_set in probe_sets:
        if probe_set.num_mel_bins != encoder.grid_f * encoder.patch_embed.patch_size:
            raise EvalError(f"{probe_set.store}: {probe_set.num_mel_bins} mel bins, the encoder takes "
                            f"{encoder.grid_f * encoder.patch_embed.patch_size}")
        feats = {s: embed(encoder, a, crop_frames, probe_set.mean, probe_set.std, cfg.batch_size, device,
                          normalize_input, cfg.pool) for s, a in probe_set.arrays.items()}
        linear = linear_probe(feats, probe_set.labels)
        m, prefix = probe_set.metric, f"probe/{probe_set.task}/" if probe_set.task else "probe/"
        metrics |= {f"{prefix}linear_{m}": linear.test, f"{prefix}knn_{m}": knn_probe(feats, probe_set.labels,
                                                                                      cfg.knn_k),
                    f"{prefix}linear_val_{m}": linear.val_by_l2[linear.l2], f"{prefix}linear_l2": linear.l2}
    if len(probe_sets) > 1 and len({p.metric for p in probe_sets}) == 1:
        for kind in ("linear", "knn", "linear_val"):
            values = [metrics[f"probe/{p.task}/{kind}_{p.metric}"] for p in probe_sets]
            metrics[f"probe/{kind}_{probe_sets[0].metric}"] = float(np.mean(values))
    metrics["probe/seconds"] = time.perf_counter() - start
    return metrics


# ----------------------------------------------------------------------------------------------- encoders


@dataclass
class LoadedEncoder:
    encoder: VisionTransformer
    crop_frames: int  # the input length the encoder was built (and trained) for
    normalize_input: bool  # whether training normalised its input (data.normalize)
    source: str  # what was loaded, for the table and MLflow
    step: int
    run_dir: Location | None  # the run (pretraining or fine-tuning) it came from, if any
    label: str  # a short name for it: the run's name, `random`, or the file's
    file: Location | None  # the file it was read from (a run resolved to its newest checkpoint); None: random


def random_encoder(cfg: Config) -> LoadedEncoder:
    """The encoder pretraining starts from: the same seed and construction as `Pretrainer`."""
    from ajepa.models.ajepa import AJEPA

    torch.manual_seed(cfg.run.seed)
    model = AJEPA(cfg.model, cfg.audio.num_mel_bins, max_frames=cfg.data.crop_frames)
    encoder = model.target_encoder if cfg.eval.encoder == "target" else model.context_encoder
    return LoadedEncoder(encoder, cfg.data.crop_frames, cfg.data.normalize, f"random init (seed {cfg.run.seed})",
                         0, None, "random", None)


def load_encoder(checkpoint: str, out: Location, which: str) -> LoadedEncoder:
    """The `which` (target or context) encoder of a pretraining run, or the encoder of a fine-tuning run: the run
    (its name under `out`, or its folder: its newest checkpoint), a checkpoint (`pretrain.pt`, `finetune.pt`, or
    its step folder) or an export (`encoder.safetensors`, `model.safetensors`); each a local path or a URI. Each
    carries its config, so the encoder is rebuilt at the size and input length it was trained with. A file in a
    run's folder is that run's (`run_dir`), whichever way it was named."""
    from ajepa.train import finetune, pretrain, runs

    checkpoint_files = (pretrain.CHECKPOINT_FILE, finetune.CHECKPOINT_FILE)
    path = storage.resolve(checkpoint)
    named = out / checkpoint if "/" not in checkpoint else None  # what a run's name would be
    if not path.exists() and named and (named / runs.RUN_FILE).exists():
        path = named
    if (path / runs.RUN_FILE).exists():  # a run: its newest step folder
        folders = runs.local_checkpoints(path)
        if not folders and "sweep" in json.loads((path / runs.RUN_FILE).read_text()):
            raise EvalError(f"{path}: a sweep, whose trials are the runs: name one ({path}/trial_<id>; its "
                            "results.csv lists them)")
        if not folders:
            raise EvalError(f"{path}: the run has no checkpoint yet")
        path = folders[-1]
    if path.is_dir():  # a step folder: the checkpoint in it
        path = next((path / f for f in checkpoint_files if (path / f).is_file()), path)
    if not path.is_file():
        looked = f", and for {named / runs.RUN_FILE}" if named else ""
        raise EvalError(f"--checkpoint {checkpoint}: no run, checkpoint or export there (looked for a run folder, a "
                        f"step folder, {' or '.join(checkpoint_files)} at {path}{looked})")
    run_dir = path.parent.parent if path.parent.name.startswith("step_") else path.parent
    run_dir = run_dir if (run_dir / runs.RUN_FILE).exists() else None
    label = run_dir.name if run_dir else path.name.split(".")[0]
    if path.name.endswith(".safetensors"):
        with path.local_copy() as local:
            return _load_export(local, which, path, run_dir, label)
    state = runs.read_checkpoint(path, "pretraining or fine-tuning", {"model", "optimizer", "step", "config"})
    cfg = config_from_dict(state["config"], source=str(path))
    fine_tuned = "classes" in state
    if fine_tuned and which != "target":
        raise EvalError(_one_encoder(str(path), "a fine-tuning checkpoint", which))
    prefix = "encoder." if fine_tuned else f"{which}_encoder."
    encoder = VisionTransformer(cfg.model, cfg.audio.num_mel_bins, cfg.data.crop_frames)
    try:
        encoder.load_state_dict({k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)})
    except RuntimeError as exc:
        raise EvalError(f"{path}: weights do not fit the encoder its config describes ({exc})") from None
    step = int(state["step"])
    kind = "fine-tuned" if fine_tuned else which
    return LoadedEncoder(encoder, cfg.data.crop_frames, cfg.data.normalize, f"{path} ({kind} encoder, step {step})",
                         step, run_dir, label, path)


def _load_export(path: Path, which: str, file: Location, run_dir: Location | None, label: str) -> LoadedEncoder:
    """The export at local `path`: `file` itself, or a local copy of a URI's file."""
    from ajepa.hear import HearError, load_model

    name = str(file)
    try:
        model = load_model(path)
    except HearError as exc:
        raise EvalError(str(exc).replace(str(path), name)) from None
    kind = "fine-tuned encoder" if model.fine_tuned else "exported target encoder"
    if which != "target":
        raise EvalError(_one_encoder(name, f"an export ({kind})", which))
    return LoadedEncoder(model.encoder, model.window_frames, model.normalize_input,
                         f"{name} ({kind}, step {model.step})", model.step, run_dir, label, file)


def _one_encoder(name: str, what: str, which: str) -> str:
    return (f"{name}: {what} holds one encoder; the {which} encoder is in pretraining checkpoints (pretrain.pt) "
            "only")


# ----------------------------------------------------------------------------------------------- the job


@dataclass
class EvaluateResult:
    metrics: dict[str, float]
    table: str
    results: Location
    mlflow_run_id: str
    tracking_uri: str


def format_table(loaded: LoadedEncoder, probe_sets: list[ProbeSet], metrics: dict[str, float], cfg: EvalConfig) -> str:
    pooling = "all real tokens" if cfg.pool == "mean" else "time, per frequency row (rows concatenated)"
    lines: list[str | tuple[str, float]] = [f"encoder: {loaded.source}", f"store:   {probe_sets[0].store}",
                                             f"pooled:  over {pooling}"]
    for p in probe_sets:
        m, prefix = p.metric, f"probe/{p.task}/" if p.task else "probe/"
        counts = ", ".join(f"{s} {len(a)}" for s, a in p.arrays.items())
        kind = "multi-label, mAP" if m == "map" else "accuracy"
        n_classes = len(p.labels["train"].classes)
        lines += [f"{'task ' + p.task if p.task else 'clips'}: {counts}; {n_classes} classes, {kind}",
                  (f"linear probe (L2 {metrics[prefix + 'linear_l2']:g} chosen on val)",
                   metrics[f"{prefix}linear_{m}"]),
                  (f"kNN (k={cfg.knn_k}, cosine)", metrics[f"{prefix}knn_{m}"])]
    width = max(len(line[0]) for line in lines if isinstance(line, tuple))  # the scores in one column
    return "\n".join(line if isinstance(line, str) else f"  {line[0]:<{width}}  {100 * line[1]:5.1f}%"
                     for line in lines)


def run_evaluate(cfg: Config, checkpoint: str, store: str | Path | Location | None = None) -> EvaluateResult:
    """Embed every split with a frozen encoder, probe it, print and log the result. Everything that can be
    checked (checkpoint, labels, splits) is checked before the encoder runs."""
    from ajepa import tracking
    from ajepa.train.runs import RUN_FILE, resolve_store

    out = storage.resolve(cfg.run.out_dir)
    loaded = random_encoder(cfg) if checkpoint == "random" else load_encoder(checkpoint, out, cfg.eval.encoder)
    probe_sets = load_probe_sets(resolve_store(cfg, store))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    parent = json.loads((loaded.run_dir / RUN_FILE).read_text()) if loaded.run_dir else None
    uri = parent["tracking_uri"] if parent else tracking.default_tracking_uri(out)
    name = f"evaluate-{time.strftime('%Y%m%d-%H%M%S')}-{loaded.label}"
    tracker = tracking.Tracker.start(uri, cfg.run.experiment, name, tags={"ajepa.job": "evaluate"},
                                     parent_run_id=parent["mlflow_run_id"] if parent else None)
    try:  # from here on a failure marks the MLflow run FAILED
        tracker.log_params({"checkpoint": loaded.source, "store": str(probe_sets[0].store),
                            "eval.encoder": cfg.eval.encoder, "eval.pool": cfg.eval.pool, "eval.knn_k": cfg.eval.knn_k,
                            **{f"classes{'.' + p.task if p.task else ''}": len(p.labels["train"].classes)
                               for p in probe_sets},
                            **{f"clips.{s}": sum(len(p.arrays[s]) for p in probe_sets) for s in SPLITS}})
        metrics = probe(loaded.encoder.to(device), probe_sets, loaded.crop_frames, cfg.eval, device,
                        loaded.normalize_input)
        tracker.log_metrics(metrics, loaded.step)
        table = format_table(loaded, probe_sets, metrics, cfg.eval)
        results = out / name / "results.json"
        with results.local_file() as results_file:
            results_file.write_text(json.dumps({"checkpoint": loaded.source, "store": probe_sets[0].store,
                                                "step": loaded.step, "metrics": metrics}, indent=2))
            tracker.log_artifact(results_file)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")
    return EvaluateResult(metrics, table, results, tracker.run_id, uri)

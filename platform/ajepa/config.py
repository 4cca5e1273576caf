"""Typed experiment configuration: dataclasses loaded from YAML, with `a.b=value` overrides.

Every field is validated on load; an unknown key or an out-of-range value raises `ConfigError` naming the
dotted key and the file it came from, before any Ray or torch work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or out of range; `key` is the section.key it is about, if one."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}", key)


def _check_range(key: str, pair: tuple[float, float], lo: float, hi: float) -> None:
    _check(len(pair) == 2 and lo <= pair[0] <= pair[1] <= hi, key,
           f"must be [min, max] with {lo} <= min <= max <= {hi}, got {list(pair)}")


@dataclass
class AudioConfig:
    """How audio becomes a spectrogram (method.md §1). Fixed per spectrogram store."""

    sample_rate: int = 16000
    num_mel_bins: int = 128
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    target_frames: int = 128  # frames stored per clip: pad with zeros or crop at 0

    def validate(self, prefix: str = "audio") -> None:
        _check(self.sample_rate >= 8000, f"{prefix}.sample_rate", f"must be >= 8000, got {self.sample_rate}")
        _check(self.num_mel_bins >= 16, f"{prefix}.num_mel_bins", f"must be >= 16, got {self.num_mel_bins}")
        _check(0 < self.frame_shift_ms <= self.frame_length_ms, f"{prefix}.frame_shift_ms",
               "must be > 0 and <= frame_length_ms")
        _check(self.target_frames >= 1, f"{prefix}.target_frames", f"must be >= 1, got {self.target_frames}")


@dataclass
class DataConfig:
    """What training reads from a spectrogram store and how it augments it."""

    store: str = ""  # path of a spectrogram store; empty means the built-in demo store
    crop_frames: int = 128  # frames fed to the model; random crop in pretraining, crop at 0 in evaluation
    batch_size: int = 32  # per worker
    # Rows shuffled together each epoch: whole files, grouped in the epoch's file order, read at once (order.py).
    # Small groups spread the reads over the epoch (a group as large as the split would read all of the next epoch
    # at this one's start) and bound a rank's memory: about three groups; 256 10 s clips are 64 MB.
    shuffle_window: int = 256
    normalize: bool = True  # (x - mean) / (2 * std) with the store's stats
    roll: bool = True  # random cyclic roll in time
    gain_db: float = 6.0  # uniform gain jitter in [-gain_db, +gain_db]

    def validate(self, prefix: str = "data") -> None:
        _check(self.crop_frames >= 1, f"{prefix}.crop_frames", f"must be >= 1, got {self.crop_frames}")
        _check(self.batch_size >= 1, f"{prefix}.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.shuffle_window >= 1, f"{prefix}.shuffle_window", f"must be >= 1, got {self.shuffle_window}")
        _check(0 <= self.gain_db <= 40, f"{prefix}.gain_db", f"must be in [0, 40], got {self.gain_db}")


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
ATTENTION_CHOICES = ("flash", "efficient", "cudnn", "math", "auto")
PRED_CONTEXTS = ("per_target", "shared")


@dataclass
class ModelConfig:
    """ViT context/target encoder and the narrow predictor (method.md §2)."""

    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    pred_dim: int = 512
    pred_depth: int = 16
    pred_heads: int = 16
    # per_target (method.md): the context rows run with each target block, attending to its mask tokens; shared:
    # once per clip, attending to the context only (31-35% fewer FLOPs for ViT-B, see models/vit.py Predictor).
    pred_context: str = "per_target"
    drop_path: float = 0.0
    loss: str = "mse"  # "mse" (paper) or "smooth_l1" (I-JEPA code)
    attention: str = "flash"  # SDPA kernels: flash | efficient | cudnn | math | auto (see models/vit.py)
    grad_checkpointing: bool = False  # recompute block activations in backward: less memory, ~1/3 more compute
    # Under autocast (bf16 on GPUs) keep the residual stream between blocks in bf16 rather than float32: the norms
    # and residual adds around the matmuls move half the bytes. No effect without autocast (CPU runs float32).
    autocast_residual: bool = False

    def validate(self, prefix: str = "model") -> None:
        for name in ("patch_size", "embed_dim", "depth", "num_heads", "pred_dim", "pred_depth", "pred_heads"):
            value = getattr(self, name)
            _check(value >= 1, f"{prefix}.{name}", f"must be >= 1, got {value}")
        _check(self.embed_dim % self.num_heads == 0, f"{prefix}.num_heads",
               f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        _check(self.pred_dim % self.pred_heads == 0, f"{prefix}.pred_heads",
               f"pred_dim {self.pred_dim} is not divisible by pred_heads {self.pred_heads}")
        _check(self.embed_dim % 4 == 0 and self.pred_dim % 4 == 0, f"{prefix}.embed_dim",
               "embed_dim and pred_dim must be divisible by 4 (2-D sin-cos positions)")
        _check(self.pred_context in PRED_CONTEXTS, f"{prefix}.pred_context",
               f"must be one of {', '.join(PRED_CONTEXTS)}, got {self.pred_context!r}")
        _check(self.mlp_ratio > 0, f"{prefix}.mlp_ratio", f"must be > 0, got {self.mlp_ratio}")
        _check(0 <= self.drop_path < 1, f"{prefix}.drop_path", f"must be in [0, 1), got {self.drop_path}")
        _check(self.loss in ("mse", "smooth_l1"), f"{prefix}.loss", f"must be mse or smooth_l1, got {self.loss!r}")
        _check(self.attention in ATTENTION_CHOICES, f"{prefix}.attention",
               f"must be one of {', '.join(ATTENTION_CHOICES)}, got {self.attention!r}")


MASK_SCHEDULES = ("curriculum", "rb", "tf", "mixture", "inverse", "random")
BLOCK_GEOMETRIES = ("normalised", "absolute")
TF_STRIPES = ("batch", "block")


@dataclass
class MaskConfig:
    """Mask families and the schedule that mixes them (method.md §3). Scales are fractions of all patches."""

    schedule: str = "curriculum"
    c0: float = 0.01  # curriculum competence at step 0
    mixture_tf_prob: float = 0.5  # P(TF) for the constant "mixture" schedule
    min_keep: int = 10  # fewest context patches
    context_scale: tuple[float, float] = (0.85, 1.0)
    rb_num_targets: int = 4
    rb_target_scale: tuple[float, float] = (0.15, 0.2)
    rb_aspect_ratio: tuple[float, float] = (0.75, 1.5)
    tf_num_targets: int = 3
    tf_target_scale: tuple[float, float] = (0.05, 0.075)
    tf_time_stripe_prob: float = 0.5  # else a frequency band
    tf_band_rows: tuple[int, int] = (1, 2)  # frequency rows of a band
    random_target_ratio: float = 0.5  # unstructured masking: fraction of patches that are targets
    # Block sides (RB targets, context block): normalised, from the scale per axis (method.md §3's choice), or
    # absolute, I-JEPA's arithmetic on the patch count as on a square grid (on 64x8 the context falls to ~13%).
    block_geometry: str = "normalised"
    # TF stripe kind: one for every target block of a batch, or one per block (time stripes and frequency bands
    # in one clip; each band then holds as many patches as a time stripe, so the blocks still stack).
    tf_stripes: str = "batch"
    # Contexts of a batch: truncated to the shortest (I-JEPA), or padded to the longest with a key mask that
    # hides the padding from every query in the context encoder and the predictor.
    pad_context: bool = False

    def validate(self, prefix: str = "mask") -> None:
        _check(self.schedule in MASK_SCHEDULES, f"{prefix}.schedule",
               f"must be one of {', '.join(MASK_SCHEDULES)}, got {self.schedule!r}")
        _check(0 < self.c0 <= 1, f"{prefix}.c0", f"must be in (0, 1], got {self.c0}")
        _check(0 <= self.mixture_tf_prob <= 1, f"{prefix}.mixture_tf_prob", "must be in [0, 1]")
        _check(self.min_keep >= 1, f"{prefix}.min_keep", f"must be >= 1, got {self.min_keep}")
        _check_range(f"{prefix}.context_scale", self.context_scale, 0.0, 1.0)
        _check(self.rb_num_targets >= 1, f"{prefix}.rb_num_targets", "must be >= 1")
        _check_range(f"{prefix}.rb_target_scale", self.rb_target_scale, 0.0, 1.0)
        _check_range(f"{prefix}.rb_aspect_ratio", self.rb_aspect_ratio, 1e-3, 1e3)
        _check(self.tf_num_targets >= 1, f"{prefix}.tf_num_targets", "must be >= 1")
        _check_range(f"{prefix}.tf_target_scale", self.tf_target_scale, 0.0, 1.0)
        _check(0 <= self.tf_time_stripe_prob <= 1, f"{prefix}.tf_time_stripe_prob", "must be in [0, 1]")
        _check_range(f"{prefix}.tf_band_rows", self.tf_band_rows, 1, 10_000)
        _check(0 < self.random_target_ratio < 1, f"{prefix}.random_target_ratio", "must be in (0, 1)")
        _check(self.block_geometry in BLOCK_GEOMETRIES, f"{prefix}.block_geometry",
               f"must be one of {', '.join(BLOCK_GEOMETRIES)}, got {self.block_geometry!r}")
        _check(self.tf_stripes in TF_STRIPES, f"{prefix}.tf_stripes",
               f"must be one of {', '.join(TF_STRIPES)}, got {self.tf_stripes!r}")


@dataclass
class OptimConfig:
    """AdamW and the schedules driven by the global step (method.md §4)."""

    steps: int = 1000  # total optimizer steps; every schedule is scaled to it
    lr: float = 2e-4
    warmup_fraction: float = 0.125  # of steps; ~3 of 24 epochs in the paper
    warmup_start_factor: float = 0.2
    final_lr: float = 1e-6
    weight_decay: tuple[float, float] = (0.04, 0.4)  # cosine from first to second
    ema_momentum: tuple[float, float] = (0.996, 1.0)  # linear from first to second
    betas: tuple[float, float] = (0.9, 0.999)
    grad_accum: int = 1
    clip_grad: float = 0.0  # 0 disables (the paper clips nothing)

    def validate(self, prefix: str = "optim") -> None:
        _check(self.steps >= 1, f"{prefix}.steps", f"must be >= 1, got {self.steps}")
        _check(self.lr > 0, f"{prefix}.lr", f"must be > 0, got {self.lr}")
        _check(0 <= self.warmup_fraction < 1, f"{prefix}.warmup_fraction", "must be in [0, 1)")
        _check(0 < self.warmup_start_factor <= 1, f"{prefix}.warmup_start_factor", "must be in (0, 1]")
        _check(0 <= self.final_lr <= self.lr, f"{prefix}.final_lr", "must be in [0, lr]")
        _check(all(w >= 0 for w in self.weight_decay), f"{prefix}.weight_decay", "must be >= 0")
        _check_range(f"{prefix}.ema_momentum", self.ema_momentum, 0.0, 1.0)
        _check(all(0 <= b < 1 for b in self.betas), f"{prefix}.betas", "must be in [0, 1)")
        _check(self.grad_accum >= 1, f"{prefix}.grad_accum", "must be >= 1")
        _check(self.clip_grad >= 0, f"{prefix}.clip_grad", "must be >= 0")


@dataclass
class RunConfig:
    """Where a run writes, how it is spread over Ray workers and how it reports."""

    name: str = ""  # empty: generated, unique per run
    out_dir: str = "runs"
    seed: int = 0
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    torch_threads: int = 0  # intra-op threads per CPU worker; 0: cpus_per_worker (rounded)
    compile: bool = False  # torch.compile each transformer block (dynamic shapes: lengths change every step)
    # inductor's mode for those blocks: max-autotune-no-cudagraphs benchmarks Triton GEMM templates, which can
    # take the GELU / bias / residual glue into the matmul (CUDA graphs are left out: lengths change every step)
    compile_mode: str = "default"
    checkpoint_every: int = 100
    log_every: int = 10
    max_failures: int = 0
    experiment: str = "ajepa"  # MLflow experiment name

    def validate(self, prefix: str = "run") -> None:
        _check(self.workers >= 0, f"{prefix}.workers", f"must be >= 0 (0 runs in-process), got {self.workers}")
        _check(self.gpus_per_worker >= 0, f"{prefix}.gpus_per_worker", "must be >= 0")
        _check(self.cpus_per_worker > 0, f"{prefix}.cpus_per_worker", "must be > 0")
        _check(self.torch_threads >= 0, f"{prefix}.torch_threads", "must be >= 0")
        _check(self.compile_mode in COMPILE_MODES, f"{prefix}.compile_mode",
               f"must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        _check(self.compile or self.compile_mode == "default", f"{prefix}.compile_mode",
               f"{self.compile_mode} needs run.compile: true")
        _check(self.checkpoint_every >= 1, f"{prefix}.checkpoint_every", "must be >= 1")
        _check(self.log_every >= 1, f"{prefix}.log_every", "must be >= 1")
        _check(self.max_failures >= -1, f"{prefix}.max_failures", "must be >= -1 (-1: unlimited)")


EVAL_POOLS = ("mean", "freq")


@dataclass
class EvalConfig:
    """Frozen-encoder evaluation (method.md §5): offline with jobs/evaluate.py, online during pretraining."""

    encoder: str = "target"  # target (EMA) or context
    # mean: over all real patch tokens (what the fine-tuning head pools). freq: over time within each frequency
    # row, the rows concatenated (Fp x D features, as MSM-MAE and M2D probe): keeps the spectral envelope that a
    # mean over frequency averages away, which a random encoder cannot recover and a trained one must learn.
    pool: str = "mean"
    knn_k: int = 5
    batch_size: int = 64  # clips per encoder call when embedding
    every: int = 0  # online probe every this many pretraining steps; 0 = off
    store: str = ""  # labelled store of the online probe; empty: the training store
    max_clips: int = 2000  # online probe: at most this many clips per split (the first ones, a fixed set)

    def validate(self, prefix: str = "eval") -> None:
        _check(self.encoder in ("target", "context"), f"{prefix}.encoder",
               f"must be target or context, got {self.encoder!r}")
        _check(self.pool in EVAL_POOLS, f"{prefix}.pool", f"must be one of {', '.join(EVAL_POOLS)}, got {self.pool!r}")
        _check(self.knn_k >= 1, f"{prefix}.knn_k", f"must be >= 1, got {self.knn_k}")
        _check(self.batch_size >= 1, f"{prefix}.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.every >= 0, f"{prefix}.every", f"must be >= 0 (0: off), got {self.every}")
        _check(self.max_clips >= 1, f"{prefix}.max_clips", f"must be >= 1, got {self.max_clips}")


TOKEN_REGULARIZERS = ("rm", "drop", "zero", "none")
FINETUNE_LOSSES = ("auto", "ce", "bce")
HEAD_NORMS = ("layernorm", "batchnorm")


@dataclass
class FinetuneConfig:
    """Fine-tuning a pretrained encoder with a classifier head (method.md §5): AudioMAE's recipe plus a token
    regulariser. The lr schedule is optim's (warm-up, then cosine) on these steps and peak lr; the optimizer
    takes optim.betas."""

    encoder: str = "target"  # which encoder of a pretraining checkpoint: target (EMA) or context
    steps: int = 1000
    lr: float = 1e-3  # peak lr of the head; layer l of an L-deep encoder gets lr * layer_decay^(L + 1 - l)
    warmup_fraction: float = 0.1
    warmup_start_factor: float = 0.01
    final_lr: float = 1e-6
    weight_decay: float = 1e-4  # constant; never on biases and norms
    layer_decay: float = 0.75
    drop_path: float = 0.1
    token_reg: str = "rm"  # rm (regularized masking), drop (remove tokens), zero (zero their patches), none
    token_ratio: float = 0.1  # ceil(token_ratio * N) of each clip's N patch tokens, redrawn every step
    rm_per_layer: bool = True  # rm: a new draw in every attention layer (else one draw for all layers)
    time_mask: int = 48  # SpecAugment: one time mask per clip of up to this many frames (0: off; at most the crop)
    freq_mask: int = 24  # SpecAugment: one frequency mask per clip of up to this many mel bins (0: off)
    mixup: float = 0.0  # mixup with weight ~ Beta(mixup, mixup) per batch (0: off)
    loss: str = "auto"  # ce (single-label), bce (one sigmoid per class), auto: bce for multi-label stores
    eval_every: int = 100  # val metric every this many steps, and at the end
    # layernorm: pool -> LayerNorm -> Linear (AudioMAE). batchnorm: each pooled feature first standardised over
    # the batch (running statistics at evaluation, no affine: MAE's linear-probe head). Mean-pooled features
    # share one large component that a per-clip LayerNorm keeps, which slows the head: on the demo store,
    # 1000 steps from scratch 17.1% -> 29.6% test, from the 1000-step encoder 11.8% -> 22.9%.
    head_norm: str = "layernorm"
    # Fine-tune on this fraction of each label's train clips (a fixed draw, data.SUBSET_SEED): the low-label
    # setting where a pretrained encoder has most to give. val and test stay whole.
    train_fraction: float = 1.0

    def validate(self, prefix: str = "finetune") -> None:
        _check(self.encoder in ("target", "context"), f"{prefix}.encoder",
               f"must be target or context, got {self.encoder!r}")
        _check(self.steps >= 1, f"{prefix}.steps", f"must be >= 1, got {self.steps}")
        _check(self.lr > 0, f"{prefix}.lr", f"must be > 0, got {self.lr}")
        _check(0 <= self.warmup_fraction < 1, f"{prefix}.warmup_fraction", "must be in [0, 1)")
        _check(0 < self.warmup_start_factor <= 1, f"{prefix}.warmup_start_factor", "must be in (0, 1]")
        _check(0 <= self.final_lr <= self.lr, f"{prefix}.final_lr", "must be in [0, lr]")
        _check(self.weight_decay >= 0, f"{prefix}.weight_decay", "must be >= 0")
        _check(0 < self.layer_decay <= 1, f"{prefix}.layer_decay", f"must be in (0, 1], got {self.layer_decay}")
        _check(0 < self.train_fraction <= 1, f"{prefix}.train_fraction",
               f"must be in (0, 1], got {self.train_fraction}")
        _check(0 <= self.drop_path < 1, f"{prefix}.drop_path", f"must be in [0, 1), got {self.drop_path}")
        _check(self.token_reg in TOKEN_REGULARIZERS, f"{prefix}.token_reg",
               f"must be one of {', '.join(TOKEN_REGULARIZERS)}, got {self.token_reg!r}")
        _check(0 < self.token_ratio < 1, f"{prefix}.token_ratio", f"must be in (0, 1), got {self.token_ratio}")
        _check(self.time_mask >= 0, f"{prefix}.time_mask", f"must be >= 0 (0: off), got {self.time_mask}")
        _check(self.freq_mask >= 0, f"{prefix}.freq_mask", f"must be >= 0 (0: off), got {self.freq_mask}")
        _check(self.mixup >= 0, f"{prefix}.mixup", f"must be >= 0 (0: off), got {self.mixup}")
        _check(self.loss in FINETUNE_LOSSES, f"{prefix}.loss",
               f"must be one of {', '.join(FINETUNE_LOSSES)}, got {self.loss!r}")
        _check(self.eval_every >= 0, f"{prefix}.eval_every",
               f"must be >= 0 (0: at the end only), got {self.eval_every}")
        _check(self.head_norm in HEAD_NORMS, f"{prefix}.head_norm",
               f"must be one of {', '.join(HEAD_NORMS)}, got {self.head_norm!r}")


@dataclass
class Config:
    audio: AudioConfig = field(default_factory=AudioConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)
        patch = self.model.patch_size
        _check(self.audio.num_mel_bins % patch == 0, "model.patch_size",
               f"num_mel_bins {self.audio.num_mel_bins} is not divisible by patch_size {patch}")
        _check(self.data.crop_frames % patch == 0, "data.crop_frames",
               f"{self.data.crop_frames} is not divisible by model.patch_size {patch}")
        _check(self.finetune.head_norm != "batchnorm" or self.data.batch_size >= 2, "finetune.head_norm",
               f"batchnorm standardises over a worker's batch: data.batch_size must be >= 2, got "
               f"{self.data.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts and lists (tuples become lists): safe for YAML, JSON, Ray and torch.load."""
        return _plain(dataclasses.asdict(self))

    def flat(self) -> dict[str, Any]:
        """`section.key -> value`, e.g. for MLflow params."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Turn a YAML value into the field's declared type, or raise naming the key."""
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        hint, origin = args[0], typing.get_origin(args[0])
    if origin is tuple:
        item_types = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(item_types):
            raise ConfigError(f"{key}: expected a list of {len(item_types)} values, got {value!r}", key)
        return tuple(_coerce(v, t, key) for v, t in zip(value, item_types, strict=True))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}", key)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}", key)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}", key)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}", key)
        return value
    raise ConfigError(f"{key}: unsupported field type {hint!r}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]} (known: {', '.join(sorted(names))})",
                          f"{where}{unknown[0]}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, key)
        else:
            kwargs[name] = _coerce(value, hint, key)
    return cls(**kwargs)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`optim.lr=1e-3` -> (["optim", "lr"], 0.001). Values are parsed as YAML scalars or lists."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {item!r}: key must be section.key, e.g. optim.lr")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
    # YAML 1.1 reads "1e-3" as a string; numbers in scientific notation are common in overrides.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    return parts, value


def config_from_dict(data: dict[str, Any], overrides: list[str] = (), source: str = "<dict>") -> Config:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in (data or {}).items()}
    overridden: dict[str, str] = {}  # section.key -> the override that set it last
    try:
        for item in overrides:
            (section, name), value = parse_override(item)
            if not isinstance(merged.setdefault(section, {}), dict):
                raise ConfigError(f"override {item!r}: {section} is not a section")
            merged[section][name] = value
            overridden[f"{section}.{name}"] = item
        cfg = _build(Config, merged, "")
        cfg.validate()
    except ConfigError as exc:
        # A value given as an override is named as such: the file is not where it is wrong.
        given = overridden.get(exc.key or "")
        where = ", ".join(filter(None, [source, given and f"override {given}"]))
        raise ConfigError(f"{where}: {exc}" if where else str(exc), exc.key) from None
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Load a YAML config (None: the built-in defaults) and apply `section.key=value` overrides.

    A config may start from another with `extends: <file>` (relative to its own folder): its sections are
    merged key by key over that file's, so a recipe states only what it changes."""
    if path is None:
        return config_from_dict({}, overrides, source="defaults")
    return config_from_dict(_read_yaml(Path(path), ()), overrides, source=str(path))


def _read_yaml(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict) or "extends" not in data:
        return data  # config_from_dict names what is wrong with a config that is not a mapping
    base = data.pop("extends")
    parent = (path.parent / str(base)).resolve()
    if parent in chain or parent == path.resolve():
        raise ConfigError(f"{path}: extends: {base} makes a loop")
    merged = _read_yaml(parent, (*chain, path.resolve()))
    for section, values in data.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

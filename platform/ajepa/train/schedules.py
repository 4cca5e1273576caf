"""Schedules driven by the one global optimizer step (method.md §4), so a resumed run continues them exactly."""

from __future__ import annotations

import math

from ajepa.config import FinetuneConfig, OptimConfig


def _progress(step: int, start: int, end: int) -> float:
    return min(max((step - start) / max(end - start, 1), 0.0), 1.0)


def warmup_steps(cfg: OptimConfig | FinetuneConfig) -> int:
    return int(round(cfg.warmup_fraction * cfg.steps))


def learning_rate(step: int, cfg: OptimConfig | FinetuneConfig) -> float:
    """Linear warm-up from warmup_start_factor x lr to lr, then cosine down to final_lr (pretraining's optim
    section, or fine-tuning's finetune section: the same fields)."""
    warm = warmup_steps(cfg)
    if step < warm:
        start = cfg.warmup_start_factor * cfg.lr
        return start + (cfg.lr - start) * step / warm
    t = _progress(step, warm, cfg.steps)
    return cfg.final_lr + 0.5 * (cfg.lr - cfg.final_lr) * (1.0 + math.cos(math.pi * t))


def weight_decay(step: int, cfg: OptimConfig) -> float:
    """Cosine from weight_decay[0] to weight_decay[1] over the whole run."""
    first, last = cfg.weight_decay
    t = _progress(step, 0, cfg.steps)
    return last + 0.5 * (first - last) * (1.0 + math.cos(math.pi * t))


def ema_momentum(step: int, cfg: OptimConfig) -> float:
    """Linear from ema_momentum[0] to ema_momentum[1] over the whole run."""
    first, last = cfg.ema_momentum
    return first + (last - first) * _progress(step, 0, cfg.steps)

"""A-JEPA: context encoder, EMA target encoder and predictor, with the feature-regression loss (method.md §2)."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ajepa.config import ModelConfig
from ajepa.models.vit import Predictor, VisionTransformer, apply_masks


def jepa_loss(pred: Tensor, target: Tensor, kind: str = "mse") -> Tensor:
    """Mean over tokens, features, blocks and batch; computed in float32 whatever the autocast dtype."""
    pred, target = pred.float(), target.float()
    if kind == "mse":
        return F.mse_loss(pred, target)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target)
    raise ValueError(f"unknown loss {kind!r} (mse or smooth_l1)")


class AJEPA(nn.Module):
    """Joint-embedding predictive model over spectrogram patches; only the context encoder and the
    predictor are trained, the target encoder follows them by `update_target`."""

    def __init__(self, cfg: ModelConfig, num_mel_bins: int = 128, max_frames: int = 1024):
        super().__init__()
        self.cfg = cfg
        self.context_encoder = VisionTransformer(cfg, num_mel_bins, max_frames)
        self.predictor = Predictor(cfg, num_mel_bins, max_frames)
        self.target_encoder = copy.deepcopy(self.context_encoder)
        self.target_encoder.requires_grad_(False)
        self.target_encoder.eval()
        # Module.to()/cuda() swap parameter data in place, so these lists stay valid after moving the model.
        online = dict(self.context_encoder.named_parameters())
        self._ema_target = list(self.target_encoder.parameters())
        self._ema_online = [online[name] for name, _ in self.target_encoder.named_parameters()]

    def train(self, mode: bool = True) -> AJEPA:
        super().train(mode)
        self.target_encoder.eval()  # targets never see drop path (or any other train-time noise)
        return self

    @torch.no_grad()
    def targets(self, x: Tensor, tgt_idx: Tensor) -> Tensor:
        """Target features (B, K, Nt, D): target encoder on all patches once per clip, parameter-free layer
        norm over features, gathered at each target block's indices."""
        b, k, nt = tgt_idx.shape
        h = self.target_encoder(x)
        h = F.layer_norm(h, (h.size(-1),))
        return apply_masks(h, tgt_idx.reshape(b, k * nt)).view(b, k, nt, -1)

    def forward(self, x: Tensor, ctx_idx: Tensor, tgt_idx: Tensor,
                ctx_pad: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """x (B, T, F) or (B, 1, T, F), ctx_idx (B, Nc), tgt_idx (B, K, Nt) -> (scalar loss, aux). ctx_pad (B, Nc),
        True where ctx_idx is padding (mask.pad_context): hidden as a key in the context encoder and predictor.

        aux holds detached monitors (no host sync): `target_std` / `pred_std`, the std of each feature
        across all target tokens of the batch, averaged over features; a collapsing model drives both to 0.
        """
        target = self.targets(x, tgt_idx)
        pred = self.predictor(self.context_encoder(x, keep=ctx_idx, key_mask=ctx_pad), ctx_idx, tgt_idx, ctx_pad)
        loss = jepa_loss(pred, target, self.cfg.loss)
        with torch.no_grad():
            aux = {
                "target_std": target.float().flatten(0, -2).std(0).mean(),
                "pred_std": pred.detach().float().flatten(0, -2).std(0).mean(),
            }
        return loss, aux

    def compile_blocks(self, mode: str = "default") -> None:
        """torch.compile every transformer block in inductor's `mode` (run.compile_mode), so norms, casts, GELU and
        residual adds fuse around the matmuls. Context and target lengths change every step, so shapes are compiled
        as dynamic once instead of recompiled per length. Blocks rather than the whole model: DDP still overlaps its
        all-reduce with the backward pass, and inductor (torch 2.14) fails on the whole forward with dynamic shapes."""
        for module in (self.context_encoder, self.target_encoder, self.predictor):
            for block in module.blocks:
                block.compile(dynamic=True, mode=mode)

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """θ̄ ← m·θ̄ + (1−m)·θ for every target-encoder parameter, as two fused multi-tensor ops."""
        torch._foreach_mul_(self._ema_target, momentum)
        torch._foreach_add_(self._ema_target, self._ema_online, alpha=1.0 - momentum)

    def _encoder(self, which: str) -> VisionTransformer:
        if which == "target":
            return self.target_encoder
        if which == "context":
            return self.context_encoder
        raise ValueError(f"which must be 'target' or 'context', got {which!r}")

    @torch.no_grad()
    def encode(self, x: Tensor, which: str = "target") -> Tensor:
        """All patch tokens (B, N, D) of one encoder, for probes. Call `eval()` first for the context one."""
        return self._encoder(which)(x)

    @torch.no_grad()
    def features(self, x: Tensor, which: str = "target") -> Tensor:
        """Mean-pooled clip embedding (B, D)."""
        return self.encode(x, which).mean(dim=1)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups over the trained parts. Biases, norms (all params with ndim <= 1) and the mask token
        get no decay; a weight-decay schedule should update only the group named "decay"."""
        decay, no_decay = [], []
        for module in (self.context_encoder, self.predictor):
            for name, param in module.named_parameters():
                if param.ndim <= 1 or name == "mask_token":
                    no_decay.append(param)
                else:
                    decay.append(param)
        return [
            {"name": "decay", "params": decay, "weight_decay": weight_decay},
            {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
        ]

"""Fine-tuning model (method.md §5): a pretrained ViT encoder, mean-pooled, [BatchNorm,] LayerNorm, Linear; the token
regularisers of training (regularized masking, token dropping, patch zeroing) and layer-wise lr decay groups.

Pure torch: the token draws take a generator, so the fine-tuning step can make them a function of
(seed, step, rank) and a resumed run redraws what the unbroken run drew.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ajepa.config import ModelConfig
from ajepa.models.vit import VisionTransformer

HEAD_INIT_STD = 2e-5  # AudioMAE / MAE: a near-zero head, so the first steps do not wreck the encoder


@dataclass(frozen=True)
class TokenMasks:
    """One batch's token regulariser; at most one field is set, none at evaluation.

    key_mask: (depth, B, N) or (B, N) bool, True = hidden as a key for every query (regularized masking);
    keep: (B, N - k) indices of the tokens that stay (dropping); zero: (B, N) bool, True = patch zeroed."""

    key_mask: Tensor | None = None
    keep: Tensor | None = None
    zero: Tensor | None = None

    def to(self, device: torch.device) -> TokenMasks:
        return TokenMasks(*(t.to(device) if t is not None else None for t in (self.key_mask, self.keep, self.zero)))


def hidden_count(n_tokens: int, ratio: float) -> int:
    """⌈ratio · N⌉ tokens, and never all of them (a query with no visible key has no attention output)."""
    return min(math.ceil(ratio * n_tokens), n_tokens - 1)


def draw_token_masks(kind: str, ratio: float, batch: int, n_tokens: int, depth: int, per_layer: bool,
                     generator: torch.Generator) -> TokenMasks:
    """Each clip's ⌈ratio · N⌉ regularised tokens, uniformly without replacement: for `rm` one draw per
    attention layer (`per_layer`) or one for all; for `drop` and `zero` one draw per clip."""
    if kind == "none":
        return TokenMasks()
    k = hidden_count(n_tokens, ratio)
    layers = depth if kind == "rm" and per_layer else 1
    order = torch.rand(layers, batch, n_tokens, generator=generator).argsort(-1)
    hidden = torch.zeros(layers, batch, n_tokens, dtype=torch.bool).scatter_(-1, order[..., :k], True)
    if kind == "rm":
        return TokenMasks(key_mask=hidden if per_layer else hidden[0])
    if kind == "drop":
        return TokenMasks(keep=order[0, :, k:].sort(-1).values)
    if kind == "zero":
        return TokenMasks(zero=hidden[0])
    raise ValueError(f"unknown token regulariser {kind!r} (rm, drop, zero or none)")


class Classifier(nn.Module):
    """Encoder -> mean over its patch tokens -> [BatchNorm without affine: `head_norm` batchnorm] -> LayerNorm ->
    Linear."""

    def __init__(self, cfg: ModelConfig, num_classes: int, num_mel_bins: int = 128, max_frames: int = 1024,
                 head_norm: str = "layernorm"):
        super().__init__()
        self.encoder = VisionTransformer(cfg, num_mel_bins, max_frames)
        self.feature_norm = nn.BatchNorm1d(cfg.embed_dim, affine=False) if head_norm == "batchnorm" else nn.Identity()
        self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.head = nn.Linear(cfg.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=HEAD_INIT_STD)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor, masks: TokenMasks | None = None) -> Tensor:
        """x (B, T, F) -> logits (B, C). `masks` (training only) regularises tokens; None is plain attention."""
        masks = masks or TokenMasks()
        if masks.zero is not None:
            x = x * ~self._patch_pixels(masks.zero, x.shape[1], x.shape[2])
        tokens = self.encoder(x, keep=masks.keep, key_mask=masks.key_mask)
        return self.head(self.fc_norm(self.feature_norm(tokens.mean(1))))

    def _patch_pixels(self, zero: Tensor, frames: int, bins: int) -> Tensor:
        """(B, N) patch flags -> (B, T, F) flags over each patch's spectrogram pixels."""
        p = self.encoder.patch_embed.patch_size
        grid = zero.view(zero.shape[0], frames // p, bins // p)
        return grid.repeat_interleave(p, 1).repeat_interleave(p, 2)

    def layer_id(self, name: str) -> int:
        """0 for the patch embedding, i + 1 for block i, depth + 1 for the norms and the head."""
        if name.startswith("encoder.patch_embed."):
            return 0
        if name.startswith("encoder.blocks."):
            return int(name.split(".")[2]) + 1
        return self.encoder.depth + 1

    def param_groups(self, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
        """AdamW groups by layer and decay: `lr_scale` layer_decay^(depth + 1 - layer) (BEiT's layer-wise lr
        decay: the head learns at the full lr, the patch embedding slowest); biases and norms (ndim <= 1)
        without weight decay."""
        top = self.encoder.depth + 1
        groups: dict[tuple[int, bool], dict[str, Any]] = {}
        for name, param in self.named_parameters():
            layer, decay = self.layer_id(name), param.ndim > 1
            group = groups.setdefault((layer, decay), {
                "name": f"layer{layer}.{'decay' if decay else 'no_decay'}", "params": [],
                "weight_decay": weight_decay if decay else 0.0, "lr_scale": layer_decay ** (top - layer)})
            group["params"].append(param)
        return [groups[key] for key in sorted(groups)]

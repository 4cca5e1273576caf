"""Model FLOPs of a training step, and the GPU peaks that model FLOPs utilisation (MFU) is measured against.

Only matmuls count, 2·m·n·k each; norms, softmax, GELU and losses are ignored. Backward is counted as twice the
forward for every trained part. With D = embed_dim, p = patch_size, L = depth, r = mlp_ratio:

    block(n, d) = 2·n·d·(4d + 2rd) + 4·n²·d       (qkv, out-projection, MLP; Q·Kᵀ and A·V)
    block(n, d, q) = 2·n·d·2d + 2·q·d·(2d + 2rd) + 4·q·n·d   (only q rows returned: keys and values of all n)
    encoder(N, n) = 2·N·p²·D + L·block(n, D)      (the patch conv runs on all N patches, the blocks on n tokens)
"""

from __future__ import annotations

import torch

from ajepa.config import ModelConfig

# Dense bf16 tensor-core peaks (no sparsity), by a fragment of torch.cuda.get_device_name; first match wins.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                   ("A100", 312e12))


def _block_flops(n: int, dim: int, mlp_ratio: float, queries: int | None = None) -> tuple[float, float]:
    """Forward matmul FLOPs of one transformer block on n tokens of width dim, returning `queries` rows (all n by
    default; Block's queries_from): (linear layers, attention)."""
    q = n if queries is None else queries
    hidden = mlp_ratio * dim
    linear = 2 * n * dim * 2 * dim + 2 * q * dim * (dim + dim + 2 * hidden)  # k, v; q, out-projection, fc1 + fc2
    attention = 2 * 2 * q * n * dim  # Q·Kᵀ and A·V over all heads
    return linear, attention


def _encoder_flops(cfg: ModelConfig, n_patches: int, n_tokens: int) -> tuple[float, float]:
    """Forward FLOPs of the ViT encoder that embeds n_patches and runs its blocks on n_tokens of them."""
    linear, attention = _block_flops(n_tokens, cfg.embed_dim, cfg.mlp_ratio)
    return 2 * n_patches * cfg.patch_size**2 * cfg.embed_dim + cfg.depth * linear, cfg.depth * attention


def flops_split(cfg: ModelConfig, grid_t: int, grid_f: int, n_ctx: int, n_tgt: int, k: int) -> dict[str, float]:
    """A-JEPA's training FLOPs of one clip per step: `linear` (patch embedding and every linear layer) and
    `attention` (Q·Kᵀ and A·V), so a profile can rate each kind's kernels. With N = grid_t·grid_f, P = pred_dim,
    Lp = pred_depth:

        context   = encoder(N, n_ctx)
        target    = encoder(N, N)                      (forward only: no gradient)
        predictor = 2·n_ctx·D·P + k·(Lp−1)·block(n, P) + k·block(n, P, n_tgt) + 2·k·n_tgt·P·D,  n = n_ctx + n_tgt
        total     = 3·(context + predictor) + target

    n_tgt is the patch count of one target block, k the number of blocks. The predictor's last block computes
    only the target rows it keeps. With model.pred_context=shared the predictor's blocks run on the context once
    and on the k blocks' rows, each of which attends to n = n_ctx + n_tgt keys: per block the linear layers of
    n_ctx + k·n_tgt rows (the last block's context rows: keys and values only) and attention of
    n_ctx² + k·n_tgt·n query-key pairs (the last block: k·n_tgt·n).
    """
    n = grid_t * grid_f
    d, p = cfg.embed_dim, cfg.pred_dim
    ctx_linear, ctx_attention = _encoder_flops(cfg, n, n_ctx)
    tgt_linear, tgt_attention = _encoder_flops(cfg, n, n)
    blocks = cfg.pred_depth - 1
    if cfg.pred_context == "shared":
        ctx_rows_linear, ctx_rows_attention = _block_flops(n_ctx, p, cfg.mlp_ratio)
        ctx_kv_linear, _ = _block_flops(n_ctx, p, cfg.mlp_ratio, queries=0)
        target_block_linear, target_block_attention = _block_flops(n_ctx + n_tgt, p, cfg.mlp_ratio, queries=n_tgt)
        target_block_linear -= ctx_kv_linear  # the keys and values of the context rows are computed once, above
        pred_linear = blocks * ctx_rows_linear + ctx_kv_linear + cfg.pred_depth * k * target_block_linear
        pred_attention = blocks * ctx_rows_attention + cfg.pred_depth * k * target_block_attention
    else:
        block_linear, block_attention = _block_flops(n_ctx + n_tgt, p, cfg.mlp_ratio)
        last_linear, last_attention = _block_flops(n_ctx + n_tgt, p, cfg.mlp_ratio, queries=n_tgt)
        pred_linear = k * (blocks * block_linear + last_linear)
        pred_attention = k * (blocks * block_attention + last_attention)
    trained_linear = ctx_linear + 2 * n_ctx * d * p + pred_linear + 2 * k * n_tgt * p * d
    trained_attention = ctx_attention + pred_attention
    return {"linear": float(3 * trained_linear + tgt_linear), "attention": float(3 * trained_attention + tgt_attention)}


def masks_flops_split(cfg: ModelConfig, grid: tuple[int, int], context: torch.Tensor,
                      targets: torch.Tensor) -> dict[str, float]:
    """`flops_split` per clip of a batch from its mask tensors, context (B, Nc) and targets (B, K, Nt): their
    shapes only, so device tensors cost no sync."""
    _, k, n_tgt = targets.shape
    return flops_split(cfg, *grid, context.shape[1], n_tgt, k)


def classifier_flops(cfg: ModelConfig, n_patches: int, n_tokens: int, num_classes: int) -> float:
    """The fine-tuning classifier's training FLOPs of one clip: 3·(encoder(N, n_tokens) + 2·D·classes), n_tokens
    below N when tokens are dropped (masked keys and zeroed patches cost the full N)."""
    linear, attention = _encoder_flops(cfg, n_patches, n_tokens)
    return float(3 * (linear + attention + 2 * cfg.embed_dim * num_classes))


def peak_bf16_flops(device_name: str) -> float | None:
    """The device's dense bf16 peak for model FLOPs utilisation; None for a device not in the table."""
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in device_name), None)


def device_peak_flops(device: torch.device) -> float | None:
    """The peak a training step on `device` is rated by: the bf16 peak of a GPU in the table (steps autocast to
    bf16 there); None on a CPU, which runs float32."""
    return peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None

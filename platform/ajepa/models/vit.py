"""ViT encoder and narrow predictor over 16x16 patches of a (time x mel) spectrogram (method.md §1-2).

Conventions: a spectrogram batch is (B, T, F) or (B, 1, T, F); its patch grid is (Tp, Fp) = (T/16, F/16) and
patch (t, f) has flat index t * Fp + f (a Conv2d output (B, D, Tp, Fp) flattened row-major). Because Fp is
fixed, the first Tp * Fp rows of a position table built for more time patches are exactly the positions of
a shorter input, so every module builds one table for `max_frames` and indexes into it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from ajepa.config import ModelConfig

_norm_layer = partial(nn.LayerNorm, eps=1e-6)  # method.md fixes the eps


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """(N,) positions -> (N, dim): sines in the first half of the channels, cosines in the second."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed_2d(dim: int, grid_t: int, grid_f: int) -> Tensor:
    """Fixed 2-D sine-cosine positions, (grid_t * grid_f, dim), row t * grid_f + f for patch (t, f).

    The first dim/2 channels encode the time index, the last dim/2 the frequency index.
    """
    if dim % 4:
        raise ValueError(f"dim must be divisible by 4 for 2-D sin-cos positions, got {dim}")
    t, f = torch.meshgrid(torch.arange(grid_t), torch.arange(grid_f), indexing="ij")
    emb = torch.cat([_sincos_1d(dim // 2, t.flatten()), _sincos_1d(dim // 2, f.flatten())], dim=1)
    return emb.float()


def apply_masks(x: Tensor, idx: Tensor) -> Tensor:
    """Gather tokens x (B, N, D) at indices idx (B, M) -> (B, M, D)."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.size(-1)))


class PatchEmbed(nn.Module):
    """Non-overlapping square patches of a one-channel spectrogram -> (B, Tp * Fp, D) tokens."""

    def __init__(self, embed_dim: int, patch_size: int = 16):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        return self.proj(x).flatten(2).transpose(1, 2)


# Allowed SDPA kernels per `model.attention`, best first. cuDNN attention builds an execution plan for each new
# sequence length, and masks change the context and target lengths every step: on an H100 that planning cost
# ~280 ms of CPU per two ViT-B steps. Flash has no per-shape planning; it takes no attention mask, so masked
# attention (regularized masking) falls to the memory-efficient kernel, and math is the last resort.
ATTENTION_BACKENDS: dict[str, list[SDPBackend] | None] = {
    "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
              SDPBackend.MATH],
    "math": [SDPBackend.MATH],
    "auto": None,  # PyTorch's own order
}


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    backends = ATTENTION_BACKENDS[name]
    with contextlib.nullcontext() if backends is None else sdpa_kernel(backends, set_priority=True):
        yield


class SharedLayout(NamedTuple):
    """The predictor's rows with model.pred_context=shared, one (rows, dim) tensor: B clips' contexts of Nc rows
    (clip-major), then K target blocks of Nt rows each, block j of clip i at position j*B + i."""

    b: int
    nc: int
    k: int
    nt: int


class DropPath(nn.Module):
    """Stochastic depth: each sample's residual branch is zeroed with probability p while training, and the kept
    ones are scaled by 1 / (1 - p), so the branch's expectation is unchanged."""

    def __init__(self, p: float):
        super().__init__()
        self.active = p > 0
        # The rate as a tensor, not a float: torch.compile specialises on a float attribute, so blocks with
        # rates that differ (they grow with depth) would each compile their own graph, past its recompile limit.
        self.register_buffer("keep", torch.tensor(1.0 - p), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or not self.active:
            return x
        return x * self.draw(x, x.size(0)).view(-1, *(1,) * (x.dim() - 1))

    def draw(self, like: Tensor, n: int) -> Tensor:
        """n samples' scales, in `like`'s dtype and device: 0 with probability p, else 1 / (1 - p)."""
        return like.new_empty(n).bernoulli_(self.keep).div_(self.keep)


class Attention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention (method.md §2), in the kernels that
    `attention_backend` allows; qkv is one projection with bias."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"the width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, h: Tensor, attn_mask: Tensor | None = None, queries_from: int = 0) -> Tensor:
        """h (B, N, D) -> (B, N - queries_from, D): rows queries_from.. attend to all N rows."""
        b, n, dim = h.shape
        if queries_from:
            q, kv = self.split_projection(h[:, queries_from:], h)
            (q,) = _by_head(q, b, n - queries_from, 1, self.num_heads)
            k, v = _by_head(kv, b, n, 2, self.num_heads)
        else:
            q, k, v = _by_head(self.qkv(h), b, n, 3, self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n - queries_from, dim))

    def split_projection(self, query_rows: Tensor, key_rows: Tensor) -> tuple[Tensor, Tensor]:
        """The qkv projection in two parts: queries of `query_rows`, keys and values of `key_rows`."""
        dim = self.proj.in_features
        q_weight, kv_weight = self.qkv.weight.split([dim, 2 * dim])
        q_bias, kv_bias = self.qkv.bias.split([dim, 2 * dim])
        return F.linear(query_rows, q_weight, q_bias), F.linear(key_rows, kv_weight, kv_bias)


class Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attention(LN(x))), then x + DropPath(Mlp(LN(x))); one drop-path
    draw per sample for each branch, attention's first.

    With `queries_from` it returns only rows `queries_from`.. of its output: the predictor keeps only its target
    rows, so its last block computes queries, the out-projection and the MLP for those rows alone (keys and
    values still come from every row).

    With `layout` (the predictor's model.pred_context=shared, see `SharedLayout`) x is the batch's rows in one
    (rows, dim) tensor: every clip's context once, then its target blocks; `attn_mask` is then a boolean key mask
    over the contexts, (B, 1, 1, Nc), True = may attend, and `queries_from` is 0 or B * Nc, the first target
    row: the last block returns the target rows only."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = _norm_layer(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = _norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, queries_from: int = 0,
                layout: SharedLayout | None = None) -> Tensor:
        if layout is not None:
            return self._shared_forward(x, attn_mask, layout, context_out=not queries_from)
        if queries_from and attn_mask is not None and attn_mask.size(-2) > 1:  # a mask per query: the kept rows'
            attn_mask = attn_mask[..., queries_from:, :]
        x = x[:, queries_from:] + self.drop_path(self.attn(self.norm1(x), attn_mask, queries_from))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def _shared_forward(self, x: Tensor, ctx_mask: Tensor | None, layout: SharedLayout, context_out: bool) -> Tensor:
        """Context rows attend to their clip's context; each target block's rows to that context and their own
        block. Norms, projections and the MLP run on all rows at once. Without `context_out` (the last block)
        only the target rows are computed past their keys and values, and returned."""
        attn = self.attn
        b, nc, k, nt = layout
        heads, ctx_rows, dim = attn.num_heads, b * nc, x.size(-1)
        h = self.norm1(x)
        if context_out:
            qkv = attn.qkv(h)
            query_ctx, key_ctx, value_ctx = _by_head(qkv[:ctx_rows], b, nc, 3, heads)
            query_tgt, key_tgt, value_tgt = _by_head(qkv[ctx_rows:], k * b, nt, 3, heads)
        else:
            q, kv = attn.split_projection(h[ctx_rows:], h)
            (query_tgt,) = _by_head(q, k * b, nt, 1, heads)
            key_ctx, value_ctx = _by_head(kv[:ctx_rows], b, nc, 2, heads)
            key_tgt, value_tgt = _by_head(kv[ctx_rows:], k * b, nt, 2, heads)
        # Target block j of clip i is batch row j*B + i: its keys are clip i's context, then its own rows (one
        # copy: concatenated as (K, B, ...) and flattened as a view).
        keys, values = (torch.cat([ctx.expand(k, *ctx.shape), tgt.view(k, b, heads, nt, -1)], dim=3).flatten(0, 1)
                        for ctx, tgt in ((key_ctx, key_tgt), (value_ctx, value_tgt)))
        tgt_mask = None
        if ctx_mask is not None:
            tgt_mask = torch.cat([ctx_mask.expand(k, *ctx_mask.shape), ctx_mask.new_ones(k, b, 1, 1, nt)],
                                 dim=-1).flatten(0, 1)
        out = F.scaled_dot_product_attention(query_tgt, keys, values, attn_mask=tgt_mask)
        out = out.transpose(1, 2).reshape(k * b * nt, dim)
        if context_out:
            ctx_out = F.scaled_dot_product_attention(query_ctx, key_ctx, value_ctx, attn_mask=ctx_mask)
            out = torch.cat([ctx_out.transpose(1, 2).reshape(ctx_rows, dim), out])
        else:
            x = x[ctx_rows:]
        attn_scale, mlp_scale = self._clip_scales(x, layout, context_out)
        x = x + _scaled(attn.proj(out), attn_scale)
        return x + _scaled(self.mlp(self.norm2(x)), mlp_scale)

    def _clip_scales(self, x: Tensor, layout: SharedLayout, context_out: bool) -> tuple[Tensor | None, Tensor | None]:
        """Drop path by clip, drawn as `forward` draws it for a (B, L, D) batch (one draw per clip for each
        residual branch, attention's first), each expanded to the clip's rows: its context, then its target
        blocks."""
        if not self.training or not self.drop_path.active:
            return None, None
        b, nc, k, nt = layout
        scales = []
        for _ in range(2):
            clip = self.drop_path.draw(x, b)
            rows = clip.repeat(k).repeat_interleave(nt)
            scales.append((torch.cat([clip.repeat_interleave(nc), rows]) if context_out else rows)[:, None])
        return scales[0], scales[1]


def _by_head(projection: Tensor, batch: int, length: int, parts: int, heads: int) -> tuple[Tensor, ...]:
    """A projection of batch x length rows holding `parts` tensors (q, k, v or some of them) -> each as
    (batch, heads, length, head_dim), the layout SDPA takes."""
    return projection.view(batch, length, parts, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def _scaled(branch: Tensor, scale: Tensor | None) -> Tensor:
    return branch if scale is None else branch * scale


def run_blocks(blocks: nn.ModuleList, x: Tensor, masks: list[Tensor | None], attention: str,
               grad_checkpointing: bool, last_queries_from: int = 0, layout: SharedLayout | None = None) -> Tensor:
    """The transformer blocks in order, under the chosen SDPA kernels; with `grad_checkpointing` (training
    only) each block's activations are recomputed in the backward pass instead of kept. With
    `last_queries_from`, the last block returns only the rows from that index on; `layout`: Block.forward's."""
    recompute = grad_checkpointing and torch.is_grad_enabled() and x.requires_grad
    last = len(blocks) - 1
    with attention_backend(attention):
        for i, (block, mask) in enumerate(zip(blocks, masks, strict=True)):
            queries_from = last_queries_from if i == last else 0
            if recompute:
                x = checkpoint(block, x, attn_mask=mask, queries_from=queries_from, layout=layout,
                               use_reentrant=False)
            else:
                x = block(x, attn_mask=mask, queries_from=queries_from, layout=layout)
    return x


def _make_blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float, drop_path: float) -> nn.ModuleList:
    rates = torch.linspace(0, drop_path, depth).tolist()
    return nn.ModuleList(
        Block(dim, num_heads, mlp_ratio=mlp_ratio, drop_path=rate) for rate in rates
    )


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _rescale_residuals(blocks: nn.ModuleList) -> None:
    # Keeps the residual stream's variance from growing with depth (I-JEPA / BEiT "fix_init_weight").
    for layer_id, block in enumerate(blocks, start=1):
        scale = 1.0 / math.sqrt(2.0 * layer_id)
        block.attn.proj.weight.data.mul_(scale)
        block.mlp.fc2.weight.data.mul_(scale)


def to_residual_dtype(x: Tensor, autocast_residual: bool) -> Tensor:
    """The residual stream's dtype: float32 from the position sums, or autocast's dtype with model.autocast_residual."""
    device = x.device.type
    if autocast_residual and torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x


def _key_attn_mask(key_mask: Tensor) -> Tensor:
    """(B, N) True = hidden key -> SDPA boolean mask (B, 1, 1, N), where True means "may attend"."""
    return ~key_mask[:, None, None, :]


class VisionTransformer(nn.Module):
    """Pre-norm ViT encoder without class token; returns all (or the kept) patch tokens after a LayerNorm."""

    def __init__(self, cfg: ModelConfig, num_mel_bins: int = 128, max_frames: int = 1024):
        super().__init__()
        p = cfg.patch_size
        self.embed_dim = cfg.embed_dim
        self.depth = cfg.depth
        self.attention, self.grad_checkpointing = cfg.attention, cfg.grad_checkpointing
        self.autocast_residual = cfg.autocast_residual
        self.grid_f = num_mel_bins // p
        self.max_grid_t = max_frames // p
        self.patch_embed = PatchEmbed(cfg.embed_dim, p)
        self.register_buffer(
            "pos_embed", sincos_pos_embed_2d(cfg.embed_dim, self.max_grid_t, self.grid_f), persistent=False
        )
        self.blocks = _make_blocks(cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio, cfg.drop_path)
        self.norm = _norm_layer(cfg.embed_dim)
        self.apply(_init_weights)
        _rescale_residuals(self.blocks)

    def forward(self, x: Tensor, keep: Tensor | None = None, key_mask: Tensor | None = None) -> Tensor:
        """x (B, T, F) or (B, 1, T, F) -> (B, N, D), N = Tp * Fp, or (B, M, D) for `keep` indices (B, M).

        key_mask: boolean over the encoded tokens (after `keep`), True = hidden as a key for every query
        (including itself); (B, N) applies to every layer, (depth, B, N) gives one mask per layer. Each query
        needs at least one visible key, otherwise its attention output is NaN.
        """
        x = self.patch_embed(x)
        n = x.size(1)
        if n > self.pos_embed.size(0):
            raise ValueError(f"{n} patches exceed the position table ({self.max_grid_t} time patches)")
        x = to_residual_dtype(x + self.pos_embed[:n], self.autocast_residual)
        if keep is not None:
            x = apply_masks(x, keep)
        masks: list[Tensor | None] = [None] * self.depth
        if key_mask is not None:
            if key_mask.dim() == 2:
                masks = [_key_attn_mask(key_mask)] * self.depth
            else:
                masks = [_key_attn_mask(m) for m in key_mask.unbind(0)]
        return self.norm(run_blocks(self.blocks, x, masks, self.attention, self.grad_checkpointing))


class Predictor(nn.Module):
    """Narrow transformer that predicts target-encoder features at target positions from context tokens.

    model.pred_context=per_target (method.md) runs the context with each target block in a sequence of its own,
    so the context rows attend to that block's mask tokens, and are computed K times. With `shared` each clip's
    context rows attend only to its context and are computed once; each block's mask tokens still attend to the
    context and their own block. The same parameters either way: a checkpoint loads into both."""

    def __init__(self, cfg: ModelConfig, num_mel_bins: int = 128, max_frames: int = 1024):
        super().__init__()
        p = cfg.patch_size
        self.shared_context = cfg.pred_context == "shared"
        self.attention, self.grad_checkpointing = cfg.attention, cfg.grad_checkpointing
        self.autocast_residual = cfg.autocast_residual
        self.embed = nn.Linear(cfg.embed_dim, cfg.pred_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.pred_dim))
        self.register_buffer(
            "pos_embed", sincos_pos_embed_2d(cfg.pred_dim, max_frames // p, num_mel_bins // p), persistent=False
        )
        self.blocks = _make_blocks(cfg.pred_dim, cfg.pred_depth, cfg.pred_heads, cfg.mlp_ratio, cfg.drop_path)
        self.norm = _norm_layer(cfg.pred_dim)
        self.proj = nn.Linear(cfg.pred_dim, cfg.embed_dim)
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        _rescale_residuals(self.blocks)

    def forward(self, ctx: Tensor, ctx_idx: Tensor, tgt_idx: Tensor, ctx_pad: Tensor | None = None) -> Tensor:
        """ctx (B, Nc, D) at patch indices ctx_idx (B, Nc); tgt_idx (B, K, Nt) -> predictions (B, K, Nt, D).
        ctx_pad (B, Nc): True where the context is padding, hidden as a key from every query."""
        b, k, nt = tgt_idx.shape
        nc = ctx.size(1)
        context = to_residual_dtype(self.embed(ctx) + self.pos_embed[ctx_idx], self.autocast_residual)
        tgt = tgt_idx.transpose(0, 1).reshape(k * b, nt)
        queries = self.mask_token + self.pos_embed[tgt]  # cast as it is written into x
        if self.shared_context:
            x = torch.cat([context.flatten(0, 1), queries.flatten(0, 1).to(context.dtype)])
            mask = None if ctx_pad is None else _key_attn_mask(ctx_pad)
            targets_from, layout = b * nc, SharedLayout(b, nc, k, nt)
        else:
            # All K target blocks in one pass: block j of the batch lives in rows j*B .. (j+1)*B - 1. Writing the
            # context into every block's rows by broadcasting saves the copies of repeat() followed by cat().
            x = context.new_empty(k * b, nc + nt, context.size(-1))
            x.view(k, b, nc + nt, -1)[:, :, :nc] = context
            x[:, nc:] = queries
            mask = None
            if ctx_pad is not None:  # every block's rows see their clip's padding; no target query is padding
                hidden = ctx_pad.new_zeros(k * b, nc + nt)
                hidden.view(k, b, nc + nt)[:, :, :nc] = ctx_pad
                mask = _key_attn_mask(hidden)
            targets_from, layout = nc, None
        # Only the target rows are kept, so the last block computes only theirs.
        x = run_blocks(self.blocks, x, [mask] * len(self.blocks), self.attention, self.grad_checkpointing,
                       last_queries_from=targets_from, layout=layout)
        return self.proj(self.norm(x)).view(k, b, nt, -1).transpose(0, 1)

"""ViT encoder, predictor and A-JEPA wrapper on a tiny model (CPU, seconds)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from ajepa.config import COMPILE_MODES, PRED_CONTEXTS, ModelConfig
from ajepa.models.ajepa import AJEPA, jepa_loss
from ajepa.models.flops import flops_split
from ajepa.models.vit import Block, DropPath, Predictor, VisionTransformer, apply_masks, sincos_pos_embed_2d
from torch import nn

TINY = ModelConfig(embed_dim=192, depth=2, num_heads=3, pred_dim=64, pred_depth=2, pred_heads=4)


def make_masks(b: int, grid: int, n_ctx: int, k: int, n_tgt: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Disjoint random context (B, n_ctx) and target (B, K, n_tgt) index sets."""
    gen = torch.Generator().manual_seed(seed)
    perms = torch.stack([torch.randperm(grid, generator=gen) for _ in range(b)])
    ctx = perms[:, :n_ctx]
    tgt = perms[:, n_ctx:n_ctx + k * n_tgt].reshape(b, k, n_tgt)
    return ctx, tgt


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("frames", [128, 512, 1024])
def test_shapes(frames: int) -> None:
    model = AJEPA(TINY)
    grid = (frames // 16) * 8
    x = torch.randn(2, frames, 128)
    ctx, tgt = make_masks(2, grid, grid // 2, 3, grid // 8)
    assert model.encode(x).shape == (2, grid, 192)
    assert model.encode(x.unsqueeze(1), which="context").shape == (2, grid, 192)
    assert model.features(x).shape == (2, 192)
    tokens = model.context_encoder(x, keep=ctx)
    assert tokens.shape == (2, grid // 2, 192)
    assert model.predictor(tokens, ctx, tgt).shape == (2, 3, grid // 8, 192)
    loss, aux = model(x, ctx, tgt)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert set(aux) == {"target_std", "pred_std"}


def test_pos_table_prefix() -> None:
    short, long = sincos_pos_embed_2d(64, 8, 8), sincos_pos_embed_2d(64, 64, 8)
    assert long.shape == (512, 64)
    torch.testing.assert_close(long[:64], short, rtol=0, atol=0)
    # Row t * Fp + f: time channels (first half) depend only on t, frequency channels only on f.
    grid = long.view(64, 8, 64)
    assert torch.equal(grid[:, :1, :32].expand(-1, 8, -1), grid[:, :, :32])
    assert torch.equal(grid[:1, :, 32:].expand(64, -1, -1), grid[:, :, 32:])
    # The encoder indexes its 1024-frame table, so a 128-frame input gets exactly the 8x8 table.
    encoder = VisionTransformer(TINY, max_frames=1024)
    torch.testing.assert_close(encoder.pos_embed[:64], sincos_pos_embed_2d(192, 8, 8), rtol=0, atol=0)
    assert "pos_embed" not in encoder.state_dict()


def test_apply_masks() -> None:
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    idx = torch.tensor([[4, 0], [1, 1]])
    out = apply_masks(x, idx)
    assert torch.equal(out[0], x[0, [4, 0]]) and torch.equal(out[1], x[1, [1, 1]])


@pytest.mark.parametrize("pred_context", PRED_CONTEXTS)
def test_predictor_blocks_are_independent(pred_context: str) -> None:
    """Batched K blocks equal running each block alone (no cross-talk between stacked blocks)."""
    pred = Predictor(dataclasses.replace(TINY, pred_context=pred_context)).eval()
    ctx_idx, tgt_idx = make_masks(2, 64, 20, 3, 6)
    ctx = torch.randn(2, 20, 192)
    out = pred(ctx, ctx_idx, tgt_idx)
    for j in range(3):
        alone = pred(ctx, ctx_idx, tgt_idx[:, j:j + 1])
        torch.testing.assert_close(out[:, j], alone[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_per", ["key", "query"])
def test_a_block_computes_only_the_rows_it_returns_and_they_equal_the_full_blocks(mask_per: str) -> None:
    """queries_from (the predictor's last block, which keeps only its target rows): the same rows, gradients and
    drop-path draws as the whole block, from fewer FLOPs (counted by torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    block = Block(64, 4, drop_path=0.5).train()
    x = torch.randn(6, 30, 64, requires_grad=True)
    hidden = torch.rand(6, 30 if mask_per == "key" else 30 * 30) < 0.3
    mask = ~hidden.view(6, 1, -1, 30)
    mask[..., 0] = True  # every query keeps a visible key
    weights = torch.randn(6, 18, 64)
    results = []
    for queries_from in (0, 12):
        torch.manual_seed(1)  # the same drop-path draws
        with FlopCounterMode(display=False) as flops:
            out = block(x, attn_mask=mask, queries_from=queries_from)[:, 12 - queries_from:]
            (out * weights).sum().backward()
        results.append((out.detach(), x.grad, [p.grad for p in block.parameters()], flops.get_total_flops()))
        x.grad = None
        block.zero_grad(set_to_none=True)
    (full, full_dx, full_grads, full_flops), (rows, dx, grads, row_flops) = results
    with torch.no_grad():
        undropped = block.eval()(x, attn_mask=mask)[:, 12:]
    assert not torch.allclose(full, undropped), "drop path drew nothing: the draws were not compared"
    torch.testing.assert_close(rows, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, full_dx, rtol=1e-5, atol=1e-5)
    for g, h in zip(grads, full_grads, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-5)
    # Linear-layer FLOPs (12·d² a row; the counter leaves SDPA out on a CPU): queries, out-projection and MLP
    # (10·d²) on the 18 returned rows, keys and values (2·d²) on all 30.
    assert row_flops / full_flops == pytest.approx((18 * 10 + 30 * 2) / (30 * 12))


def _masked_sequence_reference(pred: Predictor, ctx: torch.Tensor, ctx_idx: torch.Tensor, tgt_idx: torch.Tensor,
                               ctx_pad: torch.Tensor) -> torch.Tensor:
    """What model.pred_context=shared stands for, spelled out: one sequence per clip, its context and then all
    its target blocks, through the ordinary block with an explicit mask (context rows see the context; a
    target block's rows see the context and their own block; padding is seen by none)."""
    b, k, nt = tgt_idx.shape
    nc = ctx.size(1)
    x = torch.cat([pred.embed(ctx) + pred.pos_embed[ctx_idx], pred.mask_token + pred.pos_embed[tgt_idx.flatten(1)]],
                  dim=1)
    block_of = torch.cat([torch.full((nc,), -1), torch.arange(k).repeat_interleave(nt)])
    allowed = (block_of[None, :] == -1) | (block_of[:, None] == block_of[None, :])
    visible = ~torch.cat([ctx_pad, ctx_pad.new_zeros(b, k * nt)], dim=1)
    mask = allowed[None, None] & visible[:, None, None, :]
    for block in pred.blocks:
        x = block(x, attn_mask=mask)
    return pred.proj(pred.norm(x[:, nc:])).view(b, k, nt, -1)


def test_shared_context_predictor_equals_the_masked_sequence_it_stands_for() -> None:
    """model.pred_context=shared: outputs, input and parameter gradients, padding and drop-path draws equal the
    masked single-sequence definition (float64), with the context's rows computed once instead of K times."""
    cfg = dataclasses.replace(TINY, pred_context="shared", pred_depth=3, drop_path=0.5)
    pred = Predictor(cfg).double().train()
    ctx_idx, tgt_idx = make_masks(2, 64, 20, 3, 6)  # 2 clips, 3 blocks: a clip-block mix-up changes shapes
    pad = torch.zeros(2, 20, dtype=torch.bool)
    pad[1, 14:] = True
    ctx = torch.randn(2, 20, 192, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 3, 6, 192, dtype=torch.float64)
    results = []
    for run in (pred, lambda *args: _masked_sequence_reference(pred, *args)):
        torch.manual_seed(1)  # the same drop-path draws
        out = run(ctx, ctx_idx, tgt_idx, pad)
        (out * weights).sum().backward()
        results.append((out.detach(), ctx.grad, [p.grad for p in pred.parameters()]))
        ctx.grad = None
        pred.zero_grad(set_to_none=True)
    (shared, dx, grads), (expected, expected_dx, expected_grads) = results
    with torch.no_grad():
        undropped = pred.eval()(ctx, ctx_idx, tgt_idx, pad)
    assert not torch.allclose(shared, undropped), "drop path drew nothing: the draws were not compared"
    torch.testing.assert_close(shared, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dx, expected_dx, rtol=1e-10, atol=1e-10)
    assert dx[1, 14:].abs().max() == 0, "the padding reached a query"
    for g, h in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-10)


def test_shared_and_per_target_predictors_load_each_others_weights_and_differ_only_in_the_context_rows() -> None:
    """The same parameters either way. With two blocks the outputs differ (in per_target the context rows see the
    mask tokens before the last block reads them), so the option changes the model, not only its speed; with one
    block, whose context rows give only keys and values, they are equal."""
    ctx_idx, tgt_idx = make_masks(2, 64, 20, 3, 6)
    ctx = torch.randn(2, 20, 192)
    gaps = []
    for depth in (1, 2):
        per_target = Predictor(dataclasses.replace(TINY, pred_depth=depth)).eval()
        for param in per_target.parameters():  # weights whose attention matters (at init the branches are tiny)
            param.data.normal_(0, 0.3)
        shared = Predictor(dataclasses.replace(TINY, pred_depth=depth, pred_context="shared")).eval()
        shared.load_state_dict(per_target.state_dict())
        with torch.no_grad():
            gaps.append((shared(ctx, ctx_idx, tgt_idx) - per_target(ctx, ctx_idx, tgt_idx)).abs().max().item())
    assert gaps[0] < 1e-5 and gaps[1] > 1e-2, gaps  # float32 noise against a real difference


@pytest.mark.parametrize("pred_context", PRED_CONTEXTS)
def test_padded_contexts_give_each_clip_what_it_gets_alone(pred_context: str) -> None:
    """mask.pad_context: a clip whose context is padded to the batch's longest predicts exactly what it predicts
    from its own context alone, unpadded: the padding reaches no query in the context encoder or the predictor."""
    model = AJEPA(dataclasses.replace(TINY, pred_context=pred_context), max_frames=128).eval()
    x = torch.randn(2, 128, 128)
    ctx_idx, tgt_idx = make_masks(2, 64, 20, 3, 6)
    lengths = (20, 13)  # clip 1 keeps 13 context patches; its last 7 slots repeat its first patch
    ctx_idx[1, 13:] = ctx_idx[1, 0]
    pad = torch.arange(20)[None, :] >= torch.tensor(lengths)[:, None]
    with torch.no_grad():
        batched = model.predictor(model.context_encoder(x, keep=ctx_idx, key_mask=pad), ctx_idx, tgt_idx, pad)
        for i, n in enumerate(lengths):
            keep = ctx_idx[i:i + 1, :n]
            alone = model.predictor(model.context_encoder(x[i:i + 1], keep=keep), keep, tgt_idx[i:i + 1])
            torch.testing.assert_close(batched[i], alone[0], rtol=1e-5, atol=1e-5)
        loss, _ = model(x, ctx_idx, tgt_idx, pad)
        unmasked, _ = model(x, ctx_idx, tgt_idx)
    assert torch.isfinite(loss) and not torch.equal(loss, unmasked), "without the mask the padding is seen"


def test_target_encoder_gets_no_gradient() -> None:
    model = AJEPA(TINY)
    assert all(not p.requires_grad for p in model.target_encoder.parameters())
    ctx, tgt = make_masks(2, 64, 32, 2, 8)
    loss, _ = model(torch.randn(2, 128, 128), ctx, tgt)
    loss.backward()
    assert all(p.grad is None for p in model.target_encoder.parameters())
    trained = [*model.context_encoder.parameters(), *model.predictor.parameters()]
    assert all(p.grad is not None for p in trained)
    assert model.context_encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_target_encoder_stays_in_eval_mode() -> None:
    model = AJEPA(dataclasses.replace(TINY, drop_path=0.5)).train()
    assert model.context_encoder.training and not model.target_encoder.training
    x = torch.randn(2, 128, 128)
    torch.testing.assert_close(model.encode(x), model.encode(x), rtol=0, atol=0)


def test_ema_update_matches_formula() -> None:
    model = AJEPA(TINY)
    with torch.no_grad():
        for p in model.context_encoder.parameters():
            p.add_(torch.randn_like(p))
    online = dict(model.context_encoder.named_parameters())
    before = {name: p.clone() for name, p in model.target_encoder.named_parameters()}
    m = 0.9
    model.update_target(m)
    for name, p in model.target_encoder.named_parameters():
        # Same arithmetic one tensor at a time: bit-exact; the textbook formula only differs by rounding.
        assert torch.equal(p, before[name].mul(m).add(online[name], alpha=1 - m)), name
        torch.testing.assert_close(p, m * before[name] + (1 - m) * online[name], rtol=1e-6, atol=1e-7)
        assert not torch.equal(p, before[name])
    model.update_target(0.0)  # m = 0 copies the online weights
    for name, p in model.target_encoder.named_parameters():
        assert torch.equal(p, online[name])


class _Oracle(nn.Module):
    """Stands in for the predictor: returns the true targets plus a constant offset."""

    def __init__(self, target: torch.Tensor, offset: float):
        super().__init__()
        self.target, self.offset = target, offset

    def forward(self, ctx: torch.Tensor, ctx_idx: torch.Tensor, tgt_idx: torch.Tensor,
                ctx_pad: torch.Tensor | None = None) -> torch.Tensor:
        return self.target + self.offset


def _expected_targets(model: AJEPA, x: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    h = F.layer_norm(model.encode(x), (192,))
    return torch.stack([h[i, tgt[i].flatten()] for i in range(x.size(0))]).view(*tgt.shape, 192)


@pytest.mark.parametrize(("loss", "offset", "expected"), [
    ("mse", 0.0, 0.0), ("smooth_l1", 0.0, 0.0), ("mse", 2.0, 4.0), ("smooth_l1", 2.0, 1.5),
    ("mse", 0.5, 0.25), ("smooth_l1", 0.5, 0.125),
])
def test_loss_against_known_predictions(loss: str, offset: float, expected: float) -> None:
    model = AJEPA(dataclasses.replace(TINY, loss=loss))
    x = torch.randn(2, 128, 128)
    ctx, tgt = make_masks(2, 64, 32, 2, 8)
    target = _expected_targets(model, x, tgt)
    torch.testing.assert_close(model.targets(x, tgt), target)
    model.predictor = _Oracle(target, offset)
    value, _ = model(x, ctx, tgt)
    assert value.item() == pytest.approx(expected, abs=1e-6)


def test_loss_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown loss"):
        jepa_loss(torch.zeros(1), torch.zeros(1), "l2")


def test_residual_projections_rescaled() -> None:
    encoder = VisionTransformer(dataclasses.replace(TINY, depth=4))
    for layer_id, block in enumerate(encoder.blocks, start=1):
        want = 0.02 / math.sqrt(2 * layer_id)
        assert block.attn.proj.weight.std().item() == pytest.approx(want, rel=0.05)
        assert block.mlp.fc2.weight.std().item() == pytest.approx(want, rel=0.05)
        assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert encoder.blocks[0].attn.qkv.bias.abs().max() == 0


def test_block_is_the_pre_norm_transformer_block_written_out() -> None:
    """Block (float64, a key mask) against method.md §2's block spelled out: x + MHSA(LN(x)), then x + MLP(LN(x)),
    LayerNorm eps 1e-6, softmax(q·kᵀ/√d_head) over the visible keys, exact GELU."""
    block = Block(32, 4, mlp_ratio=2).double().eval()
    for param in block.parameters():  # weights whose every part matters (at init biases are zero)
        param.data.normal_(0, 0.3)
    x = torch.randn(3, 10, 32, dtype=torch.float64)
    hidden = torch.rand(3, 10) < 0.3
    hidden[:, 0] = False  # every query keeps a visible key

    def norm(t: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
        return (t - t.mean(-1, keepdim=True)) / (t.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt() * ln.weight \
            + ln.bias

    q, k, v = (part.view(3, 10, 4, 8).transpose(1, 2)
               for part in (norm(x, block.norm1) @ block.attn.qkv.weight.T + block.attn.qkv.bias).chunk(3, dim=-1))
    scores = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(hidden[:, None, None, :], -math.inf)
    attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(3, 10, 32)
    y = x + attended @ block.attn.proj.weight.T + block.attn.proj.bias
    mlp = block.mlp
    hidden_units = norm(y, block.norm2) @ mlp.fc1.weight.T + mlp.fc1.bias
    gelu = 0.5 * hidden_units * (1 + torch.erf(hidden_units / math.sqrt(2)))
    expected = y + gelu @ mlp.fc2.weight.T + mlp.fc2.bias
    with torch.no_grad():
        torch.testing.assert_close(block(x, attn_mask=~hidden[:, None, None, :]), expected, rtol=1e-10, atol=1e-10)


def test_drop_path_drops_whole_samples_and_keeps_the_expectation() -> None:
    drop = DropPath(0.25).train()
    out = drop(torch.ones(4000, 3, 2))
    per_sample = out.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1)).all(), "a sample was dropped in part"
    assert (per_sample[:, 0] == 0).float().mean().item() == pytest.approx(0.25, abs=0.03)
    assert out.mean().item() == pytest.approx(1.0, abs=0.05)
    x = torch.randn(5, 3)
    assert drop.eval()(x) is x and DropPath(0.0).train()(x) is x


@pytest.mark.parametrize("per_layer", [False, True])
def test_key_mask_hides_tokens(per_layer: bool) -> None:
    """A token hidden as a key in every layer cannot influence any other token's output."""
    encoder = VisionTransformer(TINY).eval()
    x = torch.randn(2, 128, 128)
    t, f = 3, 5  # patch (t, f) is token t * Fp + f
    hidden = t * 8 + f
    key_mask = torch.zeros(2, 64, dtype=torch.bool)
    key_mask[:, hidden] = True
    key_mask[1, 10] = True  # masks may differ per clip
    if per_layer:
        key_mask = key_mask.expand(TINY.depth, -1, -1)
    x2 = x.clone()
    x2[:, t * 16:(t + 1) * 16, f * 16:(f + 1) * 16] += 3 * torch.randn(2, 16, 16)
    others = torch.arange(64) != hidden

    out, out2 = encoder(x, key_mask=key_mask), encoder(x2, key_mask=key_mask)
    torch.testing.assert_close(out[:, others], out2[:, others], rtol=1e-5, atol=1e-5)
    assert (out[:, hidden] - out2[:, hidden]).abs().max() > 1e-2  # it still passes its own MLP

    full, full2 = encoder(x), encoder(x2)  # control: without the mask the change spreads
    assert (full[:, others] - full2[:, others]).abs().max() > 1e-3


def test_param_groups() -> None:
    model = AJEPA(TINY)
    decay, no_decay = model.param_groups(0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert any(p is model.predictor.mask_token for p in no_decay["params"])
    assert all(p.ndim >= 2 for p in decay["params"])
    assert all(p.ndim <= 1 for p in no_decay["params"] if p is not model.predictor.mask_token)
    n_trained = len([*model.context_encoder.parameters(), *model.predictor.parameters()])
    assert len(decay["params"]) + len(no_decay["params"]) == n_trained
    torch.optim.AdamW(model.param_groups(0.05), lr=1e-3)


def test_shared_context_attention_flops_count_each_query_key_pair_once() -> None:
    """The attention half of flops_split (the CPU FLOP counter leaves SDPA out), by hand for pred_context=shared:
    per predictor block the contexts' Nc x Nc pairs and each target block's Nt x (Nc + Nt), the last block only
    the targets' pairs; 4·d FLOPs a pair (Q·Kᵀ and A·V). The encoders' attention is the same in both modes."""
    shared = dataclasses.replace(TINY, pred_context="shared", pred_depth=3)
    per_target = dataclasses.replace(shared, pred_context="per_target")
    nc, nt, k, d = 20, 6, 3, shared.pred_dim
    pairs = {"shared": 2 * nc * nc + 3 * k * nt * (nc + nt), "per_target": k * (2 * (nc + nt) ** 2 + nt * (nc + nt))}
    encoders = flops_split(shared, 8, 8, nc, nt, k)["attention"] - 3 * 4 * d * pairs["shared"]
    assert encoders == flops_split(per_target, 8, 8, nc, nt, k)["attention"] - 3 * 4 * d * pairs["per_target"]
    assert encoders == 3 * shared.depth * 4 * nc * nc * shared.embed_dim + shared.depth * 4 * 64 * 64 * shared.embed_dim


def test_flops_vit_b() -> None:
    """method.md: ~0.6 TFLOP per clip per step for ViT-B, 1024x128, default predictor, ~48% context."""
    tflop = sum(flops_split(ModelConfig(), 64, 8, n_ctx=246, n_tgt=90, k=4).values()) / 1e12
    assert 0.5 < tflop < 0.8


@pytest.mark.parametrize("pred_context", PRED_CONTEXTS)
def test_flops_split_counts_the_linear_layers_of_a_real_training_step(pred_context: str) -> None:
    """torch's FLOP counter over a tiny model's forward and backward (it leaves SDPA out on a CPU) against
    flops_split's linear count, which rates backward at twice the forward everywhere: the patch convolutions'
    input gradient, which the spectrogram does not need, is the only difference."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = dataclasses.replace(TINY, pred_context=pred_context)
    model = AJEPA(cfg, max_frames=128)
    x = torch.randn(2, 128, 128)
    ctx, tgt = make_masks(2, 64, 20, 3, 6)
    with FlopCounterMode(display=False) as flops:
        loss, _ = model(x, ctx, tgt)
        loss.backward()
    per_clip = flops_split(cfg, 8, 8, n_ctx=20, n_tgt=6, k=3)["linear"]
    conv_input_grad = 2 * 64 * 16**2 * TINY.embed_dim
    assert flops.get_total_flops() == 2 * (per_clip - conv_input_grad)


def test_short_optimisation_reduces_loss() -> None:
    model = AJEPA(TINY)
    opt = torch.optim.AdamW(model.param_groups(0.0), lr=1e-3)
    x = torch.randn(4, 128, 128)
    ctx, tgt = make_masks(4, 64, 32, 2, 8)
    losses = []
    for _ in range(25):
        loss, _ = model(x, ctx, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.update_target(0.996)
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_attention_choices_match_the_config_and_restrict_sdpa_kernels() -> None:
    from ajepa.config import ATTENTION_CHOICES
    from ajepa.models.vit import ATTENTION_BACKENDS, attention_backend

    assert set(ATTENTION_CHOICES) == set(ATTENTION_BACKENDS)
    flags = torch.backends.cuda
    with attention_backend("flash"):
        assert flags.flash_sdp_enabled() and flags.mem_efficient_sdp_enabled() and not flags.cudnn_sdp_enabled()
    with attention_backend("math"):
        assert flags.math_sdp_enabled() and not flags.flash_sdp_enabled()
    assert flags.cudnn_sdp_enabled() and flags.flash_sdp_enabled()  # restored on exit


@pytest.mark.parametrize("attention", ["flash", "math", "auto"])
def test_encoder_and_predictor_run_under_the_configured_kernels(attention: str) -> None:
    model = AJEPA(dataclasses.replace(TINY, attention=attention))
    seen = []
    for block in (model.context_encoder.blocks[0], model.predictor.blocks[0]):
        block.register_forward_pre_hook(lambda *_: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    x = torch.randn(2, 128, 128)
    ctx, tgt = make_masks(2, 64, 32, 2, 8)
    loss, _ = model(x, ctx, tgt)
    assert seen == [attention == "auto"] * 2  # cuDNN (per-shape plans) only when PyTorch chooses
    torch.manual_seed(0)
    reference, _ = AJEPA(dataclasses.replace(TINY, attention="math"))(x, ctx, tgt)
    torch.testing.assert_close(loss, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pred_context", PRED_CONTEXTS)
def test_grad_checkpointing_gives_the_same_gradients_and_keeps_fewer_activations(pred_context: str) -> None:
    x = torch.randn(2, 128, 128)
    ctx, tgt = make_masks(2, 64, 32, 2, 8)
    results = {}
    for recompute in (False, True):
        torch.manual_seed(0)
        model = AJEPA(dataclasses.replace(TINY, grad_checkpointing=recompute, pred_context=pred_context,
                                          drop_path=0.2))  # the recomputation draws what the forward drew
        saved: list[int] = []

        def pack(t: torch.Tensor, saved: list[int] = saved) -> torch.Tensor:
            saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = model(x, ctx, tgt)
        loss.backward()
        results[recompute] = (loss.detach(), [p.grad for p in model.predictor.parameters()], sum(saved))
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=0)
    for g, h in zip(results[True][1], results[False][1], strict=True):
        torch.testing.assert_close(g, h)
    assert results[True][2] < 0.5 * results[False][2]


@pytest.mark.slow
# Each compile mode and each predictor layout once (every case compiles its graphs afresh, ~80 s on 2 cores).
@pytest.mark.parametrize(("mode", "pred_context"), zip(COMPILE_MODES, PRED_CONTEXTS, strict=True))
def test_compiled_blocks_train_like_eager_ones(mode: str, pred_context: str) -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # graphs an earlier parametrization compiled would be reused, not counted
    x = torch.randn(2, 128, 128)
    ctx, tgt = make_masks(2, 64, 32, 2, 8)
    losses = {}
    graphs = counters["stats"]["unique_graphs"]
    pad = torch.zeros(2, 32, dtype=torch.bool)
    pad[1, 27:] = True  # padded contexts and drop-path draws compiled too (drawn by aten's RNG, as in eager)
    for compiled in (False, True):
        torch.manual_seed(0)
        model = AJEPA(dataclasses.replace(TINY, depth=3, pred_context=pred_context, drop_path=0.2))
        if compiled:
            model.compile_blocks(mode)
        opt = torch.optim.AdamW(model.param_groups(0.0), lr=1e-3)
        losses[compiled] = []
        for step in range(3):
            n = 32 - 4 * step  # the context length changes every step, as masks make it
            with torch._inductor.config.patch(fallback_random=True):
                loss, _ = model(x, ctx[:, :n], tgt, pad[:, :n])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses[compiled].append(loss.item())
    # Compiled once, whatever the lengths (a recompile per length would cost a GPU step dearly) or the drop-path
    # rates (they grow with depth: a graph per rate would compile each block apart): the context encoder's first
    # block (rate 0) and its two others (0.1 and 0.2: one graph), the target encoder's (no gradient, no drop
    # path: one graph for all), the predictor's first block (rate 0) and its last one (0.2, target rows only).
    assert counters["stats"]["unique_graphs"] == graphs + 5
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_autocast_residual_keeps_the_stream_between_blocks_in_bf16_and_changes_nothing_without_autocast() -> None:
    x = torch.randn(4, 128, 128)
    ctx, tgt = make_masks(4, 64, 32, 2, 8)
    losses, grads, stream = {}, {}, {}
    for autocast_residual in (False, True):
        for autocast in (False, True):
            torch.manual_seed(0)
            model = AJEPA(dataclasses.replace(TINY, autocast_residual=autocast_residual))
            dtypes: set[torch.dtype] = set()
            for module in (model.context_encoder, model.target_encoder, model.predictor):
                for block in module.blocks:
                    block.register_forward_pre_hook(lambda _, args, seen=dtypes: seen.add(args[0].dtype))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss, _ = model(x, ctx, tgt)
            loss.backward()
            key = (autocast_residual, autocast)
            losses[key], stream[key] = loss.item(), dtypes
            grads[key] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert stream == {(False, False): {torch.float32}, (True, False): {torch.float32},
                      (False, True): {torch.float32}, (True, True): {torch.bfloat16}}
    # float32 runs are untouched; under autocast the bf16 stream rounds, it does not change the model
    assert losses[True, False] == losses[False, False]
    torch.testing.assert_close(grads[True, False], grads[False, False], rtol=0, atol=0)
    assert losses[True, True] == pytest.approx(losses[False, True], rel=2e-2)
    cosine = F.cosine_similarity(grads[True, True], grads[False, True], dim=0)
    assert cosine > 0.99

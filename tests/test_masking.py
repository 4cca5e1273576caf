"""Property tests for ajepa.masking over thousands of draws on the 64×8, 32×8 and 8×8 patch grids."""

from __future__ import annotations

import dataclasses
import itertools
import re

import numpy as np
import pytest
import torch
from ajepa.config import ConfigError, MaskConfig
from ajepa.masking import (
    FAMILIES,
    MaskBatch,
    curriculum,
    mask_stats,
    plot_mask_examples,
    rb_extent,
    sample_masks,
    tf_extent,
    tf_probability,
    validate_masks,
)

GRIDS = [(64, 8), (32, 8), (8, 8)]
CFG = MaskConfig()


def _sample(grid, family=None, *, step=0, seed=0, rank=0, batch_size=128, cfg=CFG, total_steps=100):
    return sample_masks(cfg, grid, batch_size, step=step, total_steps=total_steps, seed=seed, rank=rank,
                        family=family)


def _extents(targets: torch.Tensor, f: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounding-box (time, freq) extents of every target block, each (B, K)."""
    t_idx, f_idx = targets // f, targets % f
    return (t_idx.amax(-1) - t_idx.amin(-1) + 1), (f_idx.amax(-1) - f_idx.amin(-1) + 1)


def _assert_valid(masks: MaskBatch, cfg: MaskConfig = CFG) -> None:
    t, f = masks.grid
    num = t * f
    ctx, tgt = masks.context, masks.targets
    b = ctx.shape[0]
    assert ctx.dtype == tgt.dtype == torch.int64
    assert ctx.dim() == 2 and tgt.dim() == 3 and tgt.shape[0] == b
    assert ctx.shape[1] >= cfg.min_keep
    for idx in (ctx, tgt):
        assert int(idx.min()) >= 0 and int(idx.max()) < num
        assert (idx.diff(dim=-1) > 0).all(), "indices must be sorted and unique"
    in_target = torch.zeros(b, num, dtype=torch.bool)
    in_target.scatter_(1, tgt.reshape(b, -1), True)
    assert not in_target.gather(1, ctx).any(), "a context patch is also a target"


# ------------------------------------------------------------------------------------------- validity


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_masks_are_valid_over_many_draws(grid, family):
    for step in range(20):  # 20 batches x 128 samples per grid and family
        masks = _sample(grid, family, step=step)
        assert masks.family == family
        _assert_valid(masks)


@pytest.mark.parametrize("grid", GRIDS)
def test_schedule_masks_are_valid_and_stack(grid):
    for step in range(0, 100, 5):
        masks = _sample(grid, step=step, batch_size=64)
        _assert_valid(masks)
        k = CFG.tf_num_targets if masks.family == "tf" else CFG.rb_num_targets
        assert masks.targets.shape[:2] == (64, k)


@pytest.mark.parametrize("grid", GRIDS)
def test_rb_targets_are_identical_rectangles(grid):
    f = grid[1]
    for step in range(20):
        tgt = _sample(grid, "rb", step=step).targets
        dt, df = _extents(tgt, f)
        assert (dt * df == tgt.shape[-1]).all(), "a block with unique indices filling its bounding box"
        assert (dt == dt[0, 0]).all() and (df == df[0, 0]).all(), "one block size per batch"


@pytest.mark.parametrize("grid", GRIDS)
def test_tf_targets_are_time_stripes_or_frequency_bands(grid):
    f = grid[1]
    lo, hi = CFG.tf_target_scale
    kinds = set()
    for step in range(60):
        tgt = _sample(grid, "tf", step=step, batch_size=32).targets
        dt, df = _extents(tgt, f)
        assert (dt * df == tgt.shape[-1]).all(), "stripes are solid rectangles"
        rows = int(df[0, 0])
        assert (df == rows).all() and (dt == dt[0, 0]).all()
        if rows == f:  # time stripe: every frequency row, w = round(s*T) columns
            kinds.add("time")
            assert tf_extent(lo, None, grid)[0] <= int(dt[0, 0]) <= tf_extent(hi, None, grid)[0]
        else:  # frequency band of 1-2 rows and a long run of time columns
            kinds.add("band")
            assert CFG.tf_band_rows[0] <= rows <= CFG.tf_band_rows[1]
            assert tf_extent(lo, rows, grid)[0] <= int(dt[0, 0]) <= tf_extent(hi, rows, grid)[0]
    assert kinds == {"time", "band"}


@pytest.mark.parametrize("grid", GRIDS)
def test_tf_stripes_per_block_mix_time_stripes_and_bands_in_one_clip_and_still_stack(grid):
    t, f = grid
    cfg = dataclasses.replace(CFG, tf_stripes="block")
    validate_masks(dataclasses.replace(cfg, schedule="tf"), grid)
    mixed = 0
    for step in range(30):
        masks = _sample(grid, "tf", step=step, batch_size=16, cfg=cfg)
        _assert_valid(masks, cfg)
        dt, df = _extents(masks.targets, f)
        nt = masks.targets.shape[-1]  # one patch count for every block: (B, K, Nt) stacks
        assert (dt * df == nt).all(), "every block is a solid rectangle of Nt patches"
        stripe = df == f  # a time stripe spans every frequency row; a band 1 or 2 of them, w*F/rows long
        assert ((df[~stripe] >= 1) & (df[~stripe] <= 2)).all() and (dt[~stripe] == nt // df[~stripe]).all()
        mixed += int((stripe.any(1) & (~stripe).any(1)).sum())
    assert mixed > 0, "no clip held both a time stripe and a band"
    if f == 8:  # a 3-row band cannot hold a time stripe's w*8 patches
        with pytest.raises(ConfigError, match="^mask.tf_band_rows: with mask.tf_stripes=block a band of 3 rows"):
            validate_masks(dataclasses.replace(cfg, schedule="tf", tf_band_rows=(2, 3)), grid)


def test_tf_stripes_per_batch_stay_the_default_one_kind_a_batch():
    for step in range(30):
        _, df = _extents(_sample((64, 8), "tf", step=step, batch_size=16).targets, 8)
        assert (df == df[0, 0]).all()


def test_absolute_block_geometry_is_ijepas_and_shrinks_the_context_on_a_long_grid():
    # I-JEPA on its square 14x14 grid: sides from int(s * 196) patches, kept inside the grid.
    assert rb_extent(0.15, 1.0, (14, 14), "absolute") == (5, 5)  # int(29.4) = 29 -> sqrt 5.4
    assert rb_extent(0.2, 1.5, (14, 14), "absolute") == (8, 5)  # 39 patches: sqrt(58.5), sqrt(26)
    assert rb_extent(1.0, 1.0, (14, 14), "absolute") == (13, 13)  # never the whole axis
    # On 64x8 the same arithmetic makes a context block 23 patches long and as tall as it can be (7 of 8 rows)
    assert rb_extent(1.0, 1.0, (64, 8), "absolute") == (23, 7)
    assert rb_extent(1.0, 1.0, (64, 8)) == (64, 8)  # normalised: the whole grid
    cfg = dataclasses.replace(CFG, block_geometry="absolute")
    for step in range(10):
        _assert_valid(_sample((64, 8), "rb", step=step, batch_size=32, cfg=cfg), cfg)
    absolute, normalised = mask_stats(cfg, (64, 8), 20, 16, 0), mask_stats(CFG, (64, 8), 20, 16, 0)
    assert absolute["rb/context_fraction_untruncated"] < 0.2 < 0.4 < normalised["rb/context_fraction_untruncated"]


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_contexts_keep_every_context_patch(family):
    cfg = dataclasses.replace(CFG, pad_context=True)
    padded = _sample((64, 8), family, step=3, batch_size=32, cfg=cfg)
    truncated = _sample((64, 8), family, step=3, batch_size=32)
    assert truncated.context_pad is None and torch.equal(padded.targets, truncated.targets)
    counts = (~padded.context_pad).sum(1)
    assert padded.context.shape[1] == int(counts.max()) >= truncated.context.shape[1] == int(counts.min())
    for row, pad, target in zip(padded.context, padded.context_pad, padded.targets, strict=True):
        real = row[~pad]
        assert (real.diff() > 0).all() and (row[pad] == real[0]).all()  # sorted, then padded with its first
        assert not torch.isin(real, target.flatten()).any()
    assert padded.context_fraction == pytest.approx(counts.double().mean().item() / 512)
    if family == "rb":  # what truncation throws away: ~14 points of context on the 64x8 grid
        assert padded.context_fraction > truncated.context_fraction + 0.05


@pytest.mark.parametrize("grid", GRIDS)
def test_random_family_splits_the_grid(grid):
    num = grid[0] * grid[1]
    masks = _sample(grid, "random", batch_size=256)
    assert masks.targets.shape == (256, 1, round(CFG.random_target_ratio * num))
    assert masks.context.shape[1] + masks.targets.shape[-1] == num
    assert masks.context_fraction == pytest.approx(1 - masks.target_fraction)


def test_min_keep_is_met_by_redrawing_positions():
    # On 8x8 these blocks leave < 10 context patches in about half of all placements.
    cfg = dataclasses.replace(CFG, rb_target_scale=(0.3, 0.4))
    for step in range(10):
        _assert_valid(_sample((8, 8), "rb", step=step, batch_size=256, cfg=cfg), cfg)


def test_sampler_raises_when_context_is_impossible():
    cfg = dataclasses.replace(CFG, rb_target_scale=(0.99, 1.0))
    with pytest.raises(ValueError, match=r"mask\.rb_target_scale.*mask\.min_keep"):
        _sample((8, 8), "rb", cfg=cfg)


def test_truncation_keeps_no_positional_bias():
    # Positions are symmetric in time, so the kept context must be too; keeping the first indices of each
    # sample after truncation (~35% of its context dropped on 64x8) would pull the mean well below centre.
    t, f = 64, 8
    times = torch.cat([_sample((t, f), "rb", step=s).context.flatten() // f for s in range(20)])
    assert abs(times.double().mean().item() - (t - 1) / 2) < 1.0


# ------------------------------------------------------------------------------------ determinism, DDP


def test_same_inputs_give_identical_masks():
    for family in (None, *FAMILIES):
        a = _sample((64, 8), family, step=7, seed=3, rank=1)
        b = _sample((64, 8), family, step=7, seed=3, rank=1)
        assert a.family == b.family
        assert torch.equal(a.context, b.context) and torch.equal(a.targets, b.targets)


@pytest.mark.parametrize("family", ["rb", "tf"])
def test_ranks_share_family_and_sizes_but_not_positions(family):
    f = 8
    for step in range(10):
        ranks = [_sample((64, f), family, step=step, rank=r, batch_size=32) for r in range(4)]
        extents = [_extents(m.targets, f) for m in ranks]
        for m, (dt, df) in zip(ranks[1:], extents[1:], strict=True):
            assert m.targets.shape == ranks[0].targets.shape
            assert torch.equal(dt, extents[0][0]) and torch.equal(df, extents[0][1])
            assert not torch.equal(m.targets, ranks[0].targets)


def test_ranks_agree_on_the_scheduled_family():
    for step in range(0, 100, 2):
        families = {_sample((8, 8), step=step, rank=r, batch_size=4).family for r in range(4)}
        assert len(families) == 1


def test_step_and_seed_change_the_masks():
    base = _sample((64, 8), "rb", step=5, seed=0)
    for other in (_sample((64, 8), "rb", step=6, seed=0), _sample((64, 8), "rb", step=5, seed=1)):
        assert base.targets.shape != other.targets.shape or not torch.equal(base.targets, other.targets)


# ------------------------------------------------------------------------------------------- schedule


def test_curriculum_values():
    total = 1000
    assert curriculum(0.01, 0, total) == pytest.approx(0.01)
    assert curriculum(0.01, total // 4, total) == pytest.approx(0.5, abs=1e-3)
    assert curriculum(0.01, total, total) == 1.0
    assert curriculum(0.01, 5 * total, total) == 1.0
    values = [curriculum(0.01, s, total) for s in range(total + 1)]
    assert all(b >= a for a, b in itertools.pairwise(values))


def test_tf_probability_per_schedule():
    total = 400

    def p(schedule, step, **kw):
        return tf_probability(dataclasses.replace(CFG, schedule=schedule, **kw), step, total)

    for step in (0, 37, 100, 250, 400):
        assert p("curriculum", step) == curriculum(CFG.c0, step, total)
        assert p("inverse", step) == pytest.approx(1 - curriculum(CFG.c0, step, total))
        assert p("rb", step) == 0.0 and p("random", step) == 0.0 and p("tf", step) == 1.0
        assert p("mixture", step, mixture_tf_prob=0.3) == 0.3


def test_family_follows_the_schedule():
    def families(schedule, steps, **kw):
        cfg = dataclasses.replace(CFG, schedule=schedule, **kw)
        return [_sample((8, 8), step=s, batch_size=2, cfg=cfg, total_steps=1000).family for s in steps]

    assert set(families("rb", range(50))) == {"rb"}
    assert set(families("tf", range(50))) == {"tf"}
    assert set(families("random", range(50))) == {"random"}
    assert families("curriculum", range(1000, 1050)) == ["tf"] * 50
    assert families("inverse", range(1000, 1050)) == ["rb"] * 50
    # Early in the curriculum TF is rare: its count over steps 0..199 is binomial-like around sum f(s).
    p = [curriculum(CFG.c0, s, 1000) for s in range(200)]
    expected, sd = sum(p), sum(q * (1 - q) for q in p) ** 0.5
    assert abs(families("curriculum", range(200)).count("tf") - expected) < 4 * sd
    share = families("mixture", range(600), mixture_tf_prob=0.5).count("tf") / 600
    assert 0.42 < share < 0.58


# ------------------------------------------------------------------------------------ stats and checks


@pytest.mark.parametrize("grid", [(64, 8), (8, 8)])
def test_mean_fractions(grid):
    stats = mask_stats(CFG, grid, n_batches=100, batch_size=32, seed=0)
    # Before truncation RB keeps ~48% of the grid as in I-JEPA on images (method.md §3); truncating to the
    # batch's smallest context costs about a third of it at 32 samples per batch.
    assert 0.40 <= stats["rb/context_fraction_untruncated"] <= 0.55
    assert 0.25 <= stats["rb/context_fraction"] <= stats["rb/context_fraction_untruncated"]
    assert 0.40 <= stats["rb/target_fraction"] <= 0.55
    assert 0.60 <= stats["tf/context_fraction"] <= stats["tf/context_fraction_untruncated"] <= 0.85
    assert 0.12 <= stats["tf/target_fraction"] <= 0.30
    assert stats["random/context_fraction"] == stats["random/target_fraction"] == pytest.approx(0.5)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("schedule", ["curriculum", "rb", "tf", "mixture", "inverse", "random"])
def test_validate_accepts_defaults(grid, schedule):
    validate_masks(dataclasses.replace(CFG, schedule=schedule), grid)


@pytest.mark.parametrize("grid", [(64, 8), (8, 8)])
@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"rb_target_scale": (0.9, 1.0)}, "mask.rb_target_scale"),
        ({"tf_target_scale": (0.9, 1.0)}, "mask.tf_target_scale"),
        ({"min_keep": 1000}, "mask.min_keep"),
        ({"context_scale": (0.01, 0.02)}, "mask.context_scale"),
        ({"schedule": "random", "random_target_ratio": 0.99}, "mask.random_target_ratio"),
    ],
)
def test_validate_rejects_impossible_configs(grid, override, key):
    with pytest.raises(ConfigError, match="^" + re.escape(key) + ":"):
        validate_masks(dataclasses.replace(CFG, **override), grid)


def test_validate_ignores_families_the_schedule_never_uses():
    validate_masks(dataclasses.replace(CFG, schedule="rb", tf_target_scale=(0.9, 1.0)), (64, 8))


def test_plot_writes_a_png(tmp_path):
    path = plot_mask_examples(CFG, (64, 8), tmp_path / "plots" / "masks.png", n_examples=2)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


def test_mask_batch_fractions():
    masks = _sample((8, 8), "rb", batch_size=16)
    assert masks.context_fraction == masks.context.shape[1] / 64
    union = [len(set(masks.targets[i].flatten().tolist())) / 64 for i in range(16)]
    assert masks.target_fraction == pytest.approx(float(np.mean(union)))

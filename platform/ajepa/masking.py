"""Masks on the T×F patch grid (method.md §3): random-block (RB), time-frequency stripes (TF) and
unstructured random masks, and the schedule that picks a family for each optimizer step.

A flat patch index is t * F + f (row-major over the patch embedding's (T, F) output). Every mask is a
pure function of (seed, step, rank, batch size): the family and the block sizes come from a generator
seeded by (seed, step) only, so all DDP ranks agree on them and a resumed run redraws the same masks;
block positions come from a generator seeded by (seed, step, rank).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ajepa.config import ConfigError, MaskConfig

FAMILIES = ("rb", "tf", "random")
Grid = tuple[int, int]

_MAX_TRIES = 100  # position draws per sample before its context is declared impossible
_MIN_ACCEPT = 0.5  # validate_masks: share of placements that must keep min_keep patches at the worst sizes
_CHECK_DRAWS = 256  # placements per worst-case size in validate_masks
_STREAM_BATCH, _STREAM_POSITIONS = 0, 1  # SeedSequence spawn keys keep the two streams independent
_TARGET_KEY = {  # the key that sets each family's target size, named when a config is impossible
    "rb": "mask.rb_target_scale", "tf": "mask.tf_target_scale", "random": "mask.random_target_ratio",
}


@dataclass(frozen=True)
class MaskBatch:
    """Flat patch indices for one batch; every row of a tensor has the same length so they stack."""

    context: torch.Tensor  # (B, Nc) int64, sorted: patches the context encoder sees
    targets: torch.Tensor  # (B, K, Nt) int64, sorted per block: patches the predictor must predict
    family: str  # "rb" | "tf" | "random"
    grid: Grid
    # mask.pad_context: (B, Nc) bool, True where a row of `context` is padding (after its sorted patches;
    # it repeats one of them, and the model hides it as a key); None when contexts are truncated
    context_pad: torch.Tensor | None = None

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def context_fraction(self) -> float:
        """Mean share of the grid the context encoder sees per sample (padding excluded)."""
        if self.context_pad is None:
            return self.context.shape[1] / self.num_patches
        return float((~self.context_pad).sum(1).double().mean()) / self.num_patches

    @property
    def target_fraction(self) -> float:
        """Mean over samples of |union of target blocks| / grid size (blocks may overlap)."""
        b = self.targets.shape[0]
        hit = torch.zeros(b, self.num_patches, dtype=torch.bool)
        hit.scatter_(1, self.targets.reshape(b, -1), True)
        return hit.sum(1).double().mean().item() / self.num_patches


# --------------------------------------------------------------------------------------------- schedule


def curriculum(c0: float, step: int, total_steps: int) -> float:
    """f(s) = min(1, sqrt(s(1 - c0²)/S + c0²)): f(0) = c0, f(S/4) ≈ 0.5, f(S) = 1."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    s = min(max(step, 0), total_steps)
    return min(1.0, math.sqrt(s * (1.0 - c0 * c0) / total_steps + c0 * c0))


def tf_probability(cfg: MaskConfig, step: int, total_steps: int) -> float:
    """P(the whole batch at `step` uses TF masks); the "random" schedule never uses TF."""
    if cfg.schedule == "curriculum":
        return curriculum(cfg.c0, step, total_steps)
    if cfg.schedule == "inverse":
        return 1.0 - curriculum(cfg.c0, step, total_steps)
    if cfg.schedule == "mixture":
        return cfg.mixture_tf_prob
    if cfg.schedule == "tf":
        return 1.0
    if cfg.schedule in ("rb", "random"):
        return 0.0
    raise ConfigError(f"mask.schedule: unknown schedule {cfg.schedule!r}")


def families_in_use(cfg: MaskConfig) -> tuple[str, ...]:
    """The families a schedule can draw at some step (P(TF) is monotone in the step, so check both ends)."""
    if cfg.schedule == "random":
        return ("random",)
    ends = (tf_probability(cfg, 0, 1), tf_probability(cfg, 1, 1))
    return tuple(f for f, used in (("rb", min(ends) < 1), ("tf", max(ends) > 0)) if used)


# ------------------------------------------------------------------------------------------ block sizes


def _clip(n: float, length: int) -> int:
    return min(max(round(n), 1), length)


def rb_extent(scale: float, aspect: float, grid: Grid, geometry: str = "normalised") -> tuple[int, int]:
    """(time, frequency) extent of a block covering `scale` of the grid.

    normalised: sides from the scale in normalised coordinates, round(sqrt(s·r)·T) by round(sqrt(s/r)·F).
    absolute: I-JEPA's, sides from the patch count as on a square grid, round(sqrt(int(s·T·F)·r)) by
    round(sqrt(int(s·T·F)/r)), each kept strictly inside its axis (as I-JEPA shrinks a side that fills it);
    on a 64×8 grid that makes blocks far too tall (method.md §3), which is what an ablation measures."""
    t, f = grid
    if geometry == "absolute":
        keep = int(scale * t * f)
        return _clip(math.sqrt(keep * aspect), max(t - 1, 1)), _clip(math.sqrt(keep / aspect), max(f - 1, 1))
    return _clip(math.sqrt(scale * aspect) * t, t), _clip(math.sqrt(scale / aspect) * f, f)


def tf_extent(scale: float, band_rows: int | None, grid: Grid, equal_area: bool = False) -> tuple[int, int]:
    """A time stripe (band_rows None: every frequency row) or a frequency band of `band_rows` rows. With
    `equal_area` a band holds exactly the patches of the time stripe of this scale (w·F / rows columns), so
    stripes and bands stack as blocks of one batch (mask.tf_stripes=block; validate_masks checks it fits)."""
    t, f = grid
    if band_rows is None:
        return _clip(scale * t, t), f
    rows = min(band_rows, f)
    if equal_area:
        return _clip(scale * t, t) * f // rows, rows
    return _clip(scale * t * f / rows, t), rows


@dataclass(frozen=True)
class _Blocks:
    """One batch's block sizes as (time, frequency) extents: one per target block, and a context block.

    Every target block holds the same number of patches, so (B, K, Nt) stacks without truncating a stripe into
    scattered patches: RB targets share one size (I-JEPA draws one target size per batch too), TF blocks one
    stripe kind or, per block, a time stripe or a band of the same area."""

    targets: tuple[tuple[int, int], ...]
    context: tuple[int, int]

    @property
    def k(self) -> int:
        return len(self.targets)


def _block_sizes(cfg: MaskConfig, family: str, grid: Grid, rng: np.random.Generator) -> _Blocks:
    if family == "rb":
        target = rb_extent(rng.uniform(*cfg.rb_target_scale), rng.uniform(*cfg.rb_aspect_ratio), grid,
                           cfg.block_geometry)
        targets = (target,) * cfg.rb_num_targets
    else:
        scale = rng.uniform(*cfg.tf_target_scale)
        per_block = cfg.tf_stripes == "block"
        kinds = [_tf_rows(cfg, rng) for _ in range(cfg.tf_num_targets if per_block else 1)]
        targets = tuple(tf_extent(scale, rows, grid, per_block) for rows in kinds)
        targets = targets if per_block else targets * cfg.tf_num_targets
    return _Blocks(targets, rb_extent(rng.uniform(*cfg.context_scale), 1.0, grid, cfg.block_geometry))


def _tf_rows(cfg: MaskConfig, rng: np.random.Generator) -> int | None:
    """A stripe kind: None for a time stripe, else the rows of a frequency band."""
    if rng.random() < cfg.tf_time_stripe_prob:
        return None
    return int(rng.integers(cfg.tf_band_rows[0], cfg.tf_band_rows[1] + 1))


# ------------------------------------------------------------------------------------------- placement


def _rect_indices(starts: np.ndarray, extent: tuple[int, int], f: int) -> np.ndarray:
    """Sorted flat indices (..., lt·lf) of rectangles of `extent` whose corners are starts (..., 2)."""
    lt, lf = extent
    times = starts[..., 0, None, None] + np.arange(lt)[:, None]
    freqs = starts[..., 1, None, None] + np.arange(lf)
    return (times * f + freqs).reshape(*starts.shape[:-1], lt * lf)


def _rect_mask(starts: np.ndarray, extent: tuple[int, int], grid: Grid) -> np.ndarray:
    """(n, N) boolean masks of rectangles of `extent` whose corners are starts (n, 2)."""
    (t, f), (lt, lf) = grid, extent
    in_t = (np.arange(t) >= starts[:, 0:1]) & (np.arange(t) < starts[:, 0:1] + lt)
    in_f = (np.arange(f) >= starts[:, 1:2]) & (np.arange(f) < starts[:, 1:2] + lf)
    return (in_t[:, :, None] & in_f[:, None, :]).reshape(len(starts), t * f)


def _place(blocks: _Blocks, grid: Grid, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Place every block uniformly inside the grid for n samples.

    Returns the context (n, N) boolean = context block minus the targets, and target indices (n, K, Nt)."""
    num = grid[0] * grid[1]
    target_starts = rng.integers(0, np.subtract(grid, np.array(blocks.targets)) + 1, size=(n, blocks.k, 2))
    context_starts = rng.integers(0, np.subtract(grid, blocks.context) + 1, size=(n, 2))
    targets = np.stack([_rect_indices(target_starts[:, j], extent, grid[1])
                        for j, extent in enumerate(blocks.targets)], axis=1)
    context = _rect_mask(context_starts, blocks.context, grid)
    context.reshape(-1)[(targets.reshape(n, -1) + num * np.arange(n)[:, None]).ravel()] = False
    return context, targets


def _place_keeping_context(
    cfg: MaskConfig, family: str, blocks: _Blocks, grid: Grid, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """`_place`, redrawing the positions of samples whose context has fewer than min_keep patches."""
    context, targets = _place(blocks, grid, n, rng)
    short = context.sum(axis=1) < cfg.min_keep
    for _ in range(_MAX_TRIES - 1):
        if not short.any():
            break
        redo = np.flatnonzero(short)
        context[redo], targets[redo] = _place(blocks, grid, redo.size, rng)
        short[redo] = context[redo].sum(axis=1) < cfg.min_keep
    if short.any():
        raise _impossible(cfg, family, grid, f"{short.sum()} samples still kept fewer than mask.min_keep "
                                             f"context patches after {_MAX_TRIES} placements of "
                                             f"{_blocks_text(blocks)}")
    return context, targets


def _random_masks(
    cfg: MaskConfig, grid: Grid, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Unstructured masking: one target set of round(ratio·N) uniform patches, context = the rest."""
    num = grid[0] * grid[1]
    n_target = _random_target_count(cfg, num)
    targets = np.sort(np.argpartition(rng.random((n, num)), n_target - 1, axis=1)[:, :n_target], axis=1)
    context = np.ones((n, num), dtype=bool)
    np.put_along_axis(context, targets, False, axis=1)
    return context, targets[:, None, :]


def _random_target_count(cfg: MaskConfig, num_patches: int) -> int:
    return min(max(round(cfg.random_target_ratio * num_patches), 1), num_patches - 1)


def _impossible(cfg: MaskConfig, family: str, grid: Grid, problem: str) -> ConfigError:
    """ConfigError naming the family's target-size key, with what went wrong and the keys that fix it."""
    hint = ("lower mask.random_target_ratio" if family == "random" else
            f"lower {_TARGET_KEY[family]} or mask.{family}_num_targets, raise mask.context_scale")
    return ConfigError(f"{_TARGET_KEY[family]}: on the {grid[0]}x{grid[1]} patch grid, {problem}; "
                       f"{hint} or lower mask.min_keep={cfg.min_keep}")


def _blocks_text(blocks: _Blocks) -> str:
    sizes = f"{blocks.k} target blocks of {blocks.targets[0]}" if len(set(blocks.targets)) == 1 else \
        f"target blocks of {', '.join(map(str, blocks.targets))}"
    return f"{sizes} and a context block of {blocks.context} (time, freq) patches"


def _pad(members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, N) boolean -> (B, m) indices, m = the largest row count, each row's patches sorted and then padded
    with its first patch, and the (B, m) padding mask. Every row keeps every patch."""
    counts = members.sum(axis=1)
    order = np.argsort(~members, axis=1, kind="stable")[:, :counts.max()]  # members first, in index order
    pad = np.arange(order.shape[1])[None, :] >= counts[:, None]
    return np.where(pad, order[:, :1], order), pad


def _truncate(members: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(B, N) boolean -> (B, m) sorted indices, m = the smallest row count.

    Longer rows keep a uniform random subset: keeping the first indices would bias towards early time."""
    counts = members.sum(axis=1)
    m = int(counts.min())
    if (counts == m).all():
        return np.nonzero(members)[1].reshape(len(members), m)  # row-major order: already sorted
    keys = np.where(members, rng.random(members.shape), 2.0)  # non-members sort last
    return np.sort(np.argpartition(keys, m - 1, axis=1)[:, :m], axis=1)


# -------------------------------------------------------------------------------------------- sampling


def _rngs(seed: int, step: int, rank: int) -> tuple[np.random.Generator, np.random.Generator]:
    batch = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(step, _STREAM_BATCH)))
    positions = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(step, _STREAM_POSITIONS, rank)))
    return batch, positions


def _untruncated(
    cfg: MaskConfig, family: str, grid: Grid, batch_size: int,
    batch_rng: np.random.Generator, pos_rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Context (B, N) boolean, before truncation, and target indices (B, K, Nt).

    Every target block lies wholly inside the grid, so each block already has one size across samples."""
    if family == "random":
        return _random_masks(cfg, grid, batch_size, pos_rng)
    blocks = _block_sizes(cfg, family, grid, batch_rng)
    return _place_keeping_context(cfg, family, blocks, grid, batch_size, pos_rng)


def sample_masks(
    cfg: MaskConfig, grid: Grid, batch_size: int, *, step: int, total_steps: int, seed: int,
    rank: int = 0, family: str | None = None,
) -> MaskBatch:
    """Masks for one batch at optimizer `step` on DDP `rank`.

    `family` overrides the schedule, for plots and stats. Ranks share the family and the block sizes; the
    context length Nc can differ between ranks because each truncates to its own batch minimum (or, with
    mask.pad_context, pads to its own maximum)."""
    batch_rng, pos_rng = _rngs(seed, step, rank)
    # Always consume the family draw so the block sizes do not depend on whether `family` was forced.
    u = batch_rng.random()
    if family is None:
        family = "random" if cfg.schedule == "random" else ("tf" if u < tf_probability(cfg, step, total_steps)
                                                            else "rb")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    context, targets = _untruncated(cfg, family, grid, batch_size, batch_rng, pos_rng)
    if cfg.pad_context:
        kept, pad = _pad(context)
        return MaskBatch(torch.from_numpy(kept), torch.from_numpy(targets), family, grid, torch.from_numpy(pad))
    return MaskBatch(context=torch.from_numpy(_truncate(context, pos_rng)), targets=torch.from_numpy(targets),
                     family=family, grid=grid)


# ------------------------------------------------------------------------------------------ validation


def _worst_sizes(cfg: MaskConfig, family: str, grid: Grid) -> list[_Blocks]:
    """Targets at the top of their scale range (across aspects / stripe kinds) with the smallest context
    block: if these keep min_keep patches, every size draw does."""
    context = rb_extent(cfg.context_scale[0], 1.0, grid, cfg.block_geometry)
    if family == "rb":
        k = cfg.rb_num_targets
        targets = {rb_extent(cfg.rb_target_scale[1], r, grid, cfg.block_geometry)
                   for r in np.linspace(*cfg.rb_aspect_ratio, 5)}
    else:
        k = cfg.tf_num_targets
        targets = {tf_extent(cfg.tf_target_scale[1], rows, grid, cfg.tf_stripes == "block")
                   for rows in (None, *cfg.tf_band_rows)}
    return [_Blocks((target,) * k, context) for target in sorted(targets)]


def _check_equal_area_bands(cfg: MaskConfig, grid: Grid) -> None:
    """mask.tf_stripes=block: every band must hold exactly a time stripe's w·F patches within the grid."""
    t, f = grid
    for rows in range(cfg.tf_band_rows[0], min(cfg.tf_band_rows[1], f) + 1):
        if f % rows:
            raise ConfigError(f"mask.tf_band_rows: with mask.tf_stripes=block a band of {rows} rows must hold a "
                              f"time stripe's patches, but {rows} does not divide the {f} frequency rows")
    columns, _ = tf_extent(cfg.tf_target_scale[1], cfg.tf_band_rows[0], grid, equal_area=True)
    if columns > t:
        raise ConfigError(f"mask.tf_target_scale: with mask.tf_stripes=block a {cfg.tf_band_rows[0]}-row band "
                          f"as large as a time stripe at scale {cfg.tf_target_scale[1]} spans {columns} time "
                          f"patches, more than the grid's {t}")


def validate_masks(cfg: MaskConfig, grid: Grid) -> None:
    """Raise ConfigError naming the `mask.*` key when the schedule's families cannot mask this grid.

    Cheap enough to run before any Ray work: arithmetic checks, then a few hundred placements at the
    worst-case block sizes, then one real batch per family."""
    t, f = grid
    num = t * f
    if t < 1 or f < 1:
        raise ValueError(f"grid must have at least one patch per axis, got {grid}")
    if cfg.min_keep >= num:
        raise ConfigError(f"mask.min_keep: {cfg.min_keep} leaves no target on a {t}x{f} grid of {num} "
                          "patches")
    rng = np.random.default_rng(0)
    for family in families_in_use(cfg):
        if family == "random":
            kept = num - _random_target_count(cfg, num)
            if kept < cfg.min_keep:
                raise _impossible(cfg, family, grid, f"random masks leave only {kept} of {num} patches "
                                                     "as context, fewer than mask.min_keep")
        else:
            if family == "tf" and cfg.tf_stripes == "block":
                _check_equal_area_bands(cfg, grid)
            _check_block_family(cfg, family, grid, rng)
        sample_masks(cfg, grid, 64, step=0, total_steps=1, seed=0, family=family)


def _check_block_family(cfg: MaskConfig, family: str, grid: Grid, rng: np.random.Generator) -> None:
    ct, cf = rb_extent(cfg.context_scale[0], 1.0, grid, cfg.block_geometry)
    if ct * cf < cfg.min_keep:
        raise ConfigError(f"mask.context_scale: the smallest context block ({ct}x{cf} patches at scale "
                          f"{cfg.context_scale[0]}) is below mask.min_keep={cfg.min_keep} on a "
                          f"{grid[0]}x{grid[1]} grid")
    for blocks in _worst_sizes(cfg, family, grid):
        context, _ = _place(blocks, grid, _CHECK_DRAWS, rng)
        accept = float((context.sum(axis=1) >= cfg.min_keep).mean())
        if accept < _MIN_ACCEPT:
            raise _impossible(cfg, family, grid, f"{1 - accept:.0%} of placements of {_blocks_text(blocks)} "
                                                 "keep fewer than mask.min_keep context patches")


# ------------------------------------------------------------------------------------- stats and plots


def mask_stats(cfg: MaskConfig, grid: Grid, n_batches: int, batch_size: int, seed: int) -> dict[str, float]:
    """Mean fractions of the grid per family over n_batches batches (steps 0 .. n_batches - 1).

    `<family>/context_fraction` is what the encoder sees after truncation to the batch minimum;
    `<family>/context_fraction_untruncated` is the mean before it; `<family>/target_fraction` is the union
    of the target blocks."""
    num = grid[0] * grid[1]
    stats: dict[str, float] = {}
    for family in FAMILIES:
        kept, untruncated, target = [], [], []
        for step in range(n_batches):
            batch_rng, pos_rng = _rngs(seed, step, 0)
            batch_rng.random()  # the family draw, as in sample_masks
            context, targets = _untruncated(cfg, family, grid, batch_size, batch_rng, pos_rng)
            counts = context.sum(axis=1)
            kept.append(counts.min() / num)
            untruncated.append(counts.mean() / num)
            union = np.zeros_like(context)
            np.put_along_axis(union, targets.reshape(batch_size, -1), True, axis=1)
            target.append(union.sum(axis=1).mean() / num)
        stats[f"{family}/context_fraction"] = float(np.mean(kept))
        stats[f"{family}/context_fraction_untruncated"] = float(np.mean(untruncated))
        stats[f"{family}/target_fraction"] = float(np.mean(target))
    return stats


def plot_mask_examples(
    cfg: MaskConfig, grid: Grid, path: str | Path, n_examples: int = 3, seed: int = 0
) -> Path:
    """PNG with one row per family and one column per example: sample 0 of a batch of one at steps 0, 1, ...,
    so the context is shown before the batch-minimum truncation that training batches apply."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
    from matplotlib.patches import Patch

    t, f = grid
    k_max = max(cfg.rb_num_targets, cfg.tf_num_targets)
    colours = ["#e6e6e6", "#4c72b0"] + [f"C{1 + k % 9}" for k in range(k_max)]
    cmap = ListedColormap(colours)
    width, height = 4.0 * n_examples + 1.6, 2.2 * len(FAMILIES)
    fig = Figure(figsize=(width, height))
    # Fixed margins in inches rather than a constrained layout, which draws the figure twice to measure it.
    fig.subplots_adjust(left=0.6 / width, right=1 - 1.3 / width, bottom=0.5 / height, top=1 - 0.5 / height,
                        wspace=0.15, hspace=0.35)
    axes = fig.subplots(len(FAMILIES), n_examples, squeeze=False, sharex=True, sharey=True)
    for row, family in enumerate(FAMILIES):
        for col in range(n_examples):
            masks = sample_masks(cfg, grid, 1, step=col, total_steps=1, seed=seed, family=family)
            image = np.zeros(t * f, dtype=np.int64)
            image[masks.context[0].numpy()] = 1
            for k, block in enumerate(masks.targets[0]):  # later blocks paint over earlier overlaps
                image[block.numpy()] = 2 + k
            ax = axes[row, col]
            ax.imshow(image.reshape(t, f).T, origin="lower", aspect="auto", cmap=cmap,
                      vmin=-0.5, vmax=len(colours) - 0.5, interpolation="nearest")
            ax.set_title(f"{family.upper()} #{col + 1}: context {masks.context_fraction:.0%}, "
                         f"targets {masks.target_fraction:.0%}", fontsize=9)
            if row == len(FAMILIES) - 1:
                ax.set_xlabel("time patch")
            if col == 0:
                ax.set_ylabel("freq patch")
        n_targets = masks.targets.shape[1]
        handles = [Patch(color=colours[0], label="unused"), Patch(color=colours[1], label="context")]
        handles += [Patch(color=colours[2 + k], label=f"target {k + 1}") for k in range(n_targets)]
        axes[row, -1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    fig.suptitle(f"A-JEPA masks on the {t}x{f} patch grid (schedule {cfg.schedule})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path

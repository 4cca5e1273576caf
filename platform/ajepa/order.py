"""The order training reads the store's train split in: a pure function of (seed, epoch), numpy only.

The store's rows are shuffled once when it is built (data.py), so every Parquet file is a random sample of
the split. An epoch then costs no shuffle of the data itself, only of indices:

1. the files come in a permutation drawn from (seed, epoch);
2. consecutive files (in that order) form groups of at least `window` rows, and each group's rows are
   shuffled, so a batch is not the same run of one file's rows every epoch; a group is read at once, which
   bounds the memory a rank holds;
3. the epoch's first `batches_per_epoch * batch_size * world` rows are cut into `world` equal contiguous
   spans, one per rank; the rest (fewer than one global batch) wait for another epoch's order.

Every rank takes the same number of full batches per epoch (no DDP rank runs out early, Ray issue 66085),
reads only its span's groups, and can start at any micro-batch: a resumed run reads from where the
unbroken run was, without reading what came before.

Rows are named by their index in the split's files laid end to end, in the order `data.train_files` lists them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Keeps this stream apart from the other draws seeded by run.seed (masks, augmentation, initial weights).
_STREAM = 0x0DA7A


def batches_per_epoch(total: int, batch_size: int, world: int) -> int:
    """Full batches each rank takes per epoch."""
    per_epoch = total // (batch_size * world)
    if per_epoch < 1:
        raise ValueError(f"{total} rows cannot fill one batch of {batch_size} on each of {world} ranks")
    return per_epoch


def group_ends(rows: Sequence[int], window: int) -> np.ndarray:
    """Where each shuffle group ends, in rows from the epoch's start, for files of `rows` rows in epoch order.

    Files join a group until it holds at least `window` rows; rows too few for a group of their own join the
    last one (so one group when the whole split is smaller than `window`)."""
    ends, begin = [], 0
    for end in np.cumsum(rows, dtype=np.int64).tolist():
        if end - begin >= window:
            ends.append(end)
            begin = end
    total = int(np.sum(rows))
    if begin < total:
        if ends:
            ends[-1] = total
        else:
            ends.append(total)
    return np.asarray(ends, dtype=np.int64)


def epoch_order(rows: Sequence[int], seed: int, epoch: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, ends): every row of the split once, in epoch `epoch`'s order, and where its shuffle groups end."""
    rows = np.asarray(rows, dtype=np.int64)
    starts = np.cumsum(rows) - rows
    rng = np.random.default_rng([_STREAM, seed, epoch])
    files = rng.permutation(len(rows))
    order = np.concatenate([np.arange(starts[f], starts[f] + rows[f]) for f in files])
    ends = group_ends(rows[files], window)
    for begin, end in zip([0, *ends[:-1].tolist()], ends.tolist(), strict=True):
        rng.shuffle(order[begin:end])  # in place: a slice of an array is a view
    return order, ends


def rank_pieces(rows: Sequence[int], seed: int, epoch: int, window: int, batch_size: int, rank: int, world: int,
                first_batch: int = 0) -> list[np.ndarray]:
    """The rows `rank` trains on in `epoch` from its micro-batch `first_batch` of the epoch on, in order, cut
    where shuffle groups end: each piece lies in one group, and is read at once."""
    per_epoch = batches_per_epoch(int(np.sum(rows)), batch_size, world)
    if not 0 <= first_batch < per_epoch:
        raise ValueError(f"first_batch must be in [0, {per_epoch}), got {first_batch}")
    order, ends = epoch_order(rows, seed, epoch, window)
    span = per_epoch * batch_size
    begin, stop = rank * span + first_batch * batch_size, (rank + 1) * span
    cuts = ends[(ends > begin) & (ends < stop)] - begin
    return np.split(order[begin:stop], cuts)

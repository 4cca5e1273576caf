"""The training data order: a pure function of (seed, epoch), equal per rank, resumable at any micro-batch."""

import itertools

import numpy as np
import pytest
from ajepa import order

# ------------------------------------------------------------------------------------------- pure order

FILE_ROWS = [13, 9, 16, 11, 12, 7, 14]  # uneven, as a build's files are


def test_groups_are_whole_files_of_at_least_the_window_and_cover_the_epoch():
    assert order.group_ends([10, 10, 10, 10, 10], 20).tolist() == [20, 50]  # the short tail joins the last group
    assert order.group_ends([10, 10, 10], 25).tolist() == [30]
    assert order.group_ends([10, 10, 10], 1).tolist() == [10, 20, 30]  # each file shuffled alone
    assert order.group_ends([10, 10], 500).tolist() == [20]  # one group: a full shuffle of a small split


def test_epoch_order_is_a_permutation_drawn_from_seed_and_epoch():
    total = sum(FILE_ROWS)
    first, ends = order.epoch_order(FILE_ROWS, seed=3, epoch=0, window=20)
    assert sorted(first.tolist()) == list(range(total)) and ends[-1] == total
    assert np.array_equal(first, order.epoch_order(FILE_ROWS, 3, 0, 20)[0])
    assert not np.array_equal(first, order.epoch_order(FILE_ROWS, 3, 1, 20)[0])
    assert not np.array_equal(first, order.epoch_order(FILE_ROWS, 4, 0, 20)[0])
    # Each group holds whole files, so a rank reads a group's files once; and its rows are shuffled across them.
    starts = np.cumsum(FILE_ROWS) - FILE_ROWS
    file_of = np.searchsorted(starts, first, side="right") - 1
    groups = np.split(file_of, ends[:-1])
    for i, group in enumerate(groups):
        files = set(group.tolist())
        assert len(group) == sum(FILE_ROWS[f] for f in files) >= (20 if i < len(groups) - 1 else 0)
        assert any(a != b for a, b in itertools.pairwise(group)), "rows of a group come file after file"


def test_rank_pieces_split_the_epoch_into_equal_spans_and_resume_inside_them():
    total, batch, world = sum(FILE_ROWS), 4, 3
    per_epoch = order.batches_per_epoch(total, batch, world)
    assert per_epoch == total // 12 == 6
    full, _ = order.epoch_order(FILE_ROWS, 0, 2, 20)
    spans = [np.concatenate(order.rank_pieces(FILE_ROWS, 0, 2, 20, batch, r, world)) for r in range(world)]
    assert all(len(s) == per_epoch * batch for s in spans)
    assert np.array_equal(np.concatenate(spans), full[:world * per_epoch * batch])  # the tail waits for another epoch
    later = np.concatenate(order.rank_pieces(FILE_ROWS, 0, 2, 20, batch, 1, world, first_batch=4))
    assert np.array_equal(later, spans[1][4 * batch:])
    with pytest.raises(ValueError, match=r"first_batch must be in \[0, 6\)"):
        order.rank_pieces(FILE_ROWS, 0, 2, 20, batch, 1, world, first_batch=6)
    with pytest.raises(ValueError, match="82 rows cannot fill one batch of 32 on each of 3 ranks"):
        order.batches_per_epoch(total, 32, world)

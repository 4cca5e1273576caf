"""The training data order: shuffled once at build time, then a pure function of (seed, epoch), equal per rank,
resumable at any micro-batch. Pure index functions first (no store), then a real store built by local Ray."""

import collections
import csv
import itertools
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from ajepa import cli, data, order
from ajepa.config import AudioConfig
from conftest import micro_cfg, tone

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


# ------------------------------------------------------------------------------------ a real store

CLASSES = ("cat", "dog", "owl", "yak")
CFG = AudioConfig(target_frames=16)


@pytest.fixture(scope="module")
def store(tmp_path_factory, ray_local):
    """64 short clips, 16 per class listed class after class, 12 of each in train: the build's 4 tasks of 16 rows
    would each write one class if rows kept listing order."""
    root = tmp_path_factory.mktemp("order")
    rows = []
    for c, label in enumerate(CLASSES):
        (root / label).mkdir()
        for i in range(16):
            sf.write(root / label / f"{i}.wav", tone(0.2, 16000, freq=200.0 + 150 * c + 5 * i), 16000)
            rows.append({"path": f"{label}/{i}.wav", "label": label, "split": "train" if i < 12 else "val"})
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return data.build_store(root / "manifest.csv", root / "store", CFG).out


def test_build_shuffles_rows_once_with_its_seed_so_every_file_mixes_classes(store):
    files = data.train_files(store)
    assert sum(files.rows) == 48 and len(files.paths) == 4
    listed = [data.clip_id(f"{label}/{i}.wav") for label in CLASSES for i in range(16)]
    seeded = [listed[i] for i in np.random.default_rng(data.BUILD_SEED).permutation(len(listed))]
    position = {clip: i for i, clip in enumerate(seeded)}
    for path in files.paths:
        table = pq.read_table(path, columns=["id", "label"])
        assert len(set(table.column("label").to_pylist())) >= 3, f"{path}: rows of one or two classes"
        where = [position[clip] for clip in table.column("id").to_pylist()]
        assert where == sorted(where), f"{path}: rows not in the build's seeded order"


def epoch_ids(files, seed, epoch, world=2, batch=4, window=20):
    """Each rank's batches of ids in `epoch`, read from the store."""
    per_epoch = order.batches_per_epoch(sum(files.rows), batch, world)
    ranks = []
    for rank in range(world):
        stream = data.train_batches(files, ["id"], batch, seed, rank, world, window, start=epoch * per_epoch)
        ranks.append([b.column("id").to_pylist() for b in itertools.islice(stream, per_epoch)])
        stream.close()
    return ranks


def test_order_is_a_function_of_seed_and_epoch_and_every_clip_comes_once_an_epoch(store):
    files = data.train_files(store)
    clips = set(data.read_labels(store, "train", column="id"))
    epochs = [epoch_ids(files, seed=0, epoch=e) for e in range(3)]
    for ranks in epochs:
        assert [len(r) for r in ranks] == [6, 6] and all(len(b) == 4 for r in ranks for b in r)
        seen = [clip for r in ranks for b in r for clip in b]
        assert len(seen) == 48 and set(seen) == clips  # 48 = 6 batches x 4 rows x 2 ranks: each clip once
    assert epoch_ids(files, seed=0, epoch=1) == epochs[1]
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != epochs[2]
    assert epoch_ids(files, seed=1, epoch=0) != epochs[0]
    # Batches are not a fixed partition that only changes order: pairs of clips batched together move apart.
    together = [{frozenset(p) for r in ranks for b in r for p in itertools.combinations(b, 2)} for ranks in epochs]
    assert len(together[0] & together[1]) < len(together[0]) / 2


def test_resuming_at_any_micro_batch_reads_what_the_unbroken_run_read(store):
    files = data.train_files(store)

    def ids(rank, start, n):
        stream = data.train_batches(files, ["id"], 4, 7, rank, 2, 20, start=start)
        batches = [b.column("id").to_pylist() for b in itertools.islice(stream, n)]
        stream.close()
        return batches

    for rank in (0, 1):
        unbroken = ids(rank, 0, 20)  # 3 epochs of 6 batches and more
        for start in (1, 5, 6, 9, 17):  # mid-epoch, the last batch of one, the first of the next
            assert ids(rank, start, 20 - start) == unbroken[start:], (rank, start)


def test_a_label_subset_keeps_a_fixed_fraction_of_each_label_and_training_reads_only_those(store):
    def drawn(files):
        return files.paths, files.rows, [k.tolist() for k in files.keep]

    # 12 train clips a label: a quarter is 3 of each, the same 3 on every call; a fraction too small still keeps one.
    files = data.train_files(store, 0.25)
    assert sum(files.rows) == 12 and drawn(files) == drawn(data.train_files(store, 0.25))
    every = data.train_files(store)
    table = pa.concat_tables([pq.read_table(p, columns=["id", "label"]) for p in every.paths])
    label_of = dict(zip(table.column("id").to_pylist(), table.column("label").to_pylist(), strict=True))
    read = [clip for e in range(2) for r in epoch_ids(files, seed=0, epoch=e, batch=2) for b in r for clip in b]
    assert len(read) == 24 and len(set(read)) == 12, "each kept clip once an epoch, no other clip"
    assert collections.Counter(label_of[c] for c in set(read)) == dict.fromkeys(CLASSES, 3)
    assert sum(data.train_files(store, 0.01).rows) == 4, "one clip of each label"
    assert every.keep is None and sum(every.rows) == 48


def test_training_refuses_a_store_of_another_version(store, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(store, old)
    stats = json.loads((old / "stats.json").read_text())
    (old / "stats.json").write_text(json.dumps({**stats, "version": 2}))
    with pytest.raises(data.StoreError, match=f"{old}: store version 2, training needs version {data.STORE_VERSION}"):
        data.train_files(old)
    # The job stops before Ray or MLflow start, and says how to rebuild.
    assert cli.main(["pretrain", "--data", str(old), "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert f"--out {old} --overwrite" in err and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------- Ray Train


def _record_loop(config):
    """Each rank reads as a training loop does (`runs.host_batches`), from 0 and from config["resume_at"], and
    takes one collective step per batch, as DDP does; it writes the ids it saw."""
    import ray.train
    import torch
    import torch.distributed as dist
    from ajepa.config import config_from_dict
    from ajepa.train import runs

    ctx = ray.train.get_context()
    worker = runs.Worker(config_from_dict(config["config"]), ctx.get_world_rank(), ctx.get_world_size(),
                         torch.device("cpu"), None)
    seen = {}
    for start in (0, config["resume_at"]):
        batches = runs.host_batches(config, worker, start, columns=("id",))
        seen[start] = []
        for _ in range(config["steps"] - start):
            fbank, n_frames, columns = next(batches)
            dist.all_reduce(torch.ones(1))
            seen[start].append([str(i) for i in columns["id"]])
            assert fbank.shape == (len(columns["id"]), 16, 128) and n_frames.shape == (len(columns["id"]),)
        batches.close()
    Path(config["out"], f"rank{worker.rank}.json").write_text(json.dumps(seen))


@pytest.mark.slow
def test_two_ray_train_workers_take_equal_full_batches_and_resume_exactly(store, tmp_path):
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this test module
    cfg = micro_cfg("data.batch_size=4", "data.shuffle_window=20")
    config = {"config": cfg.to_dict(), "train_files": data.train_files(store),
              "fbank_shape": [16, 128], "steps": 15, "resume_at": 8, "out": str(tmp_path)}
    TorchTrainer(_record_loop, train_loop_config=config,
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                 run_config=RunConfig(name="order", storage_path=str(tmp_path / "ray"))).fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for seen in ranks:
        assert len(seen["0"]) == 15 and all(len(b) == 4 for b in seen["0"])
        assert seen["8"] == seen["0"][8:]  # resumed mid-epoch (6 batches an epoch): the same batches from there
    for epoch in range(2):  # both ranks' batches of an epoch: each training clip once
        ids = [i for seen in ranks for b in seen["0"][6 * epoch:6 * epoch + 6] for i in b]
        assert len(ids) == len(set(ids)) == 48

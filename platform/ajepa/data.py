"""The spectrogram store: Ray Data turns audio files into sharded Parquet once; training streams it back.

Store layout (a folder on any filesystem the cluster shares: a local path or an s3://, gs://, file:// URI, through
storage.py):

    split=train/*.parquet   id, path, label, [extra manifest columns], fbank (T x F float16, raw bytes),
    split=val/*.parquet     n_frames, frame_sum, frame_sumsq (over real frames, for the stats)
    split=test/*.parquet
    stats.json              audio config, mean/std (train split's real frames), classes, counts per split, failures
    failures.csv            path,reason for every input that could not become a spectrogram

The fbank column holds each spectrogram's raw float16 bytes; its shape is `audio.target_frames x
audio.num_mel_bins` in stats.json. Measured here on 63 rows of 1024 x 128: Parquet writes that in 0.02 s and
reads it in 0.013 s, against 0.33 s and 0.18 s for Ray's tensor extension column (a fixed-size list), which
would have cost more than the fbank computation itself. `decode_fbank` turns the column back into an array.

The build's input (a folder or a manifest, local or a URI) is listed on the driver through its filesystem; the
build's tasks read each file's bytes from that filesystem, so a bucket input needs no filesystem shared between
nodes, and an input that a node cannot see stops the build instead of becoming a store of failures.

The build writes the rows in a seeded random order, so every file is a random sample of its split. Training
reads the train split's files straight (`train_batches`) in order.py's order: seeded by (seed, epoch), no
shuffle of the data between epochs, every rank the same number of batches, resumable at any step.

This module is the only place that builds Ray Datasets and the only one that reads the store.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import posixpath
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ajepa import order, storage
from ajepa.audio import AudioError, spectrogram_from_bytes
from ajepa.background import Background
from ajepa.config import AudioConfig
from ajepa.progress import Progress, polling
from ajepa.storage import Location

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au", ".w64", ".caf")
SPLITS = ("train", "val", "test")
MANIFEST_RESERVED = ("id", "fbank", "n_frames", "frame_sum", "frame_sumsq", "status", "reason")
STORE_VERSION = 3  # 2: mean/std from the train split only; 3: rows in a seeded random order (files mix classes)
BUILD_SEED = 0  # the store's one row shuffle: fixed, so rebuilding the same input writes the same files
# A build task stops the build when at least this many of its clips, and more than half, cannot be read: an input
# the node cannot see fails every clip, while a few missing or broken files are the failures.csv's business.
NOT_VISIBLE_MIN = 4


class StoreError(RuntimeError):
    """The store cannot be built or read; the message names the input, file or field."""


@dataclass(frozen=True)
class Clip:
    path: str  # where the build's tasks read it: inside the input's filesystem (an absolute path on a local disk)
    rel: str  # path as the user named it (relative to the input folder or manifest)
    label: str
    split: str
    extra: dict[str, str]


@dataclass
class StoreSummary:
    out: Location
    written: int
    failed: int
    counts: dict[str, int]
    classes: list[str]
    mean: float
    std: float

    def line(self) -> str:
        splits = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        return f"{self.written} clips written, {self.failed} failed ({splits}) -> {self.out}"


# ---------------------------------------------------------------------------------------------- listing


def hash_split(key: str, ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> str:
    """Deterministic split from a stable hash, so re-builds and new files never move old clips."""
    u = int(hashlib.sha1(key.encode()).hexdigest()[:12], 16) / 16**12
    return "train" if u < ratios[0] else "val" if u < ratios[0] + ratios[1] else "test"


def list_folder(root: Location) -> list[Clip]:
    """Audio files under `root`, by path; the label is the first sub-folder's name ('' for files at the top).
    A bucket prefix is listed through its filesystem; the clips' order does not depend on which one."""
    clips = []
    for full in _local_walk(root.path) if root.is_local else [f.path for f in root.files(recursive=True)]:
        if not full.lower().endswith(AUDIO_EXTENSIONS):
            continue
        rel = display_name(posixpath.relpath(full, root.path))
        label = rel.split("/", 1)[0] if "/" in rel else ""
        clips.append(Clip(full, rel, label, hash_split(rel), {}))
    return sorted(clips, key=lambda c: c.rel)


def _local_walk(root: str) -> Iterator[str]:
    """Every file and folder below a local `root`. os.walk, not pyarrow, on a local disk: it keeps names that are
    not UTF-8 (pyarrow's paths are text) and does not follow symlinked folders, so a symlink loop cannot trap it;
    a file symlink that loops is listed and then fails to read, which failures.csv records."""
    for folder, dirs, files in os.walk(root):
        # A folder named like audio (`x.wav`) is listed as well, so it shows up in failures.csv ("Is a
        # directory") instead of passing silently as a class; its contents are still walked.
        for name in files + dirs:
            yield os.path.join(folder, name)


def display_name(path: str) -> str:
    """A path as valid UTF-8 text: Parquet and CSV hold nothing else, but Linux file names are bytes (an archive
    made on Windows can carry Latin-1 names). Bytes that are not UTF-8 are shown as \\xNN; the workers open the
    real name (`Clip.path`)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def read_manifest(manifest: Location) -> list[Clip]:
    """CSV with columns path,label[,split] and any extra columns (kept as strings). Relative paths are
    resolved against the manifest's folder, in its filesystem; a path may also be a URI on the same storage
    (a bucket manifest naming s3://bucket/key). Multi-label rows use `a;b` in the label."""
    try:
        # utf-8-sig: a spreadsheet's "CSV UTF-8" export starts with a byte-order mark, which would rename `path`.
        reader = csv.DictReader(io.StringIO(manifest.read_bytes().decode("utf-8-sig"), newline=""))
        fields = reader.fieldnames or []
        missing = [c for c in ("path", "label") if c not in fields]
        if missing:
            raise StoreError(f"{manifest}: missing column(s) {', '.join(missing)} (header: {fields})")
        reserved = [c for c in fields if c in MANIFEST_RESERVED]
        if reserved:
            raise StoreError(f"{manifest}: column name(s) {', '.join(reserved)} are reserved by the store")
        rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise StoreError(f"{manifest}: cannot read manifest ({exc})") from None
    clips = []
    first_line: dict[str, int] = {}  # normalised full path -> the line that named it first
    for line, row in enumerate(rows, start=2):
        rel = (row.get("path") or "").strip()
        if not rel:
            raise StoreError(f"{manifest}:{line}: empty path")
        full = _manifest_path(manifest, rel, line)
        # Spelled differently (`a.wav`, `./a.wav`, an absolute path) is still the same file twice.
        if full in first_line:
            raise StoreError(f"{manifest}:{line}: duplicate path {rel!r} (line {first_line[full]} names "
                             "the same file)")
        first_line[full] = line
        split = (row.get("split") or "").strip() or hash_split(rel)
        if split not in SPLITS:
            raise StoreError(f"{manifest}:{line}: split must be one of {', '.join(SPLITS)}, got {split!r}")
        extra = {k: (v or "") for k, v in row.items() if k not in ("path", "label", "split") and k}
        clips.append(Clip(full, rel, (row.get("label") or "").strip(), split, extra))
    return clips


def _manifest_path(manifest: Location, rel: str, line: int) -> str:
    """A manifest row's file as a path in the manifest's filesystem, normalised."""
    if storage.is_uri(rel):
        target = storage.resolve(rel)
        if (target.scheme, target.path.split("/", 1)[0]) != (manifest.scheme, manifest.path.split("/", 1)[0]):
            raise StoreError(f"{manifest}:{line}: {rel} is not in the manifest's storage ({manifest.parent}); "
                             "name files relative to the manifest or in its bucket")
        return target.path
    return posixpath.normpath(posixpath.join(manifest.parent.path, rel))


def list_inputs(source: Location) -> list[Clip]:
    if source.is_dir():
        return list_folder(source)
    if source.is_file() and source.name.lower().endswith(".csv"):
        return read_manifest(source)
    if source.exists():
        raise StoreError(f"{source}: input must be a folder of audio files or a .csv manifest")
    raise StoreError(f"{source}: input does not exist")


# --------------------------------------------------------------------------------------------- building


def clip_id(rel: str) -> str:
    return hashlib.sha1(rel.encode()).hexdigest()[:16]


def input_rows(clips: list[Clip]) -> list[dict[str, Any]]:
    """The rows the build's tasks get: one per clip, every extra manifest column in every row."""
    extra_keys = sorted({k for c in clips for k in c.extra})
    # The path goes as bytes: a file name that is not UTF-8 cannot be an Arrow string, but opens as bytes.
    return [
        {"id": clip_id(c.rel), "path": os.fsencode(c.path), "rel": c.rel, "label": c.label, "split": c.split,
         **{k: c.extra.get(k, "") for k in extra_keys}}
        for c in clips
    ]


class InputNotVisible(StoreError):
    """Most of a build task's clips cannot be read: the input is not where this node looks (not mounted, no
    credentials, a manifest naming files elsewhere). Raised in the task, it stops the whole build."""


def _read_bytes(source: Location, path: bytes) -> bytes:
    """One file's bytes, from the input's filesystem. A local file opens by its bytes name (pyarrow's paths are
    text, which a name that is not UTF-8 is not)."""
    if source.is_local:
        with open(path, "rb") as fh:
            return fh.read()
    with source.fs.open_input_stream(path.decode()) as fh:
        return fh.read()


def read_batch(batch: dict[str, np.ndarray], source: Location) -> dict[str, np.ndarray]:
    """Ray Data map_batches function, the build's read: each row's audio bytes from `source`'s filesystem (every
    node reaches a bucket; a local path must be mounted on the node that runs the task), in an `audio` column.
    A file that cannot be read is a failed row ('unreadable: <why>'); when more than half of the batch (and at
    least NOT_VISIBLE_MIN) fails, the build stops (InputNotVisible, naming this node and a path) rather than
    writing a store of failures."""
    n = len(batch["path"])
    audio = np.full(n, b"", dtype=object)
    status = np.full(n, "ok", dtype=object)
    reasons = np.full(n, "", dtype=object)
    for i, path in enumerate(batch["path"]):
        try:
            audio[i] = _read_bytes(source, path)
        except OSError as exc:
            status[i], reasons[i] = "failed", f"unreadable: {exc.strerror or exc}"
    failed = np.flatnonzero(status == "failed")
    if len(failed) >= NOT_VISIBLE_MIN and 2 * len(failed) > n:
        import ray

        first = failed[0]
        where = dataclasses.replace(source, path=display_name(os.fsdecode(batch["path"][first])))
        raise InputNotVisible(
            f"input not visible from node {ray.util.get_node_ip_address()} (node id "
            f"{ray.get_runtime_context().get_node_id()}): {len(failed)} of {n} clips of a build task could not be "
            f"read, e.g. {where}: {reasons[first]}. Every node must reach the input: on a cluster use a bucket "
            "URI (s3://, gs://) or a filesystem mounted on every node")
    out = {k: v for k, v in batch.items() if k not in ("path", "rel")}
    out.update(path=batch["rel"], audio=audio, status=status, reason=reasons)
    return out


def process_batch(batch: dict[str, np.ndarray], cfg: AudioConfig) -> dict[str, np.ndarray]:
    """Ray Data map_batches function after `read_batch`: each read row's audio bytes become its spectrogram.
    Every row comes out, with status 'ok' or 'failed' + reason (failed rows have an empty fbank; the build
    moves them to failures.csv)."""
    import torch

    torch.set_num_threads(1)  # one task per CPU: threads inside a task would only contend
    n = len(batch["audio"])
    fbanks = np.full(n, b"", dtype=object)
    n_frames = np.zeros(n, dtype=np.int32)
    sums = np.zeros(n, dtype=np.float64)
    sumsqs = np.zeros(n, dtype=np.float64)
    status = np.array(batch["status"], dtype=object)  # a copy that takes longer strings than the batch's
    reasons = np.array(batch["reason"], dtype=object)
    for i in np.flatnonzero(status == "ok"):
        try:
            spec = spectrogram_from_bytes(batch["audio"][i], cfg)
        except AudioError as exc:
            status[i], reasons[i] = "failed", str(exc)
            continue
        real = spec.fbank[: spec.n_frames].double()
        fbanks[i] = spec.fbank.numpy().astype(np.float16).tobytes()
        n_frames[i] = spec.n_frames
        sums[i] = real.sum().item()
        sumsqs[i] = real.square().sum().item()
    out = {k: v for k, v in batch.items() if k != "audio"}
    out.update(fbank=fbanks, n_frames=n_frames, frame_sum=sums, frame_sumsq=sumsqs, status=status, reason=reasons)
    return out


def rows_per_task(n_rows: int, cpus: int) -> int:
    """About eight tasks per CPU: enough to balance load, few enough that per-task overhead stays small next
    to ~10 ms of work per 10 s clip. Each task writes one Parquet file (at most 256 rows)."""
    return max(16, min(256, math.ceil(n_rows / (8 * max(cpus, 1)))))


def _staging_dir(out: Location) -> Location:
    return out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"


def build_store(source: str | Path | Location, out: str | Path | Location, cfg: AudioConfig, *,
                overwrite: bool = False) -> StoreSummary:
    """Build a spectrogram store from a folder or a CSV manifest, each a local path or a URI, with Ray Data.

    The driver lists the input through its filesystem; the build's tasks read each file's bytes from there (a
    bucket reaches every node), decode them and write one Parquet file each. Written to a hidden staging folder
    beside `out` and renamed at the end: a crash, or an input that the tasks cannot see (InputNotVisible, raised
    as a StoreError), leaves no half store, and an existing store is only replaced (with `overwrite`) once the
    new one is complete. `out` is a local path or a URI; the build's tasks write there directly.
    """
    import ray
    import ray.data

    from ajepa.runtime import init_ray

    source, out = storage.resolve(source), storage.resolve(out)
    clips = list_inputs(source)  # the input first: its errors are the likelier ones
    if not clips:
        raise StoreError(f"{source}: no audio files found (extensions: {' '.join(AUDIO_EXTENSIONS)})")
    if out.exists() and not overwrite:
        raise StoreError(f"{out}: already exists; pass --overwrite to replace it")
    rows = input_rows(clips)
    # Shuffled once, here: each build task writes a contiguous run of these rows to one file, and listing order
    # (a folder per class) would make files of one class. Training reads files in a seeded order and mixes
    # rows only within a bounded window (order.py), never the whole split again.
    rows = [rows[i] for i in np.random.default_rng(BUILD_SEED).permutation(len(rows))]
    out.parent.mkdir()
    print(f"store build: {len(rows)} clips from {source} -> {out}", flush=True)
    init_ray()  # only now: bad input is reported without waiting for a cluster
    staging = _staging_dir(out)
    # The build is one fused read->fbank->write operator: per-operator resource reservation only held it to
    # one CPU at the start (measured: 500 x 10 s clips in 5.0 s with it, 3.4 s without, on 2 CPUs).
    context = ray.data.DataContext.get_current()
    reservation = context.op_resource_reservation_enabled
    context.op_resource_reservation_enabled = False
    try:
        per_task = rows_per_task(len(rows), int(ray.cluster_resources().get("CPU", 1)))
        ds = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / per_task))
        ds = ds.map_batches(read_batch, fn_kwargs={"source": source}, batch_size=per_task, batch_format="numpy")
        ds = ds.map_batches(process_batch, fn_kwargs={"cfg": cfg}, batch_size=per_task, batch_format="numpy")
        # One file per task: min_rows_per_file would funnel every row through a single writer task.
        with _build_progress(staging / "rows", len(rows)):
            ds.write_parquet(staging.path + "/rows", filesystem=staging.fs, partition_cols=["status", "split"])
        summary = _finalise(staging, out, cfg, source, overwrite)
    except Exception as exc:
        # Ray Data hands a task's error over as a UserCodeException that keeps only its traceback's text.
        # (DataContext.raise_original_map_exception would keep the type, but makes Ray log it as a Ray bug.)
        if found := re.search(r"InputNotVisible: (.*)", str(exc)):
            raise StoreError(found.group(1)) from None
        raise
    finally:
        context.op_resource_reservation_enabled = reservation
        with contextlib.suppress(OSError):
            staging.delete()
    return summary


@contextlib.contextmanager
def _build_progress(rows: Location, total: int):
    """Clips done, clips/s, failures so far and ETA while the build runs, counted from the Parquet files its
    tasks have written under `rows` (each task writes its rows when it ends)."""
    bar = Progress("store build:", total, "clips", every_s=10)
    counted: dict[str, int] = {}

    def poll() -> None:
        for f in rows.files(recursive=True):
            if f.path.endswith(".parquet") and f.path not in counted:
                with contextlib.suppress(OSError, pa.ArrowInvalid):  # still being written: counted next time
                    counted[f.path] = pq.read_metadata(f.path, filesystem=f.fs).num_rows
        done = sum(counted.values())
        failed = sum(n for path, n in counted.items() if "/status=failed/" in path)
        bar.update(done, f"{bar.rate(done):.1f} clips/s, {failed} failed")

    try:
        with polling(poll):
            yield
    finally:
        bar.close()


def _read_partition(folder: Location, columns: list[str]) -> pa.Table:
    if not folder.exists():
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return pads.dataset(folder.path, filesystem=folder.fs, format="parquet", partitioning="hive").to_table(
        columns=columns)


def _finalise(staging: Location, out: Location, cfg: AudioConfig, source: Location, overwrite: bool) -> StoreSummary:
    rows = staging / "rows"
    failed = _read_partition(rows / "status=failed", ["path", "reason"]).to_pylist()
    ok = rows / "status=ok"
    if not ok.exists():
        raise StoreError(f"{source}: every one of {len(failed)} audio files failed; first: "
                         f"{failed[0]['path']}: {failed[0]['reason']}")
    store = staging / "store"
    ok.move_to(store)
    meta = _read_partition(store, ["label", "split", "n_frames", "frame_sum", "frame_sumsq"])
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["path", "reason"])
    writer.writerows(sorted((r["path"], r["reason"]) for r in failed))
    (store / "failures.csv").write_text(text.getvalue())
    stats = _stats(meta, cfg, len(failed), source)
    if out.exists() and overwrite:
        old = _staging_dir(out)
        out.move_to(old)
        store.move_to(out)
        with contextlib.suppress(OSError):
            old.delete()
    else:
        store.move_to(out)
    # Written last, into the store's final place: object storage moves a folder file by file, so only a store
    # with its stats.json is whole (readers refuse one without).
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return StoreSummary(out, meta.num_rows, len(failed), stats["counts"], stats["classes"], stats["mean"], stats["std"])


def _stats(meta: pa.Table, cfg: AudioConfig, failed: int, source: Location) -> dict[str, Any]:
    cols = meta.to_pydict()
    # Normalisation statistics come from the train split only (all clips when there is none): val and test
    # stand for unseen data, and nothing about them may shape what the model is trained on.
    in_stats = np.array([s == "train" for s in cols["split"]], dtype=bool)
    if not in_stats.any():
        in_stats[:] = True
    values = float(np.sum(np.asarray(cols["n_frames"], dtype=np.float64)[in_stats])) * cfg.num_mel_bins
    total = float(np.sum(np.asarray(cols["frame_sum"], dtype=np.float64)[in_stats]))
    mean = total / values
    var = max(float(np.sum(np.asarray(cols["frame_sumsq"], dtype=np.float64)[in_stats])) / values - mean * mean,
              0.0)
    classes = sorted({lab for label in cols["label"] for lab in label.split(";") if lab})
    counts = {s: int(sum(1 for x in cols["split"] if x == s)) for s in SPLITS}
    return {
        "version": STORE_VERSION,
        "source": str(source),
        "audio": dataclasses.asdict(cfg),
        "mean": mean,
        "std": math.sqrt(var),
        "stats_split": "train" if counts["train"] else "all",  # the clips mean and std come from
        "classes": classes,
        "counts": counts,
        "clips": meta.num_rows,
        "failed": failed,
        "frames_mean": float(np.mean(cols["n_frames"])),
    }


# ---------------------------------------------------------------------------------------------- reading


def fbank_shape(audio: dict[str, Any]) -> tuple[int, int]:
    return audio["target_frames"], audio["num_mel_bins"]


def decode_fbank(column: Any, shape: tuple[int, int], out: np.ndarray | None = None) -> np.ndarray:
    """A batch of stored fbank byte strings -> (N, T, F) float16, with one copy: into `out` when given (e.g.
    the pinned buffer of a tensor), else into a new array."""
    if out is None:
        return np.frombuffer(b"".join(column), dtype=np.float16).reshape(len(column), *shape)
    for row, raw in zip(out, column, strict=True):
        row[...] = np.frombuffer(raw, dtype=np.float16).reshape(shape)
    return out


def read_stats(store: str | Path | Location) -> dict[str, Any]:
    path = storage.resolve(store) / "stats.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError) as exc:
        what = "a file" if isinstance(exc, NotADirectoryError) else "no stats.json"
        raise StoreError(f"{store}: not a spectrogram store ({what}); build one with jobs/prepare_data.py") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"{path}: unreadable ({exc})") from None


def _split_dirs(store: Location, split: str | None) -> list[Location]:
    splits = SPLITS if split is None else (split,)
    if split is not None and split not in SPLITS:
        raise StoreError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return [store / f"split={s}" for s in splits if (store / f"split={s}").exists()]


def _parquet_files(folder: Location) -> list[str]:
    """A split folder's files (paths in its filesystem), in the one order every reader lists them in (row indices
    refer to it)."""
    return [f.path for f in folder.files() if f.path.endswith(".parquet")]


@dataclass
class StoreArrays:
    """A split held in memory: for tests, evaluation probes and benchmarks."""

    ids: list[str]
    labels: list[str]
    fbank: np.ndarray  # (N, T, F) float16
    n_frames: np.ndarray
    extra: dict[str, list[Any]]

    def __len__(self) -> int:
        return len(self.ids)


def _split_table(store: Location, split: str | None, columns: list[str] | None = None,
                 rows: list[int] | None = None) -> pa.Table:
    """A split (None: all) as one table; with `rows` (indices into it), only those rows are read from disk."""
    tables, offset = [], 0
    for folder in _split_dirs(store, split):
        dataset = pads.dataset(_parquet_files(folder), filesystem=folder.fs, format="parquet")
        if rows is None:
            table = dataset.to_table(columns=columns)
        else:
            n = dataset.count_rows()
            local = [r - offset for r in rows if offset <= r < offset + n]
            table = dataset.take(pa.array(local, type=pa.int64()), columns=columns)
            offset += n
        tables.append(table.append_column("split", pa.array([folder.name.split("=", 1)[1]] * table.num_rows)))
    if not tables or not sum(t.num_rows for t in tables):
        raise StoreError(f"{store}: has no rows in split {split!r}")
    return pa.concat_tables(tables, promote_options="default")


def read_labels(store: str | Path | Location, split: str | None = None, column: str = "label") -> list[str]:
    """One column of a split alone, the labels by default (cheap at any store size)."""
    return _split_table(storage.resolve(store), split, columns=[column]).column(column).to_pylist()


def store_columns(store: str | Path | Location) -> list[str]:
    """The columns of a store's rows (the extra manifest columns among them), read from its schema only."""
    store = storage.resolve(store)
    first = next((f for d in _split_dirs(store, None) for f in _parquet_files(d)), None)
    if first is None:  # every file has every column
        raise StoreError(f"{store}: no clips in any split")
    return pq.read_schema(first, filesystem=store.fs).names


def load_store(store: str | Path | Location, split: str | None = None, rows: list[int] | None = None
               ) -> StoreArrays:
    """Read a split (None: all), or the given rows of it, into memory with pyarrow, no Ray: for the small
    sets probes and tests use. Only the rows asked for are read."""
    store = storage.resolve(store)
    audio = read_stats(store)["audio"]
    table = _split_table(store, split, rows=rows)
    fbank = decode_fbank(table.column("fbank").to_pylist(), fbank_shape(audio))
    skip = {"id", "label", "fbank", "n_frames", "frame_sum", "frame_sumsq", "reason"}
    extra = {c: table.column(c).to_pylist() for c in table.column_names if c not in skip}
    return StoreArrays(table.column("id").to_pylist(), table.column("label").to_pylist(), fbank,
                       table.column("n_frames").to_numpy(), extra)


# ------------------------------------------------------------------------------------------- training


# The draw of a label subset (finetune.train_fraction): fixed, so every run and seed with a fraction trains on the
# same clips, as a low-label benchmark's fixed split does.
SUBSET_SEED = 0


@dataclass(frozen=True)
class TrainFiles:
    """The train split's files and the rows training uses in each: all that the training data order is computed
    from. Every rank reads them through `fs`, the filesystem the driver resolved (a bucket's endpoint included).
    A label subset keeps, per file, the indices of the rows it uses (`keep`) and the file's own row count."""

    fs: pafs.FileSystem
    paths: tuple[str, ...]
    rows: tuple[int, ...]  # rows used per file: all of them, or a subset's
    keep: tuple[np.ndarray, ...] | None = None  # a subset's rows in each file (sorted indices), None: all
    file_rows: tuple[int, ...] | None = None  # each file's row count when a subset was drawn


def check_version(stats: dict[str, Any], store: Location) -> None:
    """Training needs this version's layout: an older store's files each hold one class or two (rows in listing
    order), which a file-level shuffle cannot mix."""
    if stats.get("version") != STORE_VERSION:
        raise StoreError(f"{store}: store version {stats.get('version', 'none')}, training needs version "
                         f"{STORE_VERSION} (rows shuffled when the store is built); rebuild it: "
                         f"jobs/prepare_data.py --input {stats.get('source', 'SOURCE')} --out {store} --overwrite")


def train_files(store: str | Path | Location, fraction: float = 1.0) -> TrainFiles:
    """The train split's files, row counts read from their footers only; the store's version is checked first.

    With `fraction` < 1, a label subset: of each label's n train clips (a multi-label clip's labels taken
    together), round(fraction * n) and at least one, drawn with SUBSET_SEED: the same clips for every run."""
    store = storage.resolve(store)
    check_version(read_stats(store), store)
    paths = tuple(f for folder in _split_dirs(store, "train") for f in _parquet_files(folder))
    if not paths:
        raise StoreError(f"{store}: has no rows in split 'train'")
    rows = tuple(pq.read_metadata(p, filesystem=store.fs).num_rows for p in paths)
    if fraction >= 1:
        return TrainFiles(store.fs, paths, rows)
    labels = np.array([label for p in paths for label in pq.read_table(p, columns=["label"], filesystem=store.fs)
                       .column("label").to_pylist()], dtype=object)
    rng = np.random.default_rng(SUBSET_SEED)
    chosen = []
    for label in sorted(set(labels)):
        of_label = np.flatnonzero(labels == label)
        chosen.append(rng.permutation(of_label)[:max(1, round(fraction * len(of_label)))])
    kept = np.sort(np.concatenate(chosen))
    starts = np.cumsum(rows) - np.asarray(rows)
    keep = [kept[(kept >= a) & (kept < a + n)] - a for a, n in zip(starts, rows, strict=True)]
    used = [i for i, k in enumerate(keep) if len(k)]  # a file with no row in the subset is not read
    return TrainFiles(store.fs, tuple(paths[i] for i in used), tuple(len(keep[i]) for i in used),
                      tuple(keep[i] for i in used), tuple(rows[i] for i in used))


def train_batches(files: TrainFiles, columns: list[str], batch_size: int, seed: int, rank: int, world: int,
                  window: int, start: int = 0) -> Iterator[pa.Table]:
    """This rank's training batches of `batch_size` rows, from its micro-batch `start` of the run on and epoch
    after epoch without end, in order.py's order for (seed, epoch): a pure function of the arguments, so a
    resumed run reads exactly what the unbroken run read from there on.

    The next piece of rows (order.py: one shuffle group) is read on a background thread while this one is
    consumed: neither an epoch's start nor a group's read makes the step wait."""
    per_epoch = order.batches_per_epoch(sum(files.rows), batch_size, world)

    def pieces() -> Iterator[pa.Table]:
        epoch, first = divmod(start, per_epoch)
        while True:
            for rows in order.rank_pieces(files.rows, seed, epoch, window, batch_size, rank, world, first):
                yield _take_rows(files, rows, columns)
            epoch, first = epoch + 1, 0

    rest = None  # the rows of a piece that did not fill a batch: the next piece's first batch starts with them
    with Background(pieces(), depth=1, name="ajepa-read") as tables:
        for table in tables:
            table = table if rest is None else pa.concat_tables([rest, table])
            full = table.num_rows - table.num_rows % batch_size
            for begin in range(0, full, batch_size):
                yield table.slice(begin, batch_size)
            rest = table.slice(full)


def _take_rows(files: TrainFiles, rows: np.ndarray, columns: list[str]) -> pa.Table:
    """`rows` (indices into the files laid end to end) in that order, reading each file they lie in once."""
    counts = np.asarray(files.rows, dtype=np.int64)
    starts = np.cumsum(counts) - counts
    which = np.searchsorted(starts, rows, side="right") - 1
    needed = np.unique(which)
    tables = []
    for f in needed.tolist():
        with pq.ParquetFile(files.paths[f], filesystem=files.fs) as parquet:
            table = parquet.read(columns=columns)
        expected = (files.file_rows or files.rows)[f]
        if table.num_rows != expected:
            raise StoreError(f"{files.paths[f]}: has {table.num_rows} rows, {expected} when training started "
                             "(the store changed under the run)")
        tables.append(table if files.keep is None else table.take(pa.array(files.keep[f])))
    first = np.zeros(len(counts), dtype=np.int64)  # where each file read begins in their concatenation
    first[needed] = np.cumsum(counts[needed]) - counts[needed]
    return pa.concat_tables(tables).take(pa.array(rows - starts[which] + first[which]))


# ------------------------------------------------------------------------------------------ demo store


def cache_dir() -> Path:
    return Path(os.environ.get("AJEPA_CACHE", "~/.cache/ajepa")).expanduser()


DEMO_TASKS = ("instruments", "words")


def demo_manifest() -> Path:
    """The built-in demo audio, rendered once into the cache: two tasks in one manifest, told apart by its
    `task` column. `instruments`: NSynth-style notes, 16 GM families, held-out instruments; `words`: spoken
    digits from synthetic speakers, held-out speakers. Pretraining sees the union, as the method pretrains
    on everything unlabelled; the probes score each task."""
    from ajepa.demo_data import build_demo_audio, build_speech_audio, check_demo_tools, check_speech_tools

    check_demo_tools()
    check_speech_tools()
    root = cache_dir()
    parts = dict(zip(DEMO_TASKS, (build_demo_audio(root / "demo-audio"), build_speech_audio(root / "demo-speech")),
                     strict=True))
    rows = []
    for task, manifest in parts.items():
        with manifest.open(newline="") as fh:
            rows += [{**row, "path": (manifest.parent / row["path"]).relative_to(root).as_posix(), "task": task}
                     for row in csv.DictReader(fh)]
    columns = ["path", "label", "split", "task"]
    columns += sorted({key for row in rows for key in row} - set(columns))
    union = root / "demo-manifest.csv"
    staging = union.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")  # concurrent first runs must not interleave
    with staging.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    staging.replace(union)
    return union


def demo_store(cfg: AudioConfig) -> tuple[Path, StoreSummary | None]:
    """The demo spectrogram store for this audio config, built on first use and cached after.

    Returns the store and, when it was built now, its summary."""
    out = cache_dir() / f"demo-store-{cfg.target_frames}f"
    if (out / "stats.json").exists() and read_stats(out).get("audio") == dataclasses.asdict(cfg) \
            and read_stats(out).get("version") == STORE_VERSION:
        return out, None
    summary = build_store(demo_manifest(), out, cfg, overwrite=True)
    return out, summary

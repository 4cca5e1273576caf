"""The spectrogram store on a real local Ray cluster: good and broken inputs, manifests, atomic writes."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from ajepa import cli, data, storage
from ajepa.audio import spectrogram_from_bytes
from ajepa.config import AudioConfig
from catalogue import by_name
from conftest import failures, tone

ROOT = Path(__file__).resolve().parents[1]
CFG = AudioConfig(target_frames=128)


def make_folder(root: Path) -> Path:
    """3 good files in two classes (odd rates, channels, names) and 5 broken ones."""
    (root / "dog").mkdir(parents=True)
    (root / "cat").mkdir()
    sf.write(root / "dog" / "a.wav", tone(1.0, 8000, freq=300.0), 8000)
    sf.write(root / "dog" / "b ü é.flac", tone(1.5, 48000, channels=6, freq=600.0), 48000)
    sf.write(root / "cat" / "c.ogg", tone(0.5, 22050, channels=2, freq=900.0), 22050)
    for case in by_name("empty file", "truncated header", "random bytes named .wav", "NaN samples", "symlink loop"):
        case.make(root / "cat")
    (root / "notes.txt").write_text("not audio, not listed")
    return root


def test_job_writes_good_rows_lists_failures_and_exits_0(tmp_path):
    src = make_folder(tmp_path / "in")
    out = tmp_path / "store"
    job = [sys.executable, str(ROOT / "jobs" / "prepare_data.py"), "--input", str(src), "--out", str(out)]
    env = {**os.environ, "RAY_ADDRESS": ""}
    done = subprocess.run(job, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    # In a pipe, plain lines (a bar on a terminal: test_progress) and nothing on stderr.
    assert done.stderr == "" and not any(c in done.stdout for c in "\r\x1b")
    lines = done.stdout.splitlines()
    assert len(lines) == 4  # start, classes, failures file, summary: the build is too short for a progress line
    assert lines[0] == f"store build: 8 clips from {src} -> {out}"
    assert lines[-1].startswith("3 clips written, 5 failed (") and lines[-1].endswith(f"-> {out}")

    # Each reason is checked by the bad-input catalogue (test_bad_input.py); here, that all five are listed.
    assert sorted(failures(out)) == ["cat/empty.wav", "cat/header.wav", "cat/loop.wav", "cat/nan.wav", "cat/noise.wav"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["clips"] == 3 and stats["failed"] == 5 and stats["classes"] == ["cat", "dog"]
    arrays = data.load_store(out)
    assert sorted(arrays.extra["path"]) == ["cat/c.ogg", "dog/a.wav", "dog/b ü é.flac"]
    assert arrays.fbank.shape == (3, 128, 128) and arrays.fbank.dtype == np.float16
    assert sorted(arrays.n_frames.tolist()) == [48, 98, 128]

    # A second run into the same folder is refused and leaves the store as it was.
    before = sorted(p.name for p in out.rglob("*"))
    again = subprocess.run(job, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2 and "already exists; pass --overwrite" in again.stderr
    assert sorted(p.name for p in out.rglob("*")) == before


def test_store_rows_equal_the_audio_pipeline_and_stats_are_exact(ray_local, tmp_path):
    src = make_folder(tmp_path / "in")
    summary = data.build_store(src, tmp_path / "store", CFG)
    arrays = data.load_store(tmp_path / "store")
    real = {}
    for rel, split, fb, n in zip(arrays.extra["path"], arrays.extra["split"], arrays.fbank, arrays.n_frames,
                                 strict=True):
        expected = spectrogram_from_bytes((src / rel).read_bytes(), CFG)
        assert n == expected.n_frames
        torch.testing.assert_close(torch.from_numpy(fb.astype(np.float32)), expected.fbank, rtol=2e-3, atol=2e-2)
        real.setdefault(split, []).append(expected.fbank[:n].double().numpy())
    values = np.concatenate(real["train"])  # all three hash into train (a manifest test below splits them)
    assert summary.mean == pytest.approx(values.mean(), rel=1e-6)
    assert summary.std == pytest.approx(values.std(), rel=1e-6)
    assert data.read_stats(tmp_path / "store")["stats_split"] == "train"
    assert sum(summary.counts.values()) == 3
    assert not list(tmp_path.glob(".store.tmp-*")), "staging folder left behind"

    files = data.train_files(tmp_path / "store")  # what training reads
    assert sum(files.rows) == 3
    batch = next(data.train_batches(files, ["id", "fbank"], 3, seed=0, rank=0, world=1, window=1))
    by_id = dict(zip(arrays.ids, arrays.fbank, strict=True))
    decoded = data.decode_fbank(batch.column("fbank").to_pylist(), (128, 128))
    assert decoded.shape == (3, 128, 128) and decoded.dtype == np.float16
    into = np.zeros_like(decoded)
    assert data.decode_fbank(batch.column("fbank").to_pylist(), (128, 128), out=into) is into
    assert np.array_equal(into, decoded)
    for row_id, fb in zip(batch.column("id").to_pylist(), decoded, strict=True):
        assert np.array_equal(fb, by_id[row_id])


def test_manifest_keeps_splits_labels_and_extra_columns(ray_local, tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    rows = []
    for i in range(6):
        sf.write(audio / f"{i}.wav", tone(1.0, 16000, freq=200.0 + 100 * i), 16000)
        rows.append({"path": f"audio/{i}.wav", "label": "a;b" if i % 2 else "c",
                     "split": ["train", "val", "test"][i % 3], "pitch": str(60 + i)})
    rows.append({"path": str(tmp_path / "missing.wav"), "label": "c", "split": "train", "pitch": "1"})
    manifest = tmp_path / "m.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "split", "pitch"])
        writer.writeheader()
        writer.writerows(rows)
    summary = data.build_store(manifest, tmp_path / "store", CFG)
    assert summary.counts == {"train": 2, "val": 2, "test": 2}
    assert summary.classes == ["a", "b", "c"]
    assert failures(tmp_path / "store")[str(tmp_path / "missing.wav")].startswith("unreadable: No such file")
    val = data.load_store(tmp_path / "store", split="val")
    assert sorted(val.extra["pitch"]) == ["61", "64"] and set(val.extra["split"]) == {"val"}
    everything = data.load_store(tmp_path / "store")  # rows index the splits as listed, read alone
    picked = data.load_store(tmp_path / "store", rows=[1, 4])
    assert picked.ids == [everything.ids[1], everything.ids[4]]
    assert np.array_equal(picked.fbank, everything.fbank[[1, 4]])
    assert len(data.load_store(tmp_path / "store", split="test")) == 2
    # Normalisation statistics: the train split's real frames only.
    frames = {i: spectrogram_from_bytes((audio / f"{i}.wav").read_bytes(), CFG) for i in range(6)}
    values = {i: f.fbank[:f.n_frames].double().numpy() for i, f in frames.items()}
    train = np.concatenate([values[0], values[3]])
    assert summary.mean == pytest.approx(train.mean(), rel=1e-6) and summary.std == pytest.approx(train.std(), rel=1e-6)
    assert abs(summary.mean - np.concatenate(list(values.values())).mean()) > 1e-3, "the test cannot tell them apart"


def test_no_audio_and_missing_input_fail_before_ray_with_the_input_named(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    assert cli.main(["prepare-data", "--input", str(tmp_path / "empty"), "--out", str(tmp_path / "s")]) == 2
    assert f"{tmp_path / 'empty'}: no audio files found" in capsys.readouterr().err
    assert cli.main(["prepare-data", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "s")]) == 2
    assert "nope: input does not exist" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_every_file_failing_exits_nonzero_and_writes_nothing(ray_local, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.wav").write_bytes(b"")
    (tmp_path / "in" / "b.wav").write_bytes(b"RIFF")
    assert cli.main(["prepare-data", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "s")]) == 2
    assert "every one of 2 audio files failed" in capsys.readouterr().err
    assert not (tmp_path / "s").exists() and not list(tmp_path.glob(".s.tmp-*"))
    # Too few to stop the build as an input nobody sees (data.NOT_VISIBLE_MIN), but every one failed all the same.
    (tmp_path / "m.csv").write_text("path,label\nmissing1.wav,x\nmissing2.wav,x\n")
    assert cli.main(["prepare-data", "--input", str(tmp_path / "m.csv"), "--out", str(tmp_path / "s")]) == 2
    assert "every one of 2 audio files failed; first: missing1.wav: unreadable: No such file" in capsys.readouterr().err
    assert not (tmp_path / "s").exists() and not list(tmp_path.glob(".s.tmp-*"))


def test_a_crash_keeps_the_old_store_and_leaves_no_half_store(ray_local, tmp_path, monkeypatch):
    src = make_folder(tmp_path / "in")
    store = tmp_path / "store"
    data.build_store(src, store, CFG)
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash while finalising")

    monkeypatch.setattr(data, "_finalise", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        data.build_store(src, store, CFG, overwrite=True)
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before
    assert not list(tmp_path.glob(".store.tmp-*"))
    monkeypatch.undo()

    (src / "dog" / "a.wav").unlink()
    summary = data.build_store(src, store, CFG, overwrite=True)
    assert summary.written == 2 and data.read_stats(store)["clips"] == 2


def test_hash_split_is_deterministic_and_near_the_ratios():
    names = [f"clip_{i}.wav" for i in range(5000)]
    splits = [data.hash_split(n) for n in names]
    assert splits == [data.hash_split(n) for n in names]
    share = {s: splits.count(s) / len(splits) for s in data.SPLITS}
    assert abs(share["train"] - 0.8) < 0.02 and abs(share["val"] - 0.1) < 0.02


def test_reading_a_folder_or_a_file_that_is_not_a_store_is_a_clear_error(tmp_path):
    with pytest.raises(data.StoreError) as folder:
        data.train_files(tmp_path)
    assert str(folder.value) == f"{tmp_path}: not a spectrogram store (no stats.json); build one with " \
                                "jobs/prepare_data.py"
    (tmp_path / "clips.csv").write_text("path,label\n")  # a manifest given where its store belongs
    with pytest.raises(data.StoreError) as file:
        data.train_files(tmp_path / "clips.csv")
    assert str(file.value) == f"{tmp_path}/clips.csv: not a spectrogram store (a file); build one with " \
                              "jobs/prepare_data.py"


@pytest.mark.slow
def test_demo_store_is_built_from_nothing_then_cached(ray_local, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AJEPA_CACHE", str(tmp_path / "cache"))
    assert cli.main(["prepare-data", "--input", "demo"]) == 0
    # Two tasks: 1280 instrument notes (16 families) and 800 spoken digits (10 words from 80 speakers).
    assert "2080 clips written, 0 failed (train 1520, val 280, test 280)" in capsys.readouterr().out
    store = tmp_path / "cache" / "demo-store-128f"
    stats = data.read_stats(store)
    assert len(stats["classes"]) == 26 and stats["audio"]["target_frames"] == 128
    held_out = {}
    for task, key in (("instruments", "program"), ("words", "speaker")):
        train, test = (data.load_store(store, split=s).extra for s in ("train", "test"))
        seen = {s: {k for k, t in zip(e[key], e["task"], strict=True) if t == task} for s, e in (("train", train),
                                                                                              ("test", test))}
        held_out[task] = len(seen["test"]), bool(seen["test"] & seen["train"])
    assert held_out == {"instruments": (16, False), "words": (12, False)}  # unseen instruments and speakers
    assert cli.main(["prepare-data", "--input", "demo"]) == 0
    assert "demo store already built: 2080 clips, 26 classes" in capsys.readouterr().out


# ------------------------------------------------------------------------------- inputs on any storage


@pytest.fixture(scope="module")
def tone_input(tmp_path_factory) -> Path:
    """8 tones in two class folders, and a manifest of the same files with splits and an extra column."""
    root = tmp_path_factory.mktemp("tone-input")
    rows = []
    for label, base in (("low", 200.0), ("high", 2500.0)):
        (root / "audio" / label).mkdir(parents=True)
        for i in range(4):
            sf.write(root / "audio" / label / f"{i}.wav", tone(0.5, 16000, freq=base + 50 * i, seed=i), 16000)
            rows.append({"path": f"audio/{label}/{i}.wav", "label": label, "split": ("train", "val")[i % 2],
                         "take": str(i)})
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "split", "take"])
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.mark.parametrize("scheme", ["file", "s3", "gs"])
def test_a_uri_input_builds_the_store_a_local_path_builds(scheme, tone_input, ray_local, tmp_path, request):
    """The folder and the manifest, as a file:// URI or uploaded to a bucket: listed through that filesystem and
    read by the build's tasks from it, they make the same rows (ids, labels, splits, fbank) as the local path."""
    gcs_uri = request.getfixturevalue("gcs_bucket") if scheme == "gs" else None
    base = f"{request.getfixturevalue('s3_bucket')}/input" if scheme == "s3" else f"file://{tone_input}"

    def uri(name: str) -> str:  # a gs:// URI's query (the emulator's endpoint) comes after its path
        return gcs_uri(f"input/{name}") if gcs_uri else f"{base}/{name}"

    if scheme != "file":
        storage.resolve(uri("")).upload(tone_input)
    for name in ("audio/", "manifest.csv"):  # a folder's URI may end in a slash, as `aws s3 ls` shows prefixes
        local = data.build_store(tone_input / name, tmp_path / f"local-{name}", CFG)
        remote = data.build_store(uri(name), tmp_path / f"{scheme}-{name}", CFG)
        assert remote.written == local.written == 8 and remote.failed == 0
        ours, theirs = data.load_store(remote.out), data.load_store(local.out)
        assert ours.ids == theirs.ids and ours.labels == theirs.labels and np.array_equal(ours.fbank, theirs.fbank)
        assert ours.extra == theirs.extra and sorted(set(ours.labels)) == ["high", "low"]
        assert data.read_stats(remote.out)["source"] == str(storage.resolve(uri(name)))


@pytest.mark.parametrize("scheme", ["path", "s3"])
def test_an_input_the_tasks_cannot_see_stops_the_build_naming_the_node_and_a_path(scheme, ray_local, tmp_path,
                                                                                 capsys, request):
    """A manifest whose files are not where the tasks look (as on a node without the input's mount, or keys that
    are not in the bucket): the job exits 2 naming the node and a path, writes no store and leaves the one it
    would replace as it was."""
    import ray

    rows = "path,label\n" + "".join(f"not-there/{i}.wav,x\n" for i in range(6))
    if scheme == "s3":
        manifest = storage.resolve(request.getfixturevalue("s3_bucket")) / "input" / "m.csv"
        manifest.write_text(rows)
    else:
        (tmp_path / "m.csv").write_text(rows)
        manifest = storage.resolve(tmp_path / "m.csv")
    out = tmp_path / "store"
    out.mkdir()
    (out / "stats.json").write_text('{"clips": 7}')
    assert cli.main(["prepare-data", "--input", str(manifest), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"input not visible from node {ray.util.get_node_ip_address()} (node id " in err
    assert "6 of 6 clips of a build task could not be read, e.g. " in err
    assert f"{manifest.parent}/not-there/" in err and "unreadable: " in err
    assert [p.name for p in out.iterdir()] == ["stats.json"] and (out / "stats.json").read_text() == '{"clips": 7}'
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["store", "m.csv"][:2 if scheme == "path" else 1])


def test_a_bucket_manifest_names_files_relative_to_itself_or_by_uri_in_its_bucket(s3_bucket, s3_server):
    import pyarrow.fs as pafs

    manifest = storage.resolve(s3_bucket) / "meta" / "m.csv"
    manifest.write_text(f"path,label\n../audio/a.wav,x\n{s3_bucket}/audio/b.wav,y\n")
    bucket = s3_bucket.removeprefix("s3://")
    assert [c.path for c in data.read_manifest(manifest)] == [f"{bucket}/audio/a.wav", f"{bucket}/audio/b.wav"]
    pafs.S3FileSystem(endpoint_override=s3_server, allow_bucket_creation=True).create_dir(f"{bucket}-other")
    manifest.write_text(f"path,label\n{s3_bucket}-other/c.wav,x\n")
    with pytest.raises(data.StoreError, match=f"m.csv:2: {s3_bucket}-other/c.wav is not in the manifest's storage"):
        data.read_manifest(manifest)

"""The bad-input catalogue (tests/catalogue.py): each kind checked where its behaviour lives (the listing and the
build's per-file worker function, no Ray), then every kind together through the real store build; manifest
errors stop the job before any work."""

import os
import pickle
import pwd
import tempfile
import traceback
from pathlib import Path

import numpy as np
import pytest
from ajepa import cli, data, storage
from ajepa.audio import fbank, to_mono_16k
from ajepa.config import AudioConfig
from ajepa.storage import Location
from catalogue import CASES, TARGET_FRAMES, Case
from conftest import encode, failures, tone

CFG = AudioConfig(target_frames=TARGET_FRAMES)
ROOT_CANNOT_FAIL = os.geteuid() == 0  # root reads files without read permission


def worker_rows(clips: list[data.Clip], source: Location) -> dict[str, dict]:
    """What the build's tasks make of these clips: data.read_batch then data.process_batch on one batch, as Ray
    would call them."""
    rows = data.input_rows(clips)
    read = data.read_batch({k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}, source)
    out = data.process_batch(read, CFG)
    keys = ("status", "reason", "fbank", "n_frames")
    return {path: {k: out[k][i] for k in keys} for i, path in enumerate(out["path"])}


def as_nobody(case: Case) -> dict:
    """Root reads any file, so the case runs in a forked child that has dropped to the `nobody` user."""
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("running as root without a `nobody` user to drop to: no file can be unreadable")
    with tempfile.TemporaryDirectory() as folder:  # in /tmp: `nobody` cannot enter pytest's tmp_path (mode 700)
        os.chmod(folder, 0o755)
        case.make(Path(folder))
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
                with os.fdopen(write, "wb") as fh:
                    pickle.dump(worker_rows(data.list_folder(root := storage.resolve(folder)), root), fh)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as fh:
            payload = fh.read()
        assert os.waitpid(pid, 0)[1] == 0, "the unprivileged child failed (traceback above)"
    return pickle.loads(payload)[case.file]


def check_written(case: Case, spec: np.ndarray, n_frames: int) -> None:
    """Real frames as resampled to 16 kHz, zero padding after them, values as the float signal mixed to mono."""
    assert n_frames == case.frames
    assert spec.shape == (TARGET_FRAMES, CFG.num_mel_bins) and not spec[n_frames:].any()
    expected = fbank(to_mono_16k(case.wave.mean(axis=1, keepdims=True), case.rate), CFG).numpy()
    assert np.abs(spec[:n_frames].astype(np.float32) - expected[:n_frames]).mean() < case.tol


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_each_kind_is_written_or_failed_with_its_reason(case, tmp_path):
    if case.needs_non_root and ROOT_CANNOT_FAIL:
        row = as_nobody(case)
    else:
        case.make(tmp_path)
        rows = worker_rows(data.list_folder(storage.resolve(tmp_path)), storage.resolve(tmp_path))
        assert list(rows) == [case.file]  # listed once, under the name the store and failures.csv show
        row = rows[case.file]
    if case.written:
        assert row["status"] == "ok", row["reason"]
        spec = np.frombuffer(row["fbank"], np.float16).reshape(TARGET_FRAMES, CFG.num_mel_bins)
        check_written(case, spec, row["n_frames"])
    else:
        assert row["status"] == "failed" and case.reason in row["reason"]


def test_every_kind_in_one_folder_through_the_store_build(ray_local, tmp_path, capsys):
    cases = [c for c in CASES if not (c.needs_non_root and ROOT_CANNOT_FAIL)]
    src, out = tmp_path / "in", tmp_path / "store"
    src.mkdir()
    for case in cases:
        case.make(src)
    job = ["prepare-data", "--input", str(src), "--out", str(out), "--set", f"audio.target_frames={TARGET_FRAMES}"]
    assert cli.main(job) == 0
    written, failed = [c for c in cases if c.written], [c for c in cases if not c.written]
    assert f"{len(written)} clips written, {len(failed)} failed" in capsys.readouterr().out

    reasons = failures(out)
    assert sorted(reasons) == sorted(c.file for c in failed)
    for case in failed:
        assert case.reason in reasons[case.file], case.name
    arrays = data.load_store(out)
    rows = {path: (spec, n) for path, spec, n in zip(arrays.extra["path"], arrays.fbank, arrays.n_frames, strict=True)}
    assert sorted(rows) == sorted(c.file for c in written)
    for case in written:
        check_written(case, *rows[case.file])
    # The numbers behind the formula: 0.5 s at 8 kHz and 1.2 s at 96 kHz, both resampled to 16 kHz.
    assert rows["rate8000.wav"][1] == 48 and rows["rate96000.wav"][1] == 118


def test_manifest_rows_that_are_not_audio_files_fail_and_a_spreadsheet_bom_is_read(tmp_path):
    (tmp_path / "a.wav").write_bytes(encode(tone(0.5, 16000), 16000))
    (tmp_path / "folder.wav").mkdir()
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\na.wav,dog\nmissing.wav,cat\nfolder.wav,cat\n", encoding="utf-8-sig")
    clips = data.read_manifest(storage.resolve(manifest))
    assert [(c.rel, c.label) for c in clips] == [("a.wav", "dog"), ("missing.wav", "cat"), ("folder.wav", "cat")]
    rows = worker_rows(clips, storage.resolve(tmp_path))
    assert rows["a.wav"]["status"] == "ok" and rows["a.wav"]["n_frames"] == 48
    assert rows["missing.wav"]["reason"] == "unreadable: No such file or directory"
    assert rows["folder.wav"]["reason"] == "unreadable: Is a directory"


@pytest.mark.parametrize(
    "csv_text, message",
    [
        ("path,label,split\na.wav,x,train\nb.wav,y,holdout\n", "m.csv:3: split must be one of train, val, test, "
                                                               "got 'holdout'"),
        ("path,label\na.wav,x\nb.wav,y\n./a.wav,z\n", "m.csv:4: duplicate path './a.wav' (line 2 names the same file)"),
        ("file,label\na.wav,x\n", "m.csv: missing column(s) path"),
        ("path,label\n,x\n", "m.csv:2: empty path"),
        ("path,label,n_frames\na.wav,x,3\n", "m.csv: column name(s) n_frames are reserved by the store"),
    ],
    ids=["unknown split", "duplicate path", "missing column", "empty path", "reserved column"],
)
def test_manifest_errors_stop_the_job_before_any_work_naming_the_line(tmp_path, monkeypatch, capsys, csv_text,
                                                                      message):
    import ajepa.runtime

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a manifest that is an error")

    monkeypatch.setattr(ajepa.runtime, "init_ray", no_ray)
    (tmp_path / "m.csv").write_text(csv_text)
    out = tmp_path / "store"  # an earlier store that --overwrite would replace: it must survive the error
    out.mkdir()
    (out / "stats.json").write_text('{"clips": 7}')
    job = ["prepare-data", "--input", str(tmp_path / "m.csv"), "--out", str(out), "--overwrite"]
    assert cli.main(job) == 2
    assert f"error: {tmp_path}/{message}" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir() if p.name != "m.csv"] == ["store"]  # no staging folder
    assert [p.name for p in out.iterdir()] == ["stats.json"] and (out / "stats.json").read_text() == '{"clips": 7}'


def test_a_bad_input_is_named_before_an_existing_out(tmp_path, capsys):
    """Two mistakes at once: the input's is told first (an --overwrite would not help with it), and the earlier
    store stays as it was."""
    out = tmp_path / "store"
    out.mkdir()
    (out / "stats.json").write_text('{"clips": 7}')
    (tmp_path / "empty").mkdir()
    for source, message in ((tmp_path / "missing", "input does not exist"),
                            (tmp_path / "empty", "no audio files found")):
        assert cli.main(["prepare-data", "--input", str(source), "--out", str(out)]) == 2
        assert capsys.readouterr().err.startswith(f"error: {source}: {message}")
    assert [p.name for p in out.iterdir()] == ["stats.json"]
    assert cli.main(["prepare-data", "--input", str(tmp_path / "empty"), "--out", str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists()

"""The demo dataset generators, run against the real fluidsynth + GM sound font and espeak-ng, on a few programs
and speakers."""

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from ajepa import demo_data
from ajepa.demo_data import (
    FAMILIES,
    MANIFEST_COLUMNS,
    DemoToolsMissing,
    build_demo_audio,
    build_speech_audio,
    check_demo_tools,
    program_splits,
)

SMALL = {"programs": [0, 1, 8, 9, 24, 25], "notes_per_program": 3}


def read_manifest(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def small_build(tmp_path_factory) -> Path:
    return build_demo_audio(tmp_path_factory.mktemp("demo") / "small", **SMALL)


def test_manifest_columns_labels_and_files(small_build):
    with small_build.open(newline="") as f:
        assert next(csv.reader(f)) == list(MANIFEST_COLUMNS)
    rows = read_manifest(small_build)
    assert len(rows) == 18  # no program in SMALL is silent at the pitches it draws
    for row in rows:
        program = int(row["program"])
        assert row["label"] == FAMILIES[program // 8]
        assert row["split"] in {"train", "val", "test"}
        assert Path(row["path"]).parts[:2] == ("audio", row["label"])
        assert 60 <= int(row["velocity"]) <= 127 and 0 <= int(row["pitch"]) <= 127
        assert (small_build.parent / row["path"]).is_file()
    assert {int(r["program"]) for r in rows} == set(SMALL["programs"])


def test_clips_are_16k_mono_exact_length_audible_and_unclipped(small_build):
    for row in read_manifest(small_build):
        path = small_build.parent / row["path"]
        info = sf.info(path)
        assert (info.samplerate, info.channels, info.subtype, info.frames) == (16000, 1, "PCM_16", 16000)
        peak = int(np.abs(sf.read(path, dtype="int16")[0].astype(np.int32)).max())
        assert 3 <= peak < 32767, f"{path}: silent or clipped (peak {peak})"


def test_same_seed_gives_identical_manifest_and_audio(small_build, tmp_path):
    again = build_demo_audio(tmp_path / "again", workers=1, **SMALL)
    assert again.read_bytes() == small_build.read_bytes()
    for row in read_manifest(again):
        assert (again.parent / row["path"]).read_bytes() == (small_build.parent / row["path"]).read_bytes()


def test_cache_hit_returns_without_rendering(small_build, monkeypatch):
    first_clip = small_build.parent / read_manifest(small_build)[0]["path"]
    mtimes = small_build.stat().st_mtime_ns, first_clip.stat().st_mtime_ns

    def no_render(job):
        raise AssertionError("a cache hit must not render")

    monkeypatch.setattr(demo_data, "_render_family", no_render)
    start = time.perf_counter()
    assert build_demo_audio(small_build.parent, **SMALL) == small_build
    assert time.perf_counter() - start < 0.5
    assert (small_build.stat().st_mtime_ns, first_clip.stat().st_mtime_ns) == mtimes


def test_changed_parameters_rebuild_in_place(tmp_path):
    out = tmp_path / "demo"
    build_demo_audio(out, programs=[0], notes_per_program=1, seed=0)
    manifest = build_demo_audio(out, programs=[0], notes_per_program=2, seed=1)
    assert json.loads((out / "demo.json").read_text())["seed"] == 1
    assert len(read_manifest(manifest)) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no staging or retired folder left behind


def test_splits_hold_out_whole_programs(small_build):
    splits = program_splits(seed=0)
    for family in range(len(FAMILIES)):
        counts = [splits[p] for p in range(family * 8, family * 8 + 8)]
        assert sorted(counts) == ["test", "train", "train", "train", "train", "train", "train", "val"]
    assert program_splits(seed=0) == splits
    seen: dict[str, set[str]] = {}
    for row in read_manifest(small_build):
        seen.setdefault(row["program"], set()).add(row["split"])
        assert row["split"] == splits[int(row["program"])]
    assert all(len(s) == 1 for s in seen.values())


def test_crash_leaves_no_partial_dataset(tmp_path, monkeypatch):
    def broken_render(midi, wav, sample_rate):
        raise RuntimeError("fluidsynth exploded")

    monkeypatch.setattr(demo_data, "_render", broken_render)
    with pytest.raises(RuntimeError, match="exploded"):
        build_demo_audio(tmp_path / "demo", programs=[0, 8], notes_per_program=1)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_a_folder_that_is_not_a_demo_build(tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a demo dataset"):
        build_demo_audio(tmp_path, programs=[0], notes_per_program=1)
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_missing_fluidsynth_is_named_with_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DemoToolsMissing, match="`fluidsynth` program") as error:
        check_demo_tools()
    assert "sudo apt-get install -y fluidsynth fluid-soundfont-gm" in str(error.value)
    with pytest.raises(DemoToolsMissing):
        build_demo_audio(tmp_path / "demo", programs=[0], notes_per_program=1)


def test_missing_sound_font_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_data, "DEMO_SOUNDFONT", tmp_path / "missing.sf2")
    with pytest.raises(DemoToolsMissing, match="missing.sf2"):
        check_demo_tools()


def test_midi_variable_length_quantities():
    cases = {0: b"\x00", 0x7F: b"\x7f", 0x80: b"\x81\x00", 0x3FFF: b"\xff\x7f", 0x200000: b"\x81\x80\x80\x00"}
    for value, encoded in cases.items():
        assert demo_data._vlq(value) == encoded


# ------------------------------------------------------------------------------------------ spoken words


@pytest.fixture(scope="module")
def speech_build(tmp_path_factory) -> Path:
    return build_speech_audio(tmp_path_factory.mktemp("speech") / "small", speakers=8, words=["one", "two"])


def test_every_speaker_says_every_word_and_splits_hold_out_speakers(speech_build):
    rows = read_manifest(speech_build)
    assert len(rows) == 16 and {r["label"] for r in rows} == {"one", "two"}
    split_of: dict[str, set[str]] = {}
    for row in rows:
        split_of.setdefault(row["speaker"], set()).add(row["split"])
        assert Path(row["path"]).parts[:2] == ("audio", row["label"])
    assert all(len(s) == 1 for s in split_of.values()), "a speaker is in two splits"
    assert sorted(s.pop() for s in split_of.values()) == ["test"] + ["train"] * 6 + ["val"]
    assert len({r["voice"] + r["rate"] + r["speech_pitch"] for r in rows}) == 8, "speakers are not distinct"


def test_spoken_clips_are_one_second_audible_unclipped_and_the_manifest_reproducible(speech_build, tmp_path):
    for row in read_manifest(speech_build):
        audio, rate = sf.read(speech_build.parent / row["path"], dtype="int16")
        assert audio.ndim == 1 and len(audio) == rate  # one second at espeak-ng's own rate
        peak = int(np.abs(audio.astype(np.int32)).max())
        assert 1000 < peak < 32767, f"{row['path']}: too quiet or clipped (peak {peak})"
    # Same speakers, words and splits. Not the same bytes: under pytest one voice of espeak-ng rendered
    # differently in two builds (alone it is byte-identical run after run); the demo store is built once.
    again = build_speech_audio(tmp_path / "again", speakers=8, words=["one", "two"], workers=1)
    assert again.read_bytes() == speech_build.read_bytes()


def test_missing_espeak_is_named_with_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DemoToolsMissing, match="`espeak-ng` program") as error:
        build_speech_audio(tmp_path / "speech", speakers=3)
    assert "sudo apt-get install -y espeak-ng" in str(error.value)
    assert not (tmp_path / "speech").exists()

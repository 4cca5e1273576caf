"""Built-in demo dataset: NSynth-style instrument notes rendered offline from the General MIDI sound font.

Each GM program (0-127) plays `notes_per_program` random notes (pitch, velocity, length); each note becomes a
short mono clip labelled with its GM family (program // 8, 16 classes). Splits hold out whole instruments
(per family 6 programs train, 1 val, 1 test), so a probe measures generalisation to unseen instruments.

Rendering needs the `fluidsynth` program and the FluidR3 GM sound font (Debian: fluidsynth, fluid-soundfont-gm).
"""

from __future__ import annotations

import csv
import json
import math
import os
import secrets
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from multiprocessing.pool import ThreadPool
from pathlib import Path

import numpy as np
import soundfile as sf

DEMO_SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
FAMILIES = (
    "piano", "chromatic_percussion", "organ", "guitar", "bass", "strings", "ensemble", "brass",
    "reed", "pipe", "synth_lead", "synth_pad", "synth_effects", "ethnic", "percussive", "sound_effects",
)
GENERATOR_VERSION = 1  # bump whenever the output for the same parameters changes: invalidates caches
MANIFEST_COLUMNS = ("path", "label", "split", "program", "pitch", "velocity")

_INSTALL_HINT = "run `sudo apt-get install -y fluidsynth fluid-soundfont-gm` (or `make system-deps`)"

# Playable MIDI pitch range per family (inclusive): keeps notes where the GM instruments sound natural.
_PITCH_RANGE = {
    "piano": (36, 96), "chromatic_percussion": (55, 96), "organ": (36, 84), "guitar": (40, 76),
    "bass": (28, 55), "strings": (36, 84), "ensemble": (43, 84), "brass": (40, 77),
    "reed": (45, 84), "pipe": (60, 96), "synth_lead": (45, 84), "synth_pad": (40, 79),
    "synth_effects": (40, 84), "ethnic": (48, 84), "percussive": (40, 79), "sound_effects": (48, 72),
}
# Instruments whose range is far narrower than their family's (FluidR3 is silent or shrill outside it).
_PROGRAM_PITCH_RANGE = {
    43: (28, 55),  # contrabass
    58: (28, 62),  # tuba
    67: (36, 69),  # baritone sax
    72: (74, 100),  # piccolo
}
_VELOCITY_RANGE = (60, 127)
_NOTE_LENGTH_S = (0.3, 0.8)
_MAX_JITTER_MS = 100  # the onset lands 0-100 ms into its clip
_LEAD_MS = _MAX_JITTER_MS  # silence before each onset, so its clip can start before it
_TAIL_MS = 1000  # after each clip: sound is cut and the reverb dies out before the next note
_SILENT_PEAK = 1e-4  # some GM programs are silent at some pitches: such clips are dropped
_MAX_PEAK = 0.98  # louder clips are scaled down to this so 16-bit output never clips
_GAIN = 0.8


class DemoToolsMissing(RuntimeError):
    """fluidsynth or the GM sound font, needed to render the demo dataset, is not installed."""


@dataclass(frozen=True)
class _Note:
    pitch: int
    velocity: int
    length_ms: int
    jitter_ms: int  # how far into its clip the onset lands


@dataclass(frozen=True)
class _Job:
    family: int
    programs: tuple[int, ...]
    notes_per_program: int
    seed: int
    sample_rate: int
    clip_seconds: float
    out_dir: Path
    scratch_dir: Path


def check_demo_tools() -> None:
    """Raise `DemoToolsMissing` with an install hint unless fluidsynth and the GM sound font are present."""
    missing = []
    if shutil.which("fluidsynth") is None:
        missing.append("the `fluidsynth` program (not on PATH)")
    if not DEMO_SOUNDFONT.is_file():
        missing.append(f"the GM sound font {DEMO_SOUNDFONT}")
    if missing:
        raise DemoToolsMissing(
            f"the demo dataset needs fluidsynth and the GM sound font, missing {' and '.join(missing)}: "
            f"{_INSTALL_HINT}")


def build_demo_audio(out_dir: str | os.PathLike[str], *, notes_per_program: int = 10, seed: int = 0,
                     sample_rate: int = 16000, clip_seconds: float = 1.0,
                     programs: Iterable[int] = range(128), workers: int | None = None) -> Path:
    """Render the demo clips under `out_dir/audio/<family>/` and return the path of `out_dir/manifest.csv`.

    Cached: returns at once when `out_dir` already holds a build with the same parameters. Otherwise builds
    in a temporary sibling folder and swaps it in at the end, so a crash never leaves half a dataset.
    """
    out_dir = Path(out_dir)
    programs = sorted({int(p) for p in programs})
    _validate(notes_per_program, sample_rate, clip_seconds, programs)
    params = {"version": GENERATOR_VERSION, "soundfont": str(DEMO_SOUNDFONT),
              "notes_per_program": notes_per_program, "seed": seed, "sample_rate": sample_rate,
              "clip_seconds": clip_seconds, "programs": programs}
    def render(staging: Path) -> list[dict]:
        scratch = staging / "_render"
        scratch.mkdir()
        jobs = [_Job(family, tuple(p for p in programs if p // 8 == family), notes_per_program, seed,
                     sample_rate, clip_seconds, staging, scratch)
                for family in sorted({p // 8 for p in programs})]
        # Threads suffice (the work runs in fluidsynth and libsndfile) and, unlike forked processes, are
        # safe inside Ray workers.
        with ThreadPool(min(workers or os.cpu_count() or 1, len(jobs))) as pool:
            rows = [row for rows in pool.imap(_render_family, jobs) for row in rows]
        scratch.rmdir()
        splits = program_splits(seed)
        return [{**row, "split": splits[row["program"]]} for row in rows]

    return _cached_build(out_dir, params, check_demo_tools, render, MANIFEST_COLUMNS)


def _cached_build(out_dir: Path, params: dict, check_tools: Callable[[], None],
                  render: Callable[[Path], list[dict]], columns: Sequence[str]) -> Path:
    """`out_dir/manifest.csv` of a build with these parameters: the cached one, or `render`'s rows and the
    files it writes into a temporary sibling folder, swapped in at the end so a crash never leaves half a
    dataset."""
    manifest = out_dir / "manifest.csv"
    if _is_cached(out_dir, params):
        return manifest
    check_tools()
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.{secrets.token_hex(4)}.tmp"  # unique: builds may race
    staging.mkdir()
    try:
        _write_manifest(staging / "manifest.csv", render(staging), columns)
        (staging / "demo.json").write_text(json.dumps(params, indent=2) + "\n")
        _swap_in(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def program_splits(seed: int) -> dict[int, str]:
    """Map each GM program to its split: per family of 8, 6 programs train, 1 val, 1 test (seeded)."""
    rng = np.random.default_rng(seed)
    splits = {}
    for family in range(len(FAMILIES)):
        order = [int(p) for p in rng.permutation(np.arange(family * 8, family * 8 + 8))]
        splits.update({order[0]: "test", order[1]: "val"} | {p: "train" for p in order[2:]})
    return splits


def _validate(notes_per_program: int, sample_rate: int, clip_seconds: float, programs: list[int]) -> None:
    if notes_per_program < 1:
        raise ValueError(f"notes_per_program must be >= 1, got {notes_per_program}")
    if sample_rate < 8000:
        raise ValueError(f"sample_rate must be >= 8000, got {sample_rate}")
    if clip_seconds < _NOTE_LENGTH_S[0]:
        raise ValueError(f"clip_seconds must be >= {_NOTE_LENGTH_S[0]}, got {clip_seconds}")
    if not programs or programs[0] < 0 or programs[-1] > 127:
        raise ValueError(f"programs must be a non-empty set of GM programs 0-127, got {programs}")


def _is_cached(out_dir: Path, params: dict) -> bool:
    try:
        recorded = json.loads((out_dir / "demo.json").read_text())
    except (OSError, ValueError):
        return False
    return recorded == params and (out_dir / "manifest.csv").is_file()


def _check_replaceable(out_dir: Path) -> None:
    # A stale build is replaced; anything else in the way is the user's data and must not be deleted.
    if out_dir.exists() and not (out_dir / "demo.json").is_file() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not a demo dataset build: refusing to replace it")


def _swap_in(staging: Path, out_dir: Path) -> None:
    if out_dir.exists():
        retired = staging.with_suffix(".old")
        out_dir.rename(retired)
        staging.rename(out_dir)
        shutil.rmtree(retired)
    else:
        staging.rename(out_dir)


def _write_manifest(path: Path, rows: list[dict], columns: Sequence[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _draw_notes(program: int, count: int, seed: int) -> list[_Note]:
    # Seeded per program, so the notes do not depend on which other programs are built or in what order.
    rng = np.random.default_rng([seed, program])
    low, high = _PROGRAM_PITCH_RANGE.get(program) or _PITCH_RANGE[FAMILIES[program // 8]]
    pitches = rng.integers(low, high + 1, count)
    velocities = rng.integers(_VELOCITY_RANGE[0], _VELOCITY_RANGE[1] + 1, count)
    lengths = rng.uniform(*_NOTE_LENGTH_S, count)
    jitters = rng.integers(0, _MAX_JITTER_MS + 1, count)
    return [_Note(int(p), int(v), round(length * 1000), int(j))
            for p, v, length, j in zip(pitches, velocities, lengths, jitters, strict=True)]


def _onset_ms(slot: int, clip_ms: int) -> int:
    """Onset of the note in time slot `slot` of a render; slots are one clip plus a tail apart."""
    return _LEAD_MS + slot * (clip_ms + _TAIL_MS)


def _vlq(value: int) -> bytes:
    """MIDI variable-length quantity: 7 bits per byte, most significant first, high bit = more follows."""
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


def _midi_file(slots: list[tuple[int, _Note]], clip_ms: int) -> bytes:
    """A format-0 MIDI file on channel 0, one tick per millisecond, playing one (program, note) per slot."""
    events = [(0, b"\xff\x51\x03" + (1_000_000).to_bytes(3, "big"))]  # tempo: 1 s per quarter note
    current = None
    for slot, (program, note) in enumerate(slots):
        onset = _onset_ms(slot, clip_ms)
        if program != current:
            events.append((onset - _LEAD_MS, bytes([0xC0, program])))
            current = program
        events += [(onset, bytes([0x90, note.pitch, note.velocity])),
                   (onset + note.length_ms, bytes([0x80, note.pitch, 0])),
                   # All Sound Off once the clip is over, so long releases never bleed into the next note.
                   (onset + clip_ms, bytes([0xB0, 120, 0]))]
    events.append((_onset_ms(len(slots), clip_ms), b"\xff\x2f\x00"))  # end of track
    track, now = bytearray(), 0
    for time, data in sorted(events, key=lambda event: event[0]):
        track += _vlq(time - now) + data
        now = time
    header = b"MThd" + struct.pack(">IHHH", 6, 0, 1, 1000)  # 1000 ticks per quarter note
    return header + b"MTrk" + struct.pack(">I", len(track)) + bytes(track)


def _render(midi: Path, wav: Path, sample_rate: int) -> np.ndarray:
    """Render `midi` with fluidsynth and return it downmixed to mono float32."""
    # Float output: 16-bit output would clip loud notes, we scale them down instead. Dynamic sample
    # loading reads only the samples of the programs played, halving the start-up time.
    command = ["fluidsynth", "-ni", "-q", "-z", "1024", "-o", "synth.dynamic-sample-loading=1", "-O", "float",
               "-F", str(wav), "-r", str(sample_rate), "-g", str(_GAIN), str(DEMO_SOUNDFONT), str(midi)]
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    if result.returncode != 0 or not wav.is_file():
        raise RuntimeError(f"fluidsynth failed on {midi} (exit {result.returncode}): {result.stderr.strip()}")
    audio, _ = sf.read(wav, dtype="float32", always_2d=True)
    return audio.mean(axis=1)


def _render_family(job: _Job) -> list[dict]:
    """Render all notes of one family's programs in one fluidsynth run and write their clips.

    One run per family rather than per program: fluidsynth's start-up costs about as much as rendering 80
    notes.
    """
    family = FAMILIES[job.family]
    slots = [(program, index, note) for program in job.programs
             for index, note in enumerate(_draw_notes(program, job.notes_per_program, job.seed))]
    clip_ms = math.ceil(job.clip_seconds * 1000)
    midi, wav = job.scratch_dir / f"{family}.mid", job.scratch_dir / f"{family}.wav"
    midi.write_bytes(_midi_file([(program, note) for program, _, note in slots], clip_ms))
    audio = _render(midi, wav, job.sample_rate)
    midi.unlink()
    wav.unlink()
    clip_len = round(job.clip_seconds * job.sample_rate)
    (job.out_dir / "audio" / family).mkdir(parents=True, exist_ok=True)
    rows = []
    for slot, (program, index, note) in enumerate(slots):
        start = (_onset_ms(slot, clip_ms) - note.jitter_ms) * job.sample_rate // 1000
        clip = np.pad(audio[start:start + clip_len], (0, max(0, start + clip_len - len(audio))))
        peak = float(np.abs(clip).max())
        if peak < _SILENT_PEAK:
            continue
        if peak > _MAX_PEAK:
            clip = clip * (_MAX_PEAK / peak)
        name = f"{program:03d}_{index:02d}_p{note.pitch:03d}_v{note.velocity:03d}.wav"
        path = Path("audio") / family / name
        sf.write(job.out_dir / path, clip, job.sample_rate, subtype="PCM_16")
        rows.append({"path": path.as_posix(), "label": family, "program": program,
                     "pitch": note.pitch, "velocity": note.velocity})
    return rows


# ----------------------------------------------------------------------------------- spoken words (espeak-ng)

SPOKEN_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPEECH_COLUMNS = ("path", "label", "split", "speaker", "voice", "rate", "speech_pitch")
# Accents x voice variants x speaking rate x pitch: each combination is one "speaker".
_SPEECH_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029")
_SPEECH_VARIANTS = tuple(f"m{i}" for i in range(1, 8)) + tuple(f"f{i}" for i in range(1, 6)) + (
    "croak", "klatt", "klatt2", "klatt3", "whisper", "whisperf", "grandma", "grandpa", "aunty", "shelby")
_SPEECH_RATE = (110, 210)  # words per minute
_SPEECH_PITCH = (20, 80)  # espeak-ng's 0-99 scale
_SPEECH_LEAD_MS = (0, 250)  # silence before the word
_SPEECH_SNR_DB = (10.0, 40.0)  # white noise under each word: no clip is digitally silent around the word
_SPEECH_HINT = "run `sudo apt-get install -y espeak-ng` (or `make system-deps`)"


def check_speech_tools() -> None:
    if shutil.which("espeak-ng") is None:
        raise DemoToolsMissing(f"the demo's spoken words need the `espeak-ng` program (not on PATH): {_SPEECH_HINT}")


def build_speech_audio(out_dir: str | os.PathLike[str], *, speakers: int = 80, seed: int = 0,
                       clip_seconds: float = 1.0, words: Iterable[str] = SPOKEN_WORDS,
                       workers: int | None = None) -> Path:
    """Speech-Commands-style clips: every synthetic speaker says every word once; returns `manifest.csv`.

    A speaker is an espeak-ng accent, voice variant, speaking rate and pitch; splits hold out whole speakers
    (15% val, 15% test, at least one each), so a probe measures generalisation to unseen voices. Clips keep
    espeak-ng's own sample rate (the store resamples) and are cached like `build_demo_audio`'s.
    """
    out_dir = Path(out_dir)
    words = list(words)
    if speakers < 3:
        raise ValueError(f"speakers must be >= 3 (train, val and test each need one), got {speakers}")
    if clip_seconds < 0.5:
        raise ValueError(f"clip_seconds must be >= 0.5, got {clip_seconds}")
    if not words:
        raise ValueError("words must not be empty")
    params = {"version": GENERATOR_VERSION, "kind": "speech", "speakers": speakers, "seed": seed,
              "clip_seconds": clip_seconds, "words": words}
    def render(staging: Path) -> list[dict]:
        jobs = [(staging, person, w, word, clip_seconds, seed)
                for person in draw_speakers(speakers, seed) for w, word in enumerate(words)]
        with ThreadPool(workers or os.cpu_count() or 1) as pool:  # the work runs in espeak-ng processes
            return pool.starmap(_speak, jobs)

    return _cached_build(out_dir, params, check_speech_tools, render, SPEECH_COLUMNS)


def draw_speakers(count: int, seed: int) -> list[dict]:
    """`count` distinct seeded speakers with their split (the first 15% test, the next 15% val)."""
    rng = np.random.default_rng([seed, 0x5EEC])
    people: dict[tuple, dict] = {}
    while len(people) < count:
        voice = (str(rng.choice(_SPEECH_VOICES)), str(rng.choice(_SPEECH_VARIANTS)),
                 int(rng.integers(_SPEECH_RATE[0], _SPEECH_RATE[1] + 1)),
                 int(rng.integers(_SPEECH_PITCH[0], _SPEECH_PITCH[1] + 1)))
        people.setdefault(voice, {"speaker": len(people), "voice": f"{voice[0]}+{voice[1]}", "rate": voice[2],
                                  "speech_pitch": voice[3]})
    held_out = max(1, round(0.15 * count))
    for person in people.values():
        index = person["speaker"]
        person["split"] = "test" if index < held_out else "val" if index < 2 * held_out else "train"
    return list(people.values())


def _speak(out_dir: Path, person: dict, word_index: int, word: str, clip_seconds: float, seed: int) -> dict:
    """One word from one speaker: espeak-ng renders it, then a seeded onset and noise floor, cut to the clip."""
    folder = out_dir / "audio" / word
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"s{person['speaker']:03d}_{word}.wav"
    command = ["espeak-ng", "-v", person["voice"], "-s", str(person["rate"]), "-p", str(person["speech_pitch"]),
               "-w", str(path), word]
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    if result.returncode != 0 or not path.is_file():
        raise RuntimeError(f"espeak-ng failed for {' '.join(command)} (exit {result.returncode}): "
                           f"{result.stderr.strip()}")
    # float64 throughout: a float32 mean's rounding depends on the array's memory alignment, and the same
    # speaker must give the same bytes in every build.
    speech, rate = sf.read(path, dtype="float64", always_2d=True)
    speech = speech.mean(axis=1)
    rng = np.random.default_rng([seed, person["speaker"], word_index])
    lead = round(rng.integers(_SPEECH_LEAD_MS[0], _SPEECH_LEAD_MS[1] + 1) * rate / 1000)
    length = round(clip_seconds * rate)
    clip = np.zeros(length)
    body = speech[: max(length - lead, 0)]
    clip[lead: lead + len(body)] = body
    loudness = float(np.sqrt(np.mean(body ** 2))) if len(body) else 0.0
    snr = rng.uniform(*_SPEECH_SNR_DB)
    clip += rng.standard_normal(length) * loudness * 10 ** (-snr / 20)
    peak = float(np.abs(clip).max())
    if peak > _MAX_PEAK:
        clip *= _MAX_PEAK / peak
    sf.write(path, clip, rate, subtype="PCM_16")
    return {"path": path.relative_to(out_dir).as_posix(), "label": word, "split": person["split"],
            **{k: person[k] for k in ("speaker", "voice", "rate", "speech_pitch")}}

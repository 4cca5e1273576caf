"""The bad-input catalogue: every kind of input the store build must survive, and how each one ends.

A case makes one input (a file, a folder or a link) in a folder. Good input is *written*: its real frame count
after resampling to 16 kHz is known, and its fbank must match the same signal, mixed to mono in float, to within
`tol` (mean absolute difference of log-mel values). Bad input *fails*: failures.csv lists it with a reason that
contains `reason`. Manifest errors (the job stops) are in tests/test_bad_input.py.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from conftest import encode, tone

TARGET_FRAMES = 128  # the test store's audio.target_frames
WAV_HEADER = 44  # soundfile's canonical WAV header: RIFF, fmt and data chunk headers


@dataclass(frozen=True, eq=False)
class Case:
    name: str
    file: str  # its path in the store and in failures.csv (relative to the input folder)
    make: Callable[[Path], None]  # writes the input into a folder
    reason: str = ""  # failed: a substring of its failures.csv reason; "" means written
    wave: np.ndarray | None = None  # written: the float signal it encodes, (n, channels)
    rate: int = 16000
    tol: float = 0.01
    needs_non_root: bool = False  # root reads any file: this case is checked as another user

    @property
    def written(self) -> bool:
        return not self.reason

    @property
    def frames(self) -> int:
        """Kaldi frames (25 ms window, 10 ms hop, no padding) of the wave resampled to 16 kHz, up to the target."""
        n16 = math.ceil(self.wave.shape[0] * 16000 / self.rate)
        return min(1 + (n16 - 400) // 160, TARGET_FRAMES)


def channels(seconds: float, rate: int, n: int) -> np.ndarray:
    """n channels with different tones, so a downmix that drops or repeats a channel gives another spectrum."""
    return np.concatenate([tone(seconds, rate, freq=200.0 + 150.0 * c, seed=c) for c in range(n)], axis=1)


def good(name: str, file: str, wave: np.ndarray, rate: int = 16000, subtype: str = "PCM_16", fmt: str = "WAV",
         tol: float = 0.01, keep_bytes: int | None = None, name_bytes: bytes | None = None) -> Case:
    """A valid file; `keep_bytes` cuts the encoding short (the WAV header then promises more than is there);
    `name_bytes` is its name on disk when that is not `file` in UTF-8."""
    def make(folder: Path) -> None:
        with open(os.path.join(bytes(folder), name_bytes or file.encode()), "wb") as fh:
            fh.write(encode(wave, rate, fmt=fmt, subtype=subtype)[:keep_bytes])
    kept = wave if keep_bytes is None else wave[: (keep_bytes - WAV_HEADER) // 2]
    return Case(name, file, make, wave=kept, rate=rate, tol=tol)


def bad_bytes(name: str, file: str, content: bytes, reason: str) -> Case:
    return Case(name, file, lambda folder: (folder / file).write_bytes(content), reason)


def with_sample(value: float, subtype: str = "FLOAT") -> bytes:
    wave = tone(1.0, 16000)
    wave[100] = value
    return encode(wave, 16000, subtype=subtype)


def unreadable(folder: Path) -> None:
    (folder / "locked.wav").write_bytes(encode(tone(0.5, 16000), 16000))
    (folder / "locked.wav").chmod(0)


ONE_S = encode(tone(1.0, 16000), 16000, subtype="PCM_16")

CASES = [
    # Written: every WAV sample format, FLAC and Ogg, every channel count and rate, odd names, a data chunk cut short.
    good("8-bit int WAV (unsigned)", "u8.wav", channels(0.5, 16000, 1), subtype="PCM_U8", tol=0.3),
    good("16-bit int WAV", "s16.wav", channels(0.5, 16000, 1), subtype="PCM_16"),
    good("24-bit int WAV", "s24.wav", channels(0.5, 16000, 1), subtype="PCM_24"),
    good("32-bit int WAV", "s32.wav", channels(0.5, 16000, 1), subtype="PCM_32"),
    good("32-bit float WAV", "f32.wav", channels(0.5, 16000, 1), subtype="FLOAT"),
    good("64-bit float WAV", "f64.wav", channels(0.5, 16000, 1), subtype="DOUBLE"),
    good("FLAC", "clip.flac", channels(0.5, 16000, 1), fmt="FLAC"),
    # Lossy: Vorbis drops the quiet high bands of the tone's noise floor, so only a loose match is possible.
    good("Ogg Vorbis", "clip.ogg", channels(0.5, 16000, 1), fmt="OGG", subtype="VORBIS", tol=1.0),
    *(good(f"{n} channels", f"ch{n}.wav", channels(0.6, 16000, n)) for n in range(2, 9)),
    *(good(f"{rate} Hz", f"rate{rate}.wav", channels(seconds, rate, 1), rate=rate)
      for rate, seconds in [(8000, 0.5), (11025, 0.8), (22050, 1.0), (32000, 0.9), (44100, 0.7), (48000, 1.0),
                            (88200, 1.1), (96000, 1.2)]),
    good("name with spaces", "my clip 1.wav", channels(0.3, 16000, 1)),
    good("non-ASCII name", "b ü é 日本.wav", channels(0.4, 16000, 1)),
    # A Latin-1 name, as an archive made on Windows leaves it: not UTF-8, so the store shows the byte escaped.
    good("name that is not UTF-8", "latin-\\xe9.wav", channels(0.5, 16000, 1), name_bytes=b"latin-\xe9.wav"),
    good("data chunk cut short", "cut.wav", tone(1.0, 16000), keep_bytes=WAV_HEADER + 2 * 8000),
    # Failed: a row in failures.csv with the reason.
    bad_bytes("empty file", "empty.wav", b"", "empty file"),
    bad_bytes("truncated header", "header.wav", ONE_S[:30], "not decodable audio: "),
    bad_bytes("random bytes named .wav", "noise.wav", np.random.default_rng(1).bytes(3000), "not decodable audio: "),
    bad_bytes("NaN samples", "nan.wav", with_sample(np.nan), "NaN or Inf samples"),
    bad_bytes("Inf samples", "inf.wav", with_sample(-np.inf, "DOUBLE"), "NaN or Inf samples"),
    bad_bytes("zero samples", "zero.wav", encode(np.zeros((0, 1), np.float32), 16000), "no samples"),
    bad_bytes("shorter than one 25 ms frame", "10ms.wav", encode(tone(0.01, 16000), 16000),
              "too short: 10.0 ms, a frame needs 25 ms"),
    Case("symlink loop", "loop.wav", lambda folder: os.symlink("loop.wav", folder / "loop.wav"),
         "unreadable: Too many levels of symbolic links"),
    Case("directory named x.wav", "x.wav", lambda folder: (folder / "x.wav").mkdir(), "unreadable: Is a directory"),
    Case("file without read permission", "locked.wav", unreadable, "unreadable: Permission denied",
         needs_non_root=True),
]


def by_name(*names: str) -> list[Case]:
    cases = {c.name: c for c in CASES}
    return [cases[n] for n in names]

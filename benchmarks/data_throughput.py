"""Store build throughput: Ray Data (all CPUs) vs a plain single-process loop over the same audio.py code.

Both turn the same N clips of 10 s audio into fbank spectrograms and write them to Parquet; measured in one
run, one after the other. Ray start-up is excluded from our figure and printed separately.

    python benchmarks/data_throughput.py [--clips 500] [--seconds 10] [--rate 22050]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from ajepa.audio import spectrogram_from_bytes  # noqa: E402
from ajepa.config import AudioConfig  # noqa: E402


def make_clips(folder: Path, n: int, seconds: float, rate: int) -> None:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * rate)) / rate
    for i in range(n):
        wave = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 4000) * t) + 0.05 * rng.standard_normal(t.size)
        sf.write(folder / f"class{i % 10}" / f"clip{i:05d}.wav", wave.astype(np.float32), rate, subtype="PCM_16")


def baseline(files: list[Path], cfg: AudioConfig, out: Path) -> float:
    start = time.perf_counter()
    specs, frames = [], []
    for path in files:
        spec = spectrogram_from_bytes(path.read_bytes(), cfg)
        specs.append(spec.fbank.numpy().astype(np.float16).tobytes())  # the store's format
        frames.append(spec.n_frames)
    table = pa.table({"path": [str(p) for p in files], "fbank": specs, "n_frames": frames})
    pq.write_table(table, out)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=22050, help="source sample rate (resampled to 16 kHz)")
    args = parser.parse_args()
    cfg = AudioConfig(target_frames=1024)
    work = Path(tempfile.mkdtemp(prefix="ajepa-bench-"))
    try:
        src = work / "audio"
        for c in range(10):
            (src / f"class{c}").mkdir(parents=True)
        make_clips(src, args.clips, args.seconds, args.rate)
        files = sorted(src.rglob("*.wav"))
        print(f"{len(files)} clips of {args.seconds:g} s at {args.rate} Hz")

        base_s = baseline(files, cfg, work / "baseline.parquet")
        base_rate = len(files) / base_s
        print(f"baseline single-process loop: {base_s:.2f} s, {base_rate:.1f} clips/s")

        from ajepa.data import build_store
        from ajepa.runtime import init_ray

        # Start-up: the cluster, and worker processes importing torch on a first small build. A long-lived
        # cluster pays this once; it is reported, not counted.
        start = time.perf_counter()
        init_ray()
        build_store(src / "class0", work / "warmup", cfg)
        print(f"ray start-up + worker warm-up (excluded): {time.perf_counter() - start:.2f} s")
        start = time.perf_counter()
        summary = build_store(src, work / "store", cfg)
        ours_s = time.perf_counter() - start
        ours_rate = summary.written / ours_s
        print(f"ajepa store build (Ray Data): {ours_s:.2f} s, {ours_rate:.1f} clips/s ({summary.line()})")
        print(f"ratio: {ours_rate / base_rate:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

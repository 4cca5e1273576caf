"""Store build throughput: Ray Data (all CPUs) vs a plain single-process loop over the same audio.py code.

Both turn the same N clips of 10 s audio into fbank spectrograms and write them to Parquet. Shared machines
are noisy (two runs of a single pair once gave 1.28 and 2.05), so the two run in interleaved rounds, taking
turns to go first, and the medians are reported: of each side's rate and of the per-round ratios. Ray
start-up is excluded from our figure and printed separately.

    python benchmarks/data_throughput.py [--clips 500] [--seconds 10] [--rate 22050] [--rounds 5]

The last line printed is `ratio: <median over rounds of ours clips/s / baseline clips/s>`.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
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


def ours(src: Path, cfg: AudioConfig, out: Path) -> tuple[float, int]:
    """Seconds for a store build of `src`, and the clips it wrote."""
    from ajepa.data import build_store

    start = time.perf_counter()
    summary = build_store(src, out, cfg)
    return time.perf_counter() - start, summary.written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=22050, help="source sample rate (resampled to 16 kHz)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of both sides")
    args = parser.parse_args()
    cfg = AudioConfig(target_frames=1024)
    work = Path(tempfile.mkdtemp(prefix="ajepa-bench-"))
    try:
        src = work / "audio"
        for c in range(10):
            (src / f"class{c}").mkdir(parents=True)
        make_clips(src, args.clips, args.seconds, args.rate)
        files = sorted(src.rglob("*.wav"))
        print(f"{len(files)} clips of {args.seconds:g} s at {args.rate} Hz, {args.rounds} rounds")

        from ajepa.runtime import init_ray

        # Start-up: the cluster, and worker processes importing torch on a first small build. A long-lived
        # cluster pays this once; it is reported, not counted.
        start = time.perf_counter()
        init_ray()
        ours(src / "class0", cfg, work / "warmup")
        print(f"ray start-up + worker warm-up (excluded): {time.perf_counter() - start:.2f} s")
        sides = {"baseline": lambda r: (baseline(files, cfg, work / f"base{r}.parquet"), len(files)),
                 "ours": lambda r: ours(src, cfg, work / f"store{r}")}
        rates: dict[str, list[float]] = {side: [] for side in sides}
        for r in range(args.rounds):
            for side in ("baseline", "ours") if r % 2 == 0 else ("ours", "baseline"):  # take turns going first
                seconds, clips = sides[side](r)
                rates[side].append(clips / seconds)
            print(f"round {r + 1}: baseline {rates['baseline'][-1]:.1f} clips/s, ours {rates['ours'][-1]:.1f} "
                  f"clips/s, ratio {rates['ours'][-1] / rates['baseline'][-1]:.2f}")
        ratios = [o / b for o, b in zip(rates["ours"], rates["baseline"], strict=True)]
        print(f"baseline single-process loop (median): {statistics.median(rates['baseline']):.1f} clips/s")
        print(f"ajepa store build, Ray Data (median): {statistics.median(rates['ours']):.1f} clips/s")
        print(f"ratio: {statistics.median(ratios):.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray cluster (2 CPUs) shared by the tests that need it."""
    import ray
    from ajepa.runtime import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


def tone(seconds: float, rate: int, channels: int = 1, freq: float = 440.0, seed: int = 0) -> np.ndarray:
    """A noisy sine: real signal content, deterministic."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    wave = 0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.size)
    return np.repeat(wave[:, None], channels, axis=1).astype(np.float32)


def encode(samples: np.ndarray, rate: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def failures(store: Path) -> dict[str, str]:
    """A store's failures.csv as {path: reason}."""
    with (store / "failures.csv").open() as fh:
        return {row["path"]: row["reason"] for row in csv.DictReader(fh)}

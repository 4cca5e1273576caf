"""Audio bytes to Kaldi fbank spectrograms (method.md §1). Pure torch + soundfile: no Ray here.

Decoding uses soundfile (libsndfile: wav, flac, ogg/vorbis, ...) rather than `torchaudio.load`, which now
needs torchcodec and FFmpeg. Every failure raises `AudioError` with a short reason that the store writes to
`failures.csv`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torchaudio

from ajepa.config import AudioConfig


class AudioError(ValueError):
    """This input cannot become a spectrogram; the message says why."""


@dataclass(frozen=True)
class Spectrogram:
    fbank: torch.Tensor  # (target_frames, num_mel_bins) float32
    n_frames: int  # real (unpadded) frames, at most target_frames
    source_rate: int
    source_channels: int


def decode(data: bytes) -> tuple[np.ndarray, int]:
    """Decode an encoded audio file to float32 samples of shape (n_samples, channels) and its rate."""
    import soundfile as sf  # here, not at the top: training and GPU benchmarks never decode audio

    if not data:
        raise AudioError("empty file")
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as exc:
        # libsndfile's own reason ("Format not recognised.") without the BytesIO repr around it.
        raise AudioError(f"not decodable audio: {getattr(exc, 'error_string', exc)}") from None
    if samples.shape[0] == 0:
        raise AudioError("no samples")
    if not np.isfinite(samples).all():
        raise AudioError("NaN or Inf samples")
    return samples, int(rate)


def to_mono_16k(samples: np.ndarray, rate: int, sample_rate: int = 16000) -> torch.Tensor:
    """Downmix (n, channels) to mono, resample, subtract the mean. Returns a 1-D float32 tensor."""
    wave = torch.from_numpy(np.ascontiguousarray(samples.mean(axis=1, dtype=np.float32)))
    if rate != sample_rate:
        wave = torchaudio.functional.resample(wave, rate, sample_rate)
    return wave - wave.mean()


def fbank(wave: torch.Tensor, cfg: AudioConfig) -> torch.Tensor:
    """Kaldi-compatible log-mel filterbank, (frames, num_mel_bins), exactly as method.md §1."""
    min_samples = int(cfg.sample_rate * cfg.frame_length_ms / 1000)
    if wave.numel() < min_samples:
        raise AudioError(
            f"too short: {wave.numel() / cfg.sample_rate * 1000:.1f} ms, a frame needs {cfg.frame_length_ms:g} ms"
        )
    return torchaudio.compliance.kaldi.fbank(
        wave.unsqueeze(0),
        htk_compat=True,
        sample_frequency=cfg.sample_rate,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=cfg.num_mel_bins,
        dither=0.0,
        frame_length=cfg.frame_length_ms,
        frame_shift=cfg.frame_shift_ms,
    )


def pad_or_crop(spec: torch.Tensor, target_frames: int, start: int = 0) -> torch.Tensor:
    """Zero-pad at the end, or crop `target_frames` rows from `start`."""
    frames = spec.shape[0]
    if frames >= target_frames:
        return spec[start : start + target_frames]
    return torch.nn.functional.pad(spec, (0, 0, 0, target_frames - frames))


def spectrogram_from_bytes(data: bytes, cfg: AudioConfig) -> Spectrogram:
    """The whole per-file pipeline: decode, mono, resample, mean, fbank, pad/crop at 0."""
    samples, rate = decode(data)
    spec = fbank(to_mono_16k(samples, rate, cfg.sample_rate), cfg)
    return Spectrogram(
        fbank=pad_or_crop(spec, cfg.target_frames),
        n_frames=min(spec.shape[0], cfg.target_frames),
        source_rate=rate,
        source_channels=samples.shape[1],
    )


def normalize(spec: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """AudioMAE/AST normalisation: (x - mean) / (2 * std)."""
    return (spec - mean) / (2.0 * std)


@dataclass(frozen=True)
class Augmentation:
    """One batch's pretraining augmentation (method.md §1), drawn on the host, applied on the model's device.

    Crop and roll compose into one frame index per clip, so the device does a single gather; the host work
    is a few numbers per clip and never touches the spectrogram itself."""

    frames: torch.Tensor  # (B, crop) int64: output frame t of clip b is input frame frames[b, t]
    gain: torch.Tensor  # (B,) float32: added to the log-mel energies (gain jitter; 0 when off)

    def to(self, device: torch.device, non_blocking: bool = False) -> Augmentation:
        return Augmentation(self.frames.to(device, non_blocking=non_blocking),
                            self.gain.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Augmentation:
        return Augmentation(self.frames.pin_memory(), self.gain.pin_memory())


def draw_augmentation(n_frames: torch.Tensor, frames: int, crop: int, roll: bool, gain_db: float,
                      generator: torch.Generator) -> Augmentation:
    """Random crop within each clip's real frames (start 0 when it is shorter or the stored clip is shorter
    than `crop`, which is then zero-padded), random cyclic roll of the crop's real frames, gain jitter of
    ±gain_db dB.

    The roll turns only the real frames of a clip shorter than the crop, and its padding stays at the end (as
    AudioMAE rolls before it pads): rolling the padded crop would put silence mid-clip, a seam that exists in
    no real recording and that the probes, which see unrolled clips, never meet.
    A gain of g dB scales power by 10^(g/10), i.e. adds g·ln(10)/10 to the natural-log mel energies."""
    batch = n_frames.shape[0]
    real = n_frames.clamp(max=frames)
    starts = torch.zeros(batch, dtype=torch.int64)
    if frames >= crop:
        room = (real - crop).clamp(min=0).to(torch.float64)
        starts = (torch.rand(batch, generator=generator, dtype=torch.float64) * (room + 1)).floor().long()
    offsets = torch.arange(crop)[None, :].expand(batch, -1)
    if roll:
        length = (real - starts).clamp(min=1, max=crop)[:, None]  # real frames inside each crop
        shifts = (torch.rand(batch, 1, generator=generator, dtype=torch.float64) * length).floor().long()
        offsets = torch.where(offsets < length, (offsets - shifts) % length, offsets)
    gain = torch.zeros(batch)
    if gain_db > 0:
        gain = (torch.rand(batch, generator=generator) * 2 - 1) * gain_db * (np.log(10.0) / 10.0)
    return Augmentation(starts[:, None] + offsets, gain.float())


def apply_augmentation(spec: torch.Tensor, aug: Augmentation) -> torch.Tensor:
    """(B, T, F) spectrograms (any float dtype, on aug's device) -> (B, crop, F) float32."""
    crop = aug.frames.shape[1]
    if spec.shape[1] < crop:
        spec = torch.nn.functional.pad(spec, (0, 0, 0, crop - spec.shape[1]))
    # Expand the small index where it lives (expanding, then moving, would copy B x crop x F indices), and
    # gather in the stored dtype before widening: float32 is made once, for the frames kept.
    out = spec.gather(1, aug.frames[:, :, None].expand(-1, -1, spec.shape[2])).float()
    return out + aug.gain[:, None, None]

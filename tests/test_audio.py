import numpy as np
import pytest
import torch
import torchaudio
from ajepa.audio import AudioError, decode, fbank, normalize, pad_or_crop, spectrogram_from_bytes, to_mono_16k
from ajepa.config import AudioConfig
from conftest import encode, tone

CFG = AudioConfig()


def kaldi_reference(wave: torch.Tensor) -> torch.Tensor:
    """method.md §1 written out by hand, to check that our pipeline calls it exactly so."""
    return torchaudio.compliance.kaldi.fbank(
        (wave - wave.mean()).unsqueeze(0), htk_compat=True, sample_frequency=16000, use_energy=False,
        window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10, frame_length=25)


@pytest.mark.parametrize("seconds, frames, target", [(1.0, 98, 128), (5.0, 498, 512), (10.0, 998, 1024)])
def test_fbank_matches_kaldi_and_pads_to_target(seconds, frames, target):
    samples = tone(seconds, 16000)
    cfg = AudioConfig(target_frames=target)
    spec = spectrogram_from_bytes(encode(samples, 16000, subtype="FLOAT"), cfg)
    ref = kaldi_reference(torch.from_numpy(samples[:, 0]))
    assert ref.shape == (frames, 128)
    assert spec.fbank.shape == (target, 128) and spec.n_frames == frames
    torch.testing.assert_close(spec.fbank[:frames], ref, rtol=0, atol=1e-4)
    assert torch.all(spec.fbank[frames:] == 0)


def test_crop_keeps_the_start():
    samples = tone(2.0, 16000)
    spec = spectrogram_from_bytes(encode(samples, 16000, subtype="FLOAT"), AudioConfig(target_frames=128))
    ref = kaldi_reference(torch.from_numpy(samples[:, 0]))
    assert spec.n_frames == 128
    torch.testing.assert_close(spec.fbank, ref[:128], rtol=0, atol=1e-4)
    assert torch.equal(pad_or_crop(ref, 50, start=10), ref[10:60])


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resamples_any_rate_to_16k(rate):
    samples = tone(1.0, rate, freq=1000.0)
    wave = to_mono_16k(*decode(encode(samples, rate, subtype="PCM_16")))
    assert abs(wave.numel() - 16000) <= 1
    assert abs(float(wave.mean())) < 1e-6
    # The 1 kHz tone survives resampling: its energy peaks at the 1 kHz bin of a 16 kHz FFT.
    spectrum = torch.fft.rfft(wave).abs()
    assert abs(int(spectrum.argmax()) * 16000 / wave.numel() - 1000) < 5


def test_downmixes_six_channels_and_int_and_float_agree():
    stereo = np.concatenate([tone(1.0, 16000), tone(1.0, 16000, freq=220.0)], axis=1)
    six = np.concatenate([stereo] * 3, axis=1)
    mono_expected = stereo.mean(axis=1)
    samples, rate = decode(encode(six, 16000, subtype="FLOAT"))
    assert samples.shape == (16000, 6) and rate == 16000
    torch.testing.assert_close(to_mono_16k(samples, rate), torch.from_numpy(mono_expected - mono_expected.mean()))
    as_int = spectrogram_from_bytes(encode(stereo, 16000, subtype="PCM_16"), CFG).fbank
    as_float = spectrogram_from_bytes(encode(stereo, 16000, subtype="FLOAT"), CFG).fbank
    assert (as_int - as_float).abs().mean() < 0.05


def test_fbank_rejects_sub_frame_waves_and_normalize():
    with pytest.raises(AudioError, match="too short"):
        fbank(torch.zeros(399), CFG)
    x = torch.tensor([-4.2677393, 4.8702555])
    torch.testing.assert_close(normalize(x, -4.2677393, 4.5689974), torch.tensor([0.0, 1.0]))

"""The HEAR 2021 API over a real exported micro encoder (1.28 s windows of 128 frames, 8 x 8 patches, width 64)."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from ajepa.audio import fbank, normalize, pad_or_crop
from ajepa.hear import HearError, get_scene_embeddings, get_timestamp_embeddings, load_model
from ajepa.models.vit import VisionTransformer
from ajepa.train.pretrain import ENCODER_FILE, Pretrainer, export_encoder
from conftest import fake_batch, micro_cfg, tone
from safetensors.torch import load_file, save_file

RATE = 16000
MEAN, STD = -7.0, 3.5
WIDTH = 64  # micro_cfg's embed_dim


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder with the encoder of a micro Pretrainer after two steps, exported by the real export_encoder."""
    trainer = Pretrainer(micro_cfg(), MEAN, STD, torch.device("cpu"))
    for step in range(2):
        trainer.train_step([fake_batch(step)])
    folder = tmp_path_factory.mktemp("run")
    stats = {"audio": dataclasses.asdict(trainer.cfg.audio), "mean": MEAN, "std": STD}
    export_encoder(trainer.state_dict(), folder / ENCODER_FILE, stats)
    return folder


@pytest.fixture(scope="module")
def model(run_dir):
    return load_model(run_dir / ENCODER_FILE)


def clips(seconds: float, *freqs: float) -> torch.Tensor:
    return torch.stack([torch.from_numpy(tone(seconds, RATE, freq=f, seed=i)[:, 0]) for i, f in enumerate(freqs)])


def test_model_follows_the_api(model, run_dir):
    assert isinstance(model, torch.nn.Module) and not model.training
    assert model.sample_rate == 16000
    assert model.scene_embedding_size == model.timestamp_embedding_size == WIDTH
    assert not any(p.requires_grad for p in model.parameters())
    from_folder = load_model(str(run_dir))  # a run folder (and a str path) work too
    assert torch.equal(get_scene_embeddings(clips(0.5, 300), from_folder), get_scene_embeddings(clips(0.5, 300), model))


# seconds -> timestamps kept: patch k is centred at 87.5 + 160 k ms and kept while that is within the audio
@pytest.mark.parametrize(("seconds", "n_timestamps"), [(0.1, 1), (1.0, 6), (2.5, 16), (20.0, 125)])
def test_shapes_dtypes_and_timestamps(model, seconds, n_timestamps):
    audio = clips(seconds, 220, 880)
    embeddings, timestamps = get_timestamp_embeddings(audio, model)
    assert embeddings.shape == (2, n_timestamps, WIDTH) and embeddings.dtype == torch.float32
    assert timestamps.shape == (2, n_timestamps) and timestamps.dtype == torch.float32
    expected = 87.5 + 160.0 * torch.arange(n_timestamps)
    assert torch.equal(timestamps[0], expected) and torch.equal(timestamps[1], expected)
    assert timestamps.max() <= seconds * 1000
    assert torch.isfinite(embeddings).all()
    assert not torch.allclose(embeddings[0], embeddings[1], atol=1e-3)  # the two tones are told apart
    scene = get_scene_embeddings(audio, model)
    assert scene.shape == (2, WIDTH) and scene.dtype == torch.float32
    torch.testing.assert_close(scene, embeddings.mean(1))


def test_a_clip_shorter_than_the_first_patch_centre_keeps_one_timestamp_at_its_end(model):
    embeddings, timestamps = get_timestamp_embeddings(clips(0.05, 440), model)
    assert embeddings.shape == (1, 1, WIDTH)
    assert timestamps.tolist() == [[50.0]]


def test_input_is_the_stores_fbank_normalised_with_the_exported_stats(model, run_dir):
    """One 1 s clip, by hand: mean removed, Kaldi fbank, zero-padded to 128 frames, (x - mean) / (2 std), the
    exported weights; timestamp embeddings = mean over each time column's 8 frequency tokens."""
    audio = clips(1.0, 440)
    wave = audio[0] - audio[0].mean()
    x = normalize(pad_or_crop(fbank(wave, model.audio), 128), MEAN, STD)
    vit = VisionTransformer(micro_cfg().model, 128, 128)
    vit.load_state_dict(load_file(str(run_dir / ENCODER_FILE)))
    with torch.no_grad():
        columns = vit(x[None]).reshape(1, 8, 8, WIDTH).mean(2)
    embeddings, _ = get_timestamp_embeddings(audio, model)
    torch.testing.assert_close(embeddings, columns[:, :6])


def test_long_clip_is_its_windows_end_to_end(model):
    """2.5 s = 248 frames = two windows (frames 0-127, 128-247 + padding). The prefix that makes exactly frames
    0-127 and the suffix from frame 128 on, each embedded alone, give the long clip's timestamp embeddings, and
    its scene embedding is their mean. Every segment is zero-mean, so removing each clip's mean changes nothing."""
    wave = torch.from_numpy(np.random.default_rng(0).standard_normal(40000).astype(np.float32)) * 0.1
    for lo, hi in [(0, 20480), (20480, 20720), (20720, 40000)]:  # frame 128 starts at 20480; frame 127 ends at 20720
        wave[lo:hi] -= wave[lo:hi].mean()
    whole, whole_ts = get_timestamp_embeddings(wave[None], model)
    prefix, prefix_ts = get_timestamp_embeddings(wave[None, :20720], model)
    suffix, suffix_ts = get_timestamp_embeddings(wave[None, 20480:], model)
    assert prefix.shape[1] == 8 and suffix.shape[1] == 8  # 1295 ms and 1220 ms: every patch centre is inside
    torch.testing.assert_close(whole, torch.cat([prefix, suffix], 1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(whole_ts, torch.cat([prefix_ts, suffix_ts + 1280], 1))
    torch.testing.assert_close(get_scene_embeddings(wave[None], model), whole.mean(1))


def test_batching_does_not_change_an_embedding(model):
    batch = clips(2.5, 330, 440, 550)
    alone_ts, alone_times = get_timestamp_embeddings(batch[1:2], model)
    in_batch_ts, in_batch_times = get_timestamp_embeddings(batch, model)
    torch.testing.assert_close(in_batch_ts[1:2], alone_ts, rtol=1e-5, atol=1e-5)
    assert torch.equal(in_batch_times[1:2], alone_times)
    torch.testing.assert_close(get_scene_embeddings(batch, model)[1:2], get_scene_embeddings(batch[1:2], model),
                               rtol=1e-5, atol=1e-5)


def test_same_input_gives_identical_output(model):
    audio = clips(2.5, 330, 440)
    first, second = get_timestamp_embeddings(audio, model), get_timestamp_embeddings(audio, model)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert torch.equal(get_scene_embeddings(audio, model), get_scene_embeddings(audio, model))
    # float64 input is the same audio
    assert torch.equal(get_scene_embeddings(audio.double(), model), get_scene_embeddings(audio, model))


@pytest.mark.parametrize(("audio", "message"), [
    (torch.zeros(16000), r"expected a float tensor \(n_sounds, n_samples\).*16000 Hz, got shape \(16000,\)"),
    (torch.zeros(1, 2, 16000), r"got shape \(1, 2, 16000\)"),
    (torch.zeros(1, 16000, dtype=torch.int16), r"got torch.int16 \(scale integer samples to \[-1, 1\] floats\)"),
    (np.zeros((1, 16000), np.float32), "got ndarray"),
    (torch.zeros(1, 0), r"empty batch of shape \(1, 0\)"),
    (torch.zeros(0, 16000), r"empty batch of shape \(0, 16000\)"),
    (torch.full((1, 16000), float("nan")), "NaN or Inf"),
])
def test_bad_audio_gives_clear_errors(model, audio, message):
    for function in (get_timestamp_embeddings, get_scene_embeddings):
        with pytest.raises(HearError, match=message):
            function(audio, model)


def test_audio_shorter_than_one_frame_is_an_error(model):
    with pytest.raises(ValueError, match="too short: 10.0 ms, a frame needs 25 ms"):
        get_scene_embeddings(torch.zeros(1, 160), model)


def test_files_that_are_no_usable_encoder_name_the_file(tmp_path, run_dir):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, str(foreign))
    weights = load_file(str(run_dir / ENCODER_FILE))
    old = tmp_path / "old.safetensors"  # what export_encoder wrote before it recorded the input settings
    save_file(weights, str(old), metadata={"config": json.dumps(dataclasses.asdict(micro_cfg().model)), "step": "2"})
    wrong = tmp_path / "wrong.safetensors"  # weights of another width than its config says
    config = {**dataclasses.asdict(micro_cfg().model), "embed_dim": 128}
    save_file(weights, str(wrong), metadata={"config": json.dumps(config), "step": "2",
                                             "input": _input_metadata(run_dir)})
    cases = [(garbage, "not an ajepa encoder \\(unreadable as safetensors"),
             (foreign, "not an ajepa encoder \\(its metadata has no model config\\)"),
             (old, "exported without its input settings \\(fbank, mean/std, crop\\); re-export"),
             (wrong, "weights do not match the model config in its metadata"),
             (tmp_path / "absent.safetensors", "no such encoder file"),
             (tmp_path, "no such encoder file")]  # a folder without an encoder.safetensors
    for path, message in cases:
        expected = path / ENCODER_FILE if path.is_dir() else path
        with pytest.raises(HearError, match=f"^{expected}: {message}"):
            load_model(path)


def test_bad_input_settings_name_the_file_and_key(tmp_path, run_dir):
    spec = json.loads(_input_metadata(run_dir))
    spec["crop_frames"] = 100  # not a whole number of 16-frame patches
    path = tmp_path / "bad.safetensors"
    config = dataclasses.asdict(micro_cfg().model)
    save_file(load_file(str(run_dir / ENCODER_FILE)), str(path),
              metadata={"config": json.dumps(config), "input": json.dumps(spec)})
    with pytest.raises(HearError, match=f"^{path}: data.crop_frames: 100 is not divisible"):
        load_model(path)


def _input_metadata(run_dir) -> str:
    from safetensors import safe_open

    with safe_open(str(run_dir / ENCODER_FILE), "pt") as f:
        return f.metadata()["input"]


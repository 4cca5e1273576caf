"""The HEAR 2021 common API over an exported encoder: `load_model`, `get_scene_embeddings`,
`get_timestamp_embeddings` (hearbenchmark.com). Plain torch: no Ray, no MLflow.

Decisions:
- `load_model(path)` takes an `encoder.safetensors` written by `export_encoder` (the pretrained target encoder), a
  `model.safetensors` written by fine-tuning's `export_model` (its classifier's encoder), or a run folder holding
  either. Its `input` metadata says how audio becomes this encoder's input: the store's fbank settings and
  mean/std, the crop it was trained on. A file without it (exported before it existed), or one that is no ajepa
  encoder, raises `HearError` naming the file.
- Audio in: a float tensor (n_sounds, n_samples) at `model.sample_rate` (16 kHz). Each clip goes through the
  store's pipeline (audio.py, method.md §1): subtract its mean, Kaldi fbank, zero-pad, `(x - mean) / (2 * std)`.
- Windows: a clip's fbank is cut into consecutive windows of the encoder's `crop_frames` (the length of its
  position table: 1.28 s for `tiny`, 10.24 s for `base`); the last, like any shorter clip, is zero-padded as
  the store pads a short clip. All windows of the batch go through the encoder in one call, but each window
  is encoded alone: a clip's embeddings do not depend on the rest of the batch (up to float rounding).
- Timestamp embeddings: one per time patch (16 frames, a 160 ms hop), the mean of that time column's frequency
  tokens: `embed_dim` values. Concatenating the 8 frequency tokens would keep their order, but makes every
  timestamp 8 times larger (6,144 values for ViT-B) for HEAR's downstream heads, and attention has already mixed
  frequency into every token. Its timestamp is the centre (ms) of the audio the patch's frames span:
  87.5 + 160 k ms for 25 ms frames at 10 ms. Patches centred beyond the end of the audio (mostly padding) are
  dropped, keeping at least one; that one's timestamp is clamped to the end of a clip shorter than 87.5 ms.
- Scene embedding: the mean of the clip's timestamp embeddings, i.e. over its real time patches of all windows.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from ajepa.audio import fbank, normalize, pad_or_crop, to_mono_16k
from ajepa.config import Config, ConfigError, config_from_dict
from ajepa.models.vit import VisionTransformer
from ajepa.train.finetune import MODEL_FILE
from ajepa.train.pretrain import ENCODER_FILE

CLASSIFIER_ENCODER = "encoder."  # the encoder's weights in a fine-tuned model


class HearError(ValueError):
    """A file is not a usable ajepa encoder, or audio does not fit the API; the message says which."""


class HearModel(nn.Module):
    """An exported encoder with its input pipeline; in eval mode, without gradients."""

    def __init__(self, cfg: Config, mean: float, std: float, normalize_input: bool, step: int, fine_tuned: bool):
        super().__init__()
        self.step, self.fine_tuned = step, fine_tuned  # the training step it was exported at; from fine-tuning?
        self.audio, self.mean, self.std, self.normalize_input = cfg.audio, mean, std, normalize_input
        self.window_frames = cfg.data.crop_frames
        self.patch_size = cfg.model.patch_size
        self.encoder = VisionTransformer(cfg.model, cfg.audio.num_mel_bins, max_frames=cfg.data.crop_frames)
        self.sample_rate = cfg.audio.sample_rate
        self.scene_embedding_size = self.timestamp_embedding_size = cfg.model.embed_dim

    def patch_centres_ms(self, n_patches: int) -> Tensor:
        """Centre of the audio spanned by each time patch's frames, in ms."""
        hop = self.patch_size * self.audio.frame_shift_ms
        span = (self.patch_size - 1) * self.audio.frame_shift_ms + self.audio.frame_length_ms
        return torch.arange(n_patches, dtype=torch.float64) * hop + span / 2


def load_model(model_file_path: str | Path) -> HearModel:
    """An `encoder.safetensors`, a fine-tuned `model.safetensors` (or a run folder holding one) -> a HearModel on
    the CPU (`.to()` moves it)."""
    path = Path(model_file_path)
    if path.is_dir():
        path = path / (MODEL_FILE if (path / MODEL_FILE).is_file() else ENCODER_FILE)
    weights, metadata = _read_safetensors(path)
    fine_tuned = "task" in metadata  # a classifier: its encoder, without the head
    if fine_tuned:
        weights = {k[len(CLASSIFIER_ENCODER):]: v for k, v in weights.items() if k.startswith(CLASSIFIER_ENCODER)}
    if "config" not in metadata:
        raise HearError(f"{path}: not an ajepa encoder (its metadata has no model config)")
    if "input" not in metadata:
        raise HearError(f"{path}: exported without its input settings (fbank, mean/std, crop); re-export it with "
                        "this version's export_encoder(load_checkpoint(<pretrain.pt>), path, read_stats(<store>))")
    try:
        spec = json.loads(metadata["input"])
        data = {"model": json.loads(metadata["config"]), "audio": spec["audio"],
                "data": {"crop_frames": spec["crop_frames"]}}
        model = HearModel(config_from_dict(data, source=str(path)), float(spec["mean"]), float(spec["std"]),
                          bool(spec["normalize"]), int(metadata["step"]), fine_tuned)
    except ConfigError as exc:
        raise HearError(str(exc)) from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise HearError(f"{path}: unreadable encoder metadata ({type(exc).__name__}: {exc})") from None
    try:
        model.encoder.load_state_dict(weights)
    except RuntimeError as exc:
        raise HearError(f"{path}: weights do not match the model config in its metadata ({exc})") from None
    model.eval().requires_grad_(False)
    return model


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not path.is_file():
        raise HearError(f"{path}: no such encoder file")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as exc:  # safetensors raises its own and OS errors for foreign or truncated files
        raise HearError(f"{path}: not an ajepa encoder (unreadable as safetensors: {exc})") from None


def get_timestamp_embeddings(audio: Tensor, model: HearModel) -> tuple[Tensor, Tensor]:
    """(n_sounds, n_samples) -> embeddings (n_sounds, n_timestamps, D) and timestamps (n_sounds, n_timestamps) in
    ms, both float32 on the model's device."""
    n_samples = _check_audio(audio, model)
    windows = _windows(audio, model)
    device = next(model.parameters()).device
    with torch.no_grad():
        tokens = model.encoder(windows.to(device))  # (n_sounds * n_windows, Tp * Fp, D), patch t * Fp + f
    grid_f = model.encoder.grid_f
    columns = tokens.unflatten(1, (-1, grid_f)).mean(2)  # (n_sounds * n_windows, Tp, D)
    columns = columns.reshape(audio.shape[0], -1, columns.shape[-1])  # windows in order: time patches of the clip
    duration_ms = n_samples / model.sample_rate * 1000
    centres = model.patch_centres_ms(columns.shape[1])
    keep = max(1, int((centres <= duration_ms).sum()))
    timestamps = centres[:keep].clamp(max=duration_ms).float().to(device)
    return columns[:, :keep], timestamps.repeat(audio.shape[0], 1)


def get_scene_embeddings(audio: Tensor, model: HearModel) -> Tensor:
    """(n_sounds, n_samples) -> (n_sounds, D) float32: the mean of each clip's timestamp embeddings."""
    embeddings, _ = get_timestamp_embeddings(audio, model)
    return embeddings.mean(1)


def _check_audio(audio: Tensor, model: HearModel) -> int:
    """Raise HearError unless `audio` is a non-empty, finite float (n_sounds, n_samples) tensor; returns n_samples."""
    expected = f"expected a float tensor (n_sounds, n_samples) of mono audio at {model.sample_rate} Hz"
    if not isinstance(audio, Tensor):
        raise HearError(f"{expected}, got {type(audio).__name__}")
    if audio.dim() != 2:
        raise HearError(f"{expected}, got shape {tuple(audio.shape)}")
    if not audio.is_floating_point():
        raise HearError(f"{expected}, got {audio.dtype} (scale integer samples to [-1, 1] floats)")
    if audio.numel() == 0:
        raise HearError(f"{expected}, got an empty batch of shape {tuple(audio.shape)}")
    if not torch.isfinite(audio).all():
        raise HearError("audio holds NaN or Inf samples")
    return audio.shape[1]


def _windows(audio: Tensor, model: HearModel) -> Tensor:
    """Model input for every window of every clip, (n_sounds * n_windows, window_frames, mel), clip-major."""
    rate = model.sample_rate
    # to_mono_16k takes (n_samples, channels); with the model's rate it only subtracts the clip's mean.
    specs = [fbank(to_mono_16k(clip[:, None].numpy(), rate, rate), model.audio)
             for clip in audio.detach().to("cpu", torch.float32)]
    n_windows = -(-specs[0].shape[0] // model.window_frames)  # every clip has n_samples, so as many frames
    specs = [pad_or_crop(s, n_windows * model.window_frames) for s in specs]
    x = torch.stack(specs).reshape(-1, model.window_frames, model.audio.num_mel_bins)
    return normalize(x, model.mean, model.std) if model.normalize_input else x

"""What one optimizer step reads, made ready before the step runs.

`plan_step` turns the host batches of a step into `MicroBatch`es: the stored float16 spectrograms plus every
random draw of the step (crop/roll/gain per clip, context and target masks). It is a pure function of
(config, step, rank, data), so DDP ranks agree on a step's mask family and sizes and a resumed run redraws
exactly what the unbroken run drew. `Prefetcher` runs it on a background thread (as I-JEPA's mask collator
runs in loader workers), pins the results and, on CUDA, copies step s + 1 to the device on a side stream
while step s computes: the step itself never waits for the host or for a pageable copy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ajepa.audio import Augmentation, draw_augmentation
from ajepa.background import Background
from ajepa.config import Config
from ajepa.masking import Grid, sample_masks

HostBatch = tuple[Tensor, Tensor]  # (fbank (B, T, F) float16 as stored, n_frames (B,) int64)


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch with all of its step's random draws; `to()` moves the tensors, the rest stays."""

    step: int  # the optimizer step it was planned for
    fbank: Tensor  # (B, T, F) float16
    aug: Augmentation
    context: Tensor  # (B, Nc) int64
    targets: Tensor  # (B, K, Nt) int64
    family: str
    context_fraction: float
    target_fraction: float
    context_pad: Tensor | None = None  # (B, Nc) bool with mask.pad_context: True where `context` is padding

    def to(self, device: torch.device, non_blocking: bool = False) -> MicroBatch:
        pad = None if self.context_pad is None else self.context_pad.to(device, non_blocking=non_blocking)
        return dataclasses.replace(self, fbank=self.fbank.to(device, non_blocking=non_blocking),
                                   aug=self.aug.to(device, non_blocking), context=self.context.to(
                                       device, non_blocking=non_blocking),
                                   targets=self.targets.to(device, non_blocking=non_blocking), context_pad=pad)

    def pin_memory(self) -> MicroBatch:
        fbank = self.fbank if self.fbank.is_pinned() else self.fbank.pin_memory()
        pad = None if self.context_pad is None else self.context_pad.pin_memory()
        return dataclasses.replace(self, fbank=fbank, aug=self.aug.pin_memory(),
                                   context=self.context.pin_memory(), targets=self.targets.pin_memory(),
                                   context_pad=pad)

    def tensors(self) -> tuple[Tensor, ...]:
        pad = () if self.context_pad is None else (self.context_pad,)
        return self.fbank, self.aug.frames, self.aug.gain, self.context, self.targets, *pad


def plan_step(cfg: Config, grid: Grid, rank: int, step: int, batches: list[HostBatch]) -> list[MicroBatch]:
    """Every random draw of optimizer `step` on DDP `rank`, one MicroBatch per micro-batch (grad_accum).

    Augmentation comes from a generator seeded by (seed, step, rank); masks from `sample_masks`, whose
    family and sizes depend on (seed, step) only and positions on the rank and micro-batch too."""
    data, accum = cfg.data, cfg.optim.grad_accum
    seed = np.random.SeedSequence([cfg.run.seed, step, rank]).generate_state(1)[0]
    generator = torch.Generator().manual_seed(int(seed))
    planned = []
    for micro, (fbank, n_frames) in enumerate(batches):
        aug = draw_augmentation(n_frames, fbank.shape[1], data.crop_frames, data.roll, data.gain_db, generator)
        masks = sample_masks(cfg.mask, grid, fbank.shape[0], step=step, total_steps=cfg.optim.steps,
                             seed=cfg.run.seed, rank=rank * accum + micro)
        planned.append(MicroBatch(step, fbank, aug, masks.context, masks.targets, masks.family,
                                  masks.context_fraction, masks.target_fraction, masks.context_pad))
    return planned


class Prefetcher:
    """Iterator over steps first_step, first_step + 1, ...: each a list of `grad_accum` MicroBatches on `device`.

    A background thread pulls host batches, plans and (on CUDA) pins them, staying up to `depth` steps ahead.
    On CUDA each step's copy is issued on a side stream one step ahead and the compute stream waits on an
    event, not on the host. An exception in the thread (a data error, the batches running out) is raised
    by `next()` at the step that needed it. Use as a context manager, or call `close()`."""

    def __init__(self, plan: Callable[[int, list[HostBatch]], list[MicroBatch]], batches: Iterator[HostBatch],
                 grad_accum: int, first_step: int, device: torch.device, depth: int = 2):
        self.device = device
        self._cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self._cuda else None
        self._ahead: list[MicroBatch] | tuple[list[MicroBatch], torch.cuda.Event] | BaseException | None = None
        self._planned = Background(self._plan_steps(plan, batches, grad_accum, first_step), depth, "ajepa-prefetch")

    def _plan_steps(self, plan: Callable, batches: Iterator[HostBatch], accum: int, step: int
                    ) -> Iterator[list[MicroBatch]]:
        """Runs on the background thread."""
        while True:
            try:
                micro = [next(batches) for _ in range(accum)]
            except StopIteration:  # a generator ends by returning: one that raised it would be a RuntimeError
                return
            planned = plan(step, micro)
            yield [m.pin_memory() for m in planned] if self._cuda else planned
            step += 1

    # ------------------------------------------------------------------------------------ consumer
    def _fetch(self) -> tuple[list[MicroBatch], torch.cuda.Event | None] | list[MicroBatch] | Exception:
        """The thread's next step with its device copy issued, or the exception that ended the stream."""
        try:
            item = next(self._planned)
        except Exception as exc:  # StopIteration too: raised by __next__ at the step that needed it
            return exc
        if not self._cuda:
            return item
        with torch.cuda.stream(self._stream):
            moved = [m.to(self.device, non_blocking=True) for m in item]
            copied = torch.cuda.Event()
            copied.record(self._stream)
        return moved, copied

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> list[MicroBatch]:
        current = self._ahead if self._ahead is not None else self._fetch()
        self._ahead = None
        if isinstance(current, BaseException):
            self._ahead = current  # the stream stays ended
            raise current
        if not self._cuda:
            return current
        micro_batches, copied = current
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(copied)
        for m in micro_batches:  # allocated on the side stream, used on the compute stream
            for t in m.tensors():
                t.record_stream(compute)
        self._ahead = self._fetch()  # issued now, so the next step's copy overlaps this step's compute
        return micro_batches

    def close(self) -> None:
        self._planned.close()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

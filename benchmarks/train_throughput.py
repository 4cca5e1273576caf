"""Pretraining step throughput: our `Pretrainer.train_step` vs a minimal plain PyTorch loop, same model.

No Ray, no MLflow: this imports only torch, numpy and the ajepa modules a training step needs, so it runs on
any machine with the repository checked out (it puts <repo>/platform on sys.path itself).

* ours     - `Pretrainer.train_step`: host-side augmentation (crop, roll, gain, normalise), mask sampling on
             the host for the current step, forward under bf16 autocast (CUDA), backward, grad-norm, AdamW
             over two param groups with lr/wd schedules, EMA update of the target encoder.
* baseline - the same `AJEPA` class, config and init seed, fed the SAME masks (sampled before timing and
             already on the device, so it does no mask work in the timed region), plain
             `torch.optim.AdamW` (fused on CUDA), the same autocast, EMA as a Python loop over parameter
             pairs; no augmentation, no schedules.

Both read the same synthetic float16 spectrogram batches from host memory (as Ray Data hands them over)
and copy them to the device inside the timed step. The two run interleaved in rounds, alternating which goes
first, and the median round of each is reported, because shared machines are noisy. The mask family is
fixed (`--family`, the schedule is overridden to it) so that both sides do exactly the same model work.

    python benchmarks/train_throughput.py                                            # tiny config, CPU
    python benchmarks/train_throughput.py --config configs/base.yaml --batch auto    # on a GPU

The last line printed is `ratio: <ours samples/s / baseline samples/s>`.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))

from ajepa.config import Config, load_config  # noqa: E402
from ajepa.masking import MaskBatch, sample_masks  # noqa: E402
from ajepa.models.ajepa import AJEPA, flops_per_sample  # noqa: E402
from ajepa.train.pretrain import Pretrainer, patch_grid  # noqa: E402

MEAN, STD = 0.0, 0.5  # store statistics for normalisation; with N(0, 1) data both sides see similar values
POOL = 2  # distinct host batches, cycled
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
PHASES = ("data", "forward", "backward", "grad_norm", "optimizer", "ema", "other")
# Peak dense bf16 tensor FLOPS by device-name substring; the first match wins.
PEAKS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


# ------------------------------------------------------------------------------------------------ timing


class Clock:
    """Wall-clock marks that first wait for the device, so a mark means "all queued work is done"."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def timed(clock: Clock, fn: Callable[[], None], n: int) -> float:
    """Seconds for n calls of fn, synchronised at both ends only (no sync between steps)."""
    start = clock.now()
    for _ in range(n):
        fn()
    return clock.now() - start


# -------------------------------------------------------------------------------------------------- ours


def instrumented_step(tr: Pretrainer, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], clock: Clock,
                      acc: dict[str, float]) -> None:
    """`Pretrainer.train_step` itself, with a device sync + clock mark as each phase ends. The syncs stop the
    host from running ahead of the device, so only the split is reported from this, not the total."""
    t = clock.now()

    def lap(phase: str) -> None:
        nonlocal t
        now = clock.now()
        acc[phase] += now - t
        t = now

    tr.train_step(micro_batches, lap=lap)


# ---------------------------------------------------------------------------------------------- baseline


class Baseline:
    """The plain loop someone would write first: same model, pre-made masks, no augmentation or schedules."""

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg, self.device = cfg, device
        torch.manual_seed(cfg.run.seed)  # the same initial weights as Pretrainer
        self.model = AJEPA(cfg.model, cfg.audio.num_mel_bins, max_frames=cfg.data.crop_frames).to(device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas,
                                           weight_decay=cfg.optim.weight_decay[0], fused=device.type == "cuda")
        self.amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        self.momentum = cfg.optim.ema_momentum[0]
        self.target = list(self.model.target_encoder.parameters())
        self.online = list(self.model.context_encoder.parameters())

    def step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
             masks: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        crop = self.cfg.data.crop_frames
        for (fbank, _), (ctx, tgt) in zip(micro_batches, masks, strict=True):
            x = fbank.to(self.device, non_blocking=True).float()[:, :crop]
            with self.amp:
                loss, _ = self.model(x, ctx, tgt)
            (loss / len(micro_batches)).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        m = self.momentum
        with torch.no_grad():
            for pt, pc in zip(self.target, self.online, strict=True):
                pt.mul_(m).add_(pc, alpha=1 - m)


# ------------------------------------------------------------------------------------------------- setup


def make_pool(cfg: Config, batch: int, pin: bool) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """POOL optimizer steps' worth of host float16 (B, frames, mel) batches with their n_frames."""
    gen = torch.Generator().manual_seed(1234)
    frames, mel, accum = cfg.audio.target_frames, cfg.audio.num_mel_bins, cfg.optim.grad_accum
    pool = []
    for _ in range(POOL):
        micro = []
        for _ in range(accum):
            fbank = torch.randn(batch, frames, mel, generator=gen).half()
            if pin and torch.cuda.is_available():
                fbank = fbank.pin_memory()
            micro.append((fbank, torch.full((batch,), frames, dtype=torch.int64)))
        pool.append(micro)
    return pool


def presample(cfg: Config, batch: int, steps: range, family: str) -> list[list[MaskBatch]]:
    """The masks Pretrainer.masks draws at each step (rank 0), one per micro-batch."""
    grid = patch_grid(cfg)
    return [[sample_masks(cfg.mask, grid, batch, step=s, total_steps=cfg.optim.steps, seed=cfg.run.seed,
                          rank=micro, family=family) for micro in range(cfg.optim.grad_accum)] for s in steps]


def step_flops(cfg: Config, step_masks: list[MaskBatch]) -> float:
    """Model FLOPs per sample of one optimizer step, from the actual context / target sizes."""
    grid_t, grid_f = patch_grid(cfg)
    per_micro = [flops_per_sample(cfg.model, grid_t, grid_f, m.context.shape[1], m.targets.shape[2],
                                  m.targets.shape[1]) for m in step_masks]
    return sum(per_micro) / len(per_micro)


def peak_flops(device: torch.device, override_tflops: float | None) -> tuple[float | None, str]:
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAKS:
        if key in name:
            return peak, f"dense bf16 of {key}"
    return None, f"unknown device {name!r}; pass --peak-tflops"


class Bench:
    """Both contenders at one batch size, sharing the host data pool."""

    def __init__(self, cfg: Config, device: torch.device, batch: int, family: str, n_steps: int, pin: bool):
        self.cfg, self.device, self.batch = cfg, device, batch
        self.pool = make_pool(cfg, batch, pin)
        self.ours = Pretrainer(cfg, MEAN, STD, device)
        self.base = Baseline(cfg, device)
        # Pretrainer steps run n_steps in all (ours and its instrumented runs share the step counter); the
        # baseline replays the steps ours ran, with their masks, staged on the device before its timing.
        self.masks = presample(cfg, batch, range(n_steps), family)
        self.dev_masks: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def stage(self, first: int, n: int) -> None:
        """Put the masks of steps first .. first + n - 1 on the device for the baseline (untimed)."""
        self.dev_masks = {s: [(m.context.to(self.device), m.targets.to(self.device)) for m in self.masks[s]]
                          for s in range(first, first + n)}

    def data(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.pool[step % POOL]

    def ours_step(self) -> None:
        self.ours.train_step(self.data(self.ours.step))

    def base_step(self, step: int) -> None:
        self.base.step(self.data(step), self.dev_masks[step])


def try_batch(cfg: Config, device: torch.device, batch: int, family: str, steps: range) -> bool:
    """One step of each contender at the planned steps' largest masks; False on CUDA out-of-memory."""
    bench = None
    try:
        bench = Bench(cfg, device, batch, family, 0, pin=False)
        flops = [step_flops(cfg, m) for m in presample(cfg, batch, steps, family)]
        worst = steps[int(np.argmax(flops))]
        bench.ours.step = worst  # the largest masks of the run: if this fits, every timed step does
        bench.ours_step()
        worst_masks = presample(cfg, batch, range(worst, worst + 1), family)[0]
        bench.base.step(bench.data(0), [(m.context.to(device), m.targets.to(device)) for m in worst_masks])
        torch.cuda.synchronize()
        ok = True
    except OOM:
        ok = False
    del bench  # outside the except block: the traceback no longer pins the step's tensors
    gc.collect()
    torch.cuda.empty_cache()
    return ok


def auto_batch(cfg: Config, device: torch.device, family: str, steps: range, limit: int = 1 << 14) -> int:
    batch, best = 32, 0
    while batch <= limit:
        start = time.perf_counter()
        ok = try_batch(cfg, device, batch, family, steps)
        print(f"  batch {batch}: {'fits' if ok else 'out of memory'} ({time.perf_counter() - start:.1f} s)",
              flush=True)
        if not ok:
            break
        best, batch = batch, batch * 2
    if not best:
        raise SystemExit("--batch auto: even batch 32 does not fit on this device")
    return best


# -------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override, repeatable")
    parser.add_argument("--batch", default=None,
                        help="per-step micro-batch size, or auto (CUDA: largest power of two from 32 that fits); "
                             "default: 16 on CPU, data.batch_size on CUDA")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round (default CPU 3, CUDA 10)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps each first (default CPU 3, CUDA 5)")
    parser.add_argument("--rounds", type=int, default=None, help="(default CPU 11, CUDA 5)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--family", choices=("rb", "tf", "random"), default="rb",
                        help="mask family for both (sets mask.schedule; default rb, what the curriculum starts with)")
    parser.add_argument("--threads", type=int, default=None, help="CPU torch threads (default run.torch_threads)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by name)")
    parser.add_argument("--pin-memory", action="store_true", help="pin the host batches (CUDA)")
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    if args.batch == "auto" and not cuda:
        raise SystemExit("--batch auto needs --device cuda")
    cfg = load_config(args.config, [*args.set, f"mask.schedule={args.family}"])
    if not cuda:
        torch.set_num_threads(args.threads or cfg.run.torch_threads or torch.get_num_threads())
    steps = args.steps or (10 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 3)
    rounds = args.rounds or (5 if cuda else 11)
    accum = cfg.optim.grad_accum
    # Pretrainer steps in the whole run: warm-up and timed steps of ours, plain and instrumented.
    total_steps = 2 * (warmup + rounds * steps)
    clock = Clock(device)

    print(f"config {args.config} (overrides: {' '.join(args.set) or 'none'}), mask family {args.family}")
    print(f"device {torch.cuda.get_device_name(device) if cuda else 'cpu'}"
          + ("" if cuda else f", {torch.get_num_threads()} torch threads") + f", torch {torch.__version__}")
    if args.batch == "auto":
        print("finding the largest batch that fits (doubling from 32):", flush=True)
        batch = auto_batch(cfg, device, args.family, range(total_steps))
    else:
        batch = int(args.batch) if args.batch else (cfg.data.batch_size if cuda else 16)
    cfg = load_config(args.config, [*args.set, f"mask.schedule={args.family}", f"data.batch_size={batch}"])
    samples = batch * accum

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)  # the report's peak is the measured run's, not the search's

    bench = Bench(cfg, device, batch, args.family, total_steps, args.pin_memory)
    grid = patch_grid(cfg)
    m0 = bench.masks[0][0]
    print(f"batch {batch} x grad_accum {accum} = {samples} samples/step, crop {cfg.data.crop_frames} frames "
          f"({grid[0]}x{grid[1]} patches), context ~{m0.context.shape[1]} patches, "
          f"{m0.targets.shape[1]} targets of {m0.targets.shape[2]}")
    print(f"{warmup} warm-up + {rounds} rounds x {steps} timed steps each; baseline masks are sampled and moved "
          f"to the device BEFORE timing (no mask work in its timed region); ours samples them in its step")
    probe = bench.ours.masks(batch, 0)  # what ours draws at its first step: the baseline must replay it
    if not (torch.equal(probe.context, m0.context) and torch.equal(probe.targets, m0.targets)):
        raise SystemExit("pre-sampled masks differ from Pretrainer.masks: the baseline would do different work")

    def run_base(first: int, n: int) -> float:
        """Time the baseline replaying ours' steps first .. first + n - 1 (same masks, same data)."""
        bench.stage(first, n)
        positions = iter(range(first, first + n))
        return timed(clock, lambda: bench.base_step(next(positions)), n)

    def run_split(n: int, acc: dict[str, float]) -> None:
        for _ in range(n):
            instrumented_step(bench.ours, bench.data(bench.ours.step), clock, acc)

    timed(clock, bench.ours_step, warmup)
    run_base(0, warmup)
    run_split(warmup, dict.fromkeys(PHASES, 0.0))
    bench.ours._pending.clear()  # the warm-up losses, without the host sync of metrics()
    ours_rates, base_rates, splits, losses, timed_steps = [], [], [], [], []
    for r in range(rounds):
        first = bench.ours.step
        timed_steps.extend(range(first, first + steps))
        for who in ("ours", "base") if r % 2 == 0 else ("base", "ours"):
            if who == "ours":
                ours_rates.append(samples * steps / timed(clock, bench.ours_step, steps))
            else:
                base_rates.append(samples * steps / run_base(first, steps))
        acc = dict.fromkeys(PHASES, 0.0)
        run_split(steps, acc)
        splits.append(acc)
        losses.append(bench.ours.metrics()["loss"])  # host sync outside the timed regions, as at a log step
        print(f"  round {r + 1} ({'ours' if r % 2 == 0 else 'baseline'} first): ours {ours_rates[-1]:9.1f}   "
              f"baseline {base_rates[-1]:9.1f} samples/s", flush=True)

    ours_sps, base_sps = statistics.median(ours_rates), statistics.median(base_rates)
    print(f"ours     : {ours_sps:10.1f} samples/s  median of {rounds} rounds, {1e3 * samples / ours_sps:8.2f} ms/step")
    print(f"baseline : {base_sps:10.1f} samples/s  median of {rounds} rounds, {1e3 * samples / base_sps:8.2f} ms/step")
    paired = statistics.median(o / b for o, b in zip(ours_rates, base_rates, strict=True))
    print(f"median of the per-round ours/baseline ratios (drift-robust cross-check): {paired:.3f}")
    print(f"ours loss after each round: {' '.join(f'{x:.4f}' for x in losses)}")
    per_step = {p: statistics.median(a[p] for a in splits) / steps for p in PHASES}
    total = sum(per_step.values())
    print(f"ours step split (train_step with a device sync between phases, median of {rounds} rounds):")
    for p in PHASES:
        print(f"  {p:<10s} {1e3 * per_step[p]:8.2f} ms  {100 * per_step[p] / total:5.1f}%")
    print(f"  {'total':<10s} {1e3 * total:8.2f} ms  (uninstrumented ours: {1e3 * samples / ours_sps:.2f} ms)")
    print("  data = prepare (H2D copy, crop, roll, gain, normalise) + mask sampling, H2D copy and fractions; "
          "grad_norm = the gradient norm (and clipping when on); other = schedules, step seed, result dict")

    if cuda:
        flops = statistics.mean(step_flops(cfg, bench.masks[s]) for s in timed_steps)
        peak, source = peak_flops(device, args.peak_tflops)
        print(f"model FLOPs per sample {flops / 1e9:.1f} GFLOP (mean over the masks used), "
              f"peak {peak / 1e12:.0f} TFLOPS ({source})" if peak else f"peak unknown: {source}")
        if peak:
            print(f"MFU ours {100 * ours_sps * flops / peak:.1f}%  baseline {100 * base_sps * flops / peak:.1f}%")
        print(f"peak memory allocated {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    print(f"ratio: {ours_sps / base_sps:.3f}")


if __name__ == "__main__":
    main()

"""Pretraining step throughput: our `Pretrainer` vs a minimal plain PyTorch loop over the same model code.

No Ray, no MLflow: this imports only torch, numpy and the ajepa modules a training step needs, so it runs on
any machine with the repository checked out (it puts <repo>/platform on sys.path itself).

* ours     - `Pretrainer.prefetch` + `train_step`, as the Ray Train loop runs them: a background thread draws
             each step's masks and crop/roll/gain on the host and (CUDA) copies them with the batch on a side
             stream one step ahead; the step applies the augmentation on the device, runs the forward under
             bf16 autocast (CUDA), backward, grad-norm, AdamW over two param groups with lr/wd schedules, and
             the EMA update of the target encoder.
* baseline - the same `AJEPA` class, config (attention kernels, compile, checkpointing included) and init
             seed, fed the SAME masks, sampled before timing and already on the device (it does no mask work
             in the timed region), plain `torch.optim.AdamW` (fused on CUDA), the same autocast, EMA as a
             Python loop over parameter pairs; no augmentation, no schedules, no prefetching.

Both read the same synthetic float16 spectrogram batches from host memory, pinned on CUDA (as our Ray ingest
delivers them). The two run interleaved in rounds, alternating which goes first, and the median round of
each is reported, because shared machines are noisy. Each `--family` is measured on its own (the schedule is
overridden to it) so that both sides do exactly the same model work; with several families the last figures
weight them by the config's own schedule (the curriculum's RB/TF mix over its steps) and project the
GPU-hours of the paper's AudioSet-2M recipe (24 epochs x 2.0M clips) from the measured samples/s.

    python benchmarks/train_throughput.py                                                      # tiny, CPU
    python benchmarks/train_throughput.py --config configs/base.yaml --batch auto --family rb tf  # a GPU

The last line printed is `ratio: <ours samples/s / baseline samples/s>` (mix-weighted over families).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))

from ajepa.config import Config, load_config  # noqa: E402
from ajepa.masking import MaskBatch, sample_masks, tf_probability  # noqa: E402
from ajepa.models.ajepa import AJEPA  # noqa: E402
from ajepa.models.flops import masks_flops_split, peak_bf16_flops  # noqa: E402
from ajepa.train.inputs import HostBatch, Prefetcher  # noqa: E402
from ajepa.train.pretrain import Pretrainer, patch_grid  # noqa: E402

MEAN, STD = 0.0, 0.5  # store statistics for normalisation; with N(0, 1) data both sides see similar values
POOL = 2  # distinct host batches, cycled
RECIPE_SAMPLES = 24 * 2_000_000  # the paper's AudioSet-2M pretraining: 24 epochs of 2.0M clips
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
PHASES = ("data", "forward", "backward", "grad_norm", "optimizer", "ema", "other")


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


# ---------------------------------------------------------------------------------------------- baseline


class Baseline:
    """The plain loop someone would write first: same model, pre-made masks, no augmentation or schedules."""

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg, self.device = cfg, device
        torch.manual_seed(cfg.run.seed)  # the same initial weights as Pretrainer
        self.model = AJEPA(cfg.model, cfg.audio.num_mel_bins, max_frames=cfg.data.crop_frames).to(device)
        if cfg.run.compile:
            self.model.compile_blocks(cfg.run.compile_mode)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas,
                                           weight_decay=cfg.optim.weight_decay[0], fused=device.type == "cuda")
        self.amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        self.momentum = cfg.optim.ema_momentum[0]
        self.target = list(self.model.target_encoder.parameters())
        self.online = list(self.model.context_encoder.parameters())

    def step(self, micro_batches: list[HostBatch], masks: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
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


def make_pool(cfg: Config, batch: int, pin: bool) -> list[list[HostBatch]]:
    """POOL optimizer steps' worth of host float16 (B, frames, mel) batches with their n_frames."""
    gen = torch.Generator().manual_seed(1234)
    frames, mel, accum = cfg.audio.target_frames, cfg.audio.num_mel_bins, cfg.optim.grad_accum
    pool = []
    for _ in range(POOL):
        micro = []
        for _ in range(accum):
            fbank = torch.randn(batch, frames, mel, generator=gen).half()
            micro.append((fbank.pin_memory() if pin else fbank, torch.full((batch,), frames, dtype=torch.int64)))
        pool.append(micro)
    return pool


def presample(cfg: Config, batch: int, steps: range, family: str) -> list[list[MaskBatch]]:
    """The masks our planning draws at each step (rank 0), one per micro-batch."""
    grid = patch_grid(cfg)
    return [[sample_masks(cfg.mask, grid, batch, step=s, total_steps=cfg.optim.steps, seed=cfg.run.seed,
                          rank=micro, family=family) for micro in range(cfg.optim.grad_accum)] for s in steps]


def step_flops_split(cfg: Config, step_masks: list[MaskBatch]) -> dict[str, float]:
    """Model FLOPs per sample of one optimizer step by kind (linear, attention), from the actual context / target
    sizes."""
    per_micro = [masks_flops_split(cfg.model, patch_grid(cfg), m.context, m.targets) for m in step_masks]
    return {kind: sum(f[kind] for f in per_micro) / len(per_micro) for kind in per_micro[0]}


def step_flops(cfg: Config, step_masks: list[MaskBatch]) -> float:
    """Model FLOPs per sample of one optimizer step, all kinds."""
    return sum(step_flops_split(cfg, step_masks).values())


def peak_flops(device: torch.device, override_tflops: float | None) -> tuple[float | None, str]:
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    name = torch.cuda.get_device_name(device)
    peak = peak_bf16_flops(name)
    return (peak, f"dense bf16 of {name}") if peak else (None, f"unknown device {name!r}; pass --peak-tflops")


class Bench:
    """Both contenders at one batch size, sharing the host data pool."""

    def __init__(self, cfg: Config, device: torch.device, batch: int, family: str, n_steps: int):
        self.cfg, self.device, self.batch = cfg, device, batch
        self.pool = make_pool(cfg, batch, pin=device.type == "cuda")
        self.ours = Pretrainer(cfg, MEAN, STD, device)
        self.base = Baseline(cfg, device)
        # Ours runs n_steps in all, through one prefetched stream; the baseline replays the steps ours ran,
        # with their masks, staged on the device before its timing.
        self.masks = presample(cfg, batch, range(n_steps), family)
        self.dev_masks: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.plan_seconds: list[float] = []  # host planning per step, on the prefetch thread
        self.stream: Prefetcher | None = None

    def start(self) -> None:
        def plan(step: int, batches: list[HostBatch]) -> list:
            start = time.perf_counter()
            planned = self.ours.plan(step, batches)
            self.plan_seconds.append(time.perf_counter() - start)
            return planned

        host = itertools.cycle([micro for step in self.pool for micro in step])
        self.stream = Prefetcher(plan, host, self.cfg.optim.grad_accum, self.ours.step, self.device)

    def stage(self, first: int, n: int) -> None:
        """Put the masks of steps first .. first + n - 1 on the device for the baseline (untimed)."""
        self.dev_masks = {s: [(m.context.to(self.device), m.targets.to(self.device)) for m in self.masks[s]]
                          for s in range(first, first + n)}

    def data(self, step: int) -> list[HostBatch]:
        return self.pool[step % POOL]

    def ours_step(self, lap: Callable[[str], None] | None = None) -> None:
        self.ours.train_step(next(self.stream), lap=lap)

    def base_step(self, step: int) -> None:
        self.base.step(self.data(step), self.dev_masks[step])

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()


def try_batch(cfg: Config, device: torch.device, batch: int, family: str, steps: range) -> bool:
    """One step of each contender at the planned steps' largest masks; False on CUDA out-of-memory."""
    bench = None
    try:
        bench = Bench(cfg, device, batch, family, 0)
        flops = [step_flops(cfg, m) for m in presample(cfg, batch, steps, family)]
        worst = steps[int(np.argmax(flops))]
        bench.ours.step = worst  # the largest masks of the run: if this fits, every timed step does
        bench.ours.train_step(bench.data(0))
        worst_masks = presample(cfg, batch, range(worst, worst + 1), family)[0]
        bench.base.step(bench.data(0), [(m.context.to(device), m.targets.to(device)) for m in worst_masks])
        torch.cuda.synchronize()
        ok = True
    except OOM:
        ok = False
    del bench  # outside the except block: the traceback no longer pins the step's tensors
    release_memory(device)
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


# ----------------------------------------------------------------------------------------- measurements


def count_syncs(bench: Bench, n: int) -> int:
    """Host-device synchronisations inside n of our steps, as torch's sync debug mode reports them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(n):
                bench.ours_step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    # The mode announces itself with a warning that mentions synchronizing operations too: not a sync.
    syncs = [w for w in caught if "synchroniz" in str(w.message) and "prototype" not in str(w.message)]
    for w in syncs[:3]:
        print(f"    sync: {w.filename}:{w.lineno}: {str(w.message)[:120]}")
    return len(syncs)


# Kernel kinds by name, first match wins (names as torch.profiler shows them on an H100: cuBLAS's nvjet GEMMs, flash
# and cuDNN attention, inductor's Triton kernels: `triton_tem` a GEMM template with its fused epilogue).
KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("linear", ("gemm", "nvjet", "cutlass", "xmma", "triton_tem", "conv")),
    ("fused glue (inductor)", ("triton_",)),
    ("copies", ("memcpy", "memset", "copy")),
)


def kernel_kind(name: str) -> str:
    name = name.lower()
    return next((kind for kind, parts in KERNEL_KINDS if any(p in name for p in parts)),
                "other (eager elementwise, reductions, optimizer)")


def profile_summary(bench: Bench, n: int, rows: int, peak: float | None) -> None:
    """Where n of our steps spend device time: the top kernels (device-side events only, so an operator and
    its kernels are not counted twice), the share of the wall clock the device was busy, and the time per kernel
    kind with the model TFLOP/s of the linear and attention kernels (their model FLOPs over their time)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    first = bench.ours.step
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(n):
            bench.ours_step()
        torch.cuda.synchronize()
        wall_ms = 1e3 * (time.perf_counter() - start) / n
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    busy_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / n
    print(f"  profile of {n} steps: {wall_ms:.1f} ms/step wall (profiler on), kernels {busy_ms:.1f} ms/step "
          f"({100 * busy_ms / wall_ms:.0f}% of wall)")
    for e in sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:rows]:
        ms = e.self_device_time_total / 1e3 / n
        print(f"    {ms:8.2f} ms  {100 * ms / busy_ms:5.1f}%  {e.count // n:5d}x  {e.key[:90]}")
    kind_ms: dict[str, float] = {}
    for e in kernels:
        kind = kernel_kind(e.key)
        kind_ms[kind] = kind_ms.get(kind, 0.0) + e.self_device_time_total / 1e3 / n
    samples = bench.batch * bench.cfg.optim.grad_accum
    flops = {kind: samples * statistics.mean(step_flops_split(bench.cfg, bench.masks[s])[kind]
                                             for s in range(first, first + n)) for kind in ("linear", "attention")}
    print("  by kind (model TFLOP/s: the kind's model FLOPs over its kernels' time):")
    for kind, ms in sorted(kind_ms.items(), key=lambda item: -item[1]):
        rate = f"{flops[kind] / ms / 1e9:7.1f} TFLOP/s" if kind in flops else ""
        print(f"    {kind:<48s} {ms:8.2f} ms  {100 * ms / busy_ms:5.1f}%  {rate}")
    if peak:
        math_ms = kind_ms.get("linear", 0.0) + kind_ms.get("attention", 0.0)
        print(f"  MFU of the kernels alone {100 * sum(flops.values()) / (busy_ms / 1e3) / peak:.1f}%; with the "
              f"linear and attention kernels only (no glue, copies or other) "
              f"{100 * sum(flops.values()) / (math_ms / 1e3) / peak:.1f}%")


def measure(args: argparse.Namespace, family: str, device: torch.device) -> dict[str, float]:
    """Both contenders on one mask family: rates, split, MFU and memory; returns the figures for the mix."""
    cuda = device.type == "cuda"
    steps = args.steps or (10 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 3)
    rounds = args.rounds or (5 if cuda else 11)
    clock = Clock(device)
    base_overrides = [*args.set, f"mask.schedule={family}"]
    cfg = load_config(args.config, base_overrides)
    # Our steps in the whole run: warm-up, timed, instrumented, sync check and profile.
    total_steps = 2 * warmup + 2 * rounds * steps + 2 * args.profile_steps + 2
    print(f"\n=== mask family {family} ===")
    if args.batch == "auto":
        print("finding the largest batch that fits (doubling from 32):", flush=True)
        batch = auto_batch(cfg, device, family, range(total_steps))
    else:
        batch = int(args.batch) if args.batch else (cfg.data.batch_size if cuda else 16)
    cfg = load_config(args.config, [*base_overrides, f"data.batch_size={batch}"])
    samples = batch * cfg.optim.grad_accum
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)  # the report's peak is the measured run's, not the search's

    bench = Bench(cfg, device, batch, family, total_steps)
    grid = patch_grid(cfg)
    m0 = bench.masks[0][0]
    print(f"batch {batch} x grad_accum {cfg.optim.grad_accum} = {samples} samples/step, crop {cfg.data.crop_frames} "
          f"frames ({grid[0]}x{grid[1]} patches), context ~{m0.context.shape[1]} patches, {m0.targets.shape[1]} "
          f"targets of {m0.targets.shape[2]}; attention {cfg.model.attention}, compile {cfg.run.compile}, "
          f"grad checkpointing {cfg.model.grad_checkpointing}")
    print(f"{warmup} warm-up + {rounds} rounds x {steps} timed steps each; baseline masks are sampled and moved "
          f"to the device BEFORE timing; ours plans them on its prefetch thread", flush=True)
    probe = bench.ours.plan(0, bench.data(0))[0]  # what ours draws at its first step: the baseline replays it
    if not (torch.equal(probe.context, m0.context) and torch.equal(probe.targets, m0.targets)):
        raise SystemExit("pre-sampled masks differ from Pretrainer.plan: the baseline would do different work")

    def run_base(first: int, n: int) -> float:
        """Time the baseline replaying ours' steps first .. first + n - 1 (same masks, same data)."""
        bench.stage(first, n)
        positions = iter(range(first, first + n))
        return timed(clock, lambda: bench.base_step(next(positions)), n)

    def run_split(n: int, acc: dict[str, float]) -> None:
        for _ in range(n):
            t = clock.now()

            def lap(phase: str) -> None:
                nonlocal t
                now = clock.now()
                acc[phase] += now - t
                t = now

            bench.ours_step(lap)

    bench.start()
    if args.warm_shapes:
        start = time.perf_counter()
        run_base(warmup, total_steps - warmup)
        print(f"shape warm-up: the baseline replayed the masks of ours' {total_steps - warmup} later steps once, "
              f"{time.perf_counter() - start:.1f} s", flush=True)
    start = time.perf_counter()
    timed(clock, bench.ours_step, warmup)
    run_base(0, warmup)
    run_split(warmup, dict.fromkeys(PHASES, 0.0))
    print(f"warm-up {time.perf_counter() - start:.1f} s", flush=True)
    if cfg.run.compile:
        from torch._dynamo.utils import counters

        print(f"torch.compile after warm-up: frames {dict(counters['frames'])}, stats {dict(counters['stats'])}")
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
    print(f"ours step split (a device sync between phases, median of {rounds} rounds):")
    for p in PHASES:
        print(f"  {p:<10s} {1e3 * per_step[p]:8.2f} ms  {100 * per_step[p] / total:5.1f}%")
    print(f"  {'total':<10s} {1e3 * total:8.2f} ms  (uninstrumented ours: {1e3 * samples / ours_sps:.2f} ms)")
    print(f"  data = batch to device, crop/roll/gain, normalise; other = schedules, result dict. Off the step, on "
          f"the prefetch thread: masks + augmentation draws {1e3 * statistics.median(bench.plan_seconds):.2f} "
          f"ms/step (median)")

    figures = {"ours": ours_sps, "base": base_sps}
    if cuda:
        syncs = count_syncs(bench, 2)
        print(f"host-device syncs inside 2 of our steps (torch sync debug mode): {syncs}")
        peak, source = peak_flops(device, args.peak_tflops)
        if args.profile_steps:
            profile_summary(bench, args.profile_steps, args.profile_rows, peak)
        flops = statistics.mean(step_flops(cfg, bench.masks[s]) for s in timed_steps)
        print(f"model FLOPs per sample {flops / 1e9:.1f} GFLOP (mean over the masks used), "
              f"peak {peak / 1e12:.0f} TFLOPS ({source})" if peak else f"peak unknown: {source}")
        if peak:
            print(f"MFU ours {100 * ours_sps * flops / peak:.1f}%  baseline {100 * base_sps * flops / peak:.1f}%")
            figures.update(flops=flops, peak=peak)
        print(f"peak memory allocated {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    bench.close()
    return figures


def release_memory(device: torch.device) -> None:
    """Between families: the last Bench's models and the allocator's cached blocks go back."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def tf_share(cfg: Config) -> float:
    """Mean P(TF) over the config's own schedule: the share of its steps that use TF masks."""
    steps = cfg.optim.steps
    return float(np.mean([tf_probability(cfg.mask, s, steps) for s in range(steps)]))


def report_mix(args: argparse.Namespace, figures: dict[str, dict[str, float]]) -> float:
    """RB and TF weighted by the config's own schedule (seconds per sample add up): rates, MFU, the recipe's
    hours. Returns the mixed ours/baseline ratio."""
    cfg = load_config(args.config, args.set)
    p_tf = tf_share(cfg)
    weights = {"rb": 1.0 - p_tf, "tf": p_tf}
    ours, base = (1.0 / sum(w / figures[f][who] for f, w in weights.items()) for who in ("ours", "base"))
    print(f"\n=== {cfg.mask.schedule} schedule over {cfg.optim.steps} steps: rb {100 * weights['rb']:.1f}%, "
          f"tf {100 * weights['tf']:.1f}% of steps ===")
    print(f"ours {ours:.1f} samples/s, baseline {base:.1f} samples/s")
    if all("flops" in figures[f] for f in weights):
        # MFU of the mix: FLOPs per sample weighted by the share of samples of each family.
        flops = sum(w * figures[f]["flops"] for f, w in weights.items())
        peak = figures["rb"]["peak"]
        print(f"MFU ours {100 * ours * flops / peak:.1f}%  baseline {100 * base * flops / peak:.1f}%")
        print(f"projected AudioSet-2M recipe (24 epochs x 2.0M clips) on one such GPU: ours "
              f"{RECIPE_SAMPLES / ours / 3600:.1f} GPU-hours, baseline {RECIPE_SAMPLES / base / 3600:.1f}")
    return ours / base


# -------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override, repeatable (e.g. run.compile=false, model.attention=cudnn)")
    parser.add_argument("--batch", default=None,
                        help="per-step micro-batch size, or auto (CUDA: largest power of two from 32 that fits); "
                             "default: 16 on CPU, data.batch_size on CUDA")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round (default CPU 3, CUDA 10)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps each first (default CPU 3, CUDA 5)")
    parser.add_argument("--rounds", type=int, default=None, help="(default CPU 11, CUDA 5)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--family", choices=("rb", "tf", "random"), nargs="+", default=["rb"],
                        help="mask families, each measured on its own (default rb, what the curriculum starts with)")
    parser.add_argument("--threads", type=int, default=None, help="CPU torch threads (default run.torch_threads)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by name)")
    parser.add_argument("--warm-shapes", action="store_true",
                        help="before timing, run every step's masks once (untimed): cuDNN attention builds one "
                             "plan per new shape and keeps it, so this times the steady state of a long run")
    parser.add_argument("--profile-steps", type=int, default=0, help="CUDA: profile this many of our steps")
    parser.add_argument("--profile-rows", type=int, default=12, help="kernels listed by the profile")
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    if args.batch == "auto" and not cuda:
        raise SystemExit("--batch auto needs --device cuda")
    cfg = load_config(args.config, args.set)
    if not cuda:
        torch.set_num_threads(args.threads or cfg.run.torch_threads or torch.get_num_threads())
    print(f"config {args.config} (overrides: {' '.join(args.set) or 'none'}), families {' '.join(args.family)}")
    print(f"device {torch.cuda.get_device_name(device) if cuda else 'cpu'}"
          + ("" if cuda else f", {torch.get_num_threads()} torch threads") + f", torch {torch.__version__}")
    figures = {}
    for family in dict.fromkeys(args.family):
        figures[family] = measure(args, family, device)
        release_memory(device)
    if {"rb", "tf"} <= set(figures):
        ratio = report_mix(args, figures)
    else:
        ratio = figures[args.family[0]]["ours"] / figures[args.family[0]]["base"]
    print(f"ratio: {ratio:.3f}")


if __name__ == "__main__":
    main()

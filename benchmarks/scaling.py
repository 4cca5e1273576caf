"""Scaling: the store build on 1 vs 2 CPUs and pretraining on 1 vs 2 Ray Train workers, measured here, and the
arithmetic of what a node of 8 GPUs needs.

1. Store build: the demo manifest (store_build.py's: 2,080 one-second clips rendered once into a temporary cache,
   built in a fresh process, Ray's start-up not counted) with the local Ray capped at 1 CPU, then at 2; each
   process builds it twice, the second time with its task workers started (the bulk of a large build).
2. Pretraining: `jobs/pretrain.py --config configs/demo.yaml` on the store built in 1, no online probe, the same
   global batch (the demo's 32) on 1 Ray Train worker with 2 torch threads and on 2 workers with 1 thread each.
   Samples/s come from the run's own MLflow `step_time` (the mean step of each log window) over the steps after
   `--warmup-steps`.
3. An 8-GPU node: the H100 samples/s per GPU of the README's "GPU speed" (ViT-B, 1024 x 128 fbank, batch 128,
   compiled); the bytes a training read takes per sample (the fbank and n_frames columns as stored, measured on the
   demo store and scaled to 1024 frames), hence the store read rate per node and for N nodes; the CPU time of the
   ingest measured here, in one process with one torch thread (a worker's read, `runs.host_batches`, per byte on
   the demo store; the step's host planning, `inputs.plan_step`, for ViT-B at batch 128 per sample), hence the
   cores per node.

Every process gets per-user state in a temporary folder (HOME, the demo cache, MLflow's store under the runs'
--out) and a new local Ray of its own (RAY_ADDRESS=local), as the tests do.

    python benchmarks/scaling.py [--steps 80] [--warmup-steps 20] [--rounds 1]

The last line printed is `ratio: <2-worker pretraining samples/s / 1-worker samples/s>`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from epoch_boundary import logged_step_times
from store_build import build, demo_manifest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from ajepa import data  # noqa: E402
from ajepa.config import load_config  # noqa: E402
from ajepa.train.inputs import plan_step  # noqa: E402
from ajepa.train.pretrain import patch_grid  # noqa: E402
from ajepa.train.runs import Worker, host_batches  # noqa: E402

DEMO = load_config(ROOT / "configs" / "demo.yaml")
LOG_EVERY = 10  # steps per MLflow step_time window
# Pretraining layouts on the 2 cores: (Ray Train workers, torch threads each), the global batch kept.
LAYOUTS = ((1, 2), (2, 1))
# README "GPU speed" (docs/perf/h100-gpu-check.log): ViT-B samples/s on one H100, batch 128, compiled.
H100 = {"RB masks": 521.0, "curriculum mix": 402.0}
GPUS_PER_NODE = 8
GPU_BATCH = 128
TARGET_FRAMES = 1024  # configs/base.yaml: 10 s clips
AUDIOSET_CLIPS = 2_000_000
NODES = (2, 4, 8, 16)  # beyond the one node
READ_EPOCHS = 10  # demo epochs read back to time the ingest (~1 s)
MB = 1e6


def load() -> str:
    """The 1-minute load average: other users' jobs share this machine's cores, and it says how much."""
    return f"load {os.getloadavg()[0]:.1f}"


def isolate(tmp: Path) -> None:
    """This process and all it starts use per-user state under `tmp` (a fresh HOME for Ray's token and MLflow,
    no developer's tracking store or auth settings) and a new local Ray each: a `ray start` cluster on this node
    would ignore the CPU caps and share its CPUs with others."""
    for key in [k for k in os.environ if k.startswith(("RAY_AUTH", "XDG_")) or k == "MLFLOW_TRACKING_URI"]:
        del os.environ[key]
    (tmp / "home").mkdir()
    os.environ.update(HOME=str(tmp / "home"), RAY_ADDRESS="local")


# ----------------------------------------------------------------------------------------------- 1. build


def build_rates(manifest: Path, tmp: Path, rounds: int) -> tuple[dict[int, tuple[float, float]], Path]:
    """Median clips/s of the store build at 1 and 2 CPUs (alternating which goes first): (a first build, whose
    tasks start their worker processes and import torch; a second build in the same Ray, as the bulk of a large
    build runs), and a store built."""
    rates: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    for r in range(rounds):
        for cpus in sorted(rates, reverse=r % 2 == 1):
            store = tmp / f"store-{cpus}cpu-{r}"
            result = build(ROOT, manifest, store, num_cpus=cpus, again=True)
            clips = result["written"]
            rates[cpus].append((clips / result["build_s"], clips / result["again_s"]))
            print(f"  round {r + 1}, {cpus} CPU(s): {clips} clips in {result['build_s']:.1f} s first = "
                  f"{rates[cpus][-1][0]:.1f} clips/s, {result['again_s']:.1f} s again = {rates[cpus][-1][1]:.1f} "
                  f"clips/s (Ray start-up {result['ray_start_s']:.1f} s, not counted; {load()})", flush=True)
    return {cpus: (statistics.median(c for c, _ in r), statistics.median(w for _, w in r))
            for cpus, r in rates.items()}, store


# -------------------------------------------------------------------------------------------- 2. pretrain


def pretrain_rate(store: Path, out: Path, workers: int, threads: int, steps: int, warmup: int) -> float:
    """Steady-state samples/s of one demo pretraining run: the global batch kept, split over `workers`."""
    batch = DEMO.data.batch_size
    options = ["--workers", str(workers), "--set", f"data.batch_size={batch // workers}",
               "--set", f"run.cpus_per_worker={threads}", "--set", f"run.torch_threads={threads}",
               "--set", f"run.log_every={LOG_EVERY}", "--set", f"run.checkpoint_every={steps}"]
    logged = logged_step_times(ROOT, store, out, f"w{workers}x{threads}", steps, options)
    steady = [logged[s] for s in sorted(logged) if s > warmup]
    rate = batch * len(steady) / sum(steady)  # equal windows: samples/s = batch / mean step
    print(f"  {workers} worker(s) x {threads} thread(s), batch {batch // workers} each: {rate:.1f} samples/s over "
          f"steps {warmup + 1}-{steps} (windows of {LOG_EVERY}: "
          f"{' '.join(f'{batch / t:.0f}' for t in steady)}; warm-up: "
          f"{' '.join(f'{batch / logged[s]:.0f}' for s in sorted(logged) if s <= warmup)}; {load()})", flush=True)
    return rate


# ------------------------------------------------------------------------------------------ 3. the node


@dataclass(frozen=True)
class StoredBytes:
    clips: int
    files: int  # every Parquet file of every split
    fbank: int  # the fbank column chunks, compressed as written
    fbank_raw: int  # their uncompressed size
    n_frames: int  # the n_frames column chunks
    real_frames: float  # mean unpadded frames per clip
    codec: str

    def read_per_clip(self) -> float:
        """What a training read takes per clip: the two columns it asks for."""
        return (self.fbank + self.n_frames) / self.clips


def stored_bytes(store: Path) -> StoredBytes:
    """The store's on-disk bytes from its Parquet footers, by column."""
    sizes = {"fbank": 0, "fbank_raw": 0, "n_frames": 0}
    clips = files = 0
    codecs = set()
    real = 0
    for path in sorted(store.glob("split=*/*.parquet")):
        meta = pq.read_metadata(path)
        clips, files = clips + meta.num_rows, files + path.stat().st_size
        real += int(pq.read_table(path, columns=["n_frames"]).column("n_frames").to_numpy().sum())
        for g in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                chunk = meta.row_group(g).column(c)
                if chunk.path_in_schema in ("fbank", "n_frames"):
                    sizes[chunk.path_in_schema] += chunk.total_compressed_size
                    codecs.add(chunk.compression)
                if chunk.path_in_schema == "fbank":
                    sizes["fbank_raw"] += chunk.total_uncompressed_size
    return StoredBytes(clips, files, real_frames=real / clips, codec="/".join(sorted(codecs)), **sizes)


def read_cpu_per_byte(store: Path, stored: StoredBytes) -> tuple[float, float]:
    """CPU seconds per byte read, and samples/s, of a worker's training read of the demo store's train split:
    `host_batches` (Parquet read on its read-ahead thread, fbank bytes decoded into the batch tensor), as the
    training loop calls it, for READ_EPOCHS epochs. CPU time counts every thread of this process."""
    stats = data.read_stats(store)
    files = data.train_files(store)
    worker = Worker(DEMO, rank=0, world=1, device=torch.device("cpu"), tracker=None)
    config = {"fbank_shape": data.fbank_shape(stats["audio"]), "train_files": files}
    n_batches = READ_EPOCHS * (sum(files.rows) // DEMO.data.batch_size)
    batches = host_batches(config, worker, start=0)
    cpu, wall = time.process_time(), time.perf_counter()
    samples = sum(len(next(batches)[1]) for _ in range(n_batches))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    batches.close()
    return cpu / (samples * stored.read_per_clip()), samples / wall


def plan_cpu_per_sample(points: int = 16) -> float:
    """CPU seconds per sample of a step's host planning (masks, crop/roll/gain draws: `plan_step`, what each
    rank's prefetch thread runs) for configs/base.yaml (ViT-B, 64 x 8 patches) at batch 128, at steps evenly
    spread over its schedule, so RB and TF masks come in the curriculum's proportion."""
    cfg = load_config(ROOT / "configs" / "base.yaml", [f"data.batch_size={GPU_BATCH}"])
    grid = patch_grid(cfg)
    batch = (torch.zeros(GPU_BATCH, TARGET_FRAMES, cfg.audio.num_mel_bins, dtype=torch.float16),
             torch.full((GPU_BATCH,), TARGET_FRAMES, dtype=torch.int64))
    steps = np.linspace(0, cfg.optim.steps - 1, points).astype(int)
    plan_step(cfg, grid, 0, int(steps[0]), [batch])  # first-call costs (imports, allocator) apart
    start = time.process_time()
    for step in steps:
        plan_step(cfg, grid, 0, int(step), [batch])
    return (time.process_time() - start) / (points * GPU_BATCH)


def node_arithmetic(stored: StoredBytes, read_cpu: float, plan_cpu: float) -> None:
    """What one node of GPUS_PER_NODE H100s needs, every figure with the sum that makes it."""
    frames = DEMO.audio.target_frames
    mel = DEMO.audio.num_mel_bins
    per_clip = stored.fbank / stored.clips
    print(f"  demo store as stored ({stored.codec} Parquet): {stored.files / stored.clips:,.0f} B/clip on disk in all; "
          f"a training read takes the fbank + n_frames columns = {stored.read_per_clip():,.0f} B/clip; fbank "
          f"{per_clip:,.0f} B/clip compressed, {stored.fbank_raw / stored.clips:,.0f} B uncompressed (raw "
          f"{frames} x {mel} x 2 B = {frames * mel * 2:,} B), {stored.real_frames:.1f} real frames of {frames}")
    # The demo's 1 s clips are ~20% zero padding, which compresses to almost nothing, while 10 s clips fill their
    # 1024 frames: so scale the bytes per real frame, capped at the raw float16 bytes.
    per_frame = per_clip / stored.real_frames
    sample = min(TARGET_FRAMES * per_frame, TARGET_FRAMES * mel * 2) + stored.n_frames / stored.clips
    print(f"  a 1024-frame sample: {per_clip:,.0f} / {stored.real_frames:.1f} real frames = {per_frame:,.1f} B/frame "
          f"x {TARGET_FRAMES} frames + n_frames = {sample:,.0f} B read per sample (raw float16 "
          f"{TARGET_FRAMES * mel * 2:,} B: {sample / (TARGET_FRAMES * mel * 2):.3f} of it)")
    cpu_per_sample = sample * read_cpu + plan_cpu
    print(f"  ingest CPU per sample (one core, measured here): read {1e9 * read_cpu:.2f} ns/B x {sample:,.0f} B = "
          f"{1e3 * sample * read_cpu:.3f} ms + ViT-B step planning {1e3 * plan_cpu:.3f} ms = "
          f"{1e3 * cpu_per_sample:.3f} ms")
    for name, per_gpu in H100.items():
        node = GPUS_PER_NODE * per_gpu
        rate = node * sample / MB
        print(f"  {name}: {GPUS_PER_NODE} x {per_gpu:.0f} samples/s/GPU = {node:,.0f} samples/s per node; x "
              f"{sample:,.0f} B = {rate:,.0f} MB/s store read per node ({per_gpu * sample / MB:,.0f} MB/s per GPU, "
              "each rank reading its own files on one thread; "
              + ", ".join(f"{n} nodes {n * rate / 1e3:,.1f} GB/s" for n in NODES) + ")")
        print(f"    CPU: {per_gpu:.0f} x {1e3 * cpu_per_sample:.3f} ms = {per_gpu * cpu_per_sample:.2f} cores per GPU "
              f"(a rank's read-ahead and prefetch threads: under 1 keeps up), x {GPUS_PER_NODE} = "
              f"{node * cpu_per_sample:.1f} cores per node; AudioSet-2M: {AUDIOSET_CLIPS:,} x {sample:,.0f} B = "
              f"{AUDIOSET_CLIPS * sample / 1e9:,.0f} GB, an epoch {AUDIOSET_CLIPS / node / 60:.1f} min on one node")


# -------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=80, help="pretraining steps per run (a multiple of 10)")
    parser.add_argument("--warmup-steps", type=int, default=20, help="first steps left out (a multiple of 10)")
    parser.add_argument("--rounds", type=int, default=1, help="store builds per CPU count, taking turns")
    args = parser.parse_args()
    if args.steps % LOG_EVERY or args.warmup_steps % LOG_EVERY or args.warmup_steps >= args.steps:
        parser.error(f"--steps and --warmup-steps: multiples of {LOG_EVERY}, warm-up shorter than the run")
    torch.set_num_threads(1)  # this process's own measurements are per core
    print(f"{os.cpu_count()} CPUs here, {load()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="ajepa-scaling-") as tmp:
        tmp_path = Path(tmp)
        isolate(tmp_path)
        manifest = demo_manifest(tmp_path / "cache")

        print("1. store build of the demo manifest, Ray capped at 1 and at 2 CPUs", flush=True)
        build_rate, store = build_rates(manifest, tmp_path, args.rounds)
        for i, kind in enumerate(("first build", "again")):
            print(f"  clips/s, {kind}: 1 CPU {build_rate[1][i]:.1f}, 2 CPUs {build_rate[2][i]:.1f}, speed-up "
                  f"{build_rate[2][i] / build_rate[1][i]:.2f}x", flush=True)

        print(f"2. demo pretraining, {args.steps} steps, global batch {DEMO.data.batch_size}", flush=True)
        train_rate = {(w, t): pretrain_rate(store, tmp_path / "runs", w, t, args.steps, args.warmup_steps)
                      for w, t in LAYOUTS}

        print(f"3. an {GPUS_PER_NODE} x H100 node (README \"GPU speed\": ViT-B, {TARGET_FRAMES} x 128 fbank, batch "
              f"{GPU_BATCH}, compiled)", flush=True)
        stored = stored_bytes(store)
        read_cpu, read_rate = read_cpu_per_byte(store, stored)
        plan_cpu = plan_cpu_per_sample()
        print(f"  ingest measured here: the demo train split read {READ_EPOCHS} times by host_batches at "
              f"{read_rate:,.0f} samples/s, {1e9 * read_cpu:.2f} CPU-ns per byte read "
              f"({1 / read_cpu / MB:,.0f} MB/s per core); plan_step {1e3 * plan_cpu:.3f} CPU-ms per sample")
        node_arithmetic(stored, read_cpu, plan_cpu)

    one, two = train_rate[LAYOUTS[0]], train_rate[LAYOUTS[1]]
    print(f"pretraining samples/s: 1 worker x 2 threads {one:.1f}, 2 workers x 1 thread {two:.1f}")
    print(f"ratio: {two / one:.3f}")


if __name__ == "__main__":
    main()

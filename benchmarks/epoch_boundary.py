"""Epoch boundaries on the demo: training samples/s around each epoch's start against steady state, for this tree
and for a baseline commit, side by side.

Both sides run `jobs/pretrain.py --config configs/demo.yaml --workers 0 --set eval.every=0` from their own tree on
the same demo store (built by this tree), one after the other; with more rounds they take turns to go first. The
runs log every step (`run.log_every=1`), so each step's time comes from its MLflow `step_time`. Around each epoch
start b (the demo: 1520 training clips, batch 32, so every 47 steps) the 10 steps b-5 .. b+4, one log window of
the demo, give the boundary samples/s; steady state is the median step of the 40 steps around that window, so a
shared machine's load, which drifts over minutes, counts on both sides of the comparison. Other jobs' bursts can
still slow any window, so each side's figure is the median over its epoch starts. The baseline, by default
4f7a160, is the last commit that ran Ray Data's random_shuffle() over the whole train split at each epoch's start.

    python benchmarks/epoch_boundary.py [--baseline 4f7a160] [--steps 200] [--rounds 1]

Prints each side's windows and figures; the last line is `ratio: <ours / baseline>` of the median over epoch
starts of (boundary samples/s / steady samples/s).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow

ROOT = Path(__file__).resolve().parents[1]
BATCH = 32  # configs/tiny.yaml's data.batch_size, which the demo keeps
WINDOW = 10  # steps in the boundary window: the demo's run.log_every
AROUND = 20  # steps each side of the window whose median is the steady state


def baseline_tree(ref: str, into: Path) -> Path:
    """The baseline commit's jobs, library and configs, extracted from this repository's history."""
    archive = into / "baseline.tar"
    with archive.open("wb") as fh:
        subprocess.run(["git", "-C", str(ROOT), "archive", ref, "jobs", "platform", "configs"], stdout=fh, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "baseline", filter="data")
    return into / "baseline"


def demo_store() -> Path:
    """The demo store as this tree builds it (a separate process: its Ray must not hold the CPUs the runs use)."""
    subprocess.run([sys.executable, str(ROOT / "jobs" / "prepare_data.py"), "--input", "demo"], check=True)
    sys.path.insert(0, str(ROOT / "platform"))
    from ajepa.config import load_config
    from ajepa.data import cache_dir

    return cache_dir() / f"demo-store-{load_config(ROOT / 'configs' / 'demo.yaml').audio.target_frames}f"


def logged_step_times(tree: Path, store: Path, out: Path, name: str, steps: int, options: list[str]
                      ) -> dict[int, float]:
    """One demo pretraining run from `tree` with more job `options`, no online probe: {logged step: its MLflow
    `step_time`, the mean seconds of the steps since the previous log step}."""
    job = [sys.executable, str(tree / "jobs" / "pretrain.py"), "--config", str(tree / "configs" / "demo.yaml"),
           "--data", str(store), "--out", str(out), "--steps", str(steps), "--set", "eval.every=0",
           "--set", f"run.name={name}", *options]
    subprocess.run(job, check=True, stdout=subprocess.DEVNULL)
    record = json.loads((out / name / "run.json").read_text())
    history = mlflow.MlflowClient(record["tracking_uri"]).get_metric_history(record["mlflow_run_id"], "step_time")
    return {m.step: m.value for m in history}


def step_times(tree: Path, store: Path, out: Path, name: str, steps: int) -> list[float]:
    """One in-process demo pretraining run from `tree`, logging every step: the seconds of each of its steps."""
    logged = logged_step_times(tree, store, out, name, steps, ["--workers", "0", "--set", "run.log_every=1"])
    return [logged[s] for s in sorted(logged)]


@dataclass(frozen=True)
class EpochStart:
    step: int  # 0-based: the epoch's first step
    window: float  # samples/s over the WINDOW steps around it
    steady: float  # samples/s of the median step in the AROUND steps each side of the window
    first: float  # seconds of the epoch's first step, where a shuffle at the epoch's start makes training wait


def epoch_starts(times: list[float], per_epoch: int) -> list[EpochStart]:
    """Every epoch start with room around it for its window and steady state."""
    found = []
    for b in range(per_epoch, len(times), per_epoch):
        lo, hi = b - WINDOW // 2, b + WINDOW - WINDOW // 2
        if lo - AROUND < 1 or hi + AROUND > len(times):  # step 0 holds start-up
            continue
        around = times[lo - AROUND:lo] + times[hi:hi + AROUND]
        found.append(EpochStart(b, BATCH * WINDOW / sum(times[lo:hi]), BATCH / statistics.median(around), times[b]))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="4f7a160", help="git ref of the baseline (default: the last commit "
                        "with a full shuffle per epoch)")
    parser.add_argument("--steps", type=int, default=200, help="steps per run (the demo's 200: 4 epoch starts)")
    parser.add_argument("--rounds", type=int, default=1, help="runs per side, taking turns to go first")
    args = parser.parse_args()
    store = demo_store()
    train = json.loads((store / "stats.json").read_text())["counts"]["train"]
    per_epoch = train // BATCH  # one worker; both sides drop an epoch's last partial batch
    print(f"demo store {store}: {train} training clips, {per_epoch} steps an epoch, {args.steps} steps a run, "
          f"{args.rounds} round(s)")
    found: dict[str, list[EpochStart]] = {"baseline": [], "ours": []}
    with tempfile.TemporaryDirectory(prefix="ajepa-epochs-") as work:
        trees = {"baseline": baseline_tree(args.baseline, Path(work)), "ours": ROOT}
        for i in range(args.rounds):
            for side in (("baseline", "ours") if i % 2 == 0 else ("ours", "baseline")):
                times = step_times(trees[side], store, Path(work) / "runs", f"{side}-{i}", args.steps)
                starts = epoch_starts(times, per_epoch)
                found[side] += starts
                print(f"{side} round {i}: {sum(times):.0f} s for {len(times)} steps, median step "
                      f"{statistics.median(times[1:]):.2f} s; epoch starts (step: window / steady samples/s, first "
                      "step s): " + ", ".join(f"{e.step}: {e.window:.1f} / {e.steady:.1f}, {e.first:.2f} s"
                                              for e in starts), flush=True)
    shares = {}
    for side, starts in found.items():
        shares[side] = statistics.median(e.window / e.steady for e in starts)
        print(f"{side}: epoch-boundary windows {statistics.median(e.window for e in starts):.1f} samples/s, steady "
              f"state {statistics.median(e.steady for e in starts):.1f} samples/s, boundary / steady "
              f"{shares[side]:.3f}, an epoch's first step {statistics.median(e.first for e in starts):.2f} s against "
              f"{statistics.median(BATCH / e.steady for e in starts):.2f} s steady (medians over {len(starts)} epoch "
              f"starts; boundary / steady each: {' '.join(f'{e.window / e.steady:.2f}' for e in starts)})")
    print(f"ratio: {shares['ours'] / shares['baseline']:.3f}")


if __name__ == "__main__":
    main()

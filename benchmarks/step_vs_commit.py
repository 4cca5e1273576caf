"""The pretraining step of this working tree against a commit's: `train_throughput.py`'s *ours* samples/s for both,
run alternately in fresh processes with the same arguments, each from its own tree (code and configs).

For model changes: train_throughput.py's plain loop runs the same model code, so a faster model lifts both
sides there and leaves its ratio alone; this compares the step before and after the change instead.

    python benchmarks/step_vs_commit.py --commit 065c78f                               # tiny, CPU
    python benchmarks/step_vs_commit.py --commit 065c78f -- --config configs/base.yaml --family rb tf
    python benchmarks/step_vs_commit.py --commit HEAD --set model.pred_context=shared   # a setting against none

`--set` settings go to this tree's runs only: a config option measured against the same code without it.

Everything after `--` goes to train_throughput.py (default: its own defaults with `--rounds 3`). The last line is
`ratio: <this tree / the commit>`, the median of the per-pair ratios of the last figure train_throughput prints
(the mix of the families when there are several).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAMILY_RATE = re.compile(r"^ours\s+:\s+([\d.]+) samples/s", re.MULTILINE)
MIX_RATE = re.compile(r"^ours ([\d.]+) samples/s, baseline", re.MULTILINE)


def ours_rates(tree: Path, bench_args: list[str]) -> list[float]:
    """One train_throughput.py run in `tree`: ours samples/s per family, then the mix's if it printed one."""
    run = subprocess.run([sys.executable, "benchmarks/train_throughput.py", *bench_args], cwd=tree,
                         capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"train_throughput.py failed in {tree} (exit {run.returncode}):\n{run.stdout[-3000:]}"
                         f"{run.stderr[-3000:]}")
    rates = [float(x) for x in FAMILY_RATE.findall(run.stdout) + MIX_RATE.findall(run.stdout)]
    if not rates:
        raise SystemExit(f"no 'ours' samples/s in train_throughput.py's output in {tree}:\n{run.stdout[-3000:]}")
    return rates


def export(commit: str, into: Path) -> None:
    """The commit's tracked files (not a worktree: nothing is registered in the repository)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True, check=False)
    if archive.returncode:
        raise SystemExit(f"--commit {commit}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commit", required=True, help="the commit to compare against (any git revision)")
    parser.add_argument("--pairs", type=int, default=5, help="runs of each side, alternating which goes first")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a config override for this tree's runs only")
    parser.add_argument("bench_args", nargs="*", help="after --: train_throughput.py's arguments")
    args = parser.parse_args()
    bench_args = args.bench_args or ["--rounds", "3"]
    now_args = bench_args + [arg for setting in args.set for arg in ("--set", setting)]
    with tempfile.TemporaryDirectory(prefix="step-vs-commit-") as tmp:
        old_tree = Path(tmp)
        export(args.commit, old_tree)
        print(f"this tree: {REPO}; commit {args.commit} exported to {old_tree}")
        settings = f"; this tree's runs with --set {' --set '.join(args.set)}" if args.set else ""
        print(f"train_throughput.py {' '.join(bench_args)}{settings}")
        now_runs, old_runs = [], []
        for pair in range(args.pairs):
            order = [(REPO, now_runs, now_args), (old_tree, old_runs, bench_args)]
            for tree, runs, run_args in order if pair % 2 == 0 else order[::-1]:
                runs.append(ours_rates(tree, run_args))
            print(f"  pair {pair + 1} ({'this tree' if pair % 2 == 0 else 'commit'} first): this tree "
                  f"{' '.join(f'{x:8.1f}' for x in now_runs[-1])}   commit "
                  f"{' '.join(f'{x:8.1f}' for x in old_runs[-1])} samples/s", flush=True)
    if len({len(r) for r in now_runs + old_runs}) > 1:
        raise SystemExit("the two trees' train_throughput.py printed different numbers of figures: "
                         f"this tree {now_runs[0]}, commit {old_runs[0]}")
    print("figures in train_throughput.py's order (each --family, then their mix if several):")
    for i in range(len(now_runs[0])):
        now, old = (statistics.median(r[i] for r in runs) for runs in (now_runs, old_runs))
        paired = statistics.median(n[i] / o[i] for n, o in zip(now_runs, old_runs, strict=True))
        print(f"  {i + 1}: this tree {now:.1f}, commit {old:.1f} samples/s (medians); per-pair ratio {paired:.3f}")
    print(f"ratio: {statistics.median(n[-1] / o[-1] for n, o in zip(now_runs, old_runs, strict=True)):.3f}")


if __name__ == "__main__":
    main()

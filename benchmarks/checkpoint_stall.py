"""How long a checkpoint keeps training waiting: this tree (the upload on a background thread, registered through
Ray's ASYNC mode) against a baseline commit (the synchronous upload inside `ray.train.report`), side by side.

Each side runs a real Ray Train job of 2 CPU workers from its own tree, in its own process with its own local Ray
(started before timing). Rank 0 holds a real training state: the `small` config's model, EMA target and AdamW
moments (run.compile off; a zero-gradient optimizer step fills the moments), 574 MB as `pretrain.pt`. Each
rank's loop sleeps `--interval` seconds (the steps between two reports: on a GPU the host mostly waits for it),
calls the side's `runs.report`, with a checkpoint every `--checkpoint-every` reports, then takes a collective
(`dist.barrier`, standing for the next step's gradient all-reduce, where a rank waits for any rank still busy).
A report's blocked time is from the call to the end of that collective: what it takes out of the training loop.
Rank 0 also times the checkpoint's write (`trainer.save` into the local folder). The run folder is a local
path, or with `--s3` a bucket on a moto S3 server started here (in-memory, on this machine). With more rounds
the sides take turns to go first.

    python benchmarks/checkpoint_stall.py [--baseline 150fc3d] [--reports 9] [--checkpoint-every 3] [--s3]

Prints each run's reports and the medians; the last line is `ratio: <ours / baseline>` of the median blocked
seconds of a checkpoint report, on the rank that waited longest. (A run's first report also sets up the
collectives: the first plain report's second or so is that, on both sides.)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from epoch_boundary import baseline_tree

ROOT = Path(__file__).resolve().parents[1]
S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}


# ------------------------------------------------------------------------------------ one side's process


def _loop(config: dict[str, Any]) -> None:
    """A Ray Train worker: reports at a fixed pace, checkpoints on rank 0, each report timed to the next collective."""
    import ray.train
    import torch
    import torch.distributed as dist
    from ajepa.config import config_from_dict
    from ajepa.train import runs
    from ajepa.train.pretrain import Pretrainer

    rank = ray.train.get_context().get_world_rank()
    trainer, writes = None, []
    if rank == 0:
        trainer = Pretrainer(config_from_dict(config["config"]), 0.0, 1.0, torch.device("cpu"))
        for p in trainer.params:
            p.grad = torch.zeros_like(p)
        trainer.optimizer.step()  # AdamW's moments exist from the first step on

        save = trainer.save

        def timed_save(path: Path) -> None:
            start = time.perf_counter()
            save(path)
            writes.append(time.perf_counter() - start)

        trainer.save = timed_save
    # The baseline's report ends with `local_run_dir` (None off local mode); ours takes the run folder and a flag.
    tail = (None,) if config["side"] == "baseline" else (config["run_dir"], False)
    reports = []
    for i in range(1, config["reports"] + 1):
        time.sleep(config["interval"])
        checkpoint = i % config["checkpoint_every"] == 0
        if trainer is not None:
            trainer.step = i
        start = time.perf_counter()
        runs.report(trainer, {"step": i}, checkpoint and rank == 0, i, *tail)
        returned = time.perf_counter()
        dist.barrier()
        reports.append({"checkpoint": checkpoint, "report": returned - start, "blocked": time.perf_counter() - start})
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps({"reports": reports, "writes": writes}))


def run_side(args: argparse.Namespace) -> None:
    """One side's job (this script with --side, in a fresh process with its tree's library first on the path)."""
    sys.path.insert(0, str(Path(args.tree) / "platform"))
    from ajepa import storage
    from ajepa.config import load_config
    from ajepa.runtime import init_ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = storage.resolve(args.out)
    run_dir = out / args.name
    (run_dir / "run.json").write_text("{}")  # what a job's driver writes before training
    cfg = load_config(Path(args.tree) / "configs" / "small.yaml", ["run.compile=false"])
    init_ray(num_cpus=2)
    storage_path, storage_filesystem = out.ray_storage()
    with tempfile.TemporaryDirectory(prefix="ajepa-ckpt-bench-") as local:  # the ranks' timings
        config = {"side": args.side, "config": cfg.to_dict(), "run_dir": run_dir, "out": local,
                  "reports": args.reports, "checkpoint_every": args.checkpoint_every, "interval": args.interval}
        start = time.perf_counter()
        TorchTrainer(_loop, train_loop_config=config,
                     scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                     run_config=RunConfig(name=args.name, storage_path=storage_path,
                                          storage_filesystem=storage_filesystem,
                                          checkpoint_config=CheckpointConfig(num_to_keep=2))).fit()
        fit_s = time.perf_counter() - start
        ranks = [json.loads(Path(local, f"rank{r}.json").read_text()) for r in (0, 1)]
    newest = run_dir.glob("step_*/*.pt")[-1]
    size = newest.fs.get_file_info(newest.path).size
    print(json.dumps({"ranks": ranks, "fit_s": fit_s, "checkpoint_mb": size / 2**20}))


# ---------------------------------------------------------------------------------------------- driver


def side_run(name: str, tree: Path, out: str, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    job = [sys.executable, __file__, "--side", name, "--tree", str(tree), "--out", out, "--name", f"{name}-run",
           "--reports", str(args.reports), "--checkpoint-every", str(args.checkpoint_every),
           "--interval", str(args.interval)]
    done = subprocess.run(job, capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(name: str, result: dict[str, Any]) -> dict[str, float]:
    """Median blocked seconds of checkpoint and plain reports (on the rank that waited longer), per rank at
    checkpoints, and rank 0's writes."""
    ranks = result["ranks"]
    per_report = list(zip(*(r["reports"] for r in ranks), strict=True))
    worst = {kind: [max(r["blocked"] for r in rs) for rs in per_report if rs[0]["checkpoint"] == kind]
             for kind in (True, False)}
    figures = {"checkpoint": statistics.median(worst[True]), "plain": statistics.median(worst[False]),
               "write": statistics.median(ranks[0]["writes"])}
    for rank, r in enumerate(ranks):
        figures[f"rank{rank}"] = statistics.median(x["blocked"] for x in r["reports"] if x["checkpoint"])
    print(f"  {name}: checkpoint reports blocked {' '.join(f'{x:.2f}' for x in worst[True])} s (worst rank), "
          f"plain {' '.join(f'{x:.2f}' for x in worst[False])} s; rank 0's writes "
          f"{' '.join(f'{x:.2f}' for x in ranks[0]['writes'])} s; {result['checkpoint_mb']:.0f} MB checkpoints; "
          f"fit() {result['fit_s']:.1f} s", flush=True)
    return figures


def moto_server() -> tuple[subprocess.Popen, str]:
    """A moto S3 server on a free local port, with the bucket `bench`: (process, endpoint)."""
    import pyarrow.fs as pafs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"moto server did not start on port {port}")
        time.sleep(0.2)
    endpoint = f"http://127.0.0.1:{port}"
    pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True, access_key=S3_ENV["AWS_ACCESS_KEY_ID"],
                      secret_key=S3_ENV["AWS_SECRET_ACCESS_KEY"], region=S3_ENV["AWS_REGION"]).create_dir("bench")
    return proc, endpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="150fc3d", help="the commit to compare against (synchronous upload)")
    parser.add_argument("--reports", type=int, default=9, help="reports per run")
    parser.add_argument("--checkpoint-every", type=int, default=3, help="a checkpoint every this many reports")
    parser.add_argument("--interval", type=float, default=3.0, help="seconds of 'training' between reports (Ray's "
                        "controller takes one report a worker every 2 s: under that, a synchronous report also "
                        "waits for the controller, checkpoint or not)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--s3", action="store_true", help="the run folders in a moto S3 bucket, not a local folder")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        run_side(args)
        return
    env = {**os.environ, "RAY_ADDRESS": "local"}  # each side its own Ray, whatever runs on this machine
    with tempfile.TemporaryDirectory(prefix="ajepa-ckpt-stall-") as tmp:
        server = None
        if args.s3:
            server, endpoint = moto_server()
            env.update({**S3_ENV, "AWS_ENDPOINT_URL_S3": endpoint})
        try:
            sides = {"ours": ROOT, "baseline": baseline_tree(args.baseline, Path(tmp))}
            figures: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
            for r in range(args.rounds):
                for name in sorted(sides, reverse=r % 2 == 1):  # baseline first, then ours first, ...
                    out = f"s3://bench/{name}-{r}" if args.s3 else str(Path(tmp) / f"{name}-{r}")
                    figures[name].append(summary(f"round {r + 1} {name}", side_run(name, sides[name], out, args, env)))
        finally:
            if server is not None:
                server.terminate()
    median = {name: {k: statistics.median(f[k] for f in runs) for k in runs[0]} for name, runs in figures.items()}
    where = "a moto S3 bucket" if args.s3 else "a local folder"
    for name, m in median.items():
        print(f"{name}: a checkpoint report blocks {m['checkpoint']:.2f} s (rank 0 {m['rank0']:.2f} s, rank 1 "
              f"{m['rank1']:.2f} s), of which rank 0's write {m['write']:.2f} s; a plain report {m['plain']:.3f} s "
              f"(run folder in {where})")
    print(f"ratio: {median['ours']['checkpoint'] / median['baseline']['checkpoint']:.3f}")


if __name__ == "__main__":
    main()

"""One `ajepa` command whose subcommands mirror jobs/: every job's arguments are parsed here."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from ajepa.config import ConfigError, load_config
from ajepa.runtime import VERBOSE_ENV

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR, SPACE_DIR = REPO / "configs", REPO / "search_spaces"


def _path_or_shipped(folder: Path, what: str) -> Callable[[str], Path]:
    """An argparse type: a YAML path, or the name of a shipped file in `folder` (`base` for configs/base.yaml)."""

    def parse(value: str) -> Path:
        if "/" not in value and not value.endswith(".yaml"):
            if (named := folder / f"{value}.yaml").exists():
                return named
            if not Path(value).exists():  # a mistyped name: list the names there are
                shipped = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
                raise argparse.ArgumentTypeError(f"{value!r} is neither a file nor a shipped {what} ({shipped})")
        return Path(value)

    return parse


config_path = _path_or_shipped(CONFIG_DIR, "config")  # tiny, small, base, large, demo, demo-long
space_path = _path_or_shipped(SPACE_DIR, "search space")  # mask_curriculum, finetune, schedule_ablation


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=config_path, default=config_path("tiny"),
                        help="YAML config or a shipped config's name: tiny (default, CPU), demo, demo-long (the "
                             "demo's, on CPU), small, base, large (GPUs)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set optim.lr=1e-3 (repeatable)")
    parser.add_argument("--out", default=None,
                        help="output folder: a local path or a URI (s3://bucket/runs, gs://..., file:///...)")
    parser.add_argument("--address", default=None, metavar="ADDRESS",
                        help="Ray cluster to join (host:port, ray://host:port) or 'local' for a new local Ray; "
                             "default: RAY_ADDRESS, else the cluster `ray start` runs on this node, else local")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's own logs (workers, Train, Ray Data); same as AJEPA_VERBOSE=1")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ajepa", description="A-JEPA audio pretraining on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare-data", help="build a spectrogram store with Ray Data")
    _common(prep)
    prep.add_argument("--input", required=True,
                      help="folder of audio files (label = sub-folder), CSV manifest path,label[,split], either "
                           "a local path or a URI (s3://bucket/audio/, gs://..., file://...), or 'demo' for the "
                           "built-in demo dataset")
    prep.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    prep.set_defaults(func=prepare_data)

    pre = sub.add_parser("pretrain", help="A-JEPA pretraining on Ray Train")
    _common(pre)
    pre.add_argument("--data", default=None,
                     help="spectrogram store, a path or URI (default: data.store, else the demo store)")
    pre.add_argument("--steps", type=int, default=None, help="total optimizer steps (schedules scale to it)")
    pre.add_argument("--workers", type=int, default=None, help="Ray Train workers (0: in-process)")
    pre.add_argument("--gpus-per-worker", type=float, default=None)
    pre.add_argument("--resume", default=None, metavar="RUN_OR_PATH",
                     help="continue a run from its last checkpoint (run name under --out, or its folder or URI)")
    pre.set_defaults(func=pretrain)

    ft = sub.add_parser("finetune", help="fine-tune a pretrained encoder with a classifier head on Ray Train")
    _common(ft)
    ft.add_argument("--checkpoint", default=None, metavar="RUN_OR_PATH",
                    help="the encoder to start from: a pretraining or fine-tuning run (name under --out, or "
                         "folder: its newest checkpoint), a step folder, pretrain.pt or finetune.pt checkpoint, an "
                         "encoder.safetensors or model.safetensors export, or 'none' for the from-scratch baseline "
                         "(required unless --resume)")
    ft.add_argument("--data", default=None, help="labelled spectrogram store (default: data.store, else the demo)")
    ft.add_argument("--steps", type=int, default=None, help="total optimizer steps (finetune.steps)")
    ft.add_argument("--workers", type=int, default=None, help="Ray Train workers (0: in-process)")
    ft.add_argument("--gpus-per-worker", type=float, default=None)
    ft.add_argument("--resume", default=None, metavar="RUN_OR_PATH",
                    help="continue a run from its last checkpoint (run name under --out, or its folder)")
    ft.set_defaults(func=finetune)

    demo = sub.add_parser("demo", help="does pretraining help? pretrain, then probe and fine-tune against random "
                                       "init, on the demo store; one table")
    _common(demo)
    demo.set_defaults(func=run_demo, config=config_path("demo"))

    sw = sub.add_parser("sweep", help="Ray Tune sweep of pretraining (or fine-tuning) runs over a search space file, "
                                      "ASHA on the online probe, one MLflow parent run with a child run per trial")
    _common(sw)
    sw.add_argument("--space", type=space_path, default=None,
                    help="search space YAML or a shipped space's name (in search_spaces/: mask_curriculum, finetune, "
                         "schedule_ablation); required unless --resume")
    sw.add_argument("--job", choices=("pretrain", "finetune"), help="what each trial runs (default pretrain)")
    sw.add_argument("--data", default=None, help="spectrogram store (default: data.store, else the demo store)")
    sw.add_argument("--checkpoint", default=None, metavar="RUN_OR_PATH",
                    help="--job finetune: the encoder every trial starts from (as finetune's --checkpoint)")
    sw.add_argument("--num-samples", type=int,
                    help="draws of the space's random keys; each runs with every grid value and seed (default 1)")
    sw.add_argument("--seeds", type=int,
                    help="repeat each configuration with K seeds (run.seed, run.seed+1, ...): mean and spread "
                         "(default 1)")
    sw.add_argument("--steps", type=int, default=None, help="every trial's optimizer steps")
    sw.add_argument("--scheduler", choices=("asha", "fifo"),
                    help="asha (the default) stops trials that fall behind at 1, 2, 4, ... objective reports; fifo "
                         "runs all")
    sw.add_argument("--metric",
                    help="the objective (default, on val: probe/linear_val_acc for pretrain, val/acc for finetune)")
    sw.add_argument("--mode", choices=("max", "min"), help="whether the objective is maximised (default max)")
    sw.add_argument("--max-concurrent", type=int, default=None,
                    help="trials at once (default: as many as the cluster's CPUs and GPUs hold)")
    sw.add_argument("--workers", type=int, default=None, help="Ray Train workers of each trial")
    sw.add_argument("--gpus-per-worker", type=float, default=None)
    sw.add_argument("--resume", default=None, metavar="SWEEP_OR_PATH",
                    help="continue an interrupted sweep (name under --out, or its folder) with its saved settings and "
                         "space: finished trials stay done")
    sw.set_defaults(func=sweep)

    ev = sub.add_parser("evaluate", help="linear probe and kNN on a frozen encoder")
    _common(ev)
    ev.add_argument("--checkpoint", required=True, metavar="RUN_OR_PATH",
                    help="a pretraining or fine-tuning run (name under --out, or folder: its newest checkpoint), "
                         "a step folder, pretrain.pt or finetune.pt checkpoint, an encoder.safetensors or "
                         "model.safetensors export, or 'random' for the random-init baseline (model and seed from "
                         "--config)")
    ev.add_argument("--data", default=None, help="labelled spectrogram store (default: data.store, else the demo)")
    ev.set_defaults(func=evaluate)
    return parser


def prepare_data(args: argparse.Namespace) -> int:
    from ajepa import data, storage

    cfg = load_config(args.config, args.overrides).audio
    if args.input == "demo" and args.out is None:
        store, summary = data.demo_store(cfg)
        if summary is None:
            stats = data.read_stats(store)
            print(f"demo store already built: {stats['clips']} clips, {len(stats['classes'])} classes, "
                  f"{stats['counts']} -> {store}")
        else:
            print(summary.line())
        return 0
    if args.out is None:
        raise data.StoreError("--out is required unless --input is demo")
    if args.input == "demo" and storage.resolve(args.out).exists() and not args.overwrite:  # before the rendering
        raise data.StoreError(f"{args.out}: already exists; pass --overwrite to replace it")
    source = data.demo_manifest() if args.input == "demo" else args.input
    summary = data.build_store(source, args.out, cfg, overwrite=args.overwrite)
    print(f"classes: {', '.join(summary.classes) or '(unlabelled)'}; mean {summary.mean:.4f} std {summary.std:.4f}")
    if summary.failed:
        print(f"failures listed in {summary.out / 'failures.csv'}")
    print(summary.line())
    return 0


def _job_overrides(args: argparse.Namespace, steps_key: str | None = "optim.steps") -> list[str]:
    """Flags shared by every job, as config overrides (explicit --set values win); --steps sets `steps_key`."""
    flags = {"run.out_dir": args.out, "run.workers": getattr(args, "workers", None),
             "run.gpus_per_worker": getattr(args, "gpus_per_worker", None)}
    if steps_key:
        flags[steps_key] = getattr(args, "steps", None)
    return [f"{k}={v}" for k, v in flags.items() if v is not None] + args.overrides


def pretrain(args: argparse.Namespace) -> int:
    from ajepa.tracking import ui_command
    from ajepa.train.pretrain import run_pretrain

    overrides = _job_overrides(args)
    cfg = load_config(args.config, overrides)
    result = run_pretrain(cfg, store=args.data, resume=args.resume, overrides=overrides if args.resume else ())
    print(f"pretrained {result.name}: {result.step} steps, final loss {result.metrics.get('loss', float('nan')):.4f}")
    print(f"data: {result.store}")
    print(f"checkpoint: {result.checkpoint}")
    print(f"encoder weights: {result.encoder}")
    print(f"MLflow run {result.mlflow_run_id}; open with: {ui_command(result.tracking_uri)}")
    return 0


def finetune(args: argparse.Namespace) -> int:
    from ajepa.tracking import ui_command
    from ajepa.train.finetune import run_finetune

    overrides = _job_overrides(args, "finetune.steps")
    cfg = load_config(args.config, overrides)
    result = run_finetune(cfg, args.checkpoint, store=args.data, resume=args.resume,
                          overrides=overrides if args.resume else ())
    m = "map" if any(k.endswith("/map") for k in result.metrics) else "acc"
    metrics = result.metrics
    print(f"fine-tuned {result.name}: {result.step} steps from {result.source}, final loss {metrics['loss']:.4f}")
    print(f"val {m} {100 * metrics[f'val/{m}']:.1f}% (best {100 * metrics[f'val/best_{m}']:.1f}% at step "
          f"{int(metrics['val/best_step'])}), test {m} {100 * metrics[f'test/{m}']:.1f}%")
    print(f"data: {result.store}")
    print(f"checkpoint: {result.checkpoint}")
    print(f"model weights: {result.model}")
    print(f"MLflow run {result.mlflow_run_id}; open with: {ui_command(result.tracking_uri)}")
    return 0


def sweep(args: argparse.Namespace) -> int:
    from ajepa.sweep import FINAL, JOBS, SweepSettings, resumed_settings, run_sweep
    from ajepa.tracking import ui_command

    job = args.job
    if job is None and args.resume:  # --steps is the steps of the job the sweep runs
        job = resumed_settings(load_config(args.config, _job_overrides(args, steps_key=None)), args.resume).job
    overrides = _job_overrides(args, JOBS[job or SweepSettings.job].steps_key)
    cfg = load_config(args.config, overrides)
    # The settings typed, the rest SweepSettings' defaults: a resume checks those typed against its own.
    given = {name: getattr(args, name) for name in ("job", "num_samples", "seeds", "scheduler", "max_concurrent",
                                                     "metric", "mode", "checkpoint") if getattr(args, name) is not None}
    result = run_sweep(cfg, args.space, SweepSettings(**given), store=args.data, resume=args.resume,
                       overrides=overrides if args.resume else (), given=set(given))
    counts = ", ".join(f"{sum(t.reason == r for t in result.trials)} {r}" for r in FINAL)
    print(f"\nswept {result.name}: {len(result.trials)} trials ({counts}); configurations, best first:")
    print(result.table)
    if result.best is not None:
        params = ", ".join(f"{k}={v}" for k, v in result.best.params.items())
        print(f"best trial: {result.best.name} ({params}): {result.best.objective:.4g}")
    print(f"results: {result.results}")
    print(f"MLflow parent run {result.mlflow_run_id}; open with: {ui_command(result.tracking_uri)}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from ajepa.demo import run_demo as demo

    cfg = load_config(args.config, _job_overrides(args))
    result = demo(cfg)
    print(f"\ndoes pretraining help? {args.config.name}, test split of the demo store; frozen probes per task, "
          f"fine-tuning {cfg.finetune.steps} steps on both tasks' classes at once")
    print(result.table)
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from ajepa.eval import run_evaluate
    from ajepa.tracking import ui_command

    result = run_evaluate(load_config(args.config, _job_overrides(args)), args.checkpoint, args.data)
    print(result.table)
    print(f"results: {result.results}")
    print(f"MLflow run {result.mlflow_run_id}; open with: {ui_command(result.tracking_uri)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from ajepa.data import StoreError
    from ajepa.demo_data import DemoToolsMissing
    from ajepa.eval import EvalError
    from ajepa.train.runs import CheckpointError

    args = _parser().parse_args(argv)
    if args.address:
        os.environ["RAY_ADDRESS"] = args.address  # read where Ray starts (runtime.cluster_address), as RAY_ADDRESS
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"  # read where Ray starts, and inherited by the processes it starts
    try:
        return args.func(args)
    except (ConfigError, StoreError, CheckpointError, EvalError, DemoToolsMissing) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130  # the shell's code for a SIGINT exit


if __name__ == "__main__":
    sys.exit(main())

"""One `ajepa` command whose subcommands mirror jobs/: every job's arguments are parsed here."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ajepa.config import ConfigError, load_config


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="YAML config (default: built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set optim.lr=1e-3 (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="output folder")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ajepa", description="A-JEPA audio pretraining on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare-data", help="build a spectrogram store with Ray Data")
    _common(prep)
    prep.add_argument("--input", required=True,
                      help="folder of audio files (label = sub-folder), CSV manifest path,label[,split], "
                           "or 'demo' for the built-in instrument dataset")
    prep.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    prep.set_defaults(func=prepare_data)
    return parser


def prepare_data(args: argparse.Namespace) -> int:
    from ajepa import data

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
    if args.out.exists() and not args.overwrite:
        raise data.StoreError(f"{args.out}: already exists; pass --overwrite to replace it")
    source = data.demo_manifest() if args.input == "demo" else Path(args.input)
    summary = data.build_store(source, args.out, cfg, overwrite=args.overwrite)
    print(f"classes: {', '.join(summary.classes) or '(unlabelled)'}; mean {summary.mean:.4f} std {summary.std:.4f}")
    if summary.failed:
        print(f"failures listed in {summary.out / 'failures.csv'}")
    print(summary.line())
    return 0


def main(argv: list[str] | None = None) -> int:
    from ajepa.data import StoreError

    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

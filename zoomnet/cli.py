"""The ``zoomnet`` command line: a thin layer over functions the tests call directly."""

from __future__ import annotations

import argparse
import sys

from zoomnet import __version__


def _demo(args: argparse.Namespace) -> int:
    from zoomnet.demo import run_demo

    metrics = run_demo(args.out, train_size=args.train_size, epochs=args.epochs, seed=args.seed)
    return 0 if metrics["accuracy"] == metrics["accuracy"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoomnet", description="Classify very large images by zooming in.")
    parser.add_argument("--version", action="version", version=f"zoomnet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train and evaluate on synthetic tiny objects, write heatmaps")
    demo.add_argument("--out", default="demo-output", help="folder for the checkpoint and heatmaps")
    demo.add_argument("--train-size", type=int, default=320, help="training images")
    demo.add_argument("--epochs", type=int, default=8, help="training epochs")
    demo.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and sampling")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

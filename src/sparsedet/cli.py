"""The ``sparsedet`` command line (also ``python -m sparsedet``)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

EPILOG = """\
configs: bundled names (see `sparsedet configs`) or YAML paths. Dotted overrides follow the
config, e.g.  model.num_proposals=300  model.backbone.weights=/data/resnet50.pth
"""


def _cmd_configs(args: argparse.Namespace) -> int:
    from .config import bundled_configs

    for name in bundled_configs():
        print(name)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert_checkpoint

    result = convert_checkpoint(args.arch, args.src, args.dst)
    print(result.report)
    overrides = " ".join(f"{k}={v}" for k, v in result.config_overrides.items())
    print(f"load it with: sparsedet.load({str(args.dst)!r})  (architecture overrides: {overrides})")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(output_dir=args.output, iterations=args.iterations, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsedet", description="Sparse, query-based object detection: train, evaluate, convert.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__
    parser.add_argument("--version", action="version", version=f"sparsedet {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser("demo", help="train a small Sparse R-CNN on generated images and evaluate it",
                               description="Generates a few synthetic images, trains a small Sparse R-CNN "
                                           "on them on the CPU, prints the loss falling and the AP it reaches.")
    demo.add_argument("--output", default="outputs/demo", help="folder for the report (default: %(default)s)")
    demo.add_argument("--iterations", type=int, default=300, help="training steps (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="data and init seed (default: %(default)s)")
    demo.set_defaults(func=_cmd_demo)

    convert = commands.add_parser(
        "convert", help="convert an official checkpoint to sparsedet layout",
        description="Maps every key of an official checkpoint (.pth state_dict or {'model': ...}, or "
                    "detectron2 .pkl) onto sparsedet's names, checks every shape, and writes a bare "
                    "state_dict that loads with torch.load(dst, weights_only=True).")
    convert.add_argument("arch", choices=["sparse_rcnn"], help="architecture of the checkpoint")
    convert.add_argument("src", help="official checkpoint file")
    convert.add_argument("dst", help="output .pth file")
    convert.set_defaults(func=_cmd_convert)

    configs = commands.add_parser("configs", help="list the bundled configs")
    configs.set_defaults(func=_cmd_configs)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"sparsedet {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sparsedet {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The `pagedserve` command."""

from __future__ import annotations

import argparse
import sys


def _add_make_model(sub: argparse._SubParsersAction) -> None:
    from pagedserve.make_model import ARCHITECTURES, PRESETS

    p = sub.add_parser("make-model", help="write an HF-format model with random weights")
    p.add_argument("out_dir")
    p.add_argument("--arch", choices=ARCHITECTURES, default="llama")
    p.add_argument("--preset", choices=PRESETS, default="tiny")
    p.add_argument("--seed", type=int, default=0)


def _run_make_model(args: argparse.Namespace) -> int:
    from pagedserve.make_model import make_model

    out = make_model(args.arch, args.preset, args.out_dir, seed=args.seed)
    print(f"wrote {args.arch}/{args.preset} model to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedserve")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_make_model(sub)
    return parser


COMMANDS = {"make-model": _run_make_model}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

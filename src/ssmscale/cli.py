"""`ssmscale` command line: parse arguments, call one function per subcommand, map user errors to exit 2.

Heavy libraries are imported inside the handlers, never at module level, so `--help` and
config errors answer in about a second.
"""

from __future__ import annotations

import argparse
import sys

from .errors import UserError


# Each subcommand: `_<name>_args(parser)` declares its arguments, `_<name>(args)` runs it, and one
# entry in COMMANDS (bottom of the file) lists it. Only commands that work are listed.

def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(
        prog="ssmscale",
        description="Matched Transformer++ vs Mamba scaling studies: train, ladder, fit, report, profile.")
    parser.add_argument("--version", action="version", version=f"ssmscale {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_, configure, run in COMMANDS:
        p = sub.add_parser(name, help=help_, description=help_)
        configure(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        return args._run(args) or 0
    except UserError as exc:
        print(f"ssmscale {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ssmscale {args.command}: interrupted", file=sys.stderr)
        return 130


COMMANDS: list = [
]


if __name__ == "__main__":
    sys.exit(main())

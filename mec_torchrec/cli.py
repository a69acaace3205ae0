"""The ``mec`` command. Each area of the library adds its own subcommands through ``add_parser``."""

import argparse
import sys
from importlib import import_module

# (module, subcommand) pairs; each module defines add_parser(subparsers) registering `mec NAME ...`
# with a `func` default that takes the parsed namespace and returns an exit code.
_COMMANDS = [
    ("mec_torchrec.data.cli", "data"),
    ("mec_torchrec.export.cli", "export"),
]


class UserError(Exception):
    """A problem with the user's input: printed as one clear line, without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mec", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module, _ in _COMMANDS:
        import_module(module).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, FileNotFoundError) as e:
        print(f"mec {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

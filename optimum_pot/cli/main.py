"""Entry point of the ``optimum-pot`` console script."""

import argparse
import sys

from . import eval as eval_cmd
from . import info, quantize
from .common import CLIError

# Errors a user causes (bad paths, invalid settings, an offline Hub id, a missing optional feature): printed as one
# line with exit code 2. Anything else is a bug and keeps its traceback.
USER_ERRORS = (CLIError, ValueError, OSError, ImportError, NotImplementedError)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with the ``quantize``, ``eval`` and ``info`` subcommands."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="optimum-pot",
        description="Power-of-two (PoT) weight quantisation for Hugging Face transformers models.",
    )
    parser.add_argument("--version", action="version", version=f"optimum-pot {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (quantize, eval_cmd, info):
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs ``optimum-pot`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code.

    Argument errors exit with code 2 through argparse (`SystemExit`), user errors return 2 with a one-line message.
    """
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"optimum-pot {args.command}: error: {_message(e)}", file=sys.stderr)
        return 2


def _message(e: Exception) -> str:
    text = str(e).strip() or e.__class__.__name__
    return text if isinstance(e, CLIError | ValueError) else f"{e.__class__.__name__}: {text}"


if __name__ == "__main__":
    sys.exit(main())

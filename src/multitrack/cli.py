"""The ``multitrack`` command (also ``python -m multitrack``).

One ``argparse`` subcommand per verb; each registers its arguments in ``_add_<verb>`` and its
work in ``_<verb>_command(args) -> exit code``: ``demo`` here, ``run`` in ``_cli_run`` (its
arguments and its command, with the decisions it makes in that module's docstring).

Exit codes: 0 done, 1 the command failed (``run``: some task failed), 2 bad usage or a missing
extra (argparse's code), 3 (``run``) the function could not be imported or the workers could
not start, 130 interrupted by Ctrl-C.

This module imports only the standard library at import time, so ``multitrack --help`` is fast
and works without the optional extras; a command imports what it needs when it runs.

Example:
    $ multitrack demo --images 8 --workers 2
    multitrack demo: resize 8 synthetic 1024x768 PNGs to 200x200 JPEGs
    ...

    >>> from multitrack.cli import main
    >>> main(["demo", "--images", "-1"])
    Traceback (most recent call last):
    SystemExit: 2
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import multitrack

__all__ = ["build_parser", "main"]

#: images the demo resizes by default: about 15 s in all on a 2-core machine
DEMO_IMAGES = 300
DEMO_SIZE = (1024, 768)

Command = Callable[[argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit code.

    Usage errors exit through ``SystemExit(2)`` with argparse's message.

    Example:
        >>> try:
        ...     main(["--version"])
        ... except SystemExit as exit:
        ...     print("exit code", exit.code)
        multitrack ...
        exit code 0
    """
    args = build_parser().parse_args(argv)
    command: Command = args.command
    try:
        return command(args)
    except KeyboardInterrupt:
        print("multitrack: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    """The parser of the whole command line, with one subparser per command.

    Example:
        >>> build_parser().parse_args(["demo", "--images", "8"]).images
        8
    """
    parser = argparse.ArgumentParser(
        prog="multitrack",
        description="Run a function over many inputs on every core, with a progress bar.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {multitrack.__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    _add_demo(commands)
    _add_run(commands)
    return parser


def _add_demo(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = commands.add_parser(
        "demo",
        help="time an image-resize job as a for-loop and with multitrack",
        description=(
            "Make synthetic PNG images in a temporary folder, resize each one to a 200x200 JPEG "
            "once in a plain for-loop and once with multitrack.map, check that both wrote the "
            "same files, and print the speedup. Needs the demo extra: "
            'pip install "multitrack[demo]".'
        ),
    )
    demo.add_argument(
        "--images",
        type=_positive_int,
        default=DEMO_IMAGES,
        metavar="N",
        help=f"how many images to make and resize (default: {DEMO_IMAGES})",
    )
    demo.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        metavar="N",
        help="worker processes (default: multitrack's, one per usable CPU)",
    )
    demo.add_argument(
        "--size",
        type=_size,
        default=DEMO_SIZE,
        metavar="WxH",
        help="size of the synthetic images (default: {}x{})".format(*DEMO_SIZE),
    )
    demo.set_defaults(command=_demo_command)


def _demo_command(args: argparse.Namespace) -> int:
    from multitrack import _demo

    try:
        _demo.require_extra()
    except ImportError as error:
        print(error, file=sys.stderr)
        return 2
    try:
        _demo.run_demo(images=args.images, workers=args.workers, size=args.size)
    except _demo.DemoMismatch as error:
        print(f"multitrack demo: FAILED: {error}", file=sys.stderr)
        return 1
    return 0


def _add_run(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from multitrack import _cli_run  # standard library only at import time

    run = commands.add_parser(
        "run",
        help="run a Python function over many inputs (like GNU parallel)",
        description=(
            "Call MODULE:FUNCTION once per input, on every core, with a progress bar on "
            "stderr and one JSON record per input on stdout."
        ),
        epilog=_cli_run.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _cli_run.add_arguments(run)
    run.set_defaults(command=_run_command)


def _run_command(args: argparse.Namespace) -> int:
    from multitrack import _cli_run

    return _cli_run.run_command(args)


def whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum``.

    Example:
        >>> whole_number(0)("3")
        3
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


_positive_int = whole_number(1)


def _size(text: str) -> tuple[int, int]:
    """argparse type: ``WxH``, e.g. ``1024x768``."""
    width, sep, height = text.lower().partition("x")
    try:
        size = (int(width), int(height))
    except ValueError:
        size = (0, 0)
    if not sep or min(size) < 1:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT like 1024x768, got {text!r}")
    return size

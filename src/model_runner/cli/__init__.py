"""
The ``model-runner-sink`` command, an application on top of :mod:`model_runner.sink`: ``demo`` writes and verifies
collections on an embedded S3 server, ``backfill`` writes GeoJSON files from disk to S3.

The command's dependencies are the ``cli`` extra, and the ``demo`` extra for ``demo``; the library needs neither.
This module, the parser and :func:`main`, imports none of them: ``--help`` works without them, and a command whose
extra is missing says what to install in one line (exit status 2) rather than with a traceback. A command's own
module is imported when it runs, once its extras are checked.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence

from model_runner.cli.backfill import DEFAULT_CONCURRENCY, STOP_TIMEOUT_SECONDS

__all__ = ["build_parser", "main"]

Command = Callable[[argparse.Namespace], int]

# The modules each extra brings that the commands import; moto brings boto3, which the demo reads back with.
_EXTRA_MODULES = {"cli": ("ijson", "tqdm"), "demo": ("moto", "boto3")}
# As argparse's for a command line it cannot run.
_MISSING_EXTRA_STATUS = 2


def _missing_extra(extras: Sequence[str]) -> tuple[str, str] | None:
    """
    Find the first extra that is not installed.

    :param extras: The extras a command needs.
    :return: The extra and one of its modules that is not installed, or `None` when all are.
    """
    for extra in extras:
        for module in _EXTRA_MODULES[extra]:
            # Found, not imported: the demo runs moto in a server process, importing it here would only be slow.
            try:
                found = importlib.util.find_spec(module) is not None
            except ImportError:
                found = False
            if not found:
                return extra, module
    return None


def _positive_int(text: str) -> int:
    """
    Parse a count given on the command line.

    :param text: A command-line value.
    :return: It as a positive integer.
    :raises argparse.ArgumentTypeError: If it is not one.
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _positive_seconds(text: str) -> float:
    """
    Parse a duration given on the command line.

    :param text: A command-line value.
    :return: It as a positive number of seconds.
    :raises argparse.ArgumentTypeError: If it is not one.
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def _run_demo(args: argparse.Namespace) -> int:
    """
    Run the ``demo`` command.

    :param args: The parsed ``demo`` options.
    :return: 0 if every object verified, else 1.
    """
    # Here, not at the top: see the module's docstring.
    from model_runner.cli.demo import run_demo

    return run_demo(features=args.features, seed=args.seed)


def _add_demo(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """
    Add the ``demo`` subcommand.

    :param commands: The subcommands to add ``demo`` to.
    """
    demo = commands.add_parser(
        "demo",
        help="write and verify collections on an embedded S3 server",
        description="Write small and large collections through S3Sink and AsyncS3Sink to an embedded S3 server, "
        "then read each back and check it holds exactly the features written.",
    )
    demo.add_argument(
        "--features",
        type=_positive_int,
        default=100_000,
        help="features in the large collections (default: %(default)s)",
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic detections (default: %(default)s)")
    demo.set_defaults(command=_run_demo, extras=("cli", "demo"))


def _run_backfill(args: argparse.Namespace) -> int:
    """
    Run the ``backfill`` command: write GeoJSON files from disk to S3, one object per file, skipping those already
    written.

    :param args: The parsed ``backfill`` options.
    :return: 0 if no file failed, 1 if some did or the job could not run, 130 if interrupted.
    """
    # Here, not at the top: see the module's docstring.
    from model_runner.cli.backfill.job import backfill
    from model_runner.cli.backfill.writes import Target

    target = Target(
        args.bucket,
        args.prefix,
        args.role,
        concurrency=args.concurrency,
        resume=args.resume,
        dry_run=args.dry_run,
        output_format=args.format,
        overwrite=args.overwrite,
    )
    return backfill(args.sources, target, dask=args.dask, stop_timeout=args.stop_timeout)


def _add_backfill(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """
    Add the ``backfill`` subcommand. Its options are the sources, the fields of
    :class:`~model_runner.cli.backfill.writes.Target`, and where the job runs.

    :param commands: The subcommands to add ``backfill`` to.
    """
    description = (
        "Write every .geojson/.json FeatureCollection and every .ndjson/.geojsonl file (one feature a line) under "
        "the sources to S3 as PREFIX/<file stem>.geojson (.geojsonl with --format geojsonseq). Objects whose "
        "recorded source digest matches are skipped, so a rerun resumes. The last line of output is "
        "'written W, skipped S, failed F'."
    )
    backfill_parser = commands.add_parser(
        "backfill", help="write GeoJSON files to S3, resumably", description=description
    )
    backfill_parser.set_defaults(command=_run_backfill, extras=("cli",))
    backfill_parser.add_argument(
        "sources", nargs="+", metavar="SRC", help="files, or folders searched recursively; symbolic links are followed"
    )
    backfill_parser.add_argument("--bucket", required=True, help="the S3 bucket")
    backfill_parser.add_argument("--prefix", required=True, help="the key prefix of the objects")
    backfill_parser.add_argument("--role", metavar="ARN", help="IAM role to assume for writing")
    backfill_parser.add_argument(
        "--concurrency",
        type=_positive_int,
        default=DEFAULT_CONCURRENCY,
        metavar="N",
        help="files written at once, per batch with --dask (default: %(default)s)",
    )
    backfill_parser.add_argument(
        "--dask",
        metavar="ADDRESS",
        help="spread the files over dask workers: a scheduler address, or 'local' for a local cluster "
        "(needs the dask extra)",
    )
    backfill_parser.add_argument(
        "--stop-timeout",
        type=_positive_seconds,
        default=STOP_TIMEOUT_SECONDS,
        metavar="SECONDS",
        help="with --dask, how long a Ctrl-C waits for all the batches together to stop; the uploads of those still "
        "running then are aborted (default: %(default)g)",
    )
    backfill_parser.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="write every file, even those whose object is up to date",
    )
    backfill_parser.add_argument(
        "--no-overwrite",
        dest="overwrite",
        action="store_false",
        help="never replace an object: a file whose key already has one is skipped",
    )
    backfill_parser.add_argument("--dry-run", action="store_true", help="list what would be written; write nothing")
    backfill_parser.add_argument(
        "--format",
        choices=("geojson", "geojsonseq"),
        default="geojson",
        help="geojson: a FeatureCollection per file; geojsonseq: one feature a line, at PREFIX/<file stem>.geojsonl "
        "(default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    """
    Build the command-line parser. A subcommand is added by a function like :func:`_add_demo`.

    :return: The parser of the command line; each subcommand sets ``command`` to the function that runs it, and
        ``extras`` to the extras that function needs.
    """
    parser = argparse.ArgumentParser(
        prog="model-runner-sink", description="Write GeoJSON detection results to Amazon S3."
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    _add_demo(commands)
    _add_backfill(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """
    Run the ``model-runner-sink`` command.

    :param argv: The arguments, without the program name; by default ``sys.argv[1:]``.
    :return: The exit status.
    """
    args = build_parser().parse_args(argv)
    missing = _missing_extra(args.extras)
    if missing is not None:
        extra, module = missing
        print(
            f"model-runner-sink: this command needs the {extra} extra ({module} is not installed): "
            f"pip install 'model-runner-sink[{extra}]'",
            file=sys.stderr,
        )
        return _MISSING_EXTRA_STATUS
    command: Command = args.command
    return command(args)

"""The ``orchestrator-push`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .config import ConfigError
from .execute import run_and_report

EXAMPLES = """\
examples:
  orchestrator-push exec --job nightly-backup -- /usr/local/bin/backup.sh --full
  ORCHESTRATOR_PUSH_URL=http://pushgateway:9091 \\
    orchestrator-push exec --job etl --flow sales --task load -- python load.py

exit codes (exec): the command's own; 128+N when it was killed by signal N;
127 when it could not be started; 2 for a usage or configuration error.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="orchestrator-push",
        description="Report task outcomes to a Prometheus Pushgateway.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    ex = sub.add_parser(
        "exec",
        help="run a command and push its duration and outcome",
        description="Run COMMAND with this process's stdin/stdout/stderr, exit with its exit "
        "code, and push its duration, outcome and exit code to the Pushgateway.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ex.add_argument("--job", required=True, help="value of the job grouping label")
    ex.add_argument("--flow", help="value of the flow label (default: the job name)")
    ex.add_argument("--task", default="main", help="value of the task label (default: main)")
    ex.add_argument("-v", "--verbose", action="store_true", help="log delivery details to stderr")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "exec":
        cmd = list(args.cmd)
        if cmd and cmd[0] == "--":
            cmd = cmd[1:]
        if not cmd:
            parser.error("exec needs a command after --")
        _quiet_library_logs(args.verbose)
        try:
            return run_and_report(cmd, job=args.job, flow=args.flow or args.job, task=args.task)
        except ConfigError as exc:
            print(f"orchestrator-push: invalid configuration: {exc}", file=sys.stderr)
            return 2
    parser.error(f"unknown command {args.command!r}")
    return 2  # pragma: no cover - parser.error exits


def _quiet_library_logs(verbose: bool) -> None:
    # exec speaks for itself with one line; the library's own warnings would
    # otherwise reach stderr through logging's last-resort handler.
    logger = logging.getLogger("orchestrator_push")
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("orchestrator-push: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    else:
        logger.addHandler(logging.NullHandler())
    logger.propagate = False


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

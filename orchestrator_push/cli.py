"""The ``orchestrator-push`` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

from . import logs
from .config import Config, ConfigError, load_config
from .durations import parse_duration
from .execute import run_and_report

if TYPE_CHECKING:
    import logging

EXAMPLES = """\
examples:
  orchestrator-push exec --job nightly-backup -- /usr/local/bin/backup.sh --full
  # crontab: say when the next run is due, so a missed night raises an alert
  30 2 * * *  orchestrator-push exec --job backup --schedule '30 2 * * *' --grace 15m -- backup.sh
  ORCHESTRATOR_PUSH_URL=http://pushgateway:9091 \\
    orchestrator-push exec --job etl --flow sales --task load -- python load.py

exit codes (exec): the command's own; 124 when --timeout stopped it; 128+N when it
was killed by signal N;
127 when it could not be started; 2 for a usage or configuration error.
"""

ADMIN_EXIT = """
exit codes: 0 done; 1 the gateway could not be read, or a deletion failed
(delete: no such group); 2 bad arguments or configuration.
The gateway is ORCHESTRATOR_PUSH_URL (or --url), with the configured auth and TLS.
"""

STATUS_EXAMPLES = (
    """\
examples:
  orchestrator-push status
  orchestrator-push status --job airflow --stale 2d
  orchestrator-push status --json | jq '.[] | select(.status == "failed")'
"""
    + ADMIN_EXIT
)

GC_EXAMPLES = (
    """\
examples:
  orchestrator-push gc --dry-run
  orchestrator-push gc --older-than 12h --job ci
  # crontab: every night, delete the groups older than the TTL each declares
  15 3 * * *  ORCHESTRATOR_PUSH_URL=http://pushgateway:9091 orchestrator-push gc
"""
    + ADMIN_EXIT
)

DELETE_EXAMPLES = (
    """\
examples:
  orchestrator-push delete --job airflow --flow old_dag --task extract
  orchestrator-push delete --job celery --label instance=worker-3@host
"""
    + ADMIN_EXIT
)

REPLAY_EXAMPLES = """\
examples:
  orchestrator-push replay
  # crontab: deliver what failed runs left behind, every 10 minutes
  */10 * * * *  ORCHESTRATOR_PUSH_URL=http://pushgateway:9091 orchestrator-push replay

exit codes: 0 the spool is empty (or off); 1 something is left (gateway unreachable,
refused); 2 bad arguments or configuration.
"""

DOCTOR_EXAMPLES = """\
examples:
  orchestrator-push doctor
  orchestrator-push doctor --prometheus http://prometheus:9090

exit codes: 0 every check passed; 1 a check failed (its fix is printed).
"""


#: While the parser is built: argparse makes a formatter to check each argument
#: added, and one without a width reads the terminal's with shutil (about 2 ms
#: of imports an `exec` has no use for). Help and errors get the terminal's.
_BUILDING = partial(argparse.RawDescriptionHelpFormatter, width=80)


def _ready(
    p: argparse.ArgumentParser, sub: argparse._SubParsersAction[argparse.ArgumentParser]
) -> argparse.ArgumentParser:
    """Every argument checked: help and errors get the terminal's width."""
    for parser in (p, *sub.choices.values()):
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return p


def _parser(exec_only: bool = False) -> argparse.ArgumentParser:
    """The command line; ``exec_only``: without the operator's commands, which
    an ``exec`` would build only to skip (it starts with every cron run)."""
    p = argparse.ArgumentParser(
        prog="orchestrator-push",
        description="Report task outcomes to a Prometheus Pushgateway.",
        epilog=EXAMPLES,
        formatter_class=_BUILDING,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    ex = sub.add_parser(
        "exec",
        help="run a command and push its duration and outcome",
        description="Run COMMAND with this process's stdin/stdout/stderr, exit with its exit "
        "code, and push its duration, outcome and exit code to the Pushgateway.",
        epilog=EXAMPLES,
        formatter_class=_BUILDING,
    )
    ex.add_argument("--job", required=True, help="value of the job grouping label")
    ex.add_argument("--flow", help="value of the flow label (default: the job name)")
    ex.add_argument("--task", default="main", help="value of the task label (default: main)")
    ex.add_argument(
        "--timeout",
        type=_duration,
        metavar="DURATION",
        help="stop the command after DURATION (90s, 10m, 2h) like coreutils timeout: SIGTERM, "
        "SIGKILL 10 s later if it is still running; exit code 124; pushed as the task's time limit",
    )
    when = ex.add_mutually_exclusive_group()
    when.add_argument(
        "--schedule",
        metavar="CRON",
        help="the cron line that starts this command, e.g. '30 2 * * *': pushes when the "
        "next run is due and how late this one started, so a missed run raises an alert",
    )
    when.add_argument(
        "--every",
        type=_duration,
        metavar="DURATION",
        help="the command runs again DURATION after it ends (a loop, a systemd timer with "
        "OnUnitInactiveSec): pushes when the next run is due",
    )
    ex.add_argument(
        "--tz",
        metavar="ZONE",
        help="time zone of --schedule, e.g. Europe/Berlin (default: the machine's, as cron)",
    )
    ex.add_argument(
        "--grace",
        type=_duration,
        metavar="DURATION",
        help="how late a scheduled run may start before it counts as late or missed "
        "(default: 5m, or one period if shorter)",
    )
    ex.add_argument("-v", "--verbose", action="store_true", help="log delivery details to stderr")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]")
    if exec_only:
        return _ready(p, sub)

    def admin_parser(
        name: str, help: str, description: str, epilog: str
    ) -> argparse.ArgumentParser:
        sp = sub.add_parser(
            name,
            help=help,
            description=description,
            epilog=epilog,
            formatter_class=_BUILDING,
        )
        sp.add_argument(
            "--url",
            help="the Pushgateway, or several separated by commas (default: ORCHESTRATOR_PUSH_URL)",
        )
        return sp

    st = admin_parser(
        "status",
        "one row per group the Pushgateway holds",
        "One row per group the Pushgateway holds: last status, last success and "
        "failure, last duration, last push. Failures in red and stale groups in "
        "yellow on a terminal; plain text when piped.",
        STATUS_EXAMPLES,
    )
    st.add_argument("--job", help="only this job's groups")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument(
        "--stale",
        default="1d",
        type=_duration,
        metavar="DURATION",
        help="mark groups not pushed for this long as stale (default: 1d)",
    )
    g = admin_parser(
        "gc",
        "delete the groups not pushed for a while",
        "Delete the groups whose last push is older than the TTL each declares "
        "(orchestrator_push_group_ttl_seconds), or than --older-than: the expiry the "
        "Pushgateway lacks. Safe from cron: it only deletes groups it matched.",
        GC_EXAMPLES,
    )
    g.add_argument(
        "--older-than",
        type=_duration,
        metavar="DURATION",
        help="instead of each group's TTL, this age for every group, e.g. 7d, 12h, 1h30m, 90s",
    )
    g.add_argument("--job", help="only this job's groups")
    g.add_argument("--dry-run", action="store_true", help="print what would be deleted")
    d = admin_parser(
        "delete",
        "delete exactly one group",
        "Delete the one group whose grouping labels are exactly these.",
        DELETE_EXAMPLES,
    )
    d.add_argument("--job", required=True)
    d.add_argument("--flow")
    d.add_argument("--task")
    d.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="another grouping label (repeatable)",
    )
    admin_parser(
        "replay",
        "deliver the local spool now",
        "Deliver what this machine's processes could not (the spool, "
        "ORCHESTRATOR_PUSH_SPOOL_DIR), never over a newer value at the gateway. "
        "Any process that pushes does this too; this command does it now.",
        REPLAY_EXAMPLES,
    )
    doc = admin_parser(
        "doctor",
        "check the configuration, the gateway and Prometheus",
        "Check the configuration, reach the gateway with the configured auth "
        "and TLS, push and delete a probe group, and (with --prometheus) check "
        "that Prometheus scrapes the gateway with honor_labels and sees our "
        "series. Each problem is printed with its fix.",
        DOCTOR_EXAMPLES,
    )
    doc.add_argument(
        "--prometheus", metavar="URL", help="Prometheus to check, e.g. http://prometheus:9090"
    )
    return _ready(p, sub)


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _config(url: str | None) -> Config:
    env = dict(os.environ)
    if url:
        env["ORCHESTRATOR_PUSH_URL"] = url
    return load_config(env)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser(exec_only=argv[:1] == ["exec"])
    args = parser.parse_args(argv)
    if args.command == "exec":
        cmd = list(args.cmd)
        if cmd and cmd[0] == "--":
            cmd = cmd[1:]
        if not cmd:
            parser.error("exec needs a command after --")
        if args.tz is not None and args.schedule is None:
            parser.error("--tz needs --schedule")
        if args.grace is not None and args.schedule is None and args.every is None:
            parser.error("--grace needs --schedule or --every")
        schedule = None
        if args.schedule is not None:
            from .schedules import parse_cron

            try:
                schedule = parse_cron(args.schedule, args.tz)
            except ValueError as exc:
                parser.error(f"--schedule/--tz: {exc}")
        _quiet_library_logs(args.verbose)
        try:
            return run_and_report(
                cmd,
                job=args.job,
                flow=args.flow or args.job,
                task=args.task,
                timeout=args.timeout,
                schedule=schedule,
                every=args.every,
                grace=args.grace,
            )
        except ConfigError as exc:
            print(f"orchestrator-push: invalid configuration: {exc}", file=sys.stderr)
            return 2
    # The operator's commands are imported only for themselves: `exec` starts
    # with every run of a cron job or CI step, and pays for what it imports.
    from . import admin, doctor

    if args.command == "doctor":
        return doctor.run(sys.stdout, url=args.url, prometheus=args.prometheus)
    try:
        config = _config(args.url)
    except ConfigError as exc:
        print(f"orchestrator-push: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.command == "replay":
        return admin.replay(config, sys.stdout)
    if args.command == "status":
        return admin.status(
            config, sys.stdout, job=args.job, as_json=args.json, stale_after=args.stale
        )
    if args.command == "gc":
        return admin.gc(
            config, sys.stdout, older_than=args.older_than, job=args.job, dry_run=args.dry_run
        )
    if args.command == "delete":
        try:
            extra = admin.parse_label_args(args.label)
        except ValueError as exc:
            parser.error(str(exc))
        labels = {
            "job": args.job,
            **{k: v for k, v in (("flow", args.flow), ("task", args.task)) if v is not None},
        }
        return admin.delete(config, sys.stdout, labels={**labels, **extra})
    parser.error(f"unknown command {args.command!r}")
    return 2  # pragma: no cover - parser.error exits


def _quiet_library_logs(verbose: bool) -> None:
    # exec speaks for itself with one line; the library's own warnings would
    # otherwise reach stderr through logging's last-resort handler.
    logs.on_first_line(partial(_route_library_logs, verbose))


def _route_library_logs(verbose: bool, logger: logging.Logger) -> None:
    import logging

    if verbose:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("orchestrator-push: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    else:
        logger.addHandler(logging.NullHandler())
    logger.propagate = False


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

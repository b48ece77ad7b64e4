"""The ``cxrd`` command: serve, worker, predict, reprocess, status, check-config, the mending
commands ``deliveries retry`` and ``jobs retry``, and ``purge``.

Every subcommand takes ``--config PATH``; its environment twin is ``CXRD_CONFIG``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cxrd import __version__
from cxrd.config import Config, describe, load_config
from cxrd.errors import ConfigError, CxrdError

if TYPE_CHECKING:
    from cxrd.db import Database

log = logging.getLogger("cxrd")

EXIT_OK, EXIT_ERROR, EXIT_UNHEALTHY = 0, 1, 2


def _date(value: str) -> dt.datetime:
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a date: use YYYY-MM-DD or YYYY-MM-DDTHH:MM") from exc
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(dt.UTC).replace(tzinfo=None)
    return parsed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxrd", description="Chest X-ray AI node.")
    parser.add_argument("--version", action="version", version=f"cxrd {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="TOML config file (env CXRD_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", parents=[common], help="run the node (watcher, workers, reports)")
    sub.add_parser("worker", parents=[common],
                   help="run worker processes only (a worker node: shared PostgreSQL and "
                        "data folder)")
    p = sub.add_parser("predict", parents=[common], help="classify files offline, no daemon")
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("cxrd-predict"),
                   help="folder for the SR and heatmap SC (default ./cxrd-predict)")
    p.add_argument("--json", action="store_true", help="print JSON lines")
    p = sub.add_parser("reprocess", parents=[common],
                       help="queue stored studies again (e.g. after a model update)")
    p.add_argument("--since", type=_date, required=True, help="first received on/after DATE")
    p.add_argument("--until", type=_date, help="first received before DATE")
    p.add_argument("--study", help="only this Study Instance UID")
    p = sub.add_parser("status", parents=[common], help="queue, failures, deliveries, model")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("check-config", parents=[common], help="validate the config, list problems")
    p.add_argument("--worker", action="store_true",
                   help="check it as `cxrd worker` would (a worker node: PostgreSQL at this "
                        "schema, never migrated; the shared store), not as `cxrd serve`")
    p = sub.add_parser("deliveries", help="mend the outbox")
    mend = p.add_subparsers(dest="action", required=True)
    p = mend.add_parser("retry", parents=[common], help="send dead deliveries again")
    p.add_argument("--destination", metavar="NAME", help="only those to this destination")
    p = sub.add_parser("jobs", help="mend the job queue")
    mend = p.add_subparsers(dest="action", required=True)
    mend.add_parser("retry", parents=[common], help="queue failed jobs again")
    p = sub.add_parser("purge", parents=[common],
                       help="remove spool files and delivered results older than DATE")
    p.add_argument("--before", type=_date, required=True,
                   help="finished studies and results older than DATE (UTC)")
    p.add_argument("--dry-run", action="store_true", help="count only, remove nothing")
    p.add_argument("--json", action="store_true")
    return parser


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def cmd_serve(args: argparse.Namespace) -> int:
    from cxrd.logs import setup_logging
    from cxrd.node import Node
    from cxrd.preflight import StartupError, require_startable

    config = _config(args)
    setup_logging(config)
    try:
        require_startable(config)  # before the DICOM port opens and any worker starts
        return Node(config).run()  # on any exception it has closed and ended everything
    except StartupError as exc:
        for problem in exc.problems:
            print(f"cxrd: cannot start: {problem}", file=sys.stderr)
        return EXIT_ERROR
    except CxrdError:
        raise
    except Exception as exc:  # one line; the traceback at DEBUG
        log.debug("action=serve-failed", exc_info=True)
        print(f"cxrd: the node stopped: {type(exc).__name__}: {exc}; fix the cause and "
              'start it again ([logging] level = "DEBUG" logs the traceback)', file=sys.stderr)
        return EXIT_ERROR


def cmd_worker(args: argparse.Namespace) -> int:
    from cxrd.logs import setup_logging
    from cxrd.preflight import StartupError, require_worker_startable
    from cxrd.workernode import WorkerNode

    config = _config(args)
    setup_logging(config)
    try:
        require_worker_startable(config)  # before any worker starts
        return WorkerNode(config).run()  # on any exception it has ended its workers
    except StartupError as exc:
        for problem in exc.problems:
            print(f"cxrd: cannot start: {problem}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # one line; the traceback at DEBUG
        log.debug("action=worker-node-failed", exc_info=True)
        print(f"cxrd: the worker node stopped: {type(exc).__name__}: {exc}; fix the cause "
              'and start it again ([logging] level = "DEBUG" logs the traceback)',
              file=sys.stderr)
        return EXIT_ERROR


def cmd_check_config(args: argparse.Namespace) -> int:
    from cxrd.preflight import find_problems, find_worker_problems

    config = _config(args)
    print(json.dumps(describe(config), indent=2))
    if config.node.port < 1024 and not args.worker:
        print(f"note: node.port {config.node.port} is below 1024; under systemd install "
              "deploy/cxrd.service.d/low-port.conf (CAP_NET_BIND_SERVICE)", file=sys.stderr)
    # What `cxrd serve` checks before it listens (the database is migrated if it can be),
    # or, with --worker, what `cxrd worker` checks (its database is never migrated).
    problems = find_worker_problems(config) if args.worker else find_problems(config)
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s): cxrd {'worker' if args.worker else 'serve'} "
              "would refuse to start", file=sys.stderr)
        return EXIT_ERROR
    print("configuration OK", file=sys.stderr)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from cxrd.db import Database
    from cxrd.status import collect, render
    from cxrd.store import key_folders

    config = _config(args)
    db = Database(config.storage.database_url_resolved)
    db.migrate(key_folders(config))
    doc = collect(config, db)
    print(json.dumps(doc, indent=2) if args.json else render(doc))
    return EXIT_OK if doc["healthy"] else EXIT_UNHEALTHY


def cmd_reprocess(args: argparse.Namespace) -> int:
    from cxrd.admit import requeue_study, studies_to_reprocess
    from cxrd.db import Database
    from cxrd.store import key_folders

    config = _config(args)
    db = Database(config.storage.database_url_resolved)
    db.migrate(key_folders(config))
    studies = studies_to_reprocess(db, args.since, args.until, args.study)
    if not studies:
        print("no stored studies match", file=sys.stderr)
        return EXIT_OK
    from cxrd.retention import purged_studies

    unreachable = purged_studies(db, studies)
    for uid in unreachable:  # UIDs only: no patient data
        print(f"cannot reprocess {uid}: its received images were purged")
    if unreachable:
        gone = set(unreachable)
        studies = [uid for uid in studies if uid not in gone]
        print(f"skipped {len(unreachable)} studies no longer reachable (purged by retention)")
        if not studies:
            return EXIT_OK
    from tqdm import tqdm

    queued = deferred = 0
    for uid in tqdm(studies, desc="reprocess", unit="study", disable=not sys.stderr.isatty()):
        n = requeue_study(db, uid)
        queued += n
        deferred += n == 0
    print(f"queued {queued} images in {len(studies) - deferred} studies"
          + (f"; {deferred} studies busy or with nothing to classify" if deferred else ""))
    return EXIT_OK


def _mend_db(args: argparse.Namespace) -> tuple[Config, Database]:
    """The config (logging set up from it: the action's log line goes where the node's
    do) and the migrated database of a mending command."""
    from cxrd.db import Database
    from cxrd.logs import setup_logging
    from cxrd.store import key_folders

    config = _config(args)
    setup_logging(config)
    db = Database(config.storage.database_url_resolved)
    db.migrate(key_folders(config))
    return config, db


def cmd_deliveries(args: argparse.Namespace) -> int:
    from cxrd.actions import current_actor
    from cxrd.outbox import retry_dead

    config, db = _mend_db(args)
    name = args.destination
    if name is not None and name not in config.endpoint_names:
        print(f"note: {name!r} is not a configured destination or notification; its "
              "deliveries would fail again", file=sys.stderr)
    count = retry_dead(db, actor=current_actor(), destination=name)
    print(f"re-queued {count} dead deliveries" + (f" to {name}" if name else ""))
    return EXIT_OK


def cmd_jobs(args: argparse.Namespace) -> int:
    from cxrd.actions import current_actor
    from cxrd.queue import retry_failed

    _, db = _mend_db(args)
    retried = retry_failed(db, actor=current_actor())
    print(f"re-queued {retried.jobs} failed jobs ({retried.classify} classify, "
          f"{retried.report} report) in {retried.studies} studies")
    return EXIT_OK


def cmd_purge(args: argparse.Namespace) -> int:
    from cxrd.actions import current_actor
    from cxrd.retention import TRIGGER_COMMAND, purge, report_dict

    config, db = _mend_db(args)
    report = purge(db, config, args.before, trigger=TRIGGER_COMMAND, actor=current_actor(),
                   dry_run=args.dry_run)
    if args.json:
        print(json.dumps(report_dict(report), indent=2))
    else:
        verb = "would remove" if report.dry_run else "removed"
        print(f"{verb} {report.instances} received instances in {report.studies} studies "
              f"({report.spool_bytes} bytes) and {report.results} results "
              f"({report.result_bytes} bytes); kept {report.results_kept} results older than "
              f"{args.before.isoformat()} that are not yet delivered")
    if report.errors:
        print(f"{report.errors} files could not be removed (see the log); the next purge "
              "tries again", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    from cxrd.predict import predict_files

    config = _config(args)
    return predict_files(config, args.files, args.out, as_json=args.json)


COMMANDS = {"serve": cmd_serve, "worker": cmd_worker, "predict": cmd_predict,
            "reprocess": cmd_reprocess, "status": cmd_status, "check-config": cmd_check_config,
            "deliveries": cmd_deliveries, "jobs": cmd_jobs, "purge": cmd_purge}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in ("serve", "worker"):
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"cxrd: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except CxrdError as exc:
        print(f"cxrd: {exc}", file=sys.stderr)
        cause = exc.__cause__
        while cause is not None:
            print(f"  caused by: {type(cause).__name__}: {cause}", file=sys.stderr)
            cause = cause.__cause__
        return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())

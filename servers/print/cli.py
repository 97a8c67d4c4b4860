"""``dicomlab print``: list print jobs and their films, set the virtual printer's status."""

from __future__ import annotations

import argparse
from typing import Any

from db.engine import Database
from db.migrate import upgrade
from db.queries import print as q
from servers.core.declaration import StartupError
from servers.print.tables import PRINTER_CONDITIONS


def register(sub: Any, common: argparse.ArgumentParser, load: Any) -> None:
    """Add ``print jobs`` and ``print status`` to the ``dicomlab`` parser."""
    p = sub.add_parser("print", help="print jobs and printer status", description=__doc__)
    p_sub = p.add_subparsers(dest="print_command", required=True, metavar="COMMAND")
    jobs = p_sub.add_parser("jobs", parents=[common], help="list print jobs and their films")
    jobs.add_argument("--limit", type=int, default=50)
    jobs.set_defaults(func=lambda args: cmd_jobs(args, load(args)))
    status = p_sub.add_parser(
        "status", parents=[common], help="show or set the printer status (NORMAL/WARNING/FAILURE)"
    )
    status.add_argument("status", nargs="?", choices=["NORMAL", "WARNING", "FAILURE"])
    status.add_argument("info", nargs="?", help="Printer Status Info, e.g. 'SUPPLY EMPTY'")
    status.set_defaults(func=lambda args: cmd_status(args, load(args)))


def _db(config: Any) -> Database:
    upgrade(config.database_url)
    return Database(config.database_url)


def cmd_jobs(args: argparse.Namespace, config: Any) -> int:
    db = _db(config)
    films_dir = config.data_dir / "films"
    with db.read() as session:
        for job in q.list_jobs(session, args.limit):
            print(
                f"job {job.job_number} {job.job_uid} {job.state.value} ({job.status_info}) "
                f"{job.priority} from {job.originator} at {job.created_at:%Y-%m-%d %H:%M:%S} "
                f"label={job.film_session_label!r} copies={job.copies}"
            )
            if job.pdf_path:
                print(f"  pdf {films_dir / job.pdf_path}")
            for film in job.films:
                print(
                    f"  sheet {film.sheet} copy {film.copy} {film.film_size} {film.orientation} "
                    f"{film.display_format} {film.width}x{film.height} {films_dir / film.png_path}"
                )
    db.dispose()
    return 0


def cmd_status(args: argparse.Namespace, config: Any) -> int:
    db = _db(config)
    if args.status:
        info = (args.info or args.status).upper()
        if PRINTER_CONDITIONS.get(info) != args.status:
            terms = [k for k, v in PRINTER_CONDITIONS.items() if v == args.status]
            raise StartupError(f"{args.status} takes one of: {', '.join(terms)}")
        with db.write() as session:
            q.set_printer_state(session, args.status, info)
    with db.read() as session:
        status, info = q.printer_state(session)
    print(f"{status} {info}")
    db.dispose()
    return 0

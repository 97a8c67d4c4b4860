"""``dicomlab``: serve the suite, manage its database, show its configuration."""

from __future__ import annotations

import argparse
import copy
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from servers.core import config as config_mod
from servers.core import logs, systemd
from servers.core.declaration import StartupError
from servers.core.toml_out import dumps

EPILOG = """\
Configuration: --config PATH or DICOMLAB_CONFIG, then DICOMLAB_* environment
variables (e.g. DICOMLAB_AE__STORAGE_SCP__PORT=4104). Without either, the
embedded default runs: the archive AEs of the sample statement, SQLite and
instance files under ./data.
"""


def _load(args: argparse.Namespace) -> config_mod.Config:
    overrides: dict[str, Any] = {}
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = args.data_dir
    return config_mod.load(args.config, overrides=overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    from servers.core.runtime import Suite

    config = _load(args)
    logs.configure(config.log_format, config.log_level, trace=args.trace)
    log = logs.get_logger()
    suite = Suite.create(config)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("shutdown_requested", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    suite.start()
    print(banner(suite), file=sys.stderr, flush=True)
    log.info("suite_ready", config=config.source, data_dir=str(config.data_dir))
    watchdog = _systemd_ready(suite, log)
    try:
        stop.wait()
    finally:
        systemd.notify("STOPPING=1")
        if watchdog is not None:
            watchdog.stop()
        suite.stop()
        log.info("suite_stopped")
    return 0


def _systemd_ready(suite: Any, log: Any) -> systemd.Watchdog | None:
    """Under a Type=notify unit: READY=1, and the watchdog when WatchdogSec= is set."""
    listening = ", ".join(
        f"{r.config.title}:{r.config.port}" for r in suite.aes.values() if r.config.listens
    )
    if not systemd.notify(f"READY=1\nSTATUS=serving {listening}"):
        return None
    interval = systemd.watchdog_interval()
    log.info("systemd_notified", state="READY=1", watchdog_interval=interval)
    if interval is None:
        return None
    watchdog = systemd.Watchdog(interval, lambda: systemd.suite_healthy(suite), log)
    watchdog.start()
    return watchdog


def banner(suite: Any) -> str:
    config = suite.config
    lines = [
        f"dicomlab serving ({config.source}); data under {config.data_dir.absolute()}",
        f"  database: {_redact(config.database_url)}",
    ]
    for key, running in suite.aes.items():
        where = f"{config.host}:{running.config.port}" if running.config.listens else "initiator"
        services = ", ".join(running.config.services) or "outgoing associations"
        lines.append(f"  {running.config.title:<16} {where:<22} [{key}] {services}")
    if config.remotes:
        lines.append(
            "  remote AEs: "
            + ", ".join(f"{r.title}={r.host}:{r.port}" for r in config.remotes.values())
        )
    else:
        lines.append("  remote AEs: none (add [remote.TITLE] host/port to use C-MOVE)")
    listening = [r.config for r in suite.aes.values() if r.config.listens]
    if listening:
        first = listening[0]
        lines.append(f"  try: echoscu -aec {first.title} 127.0.0.1 {first.port}   (Ctrl-C stops)")
    return "\n".join(lines)


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from db.migrate import current_revision, upgrade

    config = _load(args)
    upgrade(config.database_url)
    print(
        f"database {_redact(config.database_url)} at revision {current_revision(config.database_url)}"
    )
    return 0


def cmd_db_current(args: argparse.Namespace) -> int:
    from db.migrate import current_revision

    config = _load(args)
    print(current_revision(config.database_url) or "empty (run `dicomlab db upgrade`)")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.write_default:
        target = Path(args.write_default)
        if target.exists() and not args.force:
            print(f"{target} exists; pass --force to overwrite", file=sys.stderr)
            return 2
        target.write_text(dumps(config_mod.DEFAULTS, commented=True), encoding="utf-8")
        print(
            f"wrote the default configuration to {target}; start with "
            f"`dicomlab serve --config {target}`"
        )
        return 0
    config = _load(args)
    raw = copy.deepcopy(dict(config.raw))
    raw["database_url"] = _redact(config.database_url)
    print(f"# effective configuration, from {config.source} and the environment")
    print(dumps(raw), end="")
    return 0


def cmd_statement(args: argparse.Namespace) -> int:
    from servers.core.statement import render_all

    config = _load(args)
    rendered = render_all(config)
    groups = [args.group] if args.group else sorted(rendered)
    status = 0
    for group in groups:
        if group not in rendered:
            print(
                f"no AE in group {group!r}; groups: {', '.join(sorted(rendered))}", file=sys.stderr
            )
            return 2
        text = rendered[group]
        if args.output_dir:
            target = Path(args.output_dir) / f"{group}.md"
            if args.check:
                if not target.exists() or target.read_text(encoding="utf-8") != text:
                    print(
                        f"{target} differs from the rendering; run `dicomlab statement "
                        f"--output-dir {args.output_dir}`",
                        file=sys.stderr,
                    )
                    status = 1
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
            print(f"wrote {target}")
        else:
            print(text, end="")
    return status


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dicomlab",
        description="A DICOM archive, RIS and print server suite that behaves as its "
        "conformance statements say.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", metavar="PATH", help="TOML configuration file")
    common.add_argument("--data-dir", metavar="DIR", help="override data_dir")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        parents=[common],
        help="run every enabled AE in one process",
        description="Run every enabled application entity until SIGTERM or "
        "SIGINT. Migrates the database first.",
    )
    serve.add_argument(
        "--trace",
        action="store_true",
        help="show each association's negotiation and each message's command "
        "set and identifier (for learning DICOM)",
    )
    serve.set_defaults(func=cmd_serve)

    db = sub.add_parser("db", help="database schema", description="Manage the index schema.")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    up = db_sub.add_parser(
        "upgrade",
        parents=[common],
        help="migrate to the newest schema",
        description="Apply every pending Alembic migration.",
    )
    up.set_defaults(func=cmd_db_upgrade)
    cur = db_sub.add_parser(
        "current",
        parents=[common],
        help="print the schema revision",
        description="Print the database's Alembic revision.",
    )
    cur.set_defaults(func=cmd_db_current)

    cfg = sub.add_parser(
        "config",
        parents=[common],
        help="print the effective configuration",
        description="Print the effective configuration as TOML, or write a commented default.",
    )
    cfg.add_argument("--write-default", metavar="PATH", help="write a commented default file")
    cfg.add_argument("--force", action="store_true", help="overwrite with --write-default")
    cfg.set_defaults(func=cmd_config)

    st = sub.add_parser(
        "statement",
        parents=[common],
        help="render the conformance statements",
        description="Render each AE group's conformance statement from the "
        "services' declarations and the configuration in effect.",
    )
    st.add_argument("--group", help="only this group (archive, ris, print)")
    st.add_argument("--output-dir", metavar="DIR", help="write DIR/<group>.md instead of printing")
    st.add_argument(
        "--check",
        action="store_true",
        help="with --output-dir: fail if the files differ from the rendering",
    )
    st.set_defaults(func=cmd_statement)

    from servers.worklist.cli import register as register_worklist

    register_worklist(sub, common, _load)

    from servers.print.cli import register as register_print

    register_print(sub, common, _load)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except StartupError as exc:
        print(f"dicomlab: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

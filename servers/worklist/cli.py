"""``dicomlab worklist``: add, import, list and remove scheduled steps; list MPPS and exceptions."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from db.engine import Database
from db.migrate import upgrade
from db.queries import mpps as mpps_q
from db.queries import worklist as q
from servers.core.config import Config
from servers.core.declaration import StartupError
from servers.worklist.entries import Entry, EntryError, build_entry

LoadConfig = Callable[[argparse.Namespace], Config]


def _db(config: Config) -> Database:
    upgrade(config.database_url)
    return Database(config.database_url)


def _store(config: Config, entries: list[Entry]) -> None:
    db = _db(config)
    try:
        with db.write() as session:
            records = [e.record for e in entries]
            taken = q.existing_sps_ids(session, [r.sps_id for r in records])
            taken |= q.active_accessions(session, [r.accession_number for r in records])
            if taken:
                raise StartupError(f"already scheduled: {', '.join(sorted(taken))}")
            q.add_steps(session, records)
    finally:
        db.dispose()
    for entry in entries:
        r = entry.record
        print(f"scheduled {r.sps_id} accession {r.accession_number} patient {r.patient_id}")


def _entry(values: dict[str, Any], where: str) -> Entry:
    try:
        return build_entry({k: v for k, v in values.items() if v not in ("", None)}, "cli")
    except EntryError as exc:
        raise StartupError(f"{where}: {exc}") from None


def cmd_add(args: argparse.Namespace, load: LoadConfig) -> int:
    values: dict[str, Any] = {}
    for item in args.set or []:
        keyword, sep, value = item.partition("=")
        if not sep:
            raise StartupError(f"--set {item!r}: use KEYWORD=VALUE")
        values[keyword.strip()] = value
    fixed = {
        "PatientID": args.patient_id,
        "PatientName": args.patient_name,
        "Modality": args.modality,
        "ScheduledStationAETitle": args.station,
        "ScheduledProcedureStepStartDate": args.date,
        "ScheduledProcedureStepStartTime": args.time,
        "AccessionNumber": args.accession,
        "RequestedProcedureDescription": args.description,
    }
    values.update({k: v for k, v in fixed.items() if v})
    _store(load(args), [_entry(values, "worklist add")])
    return 0


def cmd_import(args: argparse.Namespace, load: LoadConfig) -> int:
    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise StartupError(f"cannot read {path}: {exc.strerror}") from None
    rows: list[dict[str, Any]]
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StartupError(f"{path} is not JSON: {exc}") from None
        rows = data if isinstance(data, list) else [data]
        if not all(isinstance(r, dict) for r in rows):
            raise StartupError(f"{path}: expected an object or a list of objects")
    else:
        rows = [dict(r) for r in csv.DictReader(text.splitlines())]
    entries = [_entry(row, f"{path.name} entry {i + 1}") for i, row in enumerate(rows)]
    _store(load(args), entries)  # all or nothing
    return 0


def cmd_list(args: argparse.Namespace, load: LoadConfig) -> int:
    db = _db(load(args))
    try:
        with db.read() as session:
            steps = q.list_steps(session, include_removed=args.all)
    finally:
        db.dispose()
    if args.json:
        print(json.dumps([Dataset.from_json(s.dataset).to_json_dict() for s in steps], indent=1))
        return 0
    print(
        "SPS ID           ACCESSION        PATIENT ID   NAME                 MOD STATION  START          STATE"
    )
    for s in steps:
        state = s.procedure_state + (f" (removed: {s.removed_reason})" if s.removed else "")
        print(
            f"{s.sps_id:<16} {s.accession_number:<16} {s.patient_id:<12} {s.patient_name[:20]:<20} "
            f"{s.modality:<3} {s.station_ae:<8} {s.start_date} {s.start_time[:4]}  {state}"
        )
    return 0


def cmd_remove(args: argparse.Namespace, load: LoadConfig) -> int:
    db = _db(load(args))
    try:
        with db.write() as session:
            removed = q.remove_step(session, args.sps_id, "removed by user")
    finally:
        db.dispose()
    if not removed:
        print(f"no scheduled step {args.sps_id} on the worklist", file=sys.stderr)
        return 1
    print(f"removed {args.sps_id}")
    return 0


def cmd_mpps(args: argparse.Namespace, load: LoadConfig) -> int:
    db = _db(load(args))
    try:
        with db.read() as session:
            if args.exceptions:
                for e in mpps_q.list_exceptions(session):
                    print(f"{e.created_at:%Y-%m-%d %H:%M:%S} {e.sop_instance_uid} {e.reason}")
                return 0
            for step in mpps_q.list_steps(session):
                messages = mpps_q.messages_of(session, step)
                print(
                    f"{step.sop_instance_uid} {step.state.value:<12} patient {step.patient_id} "
                    f"accession {step.accession_numbers or '-'} station "
                    f"{step.performed_station_ae} {'matched' if step.matched else 'EXCEPTION'} "
                    f"messages {'/'.join(m.operation for m in messages)}"
                )
    finally:
        db.dispose()
    return 0


def register(sub: Any, common: argparse.ArgumentParser, load: LoadConfig) -> None:
    """Add ``worklist`` and its commands to the ``dicomlab`` parser."""
    wl = sub.add_parser(
        "worklist",
        help="the RIS worklist and performed steps",
        description="Manage the Modality Worklist's scheduled procedure steps and list the "
        "performed procedure steps modalities reported.",
    )
    wl_sub = wl.add_subparsers(dest="worklist_command", required=True, metavar="COMMAND")

    def bind(parser: argparse.ArgumentParser, func: Callable[..., int]) -> None:
        parser.set_defaults(func=lambda args: func(args, load))

    add = wl_sub.add_parser(
        "add",
        parents=[common],
        help="schedule one procedure step",
        description="Schedule one procedure step. Accession Number, SPS ID and Study "
        "Instance UID are generated unless given. Any other worklist attribute can be "
        "set with --set KEYWORD=VALUE (codes as value^scheme^meaning).",
    )
    add.add_argument("--patient-id", required=True)
    add.add_argument("--patient-name", required=True, help="family^given, e.g. DOE^JOHN")
    add.add_argument("--modality", required=True, help="e.g. CT, MR")
    add.add_argument("--station", required=True, help="Scheduled Station AE Title")
    add.add_argument("--date", required=True, help="start date YYYYMMDD")
    add.add_argument("--time", required=True, help="start time HHMM[SS]")
    add.add_argument("--accession", help="Accession Number (= Requested Procedure ID)")
    add.add_argument("--description", help="Requested Procedure Description")
    add.add_argument("--set", action="append", metavar="KEYWORD=VALUE")
    bind(add, cmd_add)

    imp = wl_sub.add_parser(
        "import",
        parents=[common],
        help="schedule steps from a JSON or CSV file",
        description="Schedule the steps of a JSON file (an object or list of objects) or "
        "a CSV file (header row), keyed by DICOM keywords such as PatientID, "
        "PatientName, Modality, ScheduledStationAETitle, ScheduledProcedureStepStartDate "
        "and ScheduledProcedureStepStartTime. All entries are added, or none.",
    )
    imp.add_argument("file", help="FILE.json or FILE.csv")
    bind(imp, cmd_import)

    ls = wl_sub.add_parser(
        "list",
        parents=[common],
        help="list scheduled steps",
        description="List the steps on the worklist.",
    )
    ls.add_argument("--all", action="store_true", help="include removed steps")
    ls.add_argument("--json", action="store_true", help="DICOM JSON of each entry")
    bind(ls, cmd_list)

    rm = wl_sub.add_parser(
        "remove",
        parents=[common],
        help="remove a scheduled step",
        description="Take one step off the worklist (kept in the database as removed).",
    )
    rm.add_argument("sps_id", help="Scheduled Procedure Step ID")
    bind(rm, cmd_remove)

    mp = wl_sub.add_parser(
        "mpps",
        parents=[common],
        help="list performed procedure steps",
        description="List the performed procedure steps modalities reported, or the "
        "exceptions (steps that did not match an order).",
    )
    mp.add_argument("--exceptions", action="store_true", help="list exceptions instead")
    bind(mp, cmd_mpps)

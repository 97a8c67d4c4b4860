"""The print queue and the printer monitor: job lifecycle, films on disk, N-EVENT-REPORTs."""

from __future__ import annotations

import io
import json
import queue
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydicom.dataset import Dataset
from sqlalchemy.exc import SQLAlchemyError

from db.models import PrintFilm, PrintJobState
from db.queries import print as q
from servers.core import logs
from servers.core.dimse import send_event_report
from servers.print import render as r
from servers.print import tables as t
from servers.print.scp import PrintServer
from storage.filestore import FileStore

T = TypeVar("T")
# While the database is unavailable a job in progress waits, retrying this often.
DATABASE_RETRY_S = 1.0
# Execution Status Info of a job that a previous run left unfinished (PS3.3 C.13.9.1).
ORPHAN_INFO = "PRINTER DOWN"


@dataclass
class QueuedJob:
    pk: int
    films: list[r.FilmSpec]
    assoc: Any  # the creating association when it accepted the Print Job context


class PrintWorker:
    """Prints queued jobs one at a time and watches the printer's status."""

    def __init__(self, server: PrintServer) -> None:
        self.server = server
        self.settings = server.settings
        self.store = FileStore(server.ctx.config.data_dir / "films")
        self.queue: queue.Queue[QueuedJob | None] = queue.Queue()
        self._stop = threading.Event()
        self._last_printer: tuple[str, str] | None = None
        self.log = logs.get_logger().bind(service="print")
        self.threads = [
            threading.Thread(target=self._run_jobs, name="print-jobs", daemon=True),
            threading.Thread(target=self._run_monitor, name="print-monitor", daemon=True),
        ]
        with server.ctx.db.read() as session:
            self._last_printer = q.printer_state(session)
        self._written: list[str] = []
        self._recover()
        for thread in self.threads:
            thread.start()

    def enqueue(self, pk: int, films: list[r.FilmSpec], assoc: Any) -> None:
        self.queue.put(QueuedJob(pk, films, assoc))

    def stop(self) -> None:
        self._stop.set()
        self.queue.put(None)
        for thread in self.threads:
            thread.join(timeout=5)

    def _recover(self) -> None:
        """Fail the jobs a previous run left unfinished, and remove their files.

        A job's films live in memory until it is printed: after a crash (``kill -9``,
        power loss) they are gone, and a job left PENDING or PRINTING would count
        against ``max_queued_jobs`` for ever. A rendering interrupted half-way may
        also have left temporary files and complete films of a job that never
        became DONE; neither is kept.
        """
        swept = self.store.sweep_partials() if self.store.root.exists() else 0
        with self.server.ctx.db.write() as session:
            orphans = q.fail_unfinished(session, ORPHAN_INFO)
        for number in orphans:
            shutil.rmtree(self.store.root / _job_dir(number), ignore_errors=True)
        if orphans or swept:
            self.log.warning(
                "print_jobs_recovered", failed=len(orphans), info=ORPHAN_INFO, partials=swept
            )

    def _db(self, step: Callable[[], T]) -> T:
        """Run one database step of a job, waiting while the database is unavailable.

        The job's films are in memory, so it simply carries on when the database is
        back; until then the queue waits behind it. Only stopping ends the wait.
        """
        while True:
            try:
                return step()
            except SQLAlchemyError as exc:
                self.log.warning("print_database_unavailable", error=type(exc).__name__)
                if self._stop.wait(DATABASE_RETRY_S):
                    raise

    # --- jobs ---------------------------------------------------------------------------

    def _run_jobs(self) -> None:
        while not self._stop.is_set():
            item = self.queue.get()
            if item is None:
                return
            self._written = []
            try:
                self._print(item)
            except Exception as exc:  # a job that cannot be rendered fails; the queue goes on
                if isinstance(exc, SQLAlchemyError) and self._stop.is_set():
                    return  # stopping while the database is down: the next start fails it
                self.log.exception("print_job_failed", job_pk=item.pk, error=str(exc))
                # Nothing of a failed job stays on disk (a full disk, a rendering error).
                for relative in self._written:
                    self.store.delete(relative)
                try:
                    self._state(item, PrintJobState.FAILURE, "ELEC SW ERROR")
                except SQLAlchemyError:
                    return

    def _state(self, item: QueuedJob, state: PrintJobState, info: str, **kw: Any) -> None:
        def write() -> tuple[str, str, str] | None:
            with self.server.ctx.db.write() as session:
                job = q.set_job_state(session, item.pk, state, info, **kw)
                if job is None:
                    return None
                return job.job_uid, job.job_number, job.film_session_label

        changed = self._db(write)
        if changed is None:
            return
        uid, number, label = changed
        self.log.info("print_job_state", job_uid=uid, state=state.value, info=info)
        if item.assoc is not None and self.settings.event_reports_print_job:
            ds = Dataset()
            ds.ExecutionStatusInfo = info
            ds.PrintJobID = number
            ds.FilmSessionLabel = label
            ds.PrinterName = self.settings.printer_name
            self._send(item.assoc, ds, t.JOB_EVENT_IDS[state.value], t.PRINT_JOB, uid, None)

    def _print(self, item: QueuedJob) -> None:
        self._state(item, PrintJobState.PENDING, "QUEUED")
        attempts = 0
        while True:
            status, info = self._db(self._printer_state)
            if status != "FAILURE":
                break
            if attempts >= self.settings.retry_count:
                self.log.warning("print_job_printer_failure", job_pk=item.pk, printer=info)
                self._state(item, PrintJobState.FAILURE, "UNKNOWN", attempts=attempts)
                return
            attempts += 1
            self._state(item, PrintJobState.PENDING, "QUEUED", attempts=attempts)
            if self._stop.wait(self.settings.retry_delay_s):
                return
        if status == "WARNING":
            self.log.warning("printer_warning_printing", job_pk=item.pk, printer=info)
        self._state(item, PrintJobState.PRINTING, "NORMAL")
        number, copies = self._db(lambda: self._number_and_copies(item.pk))
        pages: list[Any] = []
        rows: list[PrintFilm] = []
        sheet = 0
        rendered = []
        for index, film in enumerate(item.films, start=1):
            out = r.render_film(
                film,
                self.settings.render_scale,
                self.settings.oversize_policy,
                self.settings.font_path,
            )
            base = f"{_job_dir(number)}/film-{index:02d}"
            png = self._save(out.view, f"{base}.png")
            dens = self._save(out.density, f"{base}-density.png")
            side = f"{base}.json"
            self._write([json.dumps(out.sidecar, indent=2, default=str).encode()], side)
            rendered.append((film, out, png, dens, side))
        for copy_no in range(1, copies + 1):  # collated: 1-2-3, 1-2-3
            for film, out, png, dens, side in rendered:
                sheet += 1
                pages.append(out.view)
                rows.append(
                    PrintFilm(
                        sheet=sheet,
                        film_box_uid=film.film_box_uid,
                        copy=copy_no,
                        film_size=film.film_size,
                        orientation=film.orientation,
                        display_format=film.display_format,
                        width=out.view.width,
                        height=out.view.height,
                        png_path=png,
                        density_path=dens,
                        sidecar_path=side,
                    )
                )
        buf = io.BytesIO()
        pages[0].save(buf, "PDF", save_all=True, append_images=pages[1:], resolution=72.0)
        pdf = f"{_job_dir(number)}/job.pdf"
        self._write([buf.getvalue()], pdf)

        def record() -> None:
            with self.server.ctx.db.write() as session:
                for row in rows:
                    q.add_film(session, item.pk, copy_film(row))
                q.set_job_pdf(session, item.pk, pdf)

        self._db(record)
        self._state(item, PrintJobState.DONE, "NORMAL")

    def _printer_state(self) -> tuple[str, str]:
        with self.server.ctx.db.read() as session:
            return q.printer_state(session)

    def _number_and_copies(self, pk: int) -> tuple[str, int]:
        with self.server.ctx.db.read() as session:
            job = q.job_by_pk(session, pk)
            assert job is not None
            return job.job_number, job.copies

    def _write(self, chunks: list[bytes], relative: str) -> None:
        self._written.append(relative)
        self.store.write(chunks, relative)

    def _save(self, image: Any, relative: str) -> str:
        buf = io.BytesIO()
        image.save(buf, "PNG")
        self._write([buf.getvalue()], relative)
        return relative

    def path(self, relative: str) -> Path:
        return self.store.path(relative)

    # --- printer status -----------------------------------------------------------------

    def _run_monitor(self) -> None:
        while not self._stop.wait(self.settings.printer_poll_s):
            try:
                with self.server.ctx.db.read() as session:
                    now = q.printer_state(session)
            except Exception:
                continue
            if now == self._last_printer:
                continue
            self._last_printer = now
            status, info = now
            self.log.info("printer_status_changed", status=status, info=info)
            if not self.settings.event_reports_printer:
                continue
            ds: Dataset | None = None
            if status != "NORMAL":
                ds = Dataset()
                ds.PrinterStatus = status
                ds.PrinterStatusInfo = info
                ds.PrinterName = self.settings.printer_name
            for st in self.server.open_states():
                if PrintServer._negotiated(st.assoc, t.META):
                    self._send(
                        st.assoc,
                        ds,
                        t.PRINTER_EVENT_IDS[status],
                        t.PRINTER,
                        t.PRINTER_INSTANCE,
                        t.META,
                    )

    def _send(
        self, assoc: Any, ds: Dataset | None, event_id: int, cls: str, uid: str, meta: str | None
    ) -> None:
        if not assoc.is_established:
            return
        log = logs.assoc_logger(assoc).bind(event_type_id=event_id, sop_class=cls)
        try:
            # Not pynetdicom's send_n_event_report: run from this worker thread it could
            # take the peer's next request as the response (see servers/core/dimse.py).
            code, problem = send_event_report(assoc, ds, event_id, cls, uid, meta_uid=meta)
        except Exception as exc:
            log.warning("event_report_failed", error=str(exc))
            return
        if code is None:
            log.warning("event_report_unanswered", reason=problem)
        elif code != 0:
            log.warning("event_report_refused", status=f"0x{code:04X}")
        else:
            log.info("event_report_sent")


def _job_dir(number: str) -> str:
    return f"job-{int(number):06d}"


def copy_film(row: PrintFilm) -> PrintFilm:
    """A fresh row with ``row``'s columns: a retried transaction must not reuse the
    objects a rolled-back session had already attached."""
    columns = {c.key: getattr(row, c.key) for c in PrintFilm.__table__.columns if c.key != "id"}
    columns.pop("job_pk", None)
    return PrintFilm(**columns)


def start_worker(server: PrintServer) -> PrintWorker:
    worker = PrintWorker(server)
    server.worker = worker
    return worker

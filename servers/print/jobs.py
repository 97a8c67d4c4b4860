"""The print queue and the printer monitor: job lifecycle, films on disk, N-EVENT-REPORTs."""

from __future__ import annotations

import io
import json
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from db.models import PrintFilm, PrintJobState
from db.queries import print as q
from servers.core import logs
from servers.core.dimse import send_event_report
from servers.print import render as r
from servers.print import tables as t
from servers.print.scp import PrintServer
from storage.filestore import FileStore


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
        for thread in self.threads:
            thread.start()

    def enqueue(self, pk: int, films: list[r.FilmSpec], assoc: Any) -> None:
        self.queue.put(QueuedJob(pk, films, assoc))

    def stop(self) -> None:
        self._stop.set()
        self.queue.put(None)
        for thread in self.threads:
            thread.join(timeout=5)

    # --- jobs ---------------------------------------------------------------------------

    def _run_jobs(self) -> None:
        while not self._stop.is_set():
            item = self.queue.get()
            if item is None:
                return
            try:
                self._print(item)
            except Exception as exc:  # a job that cannot be rendered fails; the queue goes on
                self.log.exception("print_job_failed", job_pk=item.pk, error=str(exc))
                self._state(item, PrintJobState.FAILURE, "ELEC SW ERROR")

    def _state(self, item: QueuedJob, state: PrintJobState, info: str, **kw: Any) -> None:
        with self.server.ctx.db.write() as session:
            job = q.set_job_state(session, item.pk, state, info, **kw)
            if job is None:
                return
            uid, number, label = job.job_uid, job.job_number, job.film_session_label
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
            with self.server.ctx.db.read() as session:
                status, info = q.printer_state(session)
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
        with self.server.ctx.db.read() as session:
            job = q.job_by_pk(session, item.pk)
            assert job is not None
            number, copies = job.job_number, job.copies
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
            base = f"job-{int(number):06d}/film-{index:02d}"
            png = self._save(out.view, f"{base}.png")
            dens = self._save(out.density, f"{base}-density.png")
            side = f"{base}.json"
            self.store.write([json.dumps(out.sidecar, indent=2, default=str).encode()], side)
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
        pdf = f"job-{int(number):06d}/job.pdf"
        self.store.write([buf.getvalue()], pdf)
        with self.server.ctx.db.write() as session:
            for row in rows:
                q.add_film(session, item.pk, row)
            q.set_job_pdf(session, item.pk, pdf)
        self._state(item, PrintJobState.DONE, "NORMAL")

    def _save(self, image: Any, relative: str) -> str:
        buf = io.BytesIO()
        image.save(buf, "PNG")
        self.store.write([buf.getvalue()], relative)
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


def start_worker(server: PrintServer) -> PrintWorker:
    worker = PrintWorker(server)
    server.worker = worker
    return worker

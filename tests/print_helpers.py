"""A pynetdicom print SCU for the print server tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association

from db.queries import print as q
from servers.core.runtime import Suite
from servers.print import tables as t

ALL = (t.META, t.PLUT, t.ANNOTATION_BOX, t.PRINT_JOB, t.CONFIGURATION)


class Scu:
    """One association to the print SCP, with the events it received."""

    def __init__(self, assoc: Association, events: list[tuple[int, str, Dataset | None]]) -> None:
        self.assoc = assoc
        self.events = events

    def create(self, cls: str, ds: Dataset | None = None, uid: str | None = None) -> Any:
        meta = t.META if cls in (t.FILM_SESSION, t.FILM_BOX) else None
        status, attrs = self.assoc.send_n_create(
            ds if ds is not None else Dataset(), cls, uid, meta_uid=meta
        )
        return status, attrs

    def session(self, **kw: Any) -> str:
        # pynetdicom sends no data set at all for an empty one, and the request then
        # never completes: always send at least one attribute.
        kw = kw or {"NumberOfCopies": 1}
        ds = Dataset()
        for k, v in kw.items():
            setattr(ds, k, v)
        uid = str(generate_uid())
        status, _ = self.create(t.FILM_SESSION, ds, uid)
        assert status.Status in (0x0000, 0x0116, 0x0107, 0xB600), hex(status.Status)
        return uid

    def film_box(
        self, session_uid: str, fmt: str = "STANDARD\\1,1", uid: str | None = None, **kw: Any
    ) -> Any:
        """(status, attributes, film box UID)."""
        ds = Dataset()
        ds.ImageDisplayFormat = fmt
        ref = Dataset()
        ref.ReferencedSOPClassUID = t.FILM_SESSION
        ref.ReferencedSOPInstanceUID = session_uid
        ds.ReferencedFilmSessionSequence = [ref]
        for k, v in kw.items():
            setattr(ds, k, v)
        uid = uid or str(generate_uid())
        status, attrs = self.create(t.FILM_BOX, ds, uid)
        return status, attrs, uid

    def set(self, cls: str, uid: str, ds: Dataset) -> Any:
        meta = t.META if cls in (t.FILM_SESSION, t.FILM_BOX, t.IMAGE_BOX) else None
        return self.assoc.send_n_set(ds, cls, uid, meta_uid=meta)

    def action(self, cls: str, uid: str, action: int = 1) -> Any:
        return self.assoc.send_n_action(None, action, cls, uid, meta_uid=t.META)

    def delete(self, cls: str, uid: str) -> Any:
        meta = t.META if cls in (t.FILM_SESSION, t.FILM_BOX) else None
        return self.assoc.send_n_delete(cls, uid, meta_uid=meta)

    def get(self, cls: str, uid: str, tags: list[int] | None = None) -> Any:
        meta = t.META if cls == t.PRINTER else None
        return self.assoc.send_n_get(tags or [], cls, uid, meta_uid=meta)

    def wait_event(self, predicate: Any, timeout: float = 20) -> tuple[int, str, Dataset | None]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in list(self.events):
                if predicate(e):
                    return e
            time.sleep(0.02)
        raise AssertionError(f"no matching event in {self.events}")


@contextmanager
def print_scu(
    suite: Suite, contexts: tuple[str, ...] = ALL, calling: str = "PRINT_SCU"
) -> Iterator[Scu]:
    events: list[tuple[int, str, Dataset | None]] = []
    lock = threading.Lock()

    def on_event(event: Any) -> int:
        with lock:
            events.append(
                (
                    int(event.event_type),
                    str(event.request.AffectedSOPClassUID),
                    event.event_information,
                )
            )
        return 0x0000, None

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for cx in contexts:
        ae.add_requested_context(cx)
    port = suite.port_of("print_scp")
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title="PRINT_SCP",
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_event)],
    )
    assert assoc.is_established
    try:
        yield Scu(assoc, events)
    finally:
        if assoc.is_established:
            assoc.release()


def image_item(
    rows: int,
    cols: int,
    values: list[int],
    bits: int = 8,
    photometric: str = "MONOCHROME2",
    **extra: Any,
) -> Dataset:
    item = Dataset()
    item.SamplesPerPixel = 1
    item.PhotometricInterpretation = photometric
    item.Rows = rows
    item.Columns = cols
    item.BitsAllocated = 8 if bits == 8 else 16
    item.BitsStored = bits
    item.HighBit = bits - 1
    item.PixelRepresentation = 0
    if bits == 8:
        item.PixelData = bytes(values)
    else:
        item.PixelData = b"".join(v.to_bytes(2, "little") for v in values)
    item["PixelData"].VR = "OB" if bits == 8 else "OW"
    for k, v in extra.items():
        setattr(item, k, v)
    return item


def image_box_set(position: int, item: Dataset | None, **kw: Any) -> Dataset:
    ds = Dataset()
    ds.ImageBoxPosition = position
    ds.BasicGrayscaleImageSequence = [item] if item is not None else []
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def ramp(bits: int, n: int) -> list[int]:
    top = (1 << bits) - 1
    return [round(i * top / (n - 1)) for i in range(n)]


def wait_job(suite: Suite, job_uid: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with suite.db.read() as session:
            job = q.job_by_uid(session, job_uid)
            if job is not None and job.state.value in ("DONE", "FAILURE"):
                return job
        time.sleep(0.05)
    raise AssertionError("job did not finish")


def film_images(suite: Suite, job: Any, sheet: int = 1) -> tuple[Image.Image, Image.Image, Path]:
    root = suite.config.data_dir / "films"
    film = job.films[sheet - 1]
    return (
        Image.open(root / film.png_path),
        Image.open(root / film.density_path),
        root / film.sidecar_path,
    )


def lut_item(entries: int, bits: int, values: list[int]) -> Dataset:
    """A Presentation LUT Sequence item with explicit VRs (US descriptor, OW data)."""
    item = Dataset()
    item.LUTDescriptor = [entries if entries < 65536 else 0, 0, bits]
    item["LUTDescriptor"].VR = "US"
    item.LUTData = b"".join(v.to_bytes(2, "little") for v in values)
    item["LUTData"].VR = "OW"
    return item

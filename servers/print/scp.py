"""Print SCP handlers: Film Session, Film Box, Image Box, Annotation Box, P-LUT, Printer.

The working hierarchy (film session, film boxes, image and annotation boxes, P-LUTs)
lives in memory per association and is discarded when the association ends: nothing
reaches the store before an N-ACTION, which copies the films into a print job in one
transaction. A session aborted midway therefore leaves no half job behind.
"""

from __future__ import annotations

import copy
import sys
import threading
from array import array
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.uid import UID, generate_uid
from pynetdicom import evt
from sqlalchemy.exc import SQLAlchemyError

from db.models import PrintJob, PrintJobState
from db.queries import print as q
from servers.core import logs
from servers.core.context import ServiceContext
from servers.core.declaration import StatusRow, StatusTable
from servers.print import render as r
from servers.print import tables as t
from servers.print.settings import PrintSettings

FS_KEYS = ("NumberOfCopies", "PrintPriority", "MediumType", "FilmDestination", "FilmSessionLabel")
FB_CREATE_KEYS = (
    "ImageDisplayFormat",
    "ReferencedFilmSessionSequence",
    "ReferencedImageBoxSequence",
    "FilmOrientation",
    "FilmSizeID",
    "MagnificationType",
    "MaxDensity",
    "MinDensity",
    "AnnotationDisplayFormatID",
    "SmoothingType",
    "BorderDensity",
    "Trim",
    "ReferencedPresentationLUTSequence",
    "Illumination",
    "ReflectedAmbientLight",
    "ConfigurationInformation",
)
FB_SET_KEYS = (
    "MagnificationType",
    "MaxDensity",
    "MinDensity",
    "SmoothingType",
    "BorderDensity",
    "Trim",
    "ReferencedPresentationLUTSequence",
    "Illumination",
    "ReflectedAmbientLight",
    "ConfigurationInformation",
)
PIXEL_KEYS = (
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PixelData",
)
PRINTER_KEYS = (
    "PrinterStatus",
    "PrinterStatusInfo",
    "PrinterName",
    "Manufacturer",
    "ManufacturerModelName",
    "DeviceSerialNumber",
    "SoftwareVersions",
)
JOB_KEYS = (
    "ExecutionStatus",
    "ExecutionStatusInfo",
    "PrintPriority",
    "PrinterName",
    "Originator",
    "CreationDate",
    "CreationTime",
)
CHARACTER_SETS = ("", "ISO_IR 100", "ISO_IR 144")


class Answer(Exception):
    """A failure status with its Error Comment and offending tags."""

    def __init__(self, row: StatusRow, comment: str = "", tags: Iterable[int] = ()) -> None:
        super().__init__(comment)
        self.row = row
        self.comment = comment
        self.tags = list(tags)


@dataclass
class PLut:
    uid: str
    lut: r.Lut
    entries: int | None
    deleted: bool = False


@dataclass
class ImageBox:
    uid: str
    position: int
    image: r.ImageSpec | None = None
    plut: str = ""
    oversize: bool = False
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class AnnotationBox:
    uid: str
    position: int
    text: str = ""


@dataclass
class FilmBox:
    uid: str
    attrs: dict[str, Any]
    fmt: tuple[str, tuple[int, ...]]
    image_boxes: list[ImageBox]
    annotation_boxes: list[AnnotationBox]
    plut: str = ""


@dataclass
class FilmSession:
    uid: str
    attrs: dict[str, Any]
    film_boxes: list[FilmBox] = field(default_factory=list)


@dataclass
class AssocState:
    calling_ae: str
    called_ae: str
    assoc: Any
    session: FilmSession | None = None
    current: FilmBox | None = None
    pluts: dict[str, PLut] = field(default_factory=dict)


def _value(ds: Dataset, keyword: str) -> Any:
    elem = ds.get(keyword)
    return None if elem is None or elem.is_empty else elem


def _str(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip()


def _int(value: Any) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


class PrintServer:
    """The print SCP of one AE: per-association hierarchies, the queue, the printer."""

    def __init__(self, ctx: ServiceContext, settings: PrintSettings) -> None:
        self.ctx = ctx
        self.settings = settings
        self.states: dict[int, AssocState] = {}
        self.lock = threading.Lock()
        self.worker: Any = None  # set by the background worker (servers.print.jobs)

    # --- association bookkeeping --------------------------------------------------------

    def state(self, assoc: Any) -> AssocState:
        with self.lock:
            st = self.states.get(id(assoc))
            if st is None:
                st = AssocState(
                    calling_ae=assoc.requestor.ae_title.strip(),
                    called_ae=assoc.acceptor.ae_title.strip(),
                    assoc=assoc,
                )
                self.states[id(assoc)] = st
            return st

    def on_established(self, event: Any) -> None:
        self.state(event.assoc)

    def on_end(self, event: Any) -> None:
        with self.lock:
            st = self.states.pop(id(event.assoc), None)
        if st is not None and st.session is not None:
            logs.assoc_logger(event.assoc).info(
                "film_session_discarded",
                film_session_uid=st.session.uid,
                film_boxes=len(st.session.film_boxes),
            )

    def open_states(self) -> list[AssocState]:
        with self.lock:
            return list(self.states.values())

    def uid_in_use(self, uid: str) -> bool:
        for st in self.open_states():
            if st.session and st.session.uid == uid:
                return True
            if uid in st.pluts:
                return True
            if st.session:
                for fb in st.session.film_boxes:
                    if fb.uid == uid or any(b.uid == uid for b in fb.image_boxes):
                        return True
        with self.ctx.db.read() as session:
            return q.job_by_uid(session, uid) is not None

    # --- dispatch -------------------------------------------------------------------------

    def dispatch(self, table: StatusTable, fn: Callable[[], Any], assoc: Any = None) -> Any:
        try:
            try:
                return fn()
            except SQLAlchemyError as exc:
                if 0x0110 not in table:
                    raise
                if assoc is not None:
                    logs.assoc_logger(assoc).error(
                        "print_database_unavailable",
                        operation=table.operation,
                        status="0x0110",
                        reason=type(exc).__name__,
                    )
                raise Answer(table[0x0110], t.DATABASE_COMMENT) from exc
        except Answer as answer:
            status = Dataset()
            status.Status = answer.row.code
            if answer.comment:
                status.ErrorComment = answer.comment[:64]
            if answer.tags and table.operation in ("N-SET", "N-GET"):
                status.AttributeIdentifierList = [Tag(x) for x in answer.tags]
            # pynetdicom wants a bare status from N-DELETE handlers, a pair from the others.
            return status if table.operation == "N-DELETE" else (status, None)

    @staticmethod
    def decoded(event: Any, attribute: str, table: StatusTable) -> Dataset:
        """The request's data set with every element decoded; 0110 if it cannot be.

        pynetdicom decodes the data set lazily, when the handler first reads it, and
        pydicom converts each value only when it is read: both happen here, up front,
        so that an undecodable request is answered with a declared status before
        anything changes.
        """
        try:
            ds: Dataset = getattr(event, attribute)
            for element in ds.iterall():
                _ = element.value
        except Exception as exc:
            logs.assoc_logger(event.assoc).warning(
                "print_dataset_undecodable",
                operation=table.operation,
                status=f"0x{table[0x0110].code:04X}",
                reason=f"{type(exc).__name__}: {exc}"[:200],
            )
            raise Answer(table[0x0110], "Data set cannot be decoded") from exc
        return ds

    def handle_n_create(self, event: Any, table: StatusTable) -> Any:
        cls = str(event.request.AffectedSOPClassUID)
        st = self.state(event.assoc)
        requested = event.request.AffectedSOPInstanceUID

        def run() -> Any:
            uid = self._new_uid(table, requested)
            ds = self.decoded(event, "attribute_list", table)
            if cls == t.FILM_SESSION:
                return self._create_film_session(st, ds, uid, requested, table)
            if cls == t.FILM_BOX:
                return self._create_film_box(event, st, ds, uid, requested, table)
            if cls == t.PLUT:
                return self._create_plut(st, ds, uid, requested, table)
            raise Answer(table[0x0118], f"N-CREATE not supported for {cls}")

        return self.dispatch(table, run, event.assoc)

    def _new_uid(self, table: StatusTable, requested: Any) -> str:
        if requested is None:
            return str(generate_uid())
        uid = str(requested)
        if 0x0117 in table and not UID(uid).is_valid:
            raise Answer(table[0x0117], "Affected SOP Instance UID has incorrect syntax")
        if 0x0111 in table and self.uid_in_use(uid):
            raise Answer(table[0x0111], "Affected SOP Instance UID already in use")
        return uid

    def _created(
        self,
        table: StatusTable,
        warning: StatusRow | None,
        attrs: Dataset,
        uid: str,
        requested: Any,
        comment: str = "",
    ) -> Any:
        if warning is None:
            if requested is None:
                attrs.AffectedSOPInstanceUID = uid
            return (table[0x0000].code, attrs)
        status = Dataset()
        status.Status = warning.code
        status.AffectedSOPInstanceUID = uid
        if comment:
            status.ErrorComment = comment[:64]
        return (status, attrs)

    # --- Film Session ---------------------------------------------------------------------

    def _film_session_values(
        self, ds: Dataset, current: dict[str, Any] | None
    ) -> tuple[dict[str, Any], set[str], bool, list[int]]:
        values: dict[str, Any] = dict(current) if current else {}
        if current is None:
            values.update(
                NumberOfCopies=1,
                PrintPriority="LOW",
                MediumType="CURRENT",
                FilmDestination="MAGAZINE",
                FilmSessionLabel="",
            )
        questioned: set[str] = set()
        copies = ds.get("NumberOfCopies")
        if "NumberOfCopies" in ds:
            n = _int(copies) if copies not in (None, "") else None
            if n is not None and 1 <= n <= 99:
                values["NumberOfCopies"] = n
            else:
                values["NumberOfCopies"] = 1
                questioned.add("NumberOfCopies")
        for key, allowed, default in (
            ("PrintPriority", t.PRIORITIES, "LOW"),
            ("MediumType", t.MEDIUM_TYPES, "CLEAR FILM"),
            ("FilmDestination", t.FILM_DESTINATIONS, "MAGAZINE"),
        ):
            if key in ds:
                v = _str(ds, key)
                if v in allowed:
                    values[key] = v
                else:
                    values[key] = default
                    questioned.add(key)
        if "FilmSessionLabel" in ds:
            label = str(ds.get("FilmSessionLabel") or "")
            if len(label) > 64:
                label = label[:64]
                questioned.add("FilmSessionLabel")
            values["FilmSessionLabel"] = label
        memory = "MemoryAllocation" in ds
        known = {*FS_KEYS, "MemoryAllocation", "SpecificCharacterSet"}
        ignored = [int(e.tag) for e in ds if e.keyword not in known]
        return values, questioned, memory, ignored

    def _check_charset(self, ds: Dataset, table: StatusTable) -> None:
        charset = ds.get("SpecificCharacterSet", "")
        names = [charset] if isinstance(charset, str) else list(charset)
        if any(str(n).strip() not in CHARACTER_SETS for n in names):
            raise Answer(table[0x0106], "Specific Character Set not supported", [0x00080005])

    def _create_film_session(
        self, st: AssocState, ds: Dataset, uid: str, requested: Any, table: StatusTable
    ) -> Any:
        if st.session is not None:
            raise Answer(table[0x0213], "Film Session cannot be opened: one already exists")
        self._check_charset(ds, table)
        values, questioned, memory, ignored = self._film_session_values(ds, None)
        st.session = FilmSession(uid=uid, attrs=values)
        return self._answer_values(
            table, values, questioned, memory, ignored, uid=uid, requested=requested
        )

    def _answer_values(
        self,
        table: StatusTable,
        values: Mapping[str, Any],
        questioned: set[str],
        memory: bool,
        ignored: list[int],
        *,
        uid: str | None = None,
        requested: Any = None,
        extra: Dataset | None = None,
        b605: bool = False,
    ) -> Any:
        """Success or the highest-ranked warning, with the response data set it calls for."""
        warning: StatusRow | None = None
        comment = ""
        if memory:
            warning = table[0xB600]
        elif b605:
            warning = table[0xB605]
        elif questioned:
            warning = table[0x0116]
            comment = "Out of range, default applied: " + ",".join(sorted(questioned))
        elif ignored:
            warning = table[0x0107]
            comment = "Not supported, ignored: " + ",".join(f"{x:08X}" for x in ignored)
        attrs = Dataset()
        shown = questioned if warning is not None and warning.code == 0x0116 else values.keys()
        for key in shown:
            setattr(attrs, key, values[key])
        if extra is not None:
            for elem in extra:
                attrs.add(elem)
        if uid is not None:
            return self._created(table, warning, attrs, uid, requested, comment)
        if warning is None:
            return (table[0x0000].code, attrs)
        status = Dataset()
        status.Status = warning.code
        if comment:
            status.ErrorComment = comment[:64]
        if warning.code == 0x0107 and ignored:
            status.AttributeIdentifierList = [Tag(x) for x in ignored]
        return (status, attrs)

    # --- Film Box ---------------------------------------------------------------------------

    def _plut_ref(self, st: AssocState, ds: Dataset, table: StatusTable) -> str | None:
        """The P-LUT a Referenced Presentation LUT Sequence names; '' clears; None absent."""
        if "ReferencedPresentationLUTSequence" not in ds:
            return None
        seq = ds.ReferencedPresentationLUTSequence
        if not seq:
            return ""
        item = seq[0]
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        plut = st.pluts.get(uid)
        if (
            len(seq) != 1
            or str(item.get("ReferencedSOPClassUID", "")) != t.PLUT
            or plut is None
            or plut.deleted
        ):
            raise Answer(table[0x0106], "Referenced Presentation LUT unknown", [0x20500500])
        return uid

    def _film_box_values(
        self, ds: Dataset, values: dict[str, Any], keys: Iterable[str]
    ) -> tuple[set[str], bool]:
        s = self.settings
        questioned: set[str] = set()
        b605 = False
        enumerated = {
            "FilmOrientation": (t.ORIENTATIONS, "PORTRAIT"),
            "FilmSizeID": (t.FILM_SIZES, "14INX17IN"),
            "MagnificationType": (t.MAGNIFICATIONS, s.default_magnification_type),
            "AnnotationDisplayFormatID": (t.ANNOTATION_FORMATS, "NONE"),
            "BorderDensity": (t.BORDER_DENSITIES, "BLACK"),
            "Trim": (t.TRIMS, "NO"),
        }
        for key in keys:
            if key not in ds:
                continue
            if key in enumerated:
                allowed, default = enumerated[key]
                v = _str(ds, key)
                if v in allowed:
                    values[key] = v
                else:
                    values[key] = default
                    questioned.add(key)
            elif key == "MaxDensity":
                n = _int(ds.get(key))
                if n is not None and 170 <= n <= 350:
                    values[key] = n
                else:
                    values[key] = 320
                    questioned.add(key)
            elif key == "MinDensity":
                n = _int(ds.get(key))
                if n is not None and 0 <= n <= 50:
                    values[key] = n
                else:
                    values[key] = 50 if (n or 0) > 50 else 0
                    b605 = True
            elif key == "SmoothingType":
                n = _int(ds.get(key))
                if n is not None and 0 <= n <= 15:
                    values[key] = str(n)
                else:
                    values[key] = str(s.default_smoothing_type)
                    questioned.add(key)
            elif key == "Illumination":
                n = _int(ds.get(key))
                if n is not None and n > 0:
                    values[key] = n
                else:
                    values[key] = 2000
                    questioned.add(key)
            elif key == "ReflectedAmbientLight":
                n = _int(ds.get(key))
                if n is not None and n >= 0:
                    values[key] = n
                else:
                    values[key] = 10
                    questioned.add(key)
            elif key == "ConfigurationInformation":
                values[key] = str(ds.get(key) or "")
        return questioned, b605

    def _create_film_box(
        self, event: Any, st: AssocState, ds: Dataset, uid: str, requested: Any, table: StatusTable
    ) -> Any:
        s = self.settings
        if st.session is None:
            raise Answer(table[0x0213], "No Film Session on this association")
        missing = [
            tag
            for key, tag in (
                ("ImageDisplayFormat", 0x20100010),
                ("ReferencedFilmSessionSequence", 0x20100500),
            )
            if key not in ds
        ]
        if missing:
            raise Answer(table[0x0120], "Missing: " + ",".join(f"{x:08X}" for x in missing))
        if _str(ds, "ImageDisplayFormat") is None:
            raise Answer(table[0x0121], "Image Display Format has no value", [0x20100010])
        fmt = r.parse_display_format(str(ds.ImageDisplayFormat))
        if fmt is None or r.positions(fmt) > s.max_image_boxes_per_film:
            raise Answer(table[0x0106], "Image Display Format not supported", [0x20100010])
        refs = ds.ReferencedFilmSessionSequence
        if (
            len(refs) != 1
            or str(refs[0].get("ReferencedSOPClassUID", "")) != t.FILM_SESSION
            or str(refs[0].get("ReferencedSOPInstanceUID", "")) != st.session.uid
        ):
            raise Answer(table[0x0106], "Referenced Film Session is not this session")
        plut = self._plut_ref(st, ds, table) or ""
        values: dict[str, Any] = {
            "ImageDisplayFormat": str(ds.ImageDisplayFormat).strip(),
            "FilmOrientation": "PORTRAIT",
            "FilmSizeID": "CURRENT",
            "MagnificationType": s.default_magnification_type,
            "MaxDensity": s.default_max_density,
            "MinDensity": s.default_min_density,
            "AnnotationDisplayFormatID": "NONE",
            "SmoothingType": str(s.default_smoothing_type),
            "BorderDensity": "BLACK",
            "Trim": "NO",
            "Illumination": 2000,
            "ReflectedAmbientLight": 10,
            "ConfigurationInformation": "",
        }
        questioned, b605 = self._film_box_values(ds, values, FB_CREATE_KEYS)
        ignored = [int(e.tag) for e in ds if e.keyword not in FB_CREATE_KEYS]
        n = r.positions(fmt)
        image_boxes = [ImageBox(uid=str(generate_uid()), position=i + 1) for i in range(n)]
        annotation_format = values["AnnotationDisplayFormatID"]
        annotation_positions = {
            "LABEL": [0],
            "BOTTOM": list(range(1, n + 1)),
            "COMBINED": list(range(0, n + 1)),
            "NONE": [],
        }[annotation_format]
        annotation_boxes = [
            AnnotationBox(uid=str(generate_uid()), position=p) for p in annotation_positions
        ]
        film_box = FilmBox(uid, values, fmt, image_boxes, annotation_boxes, plut)
        st.session.film_boxes.append(film_box)
        st.current = film_box
        extra = Dataset()
        ref = Dataset()
        ref.ReferencedSOPClassUID = t.FILM_SESSION
        ref.ReferencedSOPInstanceUID = st.session.uid
        extra.ReferencedFilmSessionSequence = [ref]
        items = []
        for box in image_boxes:
            item = Dataset()
            item.ReferencedSOPClassUID = t.IMAGE_BOX
            item.ReferencedSOPInstanceUID = box.uid
            items.append(item)
        extra.ReferencedImageBoxSequence = items
        if annotation_boxes and self._negotiated(event.assoc, t.ANNOTATION_BOX):
            annotations = []
            for abox in annotation_boxes:
                item = Dataset()
                item.ReferencedSOPClassUID = t.ANNOTATION_BOX
                item.ReferencedSOPInstanceUID = abox.uid
                annotations.append(item)
            extra.ReferencedBasicAnnotationBoxSequence = annotations
        if plut:
            extra.ReferencedPresentationLUTSequence = ds.ReferencedPresentationLUTSequence
        return self._answer_values(
            table,
            values,
            questioned,
            False,
            ignored,
            uid=uid,
            requested=requested,
            extra=extra,
            b605=b605,
        )

    @staticmethod
    def _negotiated(assoc: Any, sop_class: str) -> bool:
        return any(str(cx.abstract_syntax) == sop_class for cx in assoc.accepted_contexts)

    # --- N-SET ------------------------------------------------------------------------------

    def handle_n_set(self, event: Any, table: StatusTable) -> Any:
        cls = str(event.request.RequestedSOPClassUID)
        uid = str(event.request.RequestedSOPInstanceUID)
        st = self.state(event.assoc)

        def run() -> Any:
            ds = self.decoded(event, "modification_list", table)
            if cls == t.FILM_SESSION:
                return self._set_film_session(st, ds, uid, table)
            if cls == t.FILM_BOX:
                return self._set_film_box(st, ds, uid, table)
            if cls == t.IMAGE_BOX:
                return self._set_image_box(st, ds, uid, table)
            if cls == t.ANNOTATION_BOX:
                return self._set_annotation(st, ds, uid, table)
            raise Answer(table[0x0112], "No such object instance")

        return self.dispatch(table, run, event.assoc)

    def _set_film_session(self, st: AssocState, ds: Dataset, uid: str, table: StatusTable) -> Any:
        if st.session is None or st.session.uid != uid:
            raise Answer(table[0x0112], "No such Film Session")
        self._check_charset(ds, table)
        values, questioned, memory, ignored = self._film_session_values(ds, st.session.attrs)
        st.session.attrs = values
        return self._answer_values(table, values, questioned, memory, ignored)

    def _set_film_box(self, st: AssocState, ds: Dataset, uid: str, table: StatusTable) -> Any:
        box = st.current
        if box is None or box.uid != uid:
            raise Answer(table[0x0112], "Not the last-created Film Box")
        plut = self._plut_ref(st, ds, table)
        values = dict(box.attrs)
        questioned, clamped = self._film_box_values(ds, values, FB_SET_KEYS)
        if clamped:
            questioned.add("MinDensity")
        ignored = [int(e.tag) for e in ds if e.keyword not in FB_SET_KEYS]
        box.attrs = values
        if plut is not None:
            box.plut = plut
        shown = {k: values[k] for k in FB_SET_KEYS if k in values}
        return self._answer_values(table, shown, questioned, False, ignored)

    def _set_annotation(self, st: AssocState, ds: Dataset, uid: str, table: StatusTable) -> Any:
        box = next(
            (a for a in (st.current.annotation_boxes if st.current else []) if a.uid == uid), None
        )
        if box is None:
            raise Answer(table[0x0112], "No such Annotation Box")
        if "AnnotationPosition" not in ds:
            raise Answer(table[0x0120], "Annotation Position missing", [0x20300010])
        if _int(ds.get("AnnotationPosition")) != box.position:
            raise Answer(table[0x0106], "Annotation Position is not this box's", [0x20300010])
        raw = ds.get("TextString") or ""
        # LO allows a backslash, which pydicom reads as a value separator: print it as sent.
        text = "\\".join(map(str, raw)) if isinstance(raw, MultiValue) else str(raw)
        questioned: set[str] = set()
        if len(text) > 64:
            text = text[:64]
            questioned.add("TextString")
        box.text = text
        values = {"AnnotationPosition": box.position, "TextString": text}
        return self._answer_values(table, values, questioned, False, [])

    def _film_geometry(self, box: FilmBox) -> tuple[str, str]:
        size = box.attrs["FilmSizeID"]
        if size == "CURRENT":
            size = self.settings.loaded_film_size
        return size, box.attrs["FilmOrientation"]

    def box_pixels(self, box: FilmBox, position: int) -> tuple[int, int]:
        """Size (columns, rows) of image box ``position`` in printer pixels."""
        size, orientation = self._film_geometry(box)
        w, h = r.film_matrix(size, orientation)
        rect = r.cells(box.fmt, 0, 0, w, h)[position - 1]
        return rect[2], rect[3]

    def _set_image_box(self, st: AssocState, ds: Dataset, uid: str, table: StatusTable) -> Any:
        film = st.current
        box = next((b for b in (film.image_boxes if film else []) if b.uid == uid), None)
        if box is None or film is None:
            raise Answer(table[0x0112], "No such Image Box in the last-created Film Box")
        if "ImageBoxPosition" not in ds:
            raise Answer(table[0x0120], "Image Box Position missing", [0x20200010])
        if _str(ds, "ImageBoxPosition") is None:
            raise Answer(table[0x0121], "Image Box Position has no value", [0x20200010])
        if _int(ds.ImageBoxPosition) != box.position:
            raise Answer(table[0x0106], "Image Box Position is not this box's", [0x20200010])
        if "BasicGrayscaleImageSequence" not in ds:
            raise Answer(table[0x0120], "Basic Grayscale Image Sequence missing", [0x20200110])
        polarity = _str(ds, "Polarity") or "NORMAL"
        if polarity not in t.POLARITIES:
            raise Answer(table[0x0106], "Polarity invalid", [0x20200020])
        plut_uid = self._plut_ref(st, ds, table)
        questioned: set[str] = set()
        magnification = ""
        if "MagnificationType" in ds:
            magnification = _str(ds, "MagnificationType") or ""
            if magnification not in t.MAGNIFICATIONS:
                magnification = ""
                questioned.add("MagnificationType")
        smoothing = 0
        if "SmoothingType" in ds:
            n = _int(ds.get("SmoothingType"))
            if n is not None and 0 <= n <= 15:
                smoothing = n
            else:
                questioned.add("SmoothingType")
        size, orientation = self._film_geometry(film)
        requested_mm: float | None = None
        if "RequestedImageSize" in ds:
            try:
                requested_mm = float(ds.RequestedImageSize)
            except (TypeError, ValueError):
                requested_mm = None
            cols, _rows = r.film_matrix(size, orientation)
            width_mm = cols * r.pixel_spacing_mm(size, orientation)[1]
            if requested_mm is None or not 0 < requested_mm <= width_mm:
                requested_mm = None
                questioned.add("RequestedImageSize")
        seq = ds.BasicGrayscaleImageSequence
        if len(seq) > 1:
            raise Answer(table[0x0106], "More than one image item", [0x20200110])
        image: r.ImageSpec | None = None
        attrs: dict[str, Any] = {"ImageBoxPosition": box.position, "Polarity": polarity}
        warn: StatusRow | None = None
        if len(seq) == 1:
            item = seq[0]
            missing = [int(Tag(k)) for k in PIXEL_KEYS if k not in item or item[k].is_empty]
            if missing:
                raise Answer(table[0x0120], "Pixel attributes missing", missing)
            aspect = (1, 1)
            if "PixelAspectRatio" in item:
                par = [_int(v) for v in (item.PixelAspectRatio or [])]
                if len(par) == 2 and all(p is not None and 0 < p < 32768 for p in par):
                    aspect = (int(par[0] or 1), int(par[1] or 1))
                else:
                    questioned.add("PixelAspectRatio")
            rows, cols = int(item.Rows), int(item.Columns)
            alloc, stored, high = int(item.BitsAllocated), int(item.BitsStored), int(item.HighBit)
            rep = int(item.PixelRepresentation)
            photometric = str(item.PhotometricInterpretation).strip()
            pixel = bytes(item.PixelData)
            if (
                int(item.SamplesPerPixel) != 1
                or photometric not in ("MONOCHROME1", "MONOCHROME2")
                or alloc not in (8, 16)
                or not 8 <= stored <= alloc
                or high != stored - 1
                or rep not in (0, 1)
                or rows < 1
                or cols < 1
                or len(pixel) < rows * cols * alloc // 8
                or len(pixel) > rows * cols * alloc // 8 + 1
            ):
                raise Answer(table[0x0106], "Pixel attributes invalid", [0x20200110])
            film_cols, film_rows = r.film_matrix(size, orientation)
            if cols > film_cols or rows > film_rows:
                raise Answer(table[0xC603], "Image larger than the film's printable matrix")
            if plut_uid:
                plut = st.pluts[plut_uid]
                if plut.entries is not None and plut.entries != 1 << stored:
                    raise Answer(
                        table[0x0106], "P-LUT entries do not match Bits Stored", [0x20500500]
                    )
            values = _decode(pixel, rows * cols, alloc, stored, rep)
            image = r.ImageSpec(
                position=box.position,
                rows=rows,
                columns=cols,
                bits_stored=stored,
                signed=rep == 1,
                values=values,
                monochrome1=photometric == "MONOCHROME1",
                polarity=polarity,
                magnification=magnification,
                smoothing=smoothing,
                aspect=aspect,
                requested_size_mm=requested_mm,
            )
            too_big = r.oversize(cols, rows, self.box_pixels(film, box.position))
            policy = self.settings.oversize_policy
            if too_big and policy == "FAIL":
                raise Answer(table[0xC603], "Image larger than its Image Box")
            if too_big:
                warn = table[{"DEMAGNIFY": 0xB604, "CROP": 0xB609, "DECIMATE": 0xB60A}[policy]]
            box.oversize = too_big
        box.image = image
        if plut_uid is not None:
            box.plut = plut_uid
        if magnification:
            attrs["MagnificationType"] = magnification
        if "SmoothingType" in ds:
            attrs["SmoothingType"] = str(smoothing)
        box.attrs = attrs
        if warn is not None:
            status = Dataset()
            status.Status = warn.code
            out = Dataset()
            for key, value in attrs.items():
                setattr(out, key, value)
            return (status, out)
        if questioned:
            status = Dataset()
            status.Status = table[0x0116].code
            status.ErrorComment = ("Out of range: " + ",".join(sorted(questioned)))[:64]
            out = Dataset()
            for key in questioned:
                if key in attrs:
                    setattr(out, key, attrs[key])
            return (status, out)
        out = Dataset()
        for key, value in attrs.items():
            setattr(out, key, value)
        return (table[0x0000].code, out)

    # --- Presentation LUT ------------------------------------------------------------------

    def _create_plut(
        self, st: AssocState, ds: Dataset, uid: str, requested: Any, table: StatusTable
    ) -> Any:
        has_seq = "PresentationLUTSequence" in ds
        has_shape = "PresentationLUTShape" in ds
        if has_seq and has_shape:
            raise Answer(table[0x0106], "Send both Presentation LUT and Presentation LUT Shape")
        if not has_seq and not has_shape:
            raise Answer(table[0x0120], "Neither Presentation LUT nor Presentation LUT Shape")
        if has_shape:
            shape = _str(ds, "PresentationLUTShape") or ""
            if shape not in t.LUT_SHAPES:
                raise Answer(table[0x0106], "Invalid Presentation LUT Shape value")
            st.pluts[uid] = PLut(uid, r.Lut(shape=shape), None)
        else:
            seq = ds.PresentationLUTSequence
            if len(seq) != 1:
                raise Answer(table[0x0106], "Presentation LUT Sequence must hold one item")
            item = seq[0]
            if "LUTDescriptor" not in item or "LUTData" not in item:
                raise Answer(table[0x0120], "LUT Descriptor or LUT Data missing")
            desc = [int(v) for v in item.LUTDescriptor]
            data = item["LUTData"].value
            if isinstance(data, bytes | bytearray):
                values = [int.from_bytes(data[i : i + 2], "little") for i in range(0, len(data), 2)]
            else:
                values = [int(v) for v in (data if isinstance(data, list | tuple) else [data])]
            entries = desc[0] if len(desc) == 3 and desc[0] else 65536
            if (
                len(desc) != 3
                or entries not in {1 << k for k in range(8, 17)}
                or desc[1] != 0
                or not 10 <= desc[2] <= 16
                or len(values) != entries
                or any(v < 0 or v > (1 << desc[2]) - 1 for v in values)
            ):
                raise Answer(table[0x0106], "Invalid LUT Descriptor values")
            st.pluts[uid] = PLut(uid, r.Lut(data=tuple(values), bits=desc[2]), entries)
        return self._created(table, None, Dataset(), uid, requested)

    # --- N-DELETE ---------------------------------------------------------------------------

    def handle_n_delete(self, event: Any, table: StatusTable) -> Any:
        cls = str(event.request.RequestedSOPClassUID)
        uid = str(event.request.RequestedSOPInstanceUID)
        st = self.state(event.assoc)

        def run() -> Any:
            if cls == t.PLUT:
                plut = st.pluts.get(uid)
                if plut is None or plut.deleted:
                    raise Answer(table[0x0112], "No such Presentation LUT")
                plut.deleted = True
                return table[0x0000].code
            if cls == t.FILM_SESSION and st.session is not None and st.session.uid == uid:
                st.session = None
                st.current = None
                return table[0x0000].code
            if cls == t.FILM_BOX and st.current is not None and st.current.uid == uid:
                assert st.session is not None
                st.session.film_boxes.remove(st.current)
                st.current = None
                return table[0x0000].code
            raise Answer(table[0x0112], "No such object instance")

        return self.dispatch(table, run, event.assoc)

    # --- N-GET ------------------------------------------------------------------------------

    def handle_n_get(self, event: Any, table: StatusTable) -> Any:
        cls = str(event.request.RequestedSOPClassUID)
        uid = str(event.request.RequestedSOPInstanceUID)
        raw = event.request.AttributeIdentifierList or []
        requested = [int(tag) for tag in (raw if isinstance(raw, list) else [raw])]

        def run() -> Any:
            if cls == t.PRINTER and uid == t.PRINTER_INSTANCE:
                return self._get_answer(table, self.printer_attributes(), requested)
            if cls == t.CONFIGURATION and uid == t.CONFIGURATION_INSTANCE:
                return self._get_answer(table, self.configuration(), requested)
            if cls == t.PRINT_JOB:
                ds = self.job_attributes(uid)
                if ds is not None:
                    return self._get_answer(table, ds, requested)
            raise Answer(table[0x0112], "No such object instance")

        return self.dispatch(table, run, event.assoc)

    @staticmethod
    def _get_answer(table: StatusTable, ds: Dataset, requested: list[int]) -> Any:
        if not requested:
            return (table[0x0000].code, ds)
        out = Dataset()
        unknown = []
        for tag in requested:
            if tag in ds:
                out.add(ds[tag])
            else:
                unknown.append(tag)
        if not unknown:
            return (table[0x0000].code, out)
        status = Dataset()
        status.Status = table[0x0107].code
        status.AttributeIdentifierList = [Tag(x) for x in unknown]
        return (status, out)

    def printer_attributes(self) -> Dataset:
        s = self.settings
        with self.ctx.db.read() as session:
            status, info = q.printer_state(session)
        ds = Dataset()
        ds.PrinterStatus = status
        ds.PrinterStatusInfo = info
        ds.PrinterName = s.printer_name
        ds.Manufacturer = s.manufacturer
        ds.ManufacturerModelName = s.model_name
        ds.DeviceSerialNumber = s.serial_number
        ds.SoftwareVersions = s.software_version
        return ds

    def configuration(self) -> Dataset:
        s = self.settings
        item = Dataset()
        item.SOPClassesSupported = [
            t.META,
            t.FILM_SESSION,
            t.FILM_BOX,
            t.IMAGE_BOX,
            t.PRINTER,
            t.PLUT,
            t.CONFIGURATION,
            t.PRINT_JOB,
            t.ANNOTATION_BOX,
        ]
        item.MaximumMemoryAllocation = s.max_memory_allocation_kb
        item.MemoryBitDepth = 16
        item.PrintingBitDepth = s.printing_bit_depth
        medium = Dataset()
        medium.ItemNumber = 1
        medium.MediumType = s.loaded_medium
        medium.FilmSizeID = s.loaded_film_size
        medium.MinDensity = s.default_min_density
        medium.MaxDensity = 350
        item.MediaInstalledSequence = [medium]
        formats = []
        for size in ("8INX10IN", "11INX14IN", "14INX17IN"):
            for orientation in t.ORIENTATIONS:
                f = Dataset()
                cols, rows = r.film_matrix(size, orientation)
                f.Rows = rows
                f.Columns = cols
                f.ImageDisplayFormat = "STANDARD\\C,R"
                f.FilmOrientation = orientation
                f.FilmSizeID = size
                f.PrinterResolutionID = "STANDARD"
                f.PrinterPixelSpacing = [f"{v:.4f}" for v in r.pixel_spacing_mm(size, orientation)]
                f.RequestedImageSizeFlag = "YES"
                formats.append(f)
        item.SupportedImageDisplayFormatsSequence = formats
        item.OtherMediaAvailableSequence = []
        item.DefaultPrinterResolutionID = "STANDARD"
        item.DefaultMagnificationType = s.default_magnification_type
        item.OtherMagnificationTypesAvailable = [
            m for m in t.MAGNIFICATIONS if m != s.default_magnification_type
        ]
        item.DefaultSmoothingType = str(s.default_smoothing_type)
        item.OtherSmoothingTypesAvailable = [
            str(n) for n in range(16) if n != s.default_smoothing_type
        ]
        item.ConfigurationInformationDescription = "Accepted and stored; printed as identity"
        item.MaximumCollatedFilms = s.max_collated_films
        item.DecimateCropResult = {"CROP": "CROP", "FAIL": "FAIL"}.get(
            s.oversize_policy, "DECIMATE"
        )
        item.Manufacturer = s.manufacturer
        item.ManufacturerModelName = s.model_name
        item.PrinterName = s.printer_name
        ds = Dataset()
        ds.PrinterConfigurationSequence = [item]
        return ds

    def job_attributes(self, uid: str) -> Dataset | None:
        with self.ctx.db.read() as session:
            job = q.job_by_uid(session, uid)
            if job is None or not q.job_visible(job, self.settings.job_retention_s):
                return None
            ds = Dataset()
            ds.ExecutionStatus = job.state.value
            ds.ExecutionStatusInfo = job.status_info
            ds.PrintPriority = job.priority
            ds.PrinterName = self.settings.printer_name
            ds.Originator = job.originator
            ds.CreationDate = job.created_at.strftime("%Y%m%d")
            ds.CreationTime = job.created_at.strftime("%H%M%S")
            return ds

    # --- N-ACTION ---------------------------------------------------------------------------

    def handle_n_action(self, event: Any, table: StatusTable) -> Any:
        cls = str(event.request.RequestedSOPClassUID)
        uid = str(event.request.RequestedSOPInstanceUID)
        st = self.state(event.assoc)

        def run() -> Any:
            if cls == t.FILM_SESSION and st.session is not None and st.session.uid == uid:
                boxes = list(st.session.film_boxes)
                source = "FILM SESSION"
            elif cls == t.FILM_BOX and st.current is not None and st.current.uid == uid:
                boxes = [st.current]
                source = "FILM BOX"
            else:
                raise Answer(table[0x0112], "No such object instance")
            if event.action_type != 1:
                raise Answer(table[0x0211], "Action Type ID is not 1 (PRINT)")
            if not boxes:
                raise Answer(table[0xC600], "Film Session holds no Film Box")
            if source == "FILM SESSION" and len(boxes) > self.settings.max_collated_films:
                raise Answer(table[0x0213], "More film boxes than maximum collated films")
            for box in boxes:
                for ibox in box.image_boxes:
                    if ibox.image is not None and ibox.image.requested_size_mm:
                        size, orientation = self._film_geometry(box)
                        spacing = r.pixel_spacing_mm(size, orientation)[1]
                        if (
                            ibox.image.requested_size_mm
                            > self.box_pixels(box, ibox.position)[0] * spacing
                        ):
                            raise Answer(table[0xC613], "Requested Image Size wider than box")
            with self.ctx.db.read() as session:
                queued = q.unfinished_jobs(session)
            if queued >= self.settings.max_queued_jobs:
                code = 0xC601 if source == "FILM SESSION" else 0xC602
                raise Answer(table[code], "Print queue is full")
            printable = [b for b in boxes if any(i.image is not None for i in b.image_boxes)]
            warning: StatusRow | None = None
            if len(printable) < len(boxes):
                warning = table[0xB602 if source == "FILM SESSION" else 0xB603]
            elif any(i.oversize for b in printable for i in b.image_boxes if i.image):
                policy = self.settings.oversize_policy
                warning = table[{"DEMAGNIFY": 0xB604, "CROP": 0xB609, "DECIMATE": 0xB60A}[policy]]
            if not printable:
                assert warning is not None
                return (warning.code, None)
            assert st.session is not None
            films = [self.film_spec(st, b) for b in printable]
            job_uid = self.submit(event.assoc, st, films, source)
            reply = Dataset()
            ref = Dataset()
            ref.ReferencedSOPClassUID = t.PRINT_JOB
            ref.ReferencedSOPInstanceUID = job_uid
            reply.ReferencedPrintJobSequencePullStoredPrint = [ref]
            return ((warning or table[0x0000]).code, reply)

        return self.dispatch(table, run, event.assoc)

    def film_spec(self, st: AssocState, box: FilmBox) -> r.FilmSpec:
        size, orientation = self._film_geometry(box)
        a = box.attrs
        tone = r.Tone(
            d_min=a["MinDensity"] / 100,
            d_max=a["MaxDensity"] / 100,
            illumination=float(a["Illumination"]),
            ambient=float(a["ReflectedAmbientLight"]),
            printing_bits=self.settings.printing_bit_depth,
        )
        film_lut = st.pluts[box.plut].lut if box.plut in st.pluts else None
        images = {}
        for ibox in box.image_boxes:
            if ibox.image is None:
                continue
            image = copy.copy(ibox.image)
            image.lut = st.pluts[ibox.plut].lut if ibox.plut in st.pluts else None
            images[ibox.position] = image
        annotations = {a_.position: a_.text for a_ in box.annotation_boxes if a_.text}
        assert st.session is not None
        return r.FilmSpec(
            film_box_uid=box.uid,
            display_format=a["ImageDisplayFormat"],
            orientation=orientation,
            film_size=size,
            magnification=a["MagnificationType"],
            smoothing=int(a["SmoothingType"]),
            border_density=a["BorderDensity"],
            trim=a["Trim"],
            tone=tone,
            annotation_format=a["AnnotationDisplayFormatID"],
            lut=film_lut,
            images=images,
            annotations=annotations,
            attributes={**{k: v for k, v in a.items()}, "FilmSession": dict(st.session.attrs)},
        )

    def submit(self, assoc: Any, st: AssocState, films: list[r.FilmSpec], source: str) -> str:
        """Queue a print job holding copies of ``films``; one transaction."""
        assert st.session is not None
        job_uid = str(generate_uid())
        attrs = st.session.attrs
        with self.ctx.db.write() as session:
            job = q.add_job(
                session,
                PrintJob(
                    job_uid=job_uid,
                    job_number="",
                    state=PrintJobState.PENDING,
                    status_info="QUEUED",
                    priority=attrs["PrintPriority"],
                    originator=st.calling_ae,
                    called_ae=st.called_ae,
                    film_session_uid=st.session.uid,
                    film_session_label=attrs["FilmSessionLabel"],
                    source=source,
                    copies=int(attrs["NumberOfCopies"]),
                ),
            )
            pk = job.id
            number = job.job_number
        logs.assoc_logger(assoc).info(
            "print_job_queued", job_uid=job_uid, job_number=number, films=len(films)
        )
        if self.worker is not None:
            self.worker.enqueue(pk, films, assoc if self._negotiated(assoc, t.PRINT_JOB) else None)
        return job_uid


def _decode(pixel: bytes, count: int, alloc: int, stored: int, signed: int) -> array[int]:
    """Stored values 0 .. 2^stored - 1 (signed data offset by 2^(stored-1)), two bytes each.

    Whole-buffer operations only: a film's N-SETs must not hold the interpreter for
    seconds (the print queue renders the previous film meanwhile).
    """
    mask = (1 << stored) - 1
    # Masking, and for signed data the offset: (v & mask) ^ 2^(stored-1) equals
    # (v & mask) - 2^stored + 2^(stored-1) when the sign bit is set, else v + 2^(stored-1).
    flip = 1 << (stored - 1) if signed else 0
    if alloc == 8:
        raw = pixel[:count]
        if mask != 0xFF or flip:
            raw = raw.translate(_byte_table(mask, flip))
        pairs = bytearray(2 * len(raw))
        pairs[0::2] = raw  # each value as a little-endian pair with a zero high byte
        raw = bytes(pairs)
    else:
        # Little-endian pairs: AND and XOR act on each byte alone, so bytes.translate
        # does both halves; a value above the mask shows as a high byte above its mask.
        raw = pixel[: count * 2]
        high = raw[1::2]
        if flip or high.translate(None, bytes(range((mask >> 8) + 1))):
            pairs = bytearray(raw)
            pairs[0::2] = raw[0::2].translate(_byte_table(mask & 0xFF, flip & 0xFF))
            pairs[1::2] = high.translate(_byte_table(mask >> 8, flip >> 8))
            raw = bytes(pairs)
    values = array("H")
    values.frombytes(raw)
    if sys.byteorder != "little":
        values.byteswap()
    return values


def _byte_table(mask: int, flip: int) -> bytes:
    return bytes((v & mask) ^ flip for v in range(256))


def handler_map(server: PrintServer, statuses: Mapping[str, StatusTable]) -> dict[Any, Any]:
    """The intervention handlers of one declaration, bound to its status tables."""
    out: dict[Any, Any] = {}
    events = {
        "N-CREATE": (evt.EVT_N_CREATE, server.handle_n_create),
        "N-SET": (evt.EVT_N_SET, server.handle_n_set),
        "N-GET": (evt.EVT_N_GET, server.handle_n_get),
        "N-ACTION": (evt.EVT_N_ACTION, server.handle_n_action),
        "N-DELETE": (evt.EVT_N_DELETE, server.handle_n_delete),
    }
    for operation, table in statuses.items():
        event_type, method = events[operation]

        def handler(event: Any, _m: Any = method, _t: StatusTable = table) -> Any:
            return _m(event, _t)

        out[event_type] = handler
    return out

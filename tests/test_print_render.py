"""What the virtual printer puts on film, read back pixel by pixel; whole sessions; events."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from db.queries import print as q
from servers.print import tables as t
from servers.print.render import optical_density
from tests.print_helpers import (
    Scu,
    film_images,
    image_box_set,
    image_item,
    lut_item,
    print_scu,
    ramp,
    wait_job,
)

SCALE = {"services": {"print": {"render_scale": 0.125}}}
DMIN, DMAX = 0.20, 3.20  # defaults: Min Density 20, Max Density 320


@pytest.fixture
def printer(make_suite: Any) -> Any:
    return make_suite(SCALE)


def _print_one(
    suite: Any, scu: Scu, item: Dataset, film: dict[str, Any] | None = None, **box: Any
) -> tuple[Any, dict[str, Any]]:
    fs = scu.session()
    status, attrs, fb = scu.film_box(
        fs, "STANDARD\\1,1", MagnificationType="REPLICATE", **(film or {})
    )
    assert status.Status == 0
    ib = attrs.ReferencedImageBoxSequence[0].ReferencedSOPInstanceUID
    assert scu.set(t.IMAGE_BOX, ib, image_box_set(1, item, **box))[0].Status == 0
    status, reply = scu.action(t.FILM_BOX, fb)
    assert status.Status == 0
    job = wait_job(
        suite, reply.ReferencedPrintJobSequencePullStoredPrint[0].ReferencedSOPInstanceUID
    )
    assert job.state.value == "DONE"
    _view, _dens, side = film_images(suite, job)
    return job, json.loads(side.read_text())


def _row_densities(suite: Any, job: Any, sidecar: dict[str, Any]) -> tuple[list[float], list[int]]:
    view, dens, _ = film_images(suite, job)
    x, y, w, h = sidecar["placements"][0]["image"]
    mid = y + h // 2
    return (
        [dens.getpixel((x + i, mid)) / 1000 for i in range(w)],
        [view.getpixel((x + i, mid)) for i in range(w)],
    )


def test_identity_ramp_lands_centred_and_follows_the_gsdf(printer):
    with print_scu(printer, contexts=(t.META,)) as scu:
        job, side = _print_one(printer, scu, image_item(1, 256, ramp(8, 256)))
    _x, y, w, h = side["placements"][0]["image"]
    assert (side["width"], side["height"]) == (512, 640)
    assert w == 512 and h == 2 and y == (640 - 2) // 2  # 256 px scaled to the 512 px box
    dens, view = _row_densities(printer, job, side)
    assert dens[0] == pytest.approx(DMAX, abs=0.002)
    assert dens[-1] == pytest.approx(DMIN, abs=0.002)
    expected = optical_density(128, 255, 2000, 10, DMIN, DMAX)
    assert dens[256] == pytest.approx(expected, abs=0.003)  # pixel 128 replicated twice
    # The view is linear in JND index: an IDENTITY print looks like its input.
    assert view[0] == 0 and view[-1] == 255 and abs(view[256] - 128) <= 1
    # Border is BLACK (Max Density) around the image.
    _v, dmap, _ = film_images(printer, job)
    assert dmap.getpixel((5, 5)) == round(DMAX * 1000)


def test_reverse_polarity_inverts(printer):
    with print_scu(printer, contexts=(t.META,)) as scu:
        job, side = _print_one(printer, scu, image_item(1, 256, ramp(8, 256)), Polarity="REVERSE")
    dens, _ = _row_densities(printer, job, side)
    assert dens[0] == pytest.approx(DMIN, abs=0.002)
    assert dens[-1] == pytest.approx(DMAX, abs=0.002)


def test_lin_od_is_linear_in_density(printer):
    with print_scu(printer, contexts=(t.META, t.PLUT)) as scu:
        plut = str(generate_uid())
        lin = Dataset()
        lin.PresentationLUTShape = "LIN OD"
        assert scu.create(t.PLUT, lin, plut)[0].Status == 0
        ref = Dataset()
        ref.ReferencedSOPClassUID = t.PLUT
        ref.ReferencedSOPInstanceUID = plut
        job, side = _print_one(
            printer,
            scu,
            image_item(1, 4096, ramp(12, 4096), bits=12),
            film={"ReferencedPresentationLUTSequence": [ref]},
        )
    dens, _ = _row_densities(printer, job, side)
    # 4096 columns demagnified to 512: nearest samples; density falls linearly.
    for i in (0, 128, 256, 384, 511):
        v = dens[i]
        frac = (DMAX - v) / (DMAX - DMIN)
        assert 0 <= frac <= 1
    assert dens[0] == pytest.approx(DMAX, abs=0.01)
    assert dens[256] == pytest.approx((DMAX + DMIN) / 2, abs=0.01)


def test_explicit_lut_maps_p_values(printer):
    with print_scu(printer, contexts=(t.META, t.PLUT)) as scu:
        plut = str(generate_uid())
        inverted = Dataset()
        inverted.PresentationLUTSequence = [lut_item(256, 12, [4095 - i * 16 for i in range(256)])]
        assert scu.create(t.PLUT, inverted, plut)[0].Status == 0
        ref = Dataset()
        ref.ReferencedSOPClassUID = t.PLUT
        ref.ReferencedSOPInstanceUID = plut
        job, side = _print_one(
            printer,
            scu,
            image_item(1, 256, ramp(8, 256)),
            ReferencedPresentationLUTSequence=[ref],
        )
    dens, _ = _row_densities(printer, job, side)
    assert dens[0] == pytest.approx(DMIN, abs=0.002)  # P = 4095: lightest
    p_last = 4095 - 255 * 16
    assert dens[-1] == pytest.approx(optical_density(p_last, 4095, 2000, 10, DMIN, DMAX), abs=0.003)


def test_whole_session_every_format_8_and_12_bit_annotations_events(printer):
    formats = ["STANDARD\\2,1", "ROW\\1,2", "COL\\2,1"]
    with print_scu(printer) as scu:
        fs = scu.session(NumberOfCopies=2, FilmSessionLabel="WHOLE")
        plut = str(generate_uid())
        shape = Dataset()
        shape.PresentationLUTShape = "IDENTITY"
        assert scu.create(t.PLUT, shape, plut)[0].Status == 0
        for fmt in formats:
            status, attrs, _fb = scu.film_box(
                fs, fmt, AnnotationDisplayFormatID="COMBINED", Trim="YES", BorderDensity="WHITE"
            )
            assert status.Status == 0
            boxes = [i.ReferencedSOPInstanceUID for i in attrs.ReferencedImageBoxSequence]
            item8 = image_item(16, 16, [200] * 256)
            item12 = image_item(16, 16, [4095] * 256, bits=12)
            assert scu.set(t.IMAGE_BOX, boxes[0], image_box_set(1, item8))[0].Status == 0
            assert scu.set(t.IMAGE_BOX, boxes[1], image_box_set(2, item12))[0].Status == 0
            notes = [i.ReferencedSOPInstanceUID for i in attrs.ReferencedBasicAnnotationBoxSequence]
            label = Dataset()
            label.SpecificCharacterSet = "ISO_IR 144"
            label.AnnotationPosition = 0
            label.TextString = f"Film {fmt} Пример"
            assert scu.set(t.ANNOTATION_BOX, notes[0], label)[0].Status == 0
        status, reply = scu.action(t.FILM_SESSION, fs)
        assert status.Status == 0
        job_uid = reply.ReferencedPrintJobSequencePullStoredPrint[0].ReferencedSOPInstanceUID
        done = scu.wait_event(lambda e: e[0] == 3 and e[1] == t.PRINT_JOB)
        assert done[2].ExecutionStatusInfo == "NORMAL" and done[2].FilmSessionLabel == "WHOLE"
        status, attrs = scu.get(t.PRINT_JOB, job_uid)
        assert status.Status == 0 and attrs.ExecutionStatus == "DONE"
    job = wait_job(printer, job_uid)
    assert [f.sheet for f in job.films] == [1, 2, 3, 4, 5, 6]
    assert [f.display_format for f in job.films] == formats * 2  # collated copies
    assert (printer.config.data_dir / "films" / job.pdf_path).read_bytes()[:5] == b"%PDF-"
    for sheet, fmt in enumerate(formats, start=1):
        _view, dens, side_path = film_images(printer, job, sheet)
        side = json.loads(side_path.read_text())
        assert side["annotations"] == {"0": f"Film {fmt} Пример"}  # the backslash kept
        p1, p2 = side["placements"]
        if fmt.startswith("STANDARD"):
            assert p1["box"][0] < p2["box"][0] and p1["box"][1] == p2["box"][1]
        elif fmt.startswith("ROW"):
            assert p1["box"][1] < p2["box"][1]  # row 1 holds position 1
        else:
            # Column 1 holds two boxes, numbered top to bottom.
            assert p1["box"][0] == p2["box"][0] and p1["box"][1] < p2["box"][1]
        x, y, w, h = p2["image"]
        assert dens.getpixel((x + w // 2, y + h // 2)) == round(DMIN * 1000)  # 4095 at 12 bits
        # Trim: a frame at the opposite of the WHITE border, i.e. Max Density.
        assert dens.getpixel((x + w // 2, y - 1)) == round(DMAX * 1000)
        assert dens.getpixel((1, side["height"] - 2)) == round(DMIN * 1000)  # white border
    with printer.db.read() as session:
        assert len(q.list_jobs(session)) == 1


def test_printer_status_events_and_held_jobs(make_suite):
    suite = make_suite(
        {"services": {"print": {"render_scale": 0.125, "retry_count": 0, "printer_poll_s": 0.05}}}
    )
    with print_scu(suite, contexts=(t.META, t.PRINT_JOB)) as scu:
        with suite.db.write() as session:
            q.set_printer_state(session, "FAILURE", "PRINTER DOWN")
        event = scu.wait_event(lambda e: e[1] == t.PRINTER)
        assert event[0] == 3 and event[2].PrinterStatusInfo == "PRINTER DOWN"
        _status, attrs = scu.get(t.PRINTER, t.PRINTER_INSTANCE)
        assert attrs.PrinterStatus == "FAILURE" and attrs.PrinterStatusInfo == "PRINTER DOWN"
        fs = scu.session()
        _s, attrs, fb = scu.film_box(fs)
        ib = attrs.ReferencedImageBoxSequence[0].ReferencedSOPInstanceUID
        scu.set(t.IMAGE_BOX, ib, image_box_set(1, image_item(1, 1, [5])))
        _status, _reply = scu.action(t.FILM_BOX, fb)
        failed = scu.wait_event(lambda e: e[0] == 4 and e[1] == t.PRINT_JOB)
        assert failed[2].ExecutionStatusInfo == "UNKNOWN"
        with suite.db.write() as session:
            q.set_printer_state(session, "NORMAL", "NORMAL")
        normal = scu.wait_event(lambda e: e[1] == t.PRINTER and e[0] == 1)
        assert normal[2] is None or len(normal[2]) == 0


def test_abort_midway_leaves_no_job_and_server_keeps_serving(printer):
    with print_scu(printer, contexts=(t.META,)) as scu:
        fs = scu.session()
        _s, attrs, _fb = scu.film_box(fs)
        ib = attrs.ReferencedImageBoxSequence[0].ReferencedSOPInstanceUID
        scu.set(t.IMAGE_BOX, ib, image_box_set(1, image_item(1, 1, [5])))
        scu.assoc.abort()
    with printer.db.read() as session:
        assert q.list_jobs(session) == []
    with print_scu(printer, contexts=(t.META,)) as scu:
        fs2 = scu.session()
        assert scu.film_box(fs2)[0].Status == 0
        # The aborted association's session is gone.
        assert scu.action(t.FILM_SESSION, fs)[0].Status == 0x0112

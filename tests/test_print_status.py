"""Every declared print status row, provoked over a real association with the exact code."""

from __future__ import annotations

import time
from io import BytesIO
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom.dimse_primitives import N_CREATE, N_SET
from pynetdicom.dsutils import encode

from servers.print import tables as t
from tests.print_helpers import Scu, image_box_set, image_item, lut_item, print_scu


def _fb(scu: Scu, fmt: str = "STANDARD\\1,1", **kw: Any) -> tuple[str, str, Dataset]:
    fs = scu.session()
    status, attrs, fb = scu.film_box(fs, fmt, **kw)
    assert status.Status in (0x0000, 0x0116, 0xB605, 0x0107), hex(status.Status)
    return fs, fb, attrs


def _ds(**kw: Any) -> Dataset:
    ds = Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def test_film_session_n_create_statuses(suite):
    with print_scu(suite) as scu:
        uid = str(generate_uid())
        status, attrs = scu.create(t.FILM_SESSION, _ds(NumberOfCopies=2, FilmSessionLabel="A"), uid)
        assert status.Status == 0x0000 and attrs.NumberOfCopies == 2
        # One film session per association.
        status, _ = scu.create(t.FILM_SESSION, _ds(NumberOfCopies=1), str(generate_uid()))
        assert status.Status == 0x0213
    with print_scu(suite) as scu:
        status, attrs = scu.create(t.FILM_SESSION, _ds(NumberOfCopies=150, PrintPriority="URGENT"))
        assert status.Status == 0x0116
        assert attrs.NumberOfCopies == 1 and attrs.PrintPriority == "LOW"
        assert "MediumType" not in attrs  # only the attributes in question
    with print_scu(suite) as scu:
        status, _ = scu.create(t.FILM_SESSION, _ds(MemoryAllocation=100))
        assert status.Status == 0xB600
    with print_scu(suite) as scu:
        status, _ = scu.create(t.FILM_SESSION, _ds(OwnerID="X"))
        assert status.Status == 0x0107
    with print_scu(suite) as scu:
        status, _ = scu.create(t.FILM_SESSION, _ds(SpecificCharacterSet="ISO_IR 192"))
        assert status.Status == 0x0106
        uid = scu.session()
    with print_scu(suite) as other:
        status, _ = other.create(t.FILM_SESSION, _ds(NumberOfCopies=1), uid)
        # The first association's session is gone once it was released: the UID is free.
        assert status.Status == 0x0000
        status, _ = other.create(t.FILM_BOX, _ds(Trim="NO"), uid)
        assert status.Status == 0x0111
        status, _ = other.assoc.send_n_create(
            _ds(PrinterName="X"), t.PRINTER, None, meta_uid=t.META
        )
        assert status.Status == 0x0118


def test_film_box_n_create_statuses(suite):
    with print_scu(suite) as scu:
        status, _, _ = scu.film_box(str(generate_uid()))
        assert status.Status == 0x0213  # no film session yet
        fs = scu.session()
        status, attrs, _ = scu.film_box(fs, "STANDARD\\2,2")
        assert status.Status == 0x0000 and len(attrs.ReferencedImageBoxSequence) == 4
        status, attrs, _ = scu.film_box(fs, "STANDARD\\1,1", MaxDensity=500, Trim="MAYBE")
        assert status.Status == 0x0116 and attrs.MaxDensity == 320 and attrs.Trim == "NO"
        assert "ReferencedImageBoxSequence" in attrs
        status, attrs, _ = scu.film_box(fs, "STANDARD\\1,1", MinDensity=80)
        assert status.Status == 0xB605 and attrs.MinDensity == 50
        status, _, _ = scu.film_box(fs, "STANDARD\\1,1", EmptyImageDensity="BLACK")
        assert status.Status == 0x0107
        status, _, _ = scu.film_box(fs, "SLIDE")
        assert status.Status == 0x0106
        status, _, _ = scu.film_box(str(generate_uid()))
        assert status.Status == 0x0106  # not this association's session
        status, _, _ = scu.film_box(fs, "")
        assert status.Status == 0x0121
        status, _ = scu.create(t.FILM_BOX, _ds(ImageDisplayFormat="STANDARD\\1,1"))
        assert status.Status == 0x0120


def test_meta_n_set_statuses(suite):
    with print_scu(suite) as scu:
        fs, fb, attrs = _fb(scu, "STANDARD\\10,10")
        ib = attrs.ReferencedImageBoxSequence[0].ReferencedSOPInstanceUID
        assert scu.set(t.FILM_SESSION, fs, _ds(NumberOfCopies=3))[0].Status == 0x0000
        status, attrs = scu.set(t.FILM_SESSION, fs, _ds(NumberOfCopies=0))
        assert status.Status == 0x0116 and attrs.NumberOfCopies == 1
        assert scu.set(t.FILM_SESSION, fs, _ds(MemoryAllocation=5))[0].Status == 0xB600
        status, _ = scu.set(t.FILM_BOX, fb, _ds(ImageDisplayFormat="STANDARD\\2,2", Trim="YES"))
        assert status.Status == 0x0107
        assert int(status.AttributeIdentifierList) == 0x20100010
        assert scu.set(t.FILM_BOX, str(generate_uid()), _ds(Trim="YES"))[0].Status == 0x0112
        # Image boxes: 10x10 cells of 409x512 printer pixels on 14x17 film.
        big = image_item(520, 420, [7] * (520 * 420))
        assert scu.set(t.IMAGE_BOX, ib, image_box_set(1, big))[0].Status == 0xB604
        assert scu.set(t.IMAGE_BOX, ib, image_box_set(2, big))[0].Status == 0x0106
        bad = image_item(2, 2, [0, 1, 2, 3], PhotometricInterpretation="RGB")
        assert scu.set(t.IMAGE_BOX, ib, image_box_set(1, bad))[0].Status == 0x0106
        assert (
            scu.set(t.IMAGE_BOX, ib, image_box_set(1, image_item(1, 1, [1]), Polarity="UP"))[
                0
            ].Status
            == 0x0106
        )
        no_pixels = image_item(2, 2, [0, 1, 2, 3])
        del no_pixels.PixelData
        status, _ = scu.set(t.IMAGE_BOX, ib, image_box_set(1, no_pixels))
        assert status.Status == 0x0120
        status, _ = scu.set(t.IMAGE_BOX, ib, _ds(ImageBoxPosition=None))
        assert status.Status == 0x0121
        huge = image_item(5200, 1, [0] * 5200)
        assert scu.set(t.IMAGE_BOX, ib, image_box_set(1, huge))[0].Status == 0xC603
        status, attrs = scu.set(
            t.IMAGE_BOX, ib, image_box_set(1, image_item(1, 1, [1]), MagnificationType="ZOOM")
        )
        assert status.Status == 0x0116


@pytest.mark.parametrize(("policy", "code"), [("CROP", 0xB609), ("DECIMATE", 0xB60A)])
def test_oversize_policies(make_suite, policy, code):
    suite = make_suite({"services": {"print": {"oversize_policy": policy}}})
    with print_scu(suite) as scu:
        _fs, fb, attrs = _fb(scu, "STANDARD\\10,10")
        ib = attrs.ReferencedImageBoxSequence[0].ReferencedSOPInstanceUID
        big = image_item(520, 420, [200] * (520 * 420))
        assert scu.set(t.IMAGE_BOX, ib, image_box_set(1, big))[0].Status == code
        status, _ = scu.action(t.FILM_BOX, fb)
        assert status.Status == code


def test_oversize_fail_policy(make_suite):
    suite = make_suite({"services": {"print": {"oversize_policy": "FAIL"}}})
    with print_scu(suite) as scu:
        _fs, _fb_uid, attrs = _fb(scu, "STANDARD\\10,10")
        ib = attrs.ReferencedImageBoxSequence[0].ReferencedSOPInstanceUID
        big = image_item(520, 420, [200] * (520 * 420))
        assert scu.set(t.IMAGE_BOX, ib, image_box_set(1, big))[0].Status == 0xC603


def test_meta_n_action_statuses(make_suite):
    suite = make_suite({"services": {"print": {"max_collated_films": 2}}})
    with print_scu(suite, contexts=(t.META, t.PLUT)) as scu:
        fs = scu.session()
        assert scu.action(t.FILM_SESSION, fs)[0].Status == 0xC600
        assert scu.action(t.FILM_SESSION, str(generate_uid()))[0].Status == 0x0112
        _, attrs, fb = scu.film_box(fs, "STANDARD\\1,1")
        assert scu.action(t.FILM_BOX, fb, action=2)[0].Status == 0x0211
        status, reply = scu.action(t.FILM_BOX, fb)
        assert status.Status == 0xB603 and not reply  # empty page: no job
        ib = attrs.ReferencedImageBoxSequence[0].ReferencedSOPInstanceUID
        assert scu.set(t.IMAGE_BOX, ib, image_box_set(1, image_item(1, 1, [9])))[0].Status == 0
        status, reply = scu.action(t.FILM_BOX, fb)
        assert status.Status == 0x0000
        assert (
            reply.ReferencedPrintJobSequencePullStoredPrint[0].ReferencedSOPClassUID == t.PRINT_JOB
        )
        scu.film_box(fs, "STANDARD\\1,1")  # an empty second film
        status, reply = scu.action(t.FILM_SESSION, fs)
        assert status.Status == 0xB602 and reply.ReferencedPrintJobSequencePullStoredPrint
        assert scu.action(t.FILM_BOX, fb)[0].Status == 0x0112  # no longer the last one
        scu.film_box(fs, "STANDARD\\1,1")
        assert scu.action(t.FILM_SESSION, fs)[0].Status == 0x0213  # 3 films > 2
    with print_scu(suite, contexts=(t.META,)) as scu:
        _fs, fb, attrs = _fb(scu, "STANDARD\\2,1")
        ib = attrs.ReferencedImageBoxSequence[0].ReferencedSOPInstanceUID
        item = image_item(1, 1, [9])
        assert (
            scu.set(t.IMAGE_BOX, ib, image_box_set(1, item, RequestedImageSize="300"))[0].Status
            == 0x0000
        )
        assert scu.action(t.FILM_BOX, fb)[0].Status == 0xC613


def test_queue_full(make_suite):
    suite = make_suite({"services": {"print": {"max_queued_jobs": 0}}})
    with print_scu(suite, contexts=(t.META,)) as scu:
        fs, fb, attrs = _fb(scu)
        ib = attrs.ReferencedImageBoxSequence[0].ReferencedSOPInstanceUID
        scu.set(t.IMAGE_BOX, ib, image_box_set(1, image_item(1, 1, [9])))
        assert scu.action(t.FILM_BOX, fb)[0].Status == 0xC602
        assert scu.action(t.FILM_SESSION, fs)[0].Status == 0xC601
    with suite.db.read() as session:
        from db.queries import print as q

        assert q.list_jobs(session) == []


def test_n_delete_and_plut_statuses(suite):
    with print_scu(suite) as scu:
        fs, fb, _ = _fb(scu)
        assert scu.delete(t.FILM_BOX, fb).Status == 0x0000
        assert scu.delete(t.FILM_BOX, fb).Status == 0x0112
        assert scu.delete(t.FILM_SESSION, fs).Status == 0x0000
        plut = str(generate_uid())
        assert scu.create(t.PLUT, _ds(PresentationLUTShape="LIN OD"), plut)[0].Status == 0
        assert scu.create(t.PLUT, _ds(PresentationLUTShape="GAMMA"))[0].Status == 0x0106
        seq = lut_item(256, 12, list(range(256)))
        both = _ds(PresentationLUTShape="IDENTITY", PresentationLUTSequence=[seq])
        status, _ = scu.create(t.PLUT, both)
        assert status.Status == 0x0106 and "both" in status.ErrorComment
        assert scu.create(t.PLUT, _ds(LUTExplanation="none"))[0].Status == 0x0120
        bad = lut_item(256, 12, list(range(100)))
        assert scu.create(t.PLUT, _ds(PresentationLUTSequence=[bad]))[0].Status == 0x0106
        assert scu.delete(t.PLUT, plut).Status == 0x0000
        assert scu.delete(t.PLUT, plut).Status == 0x0112
        fs = scu.session()
        ref = _ds(ReferencedSOPClassUID=t.PLUT, ReferencedSOPInstanceUID=plut)
        status, _, _ = scu.film_box(fs, ReferencedPresentationLUTSequence=[ref])
        assert status.Status == 0x0106  # deleted P-LUT cannot be newly referenced


def test_annotation_statuses(suite):
    with print_scu(suite) as scu:
        _fs, _fb_uid, attrs = _fb(scu, "STANDARD\\2,1", AnnotationDisplayFormatID="COMBINED")
        boxes = [i.ReferencedSOPInstanceUID for i in attrs.ReferencedBasicAnnotationBoxSequence]
        assert len(boxes) == 3
        ok = scu.set(t.ANNOTATION_BOX, boxes[0], _ds(AnnotationPosition=0, TextString="LBL"))
        assert ok[0].Status == 0x0000
        status, out = scu.set(
            t.ANNOTATION_BOX, boxes[1], _ds(AnnotationPosition=1, TextString="x" * 70)
        )
        assert status.Status == 0x0116 and out.TextString == "x" * 64
        assert scu.set(t.ANNOTATION_BOX, boxes[1], _ds(AnnotationPosition=2))[0].Status == 0x0106
        assert scu.set(t.ANNOTATION_BOX, boxes[1], _ds(TextString="A"))[0].Status == 0x0120
        assert (
            scu.set(t.ANNOTATION_BOX, str(generate_uid()), _ds(AnnotationPosition=1))[0].Status
            == 0x0112
        )


def test_n_get_statuses(suite):
    with print_scu(suite) as scu:
        status, attrs = scu.get(t.PRINTER, t.PRINTER_INSTANCE, [0x21100010, 0x00181200])
        assert status.Status == 0x0107 and attrs.PrinterStatus == "NORMAL"
    with print_scu(suite) as scu:
        status, attrs = scu.get(t.PRINTER, t.PRINTER_INSTANCE)
        assert status.Status == 0 and attrs.PrinterStatus == "NORMAL"
        assert scu.get(t.PRINTER, "1.2.3")[0].Status == 0x0112
        status, attrs = scu.get(t.CONFIGURATION, t.CONFIGURATION_INSTANCE)
        assert status.Status == 0
        assert attrs.PrinterConfigurationSequence[0].MaximumCollatedFilms == 12
        status, _ = scu.get(t.CONFIGURATION, t.CONFIGURATION_INSTANCE, [0x21100010])
        assert status.Status == 0x0107
        assert scu.get(t.CONFIGURATION, "1.2.3")[0].Status == 0x0112
        assert scu.get(t.PRINT_JOB, str(generate_uid()))[0].Status == 0x0112


def test_demagnified_film_box_print_and_print_job_n_get(suite):
    with print_scu(suite, contexts=(t.META, t.PRINT_JOB)) as scu:
        _fs, fb, attrs = _fb(scu, "STANDARD\\10,10")
        ib = attrs.ReferencedImageBoxSequence[0].ReferencedSOPInstanceUID
        big = image_item(520, 420, [100] * (520 * 420))
        assert scu.set(t.IMAGE_BOX, ib, image_box_set(1, big))[0].Status == 0xB604
        status, reply = scu.action(t.FILM_BOX, fb)
        assert status.Status == 0xB604  # DEMAGNIFY, the default policy; a job was created
        job_uid = reply.ReferencedPrintJobSequencePullStoredPrint[0].ReferencedSOPInstanceUID
        scu.wait_event(lambda e: e[0] in (3, 4) and e[1] == t.PRINT_JOB)
    # Tracked from a new association, as the sample describes.
    with print_scu(suite, contexts=(t.PRINT_JOB,)) as scu:
        status, attrs = scu.get(t.PRINT_JOB, job_uid, [0x21000020, 0x00181200])
        assert status.Status == 0x0107 and attrs.ExecutionStatus == "DONE"
        assert int(status.AttributeIdentifierList) == 0x00181200


# -- 0110: a request data set that cannot be decoded ----------------------------------------


def _broken(ds: Dataset, implicit: bool, fault: str) -> bytes:
    """``ds`` encoded, followed by an element that cannot be decoded."""
    data = encode(ds, implicit, True)
    assert data is not None
    if fault == "unclosed-sequence":
        # (0008,1140) with undefined length, one item of undefined length, then the end.
        vr = b"" if implicit else b"SQ\x00\x00"
        return data + b"\x08\x00\x40\x11" + vr + b"\xff" * 4 + b"\xfe\xff\x00\xe0" + b"\xff" * 4
    # (0028,0010) Rows: US with a three-byte value.
    header = b"\x03\x00\x00\x00" if implicit else b"US\x03\x00"
    return b"\x28\x00\x10\x00" + header + b"\x01\x02\x03" + data


def _send_raw(scu: Scu, abstract: str, req: Any) -> Any:
    """Send ``req`` (its data set already encoded) on ``abstract``'s context; the response."""
    cx = next(c for c in scu.assoc.accepted_contexts if c.abstract_syntax == abstract)
    assert cx.context_id is not None
    assoc = scu.assoc
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        assoc.dimse.send_msg(req, cx.context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    assert type(rsp) is type(req), "no response"
    if rsp.Status == 0x0110:
        assert rsp.ErrorComment == "Data set cannot be decoded"
    return rsp


def _implicit(scu: Scu, abstract: str) -> bool:
    cx = next(c for c in scu.assoc.accepted_contexts if c.abstract_syntax == abstract)
    return bool(cx.transfer_syntax[0].is_implicit_VR)


def _raw_create(scu: Scu, abstract: str, cls: str, uid: str, ds: Dataset, fault: str) -> int:
    req = N_CREATE()
    req.MessageID = 901
    req.AffectedSOPClassUID = cls
    req.AffectedSOPInstanceUID = uid
    req.AttributeList = BytesIO(_broken(ds, _implicit(scu, abstract), fault))
    return int(_send_raw(scu, abstract, req).Status)


def _raw_set(scu: Scu, abstract: str, cls: str, uid: str, ds: Dataset, fault: str) -> int:
    req = N_SET()
    req.MessageID = 902
    req.RequestedSOPClassUID = cls
    req.RequestedSOPInstanceUID = uid
    req.ModificationList = BytesIO(_broken(ds, _implicit(scu, abstract), fault))
    return int(_send_raw(scu, abstract, req).Status)


def _state(suite: Any) -> Any:
    [st] = suite.__dict__["_print_servers"]["print_scp"].open_states()
    return st


@pytest.mark.parametrize("fault", ["unclosed-sequence", "value-length"])
def test_undecodable_data_set_is_0110(suite, fault):
    code = t.META_N_CREATE[0x0110].code
    assert code == 0x0110
    for table in (t.META_N_SET, t.PLUT_N_CREATE, t.ANNOTATION_N_SET):
        assert table[0x0110].code == 0x0110
    with print_scu(suite) as scu:
        # Film Session N-CREATE: nothing created, and the UID is still free afterwards.
        fs = str(generate_uid())
        assert _raw_create(scu, t.META, t.FILM_SESSION, fs, _ds(NumberOfCopies=5), fault) == code
        assert _state(suite).session is None
        status, attrs = scu.create(t.FILM_SESSION, _ds(NumberOfCopies=3), fs)
        assert status.Status == 0x0000 and attrs.NumberOfCopies == 3
        # Film Session N-SET: nothing changed.
        assert _raw_set(scu, t.META, t.FILM_SESSION, fs, _ds(NumberOfCopies=7), fault) == code
        assert _state(suite).session.attrs["NumberOfCopies"] == 3
        # Presentation LUT N-CREATE: nothing created, the UID is still free afterwards.
        plut = str(generate_uid())
        shape = _ds(PresentationLUTShape="IDENTITY")
        assert _raw_create(scu, t.PLUT, t.PLUT, plut, shape, fault) == code
        assert plut not in _state(suite).pluts
        assert scu.create(t.PLUT, shape, plut)[0].Status == 0x0000
        # Basic Annotation Box N-SET: the text is unchanged.
        _fs2, _fb_uid, fb_attrs = _fb_in(scu, fs)
        box = fb_attrs.ReferencedBasicAnnotationBoxSequence[0].ReferencedSOPInstanceUID
        ok = scu.set(t.ANNOTATION_BOX, box, _ds(AnnotationPosition=0, TextString="OLD"))
        assert ok[0].Status == 0x0000
        new = _ds(AnnotationPosition=0, TextString="NEW")
        assert _raw_set(scu, t.ANNOTATION_BOX, t.ANNOTATION_BOX, box, new, fault) == code
        assert _state(suite).current.annotation_boxes[0].text == "OLD"
        # The association still serves good requests.
        status, out = scu.set(t.FILM_SESSION, fs, _ds(NumberOfCopies=4))
        assert status.Status == 0x0000 and out.NumberOfCopies == 4
    # And so does the server.
    with print_scu(suite) as scu:
        scu.session()


def _fb_in(scu: Scu, fs: str) -> tuple[str, str, Dataset]:
    status, attrs, fb = scu.film_box(fs, "STANDARD\\1,1", AnnotationDisplayFormatID="LABEL")
    assert status.Status == 0x0000, hex(status.Status)
    return fs, fb, attrs

"""Test data and clients: small valid images, pynetdicom SCU associations."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE

from servers.core.runtime import Suite

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
SC = "1.2.840.10008.5.1.4.1.1.7"
US_RETIRED = "1.2.840.10008.5.1.4.1.1.6"
NM_RETIRED = "1.2.840.10008.5.1.4.1.1.5"


def make_image(
    sop_class: str = CT,
    *,
    patient_id: str = "PAT001",
    patient_name: str = "DOE^JOHN",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    modality: str = "CT",
    study_date: str = "20240105",
    study_time: str = "101500",
    accession: str = "ACC001",
    rows: int = 4,
    columns: int = 4,
    **extra: Any,
) -> Dataset:
    """A small but complete image instance (16-bit MONOCHROME2)."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "M"
    ds.StudyDate = study_date
    ds.StudyTime = study_time
    ds.AccessionNumber = accession
    ds.StudyID = "1"
    ds.ReferringPhysicianName = "WHO^DOCTOR"
    ds.StudyDescription = "TEST STUDY"
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(256))[: 2 * rows * columns].ljust(2 * rows * columns, b"\0")
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


def write_part10(ds: Dataset, path: Path, explicit: bool = True) -> Path:
    """Write ``ds`` as a Part 10 file (for DCMTK's storescu)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if explicit else ImplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    return path


@contextmanager
def associate(
    suite: Suite,
    ae_key: str,
    contexts: Sequence[str | tuple[str, Sequence[str]]],
    *,
    calling_ae: str = "TEST_SCU",
    called_ae: str | None = None,
    **kwargs: Any,
) -> Iterator[Association]:
    """An established pynetdicom association to one of ``suite``'s AEs; released on exit."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for cx in contexts:
        if isinstance(cx, str):
            ae.add_requested_context(cx, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
        else:
            ae.add_requested_context(cx[0], list(cx[1]))
    title = called_ae or suite.config.ae(ae_key).title
    assoc = ae.associate("127.0.0.1", suite.port_of(ae_key), ae_title=title, **kwargs)
    assert assoc.is_established, f"association to {title} not established"
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def free_ports_env(given: dict[str, str] | None = None) -> dict[str, str]:
    """DICOMLAB_* variables giving every listening AE of the embedded default, and the
    HL7 listener, a free loopback port, except where ``given`` already sets one.

    A `dicomlab serve` subprocess started by a test must not collide with another one,
    or with a suite a developer left running on the default ports.
    """
    from servers.core.config import DEFAULTS
    from tests.conftest import free_port

    given = given or {}
    env: dict[str, str] = {}
    for key, ae in DEFAULTS["ae"].items():
        name = f"DICOMLAB_AE__{key.upper()}__PORT"
        if int(ae.get("port", 0)) > 0 and name not in given:
            env[name] = str(free_port())
    if "DICOMLAB_SERVICES__WORKLIST__HL7_PORT" not in given:
        env["DICOMLAB_SERVICES__WORKLIST__HL7_PORT"] = str(free_port())
    return env


def request_association(ae: AE, host: str, port: int, **kwargs: Any) -> Association:
    """``ae.associate(host, port, **kwargs)``, keeping an A-ASSOCIATE-RJ pynetdicom can drop.

    pynetdicom's requestor ACSE waits for the socket's "ready" flag and then aborts
    if the socket is no longer connected. When the acceptor answers with an
    A-ASSOCIATE-RJ and the requestor's own DUL closes the connection on it (PS3.8
    AE-4) before that thread wakes, the association reads as aborted although the
    rejection arrived: it is then still on the DUL's to-user queue. Seen with a
    fast acceptor on a loaded machine (1 in ~300); tests that check the rejection
    the server sent read it from there.
    """
    assoc = ae.associate(host, port, **kwargs)
    if assoc.is_aborted and not assoc.is_rejected:
        for primitive in list(assoc.dul.to_user_queue.queue):
            if isinstance(primitive, A_ASSOCIATE) and primitive.result not in (None, 0):
                assoc.acceptor.primitive = primitive
                assoc.is_rejected = True
                assoc.is_aborted = False
                break
    return assoc

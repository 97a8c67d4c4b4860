"""Test instances, generated once with pydicom into a cache directory.

Every set is a directory of Part 10 files (Explicit VR Little Endian) plus a
``manifest.json`` saying what is in it; a set is regenerated only when its
parameters change. Sets:

* ``ct-N``: N CT images of 512×512 16-bit (~0.5 MB), one study, one series;
* ``tiny-N``: N CT images of 16×32 16-bit (1 KB of pixels), one study, one series;
* ``find-S``: S studies of one tiny image each, for C-FIND: two studies per
  patient, names from a fixed list of family names (so ``A*`` matches a known
  share), study dates spread over 2022-2023, unique accession numbers.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
GENERATOR_VERSION = 1
FAMILY_NAMES = (
    "ADAMS",
    "BAKER",
    "CLARK",
    "DAVIS",
    "EVANS",
    "FOSTER",
    "GARCIA",
    "HARRIS",
    "IRWIN",
    "JONES",
    "KING",
    "LEWIS",
    "MILLER",
    "NELSON",
    "OWENS",
    "PARKER",
    "QUINN",
    "ROBERTS",
    "SMITH",
    "TAYLOR",
    "UNDERWOOD",
    "VAUGHN",
    "WALKER",
    "XAVIER",
    "YOUNG",
    "ZIMMER",
)
GIVEN_NAMES = ("ANN", "BOB", "CARL", "DORA", "ERIC", "FAY", "GUS", "HELEN")


@dataclass(frozen=True)
class InstanceSet:
    name: str
    path: Path
    files: list[Path]
    bytes_total: int
    manifest: dict[str, object]


def _image(
    *,
    rows: int,
    columns: int,
    pixels: bytes,
    study_uid: str,
    series_uid: str,
    number: int,
    patient_id: str,
    patient_name: str,
    study_date: str,
    accession: str,
) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyDate = study_date
    ds.StudyTime = "101500"
    ds.AccessionNumber = accession
    ds.Modality = "CT"
    ds.ReferringPhysicianName = "WHO^DOCTOR"
    ds.StudyDescription = "BENCH STUDY"
    ds.SeriesDescription = "BENCH SERIES"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F" if number % 2 else "M"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixels
    return ds


def _save(ds: Dataset, path: Path) -> int:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    return path.stat().st_size


def _cached(root: Path, name: str, params: dict[str, object]) -> InstanceSet | None:
    path = root / name
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        return None
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("params") != params:
        return None
    files = [path / f for f in manifest["files"]]
    return InstanceSet(name, path, files, int(manifest["bytes_total"]), manifest)


def _fresh_dir(root: Path, name: str) -> Path:
    path = root / name
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _finish(
    path: Path,
    name: str,
    params: dict[str, object],
    files: list[Path],
    total: int,
    extra: dict[str, object] | None = None,
) -> InstanceSet:
    manifest: dict[str, object] = {
        "params": params,
        "files": [str(f.relative_to(path)) for f in files],
        "bytes_total": total,
        **(extra or {}),
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    return InstanceSet(name, path, files, total, manifest)


def image_series(root: Path, kind: str, count: int, label: str = "") -> InstanceSet:
    """``count`` images of one study and series: ``kind`` is ``ct`` (512×512) or ``tiny``.

    Sets with different ``label`` have different UIDs, so one server can hold both.
    """
    rows, columns = (512, 512) if kind == "ct" else (16, 32)
    name = f"{label}{kind}-{count}"
    params: dict[str, object] = {"v": GENERATOR_VERSION, "kind": kind, "count": count}
    cached = _cached(root, name, params)
    if cached is not None:
        return cached
    path = _fresh_dir(root, name)
    pixels = random.Random(7).randbytes(rows * columns * 2)
    study_uid, series_uid = generate_uid(), generate_uid()
    files, total = [], 0
    for i in range(count):
        ds = _image(
            rows=rows,
            columns=columns,
            pixels=pixels,
            study_uid=study_uid,
            series_uid=series_uid,
            number=i + 1,
            patient_id=f"BENCH_{kind.upper()}",
            patient_name=f"BENCH^{kind.upper()}",
            study_date="20240105",
            accession=f"ACC_{kind.upper()}",
        )
        file = path / f"{i:06d}.dcm"
        total += _save(ds, file)
        files.append(file)
    return _finish(
        path, name, params, files, total, {"study_uid": study_uid, "series_uid": series_uid}
    )


def find_studies(root: Path, studies: int) -> InstanceSet:
    """``studies`` studies of one tiny image each (see the module docstring)."""
    name = f"find-{studies}"
    params: dict[str, object] = {"v": GENERATOR_VERSION, "kind": "find", "studies": studies}
    cached = _cached(root, name, params)
    if cached is not None:
        return cached
    path = _fresh_dir(root, name)
    rng = random.Random(studies)
    pixels = rng.randbytes(8 * 8 * 2)
    files, total = [], 0
    for i in range(studies):
        patient = i // 2
        family = FAMILY_NAMES[patient % len(FAMILY_NAMES)]
        given = GIVEN_NAMES[(patient // len(FAMILY_NAMES)) % len(GIVEN_NAMES)]
        day = rng.randrange(730)
        year, rest = (2022, day) if day < 365 else (2023, day - 365)
        month, dom = divmod(rest, 31)
        study_date = f"{year}{min(month, 11) + 1:02d}{min(dom, 27) + 1:02d}"
        ds = _image(
            rows=8,
            columns=8,
            pixels=pixels,
            study_uid=generate_uid(),
            series_uid=generate_uid(),
            number=1,
            patient_id=f"P{patient:07d}",
            patient_name=f"{family}{patient}^{given}",
            study_date=study_date,
            accession=f"A{i:09d}",
        )
        sub = path / f"{i // 1000:04d}"
        sub.mkdir(exist_ok=True)
        file = sub / f"{i:07d}.dcm"
        total += _save(ds, file)
        files.append(file)
    return _finish(path, name, params, files, total)


def default_cache() -> Path:
    return Path(os.environ.get("DICOMLAB_BENCH_CACHE", Path(__file__).parent / ".cache"))


WORKLIST_STATIONS = ("CT01", "CT02", "CT03", "MR01", "MR02", "US01", "US02", "CR01", "CR02", "XA01")
WORKLIST_DAYS = 20  # scheduled dates 20261201 .. 20261220
MWL_SOP_CLASS = "1.2.840.10008.5.1.4.31"


@dataclass(frozen=True)
class WorklistSet:
    path: Path
    entries: Path  # entries.json: the rows ``dicomlab worklist import`` takes
    wl_dir: Path  # one .wl file (Part 10) per step, the same data sets


def worklist_steps(root: Path, steps: int) -> WorklistSet:
    """``steps`` scheduled procedure steps, one per patient, as an import file for dicomlab
    and as .wl files for DCMTK's wlmscpfs and Orthanc's worklist plugin.

    The .wl data sets are what dicomlab's own entry builder
    (:func:`servers.worklist.entries.build_entry`) makes of the same rows, so every
    peer holds the same entries; the identifiers it would otherwise generate are given.
    Patient names come from the same 26 family names as ``find-S`` (so ``A*`` matches
    about 1/26), stations from :data:`WORKLIST_STATIONS`, dates over
    :data:`WORKLIST_DAYS` days.
    """
    from servers.worklist.entries import build_entry

    name = f"mwl-{steps}"
    path = root / name
    params: dict[str, object] = {"v": GENERATOR_VERSION, "kind": "mwl", "steps": steps}
    done = path / "params.json"
    result = WorklistSet(path, path / "entries.json", path / "wl")
    if done.exists() and json.loads(done.read_text()) == params:
        return result
    path = _fresh_dir(root, name)
    result.wl_dir.mkdir()
    rng = random.Random(steps)
    rows = []
    for i in range(steps):
        family = FAMILY_NAMES[i % len(FAMILY_NAMES)]
        given = GIVEN_NAMES[(i // len(FAMILY_NAMES)) % len(GIVEN_NAMES)]
        station = WORKLIST_STATIONS[rng.randrange(len(WORKLIST_STATIONS))]
        row = {
            "PatientID": f"W{i:07d}",
            "PatientName": f"{family}{i}^{given}",
            "PatientBirthDate": "19700101",
            "PatientSex": "F" if i % 2 else "M",
            "Modality": station[:2],
            "ScheduledStationAETitle": station,
            "ScheduledProcedureStepStartDate": f"202612{rng.randrange(WORKLIST_DAYS) + 1:02d}",
            "ScheduledProcedureStepStartTime": f"{8 + rng.randrange(10):02d}{rng.randrange(4) * 15:02d}",
            "AccessionNumber": f"WA{i:09d}",
            "ScheduledProcedureStepID": f"WS{i:09d}",
            "StudyInstanceUID": f"2.25.{1000000 + steps}{i:09d}",
            "RequestedProcedureDescription": f"{station[:2]} EXAM",
        }
        rows.append(row)
        ds = build_entry(row, "bench").dataset
        # A Type 2 return key dicomlab answers empty; without it wlmscpfs logs a
        # warning per file per query.
        ds.ReferencedPatientSequence = []
        ds.SpecificCharacterSet = "ISO_IR 100"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(MWL_SOP_CLASS)
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.save_as(result.wl_dir / f"{i:07d}.wl", enforce_file_format=True)
    result.entries.write_text(json.dumps(rows))
    done.write_text(json.dumps(params))
    return result

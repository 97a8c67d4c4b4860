"""Bulk-load Part 10 files into a dicomlab data directory, as C-STORE would index them.

The C-FIND workloads need 10,000 to 100,000 studies; sending them over DICOM to
dicomlab would measure C-STORE again. This loader produces the same index rows
(:func:`db.queries.ingest.record_from_dataset` and :func:`index_instance`, the
functions the Storage SCP calls) and the same files (File Meta Information from
:func:`servers.storage.encoding.part10_header`, then the data set bytes as they
are in the source file) in the store's own layout, but commits the index in
batches and syncs the file system once at the end instead of per instance.
Run it on a stopped server's data directory.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path

from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble

from db.engine import Database
from db.migrate import upgrade
from db.queries.ingest import StoredFacts, index_instance, record_from_dataset
from servers.core import config as config_mod
from servers.storage.encoding import part10_header
from storage.filestore import FileStore

SOURCE_AE = "BENCHLOAD"


def load(data_dir: Path, files: Sequence[Path], batch: int = 1000) -> int:
    """Index and store ``files`` under ``data_dir``; returns how many were loaded."""
    config = config_mod.load(environ={"DICOMLAB_DATA_DIR": str(data_dir)})
    upgrade(config.database_url)
    db = Database(config.database_url)
    store = FileStore(config.storage_dir)
    ae = config.ae("storage_scp")
    loaded = 0
    try:
        for start in range(0, len(files), batch):
            with db.write() as session:
                for file in files[start : start + batch]:
                    raw = file.read_bytes()
                    fp = BytesIO(raw)
                    read_preamble(fp, False)
                    meta = _read_file_meta_info(fp)
                    body = raw[fp.tell() :]
                    ts = str(meta.TransferSyntaxUID)
                    implicit = ts == "1.2.840.10008.1.2"
                    ds = read_dataset(BytesIO(body), implicit, True, stop_when=None)
                    record = record_from_dataset(ds)
                    header = part10_header(
                        sop_class_uid=record.sop_class_uid,
                        sop_instance_uid=record.sop_instance_uid,
                        transfer_syntax_uid=ts,
                        implementation_class_uid=ae.implementation_class_uid,
                        implementation_version_name=ae.implementation_version_name,
                        source_ae_title=SOURCE_AE,
                    )
                    relative = store._new_relative_path()
                    target = store.path(relative)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    data = header + body
                    target.write_bytes(data)
                    facts = StoredFacts(
                        relative_path=relative,
                        size=len(data),
                        sha256=hashlib.sha256(data).hexdigest(),
                        transfer_syntax_uid=ts,
                        source_ae=SOURCE_AE,
                    )
                    index_instance(
                        session,
                        record,
                        facts,
                        stored_sop_instance_uid=record.sop_instance_uid,
                        replace=False,
                    )
                    loaded += 1
    finally:
        db.dispose()
    os.sync()
    return loaded

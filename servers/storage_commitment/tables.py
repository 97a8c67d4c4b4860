"""Storage Commitment as data: UIDs, status rows, Failure Reasons, settings.

Kept apart from the service class and the delivery worker so that both, and the
statement, read the same rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from servers.core.declaration import (
    FAILURE,
    SUCCESS,
    WARNING,
    StartupError,
    StatusRow,
    StatusTable,
)

STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"
# PS3.4 J.3.5: the one SOP Instance every Push Model request and report names.
WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_STORAGE_COMMITMENT = 1  # PS3.4 Table J.3-1, the only Action Type
EVENT_ALL_COMMITTED = 1  # PS3.4 Table J.3-2
EVENT_FAILURES_EXIST = 2

SUCCESS_CODE = 0x0000
PROCESSING_FAILURE = 0x0110
NO_SUCH_SOP_INSTANCE = 0x0112
MISSING_ATTRIBUTE = 0x0120
MISSING_ATTRIBUTE_VALUE = 0x0121
NO_SUCH_ACTION = 0x0123

# Table F.4.2-34 as resolved in the digest (F1), plus two standard codes for
# cases the sample does not cover.
N_ACTION_STATUSES = StatusTable(
    "N-ACTION",
    [
        StatusRow(
            SUCCESS_CODE,
            SUCCESS,
            "Success",
            "The request was well formed and its transaction has been recorded: every "
            "referenced instance has been checked and the outcome stored, and the "
            "N-EVENT-REPORT follows.",
        ),
        StatusRow(
            PROCESSING_FAILURE,
            FAILURE,
            "Processing Failure",
            "The Action Information cannot be decoded, the Transaction UID or a Referenced "
            "SOP Class/Instance UID is not a valid UID (digits and dots, at most 64 "
            "characters), the Transaction UID belongs to a transaction whose report is "
            "still being delivered, or the database or file system failed while the "
            "request was checked or recorded (nothing is recorded then).",
        ),
        StatusRow(
            NO_SUCH_SOP_INSTANCE,
            FAILURE,
            "No Such SOP Instance",
            "Addition to the sample's table: the Requested SOP Instance UID is not the "
            "well-known instance 1.2.840.10008.1.20.1.1.",
        ),
        StatusRow(
            MISSING_ATTRIBUTE,
            FAILURE,
            "Missing Attribute",
            "The Action Information is absent, or lacks Transaction UID (0008,1195) or "
            "Referenced SOP Sequence (0008,1199).",
        ),
        StatusRow(
            MISSING_ATTRIBUTE_VALUE,
            FAILURE,
            "Missing Attribute Value",
            "Transaction UID is empty, Referenced SOP Sequence has no items, or an item "
            "lacks a value for Referenced SOP Class UID (0008,1150) or Referenced SOP "
            "Instance UID (0008,1155).",
        ),
        StatusRow(
            NO_SUCH_ACTION,
            FAILURE,
            "No Such Action",
            "Addition to the sample's table: the Action Type ID is not 1 (Request Storage "
            "Commitment).",
        ),
    ],
)

# PS3.3 C.14.1.1 Failure Reasons this SCP puts in the Failed SOP Sequence (digest §6.6).
FR_PROCESSING_FAILURE = 0x0110
FR_NO_SUCH_OBJECT = 0x0112
FR_CLASS_INSTANCE_CONFLICT = 0x0119
FR_SOP_CLASS_NOT_SUPPORTED = 0x0122

FAILURE_REASONS = StatusTable(
    "Failure Reason",
    [
        StatusRow(
            FR_NO_SUCH_OBJECT,
            FAILURE,
            "No such object instance",
            "The SOP Instance UID is not in the index (including instances that have not "
            "arrived yet: requests are not cached), or it is indexed but its file is "
            "missing or no longer has the SHA-256 recorded when it was stored.",
        ),
        StatusRow(
            FR_SOP_CLASS_NOT_SUPPORTED,
            FAILURE,
            "Referenced SOP Class not supported",
            "The Referenced SOP Class UID is not a storage SOP class the Storage service "
            "of this AE accepts.",
        ),
        StatusRow(
            FR_CLASS_INSTANCE_CONFLICT,
            FAILURE,
            "Class/Instance conflict",
            "The instance is indexed under a different SOP Class UID than the one referenced.",
        ),
        StatusRow(
            FR_PROCESSING_FAILURE,
            FAILURE,
            "Processing failure",
            "The stored file could not be checked because of a system error.",
        ),
    ],
)

DELIVERED_CODES = frozenset({0x0000, 0x0107})

# Table F.4.2-35: how the answer to an N-EVENT-REPORT-RQ is treated.
EVENT_REPORT_RESPONSES: tuple[tuple[str, str, str, str], ...] = (
    (SUCCESS, "Success", "0000", "Delivered; logged as `event_report_sent`."),
    (
        WARNING,
        "Attribute List Error",
        "0107",
        "Delivered; logged as `event_report_sent` at warning level.",
    ),
    (
        "*",
        "*",
        "any other",
        "The attempt failed; logged as `event_report_failed` and retried as described "
        "below until the attempts are used up.",
    ),
)


@dataclass(frozen=True)
class CommitmentSettings:
    """``[services.storage_commitment]`` with the Table F.4.4-2 defaults."""

    always_new_association: bool = False
    max_attempts: int = 5
    retry_interval: float = 300.0
    verify_checksum: bool = True

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> CommitmentSettings:
        unknown = set(raw) - {
            "always_new_association",
            "max_attempts",
            "retry_interval",
            "verify_checksum",
        }
        if unknown:
            raise StartupError(
                "[services.storage_commitment] has unknown settings: " + ", ".join(sorted(unknown))
            )
        settings = cls(
            always_new_association=bool(raw.get("always_new_association", False)),
            max_attempts=int(raw.get("max_attempts", 5)),
            retry_interval=float(raw.get("retry_interval", 300)),
            verify_checksum=bool(raw.get("verify_checksum", True)),
        )
        if settings.max_attempts < 1:
            raise StartupError("[services.storage_commitment] max_attempts must be at least 1")
        if settings.retry_interval < 0:
            raise StartupError("[services.storage_commitment] retry_interval must not be negative")
        return settings

    def as_dict(self) -> dict[str, Any]:
        return {
            "always_new_association": self.always_new_association,
            "max_attempts": self.max_attempts,
            "retry_interval": self.retry_interval,
            "verify_checksum": self.verify_checksum,
        }

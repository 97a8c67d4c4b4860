"""Storage Commitment Push Model SCP on the STORAGE-SCP AE (Annex F §F.4.2.3.4.1.5, §F.4.2.3.3).

An instance is committed when its index row, its file and the file's SHA-256
agree; the report goes back on the N-ACTION's association when it can, and
otherwise over associations this AE opens, with retries that survive restarts.
"""

from __future__ import annotations

from servers.core.config import Config
from servers.core.context import ServiceContext
from servers.core.declaration import (
    ContextRow,
    ServiceDeclaration,
    StatementSection,
    StatusTable,
)
from servers.core.hookspecs import hookimpl
from servers.core.transfer_syntax import EXPLICIT_VR_LE, IMPLICIT_VR_LE
from servers.storage_commitment.delivery import PROPOSED_CONTEXTS, DeliveryWorker, start_worker
from servers.storage_commitment.scp import CommitmentServiceClass
from servers.storage_commitment.tables import (
    EVENT_REPORT_RESPONSES,
    FAILURE_REASONS,
    N_ACTION_STATUSES,
    STORAGE_COMMITMENT_PUSH,
    WELL_KNOWN_INSTANCE,
    CommitmentSettings,
)

NAME = "storage_commitment"


def _failure_reason_table(table: StatusTable) -> str:
    lines = ["| Failure Reason | Meaning | Sent when |", "|---|---|---|"]
    lines += [f"| {row.hex} | {row.meaning} | {row.condition} |" for row in table]
    return "\n".join(lines)


def _response_table() -> str:
    lines = [
        "| Service Status | Further Meaning | Code | Behaviour |",
        "|---|---|---|---|",
    ]
    lines += [f"| {s} | {m} | {c} | {b} |" for s, m, c, b in EVENT_REPORT_RESPONSES]
    return "\n".join(lines)


def _minutes(seconds: float) -> str:
    if seconds >= 60 and seconds % 60 == 0:
        minutes = int(seconds // 60)
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    return f"{seconds:g} seconds"


def statement(settings: CommitmentSettings) -> tuple[StatementSection, ...]:
    delivery_default = (
        "Every report is sent over a new association (`always_new_association = true`)."
        if settings.always_new_association
        else "By default the report is sent on the association that carried the N-ACTION, "
        "right after the N-ACTION-RSP (`always_new_association = false`)."
    )
    check = (
        "its file exists in the file store and its SHA-256 equals the checksum recorded "
        "when it was stored"
        if settings.verify_checksum
        else "its file exists in the file store (`verify_checksum = false`: the recorded "
        "SHA-256 is not recomputed)"
    )
    return (
        StatementSection(
            "Meaning of a commitment",
            "The STORAGE-SCP AE commits to an instance only if, at the moment the N-ACTION "
            "is handled, the instance's SOP Instance UID is in the index under the "
            f"referenced SOP Class UID, and {check}. Files are written and fsynced before "
            "their index row is committed, so a committed instance has survived a C-STORE "
            "Success durably. The archive never deletes instances automatically; a "
            "commitment is the archive taking permanent responsibility, and the peer may "
            "delete its copy. This is stricter than the sample statement, which commits on "
            "database presence alone: an indexed instance whose file is missing or "
            "damaged is reported as a failure.\n\n"
            "The check happens immediately and synchronously, before the N-ACTION-RSP. "
            "Requests are not cached: an instance that arrives after its N-ACTION, even on "
            "the same association, is reported as failed (0112). Commitment covers the "
            "storage SOP classes the Storage service of this AE accepts (the statement's "
            "Table F.4.2-33, which omits NM Image Storage (Retired) although it is "
            "accepted; it is committed like the others). When the peer stored the same "
            "SOP Instance UID twice and the second copy was given a new UID, a request for "
            "the original UID is answered from the instance indexed under that UID. "
            "Storage Media File-Set ID and UID in the request are ignored. An instance "
            "named twice in one request is reported once.",
        ),
        StatementSection(
            "N-ACTION handling",
            "The request is checked in this order: Requested SOP Instance UID, Action Type "
            "ID, presence of the data set's attributes, their values; the first problem "
            "decides the status. The sample statement prints Processing Failure, Missing "
            "Attribute and Missing Attribute Value as 'Error'; PS3.7 and this table call "
            "them Failure, and the codes are the sample's. PS3.7 lists 0120 and 0121 for "
            "N-CREATE/N-SET rather than N-ACTION; they are sent as the sample specifies "
            "(0120: an attribute is absent; 0121: present without a value). The codes "
            "0112 (wrong Requested SOP Instance UID) and 0123 (Action Type ID other than "
            "1) are additions to the sample's table, taken from PS3.7. A Transaction UID "
            "whose earlier transaction is still awaiting delivery is refused with 0110; "
            "one whose earlier transaction was delivered or failed starts a new check "
            "that replaces the earlier outcome. Each transaction and its per-instance "
            "outcomes are stored in the database in one step before the N-ACTION-RSP, so "
            "a report that could not be delivered survives a restart. There is no limit "
            "on outstanding requests; each N-ACTION is answered before the next message "
            "is read.",
        ),
        StatementSection(
            "N-EVENT-REPORT content",
            f"Affected SOP Instance UID is {WELL_KNOWN_INSTANCE}. Event Type ID is 1 when "
            "every referenced instance was committed and 2 otherwise. The data set carries "
            "the Transaction UID of the request, Referenced SOP Sequence with the committed "
            "instances (absent when none was committed) and, for event type 2, Failed SOP "
            "Sequence whose items carry Failure Reason. Every referenced instance appears "
            "in exactly one of the two sequences. Retrieve AE Title is not sent.\n\n"
            + _failure_reason_table(FAILURE_REASONS),
        ),
        StatementSection(
            "Delivering the report",
            f"{delivery_default} The AE then waits for the N-EVENT-REPORT-RSP; requests "
            "the peer sends meanwhile are served after it. If the peer releases or aborts "
            "the association before the report is sent or answered, or the transfer "
            "fails, the report is sent over a new association opened by this AE, at once. "
            "The new association always goes to the AE title that called on the "
            "N-ACTION's association, looked up in the `[remote]` table (never the peer's "
            "address with a guessed port); a title not in the table makes the transaction "
            "fail at once, with an error in the log. The AE proposes Table F.4.2-28 with "
            "an SCP/SCU Role Selection item for Storage Commitment (SCU-role 0, SCP-role "
            "1); a peer that does not confirm the role still gets the report, and a "
            "warning is logged. All due reports for one peer go over one association, "
            "which is then released, and the AE opens one association at a time.\n\n"
            "Every transmission counts as an attempt, including the one on the original "
            "association. A status other than 0000 or 0107, a refused association or a "
            "lost connection uses an attempt and stops the batch; the remaining reports "
            f"are retried together after {_minutes(settings.retry_interval)} "
            f"(`retry_interval = {settings.retry_interval:g}`). After "
            f"{settings.max_attempts} attempts (`max_attempts`) the transaction is marked "
            "failed and an error is logged. Outstanding transactions are delivered after "
            "a restart.\n\n" + _response_table(),
        ),
        StatementSection(
            "SCP/SCU role selection",
            "PS3.4 J.2.1 makes role selection support mandatory. When a requestor proposes "
            "an SCP/SCU Role Selection item for Storage Commitment, the STORAGE-SCP AE "
            "accepts the requestor's SCU role and declines an SCP role (reply SCU-role 1, "
            "SCP-role 0); a requestor proposing only the SCP role has the context rejected "
            "(user-rejection), since this AE is not a Storage Commitment SCU. SOP Class "
            "Extended Negotiation is not supported.",
        ),
    )


def declaration(config: Config) -> ServiceDeclaration:
    settings = CommitmentSettings.from_mapping(config.service_settings(NAME))
    # Table F.4.2-30 rows 2-3; Explicit first, the AE's default preference (§F.4.2.3.4.1.2).
    accepted = ContextRow(
        STORAGE_COMMITMENT_PUSH,
        (EXPLICIT_VR_LE, IMPLICIT_VR_LE),
        scu_role=False,
        scp_role=True,
        role_selection=True,
    )
    proposed = tuple(
        ContextRow(
            uid,
            (syntax,),
            scu_role=uid != STORAGE_COMMITMENT_PUSH,
            scp_role=uid == STORAGE_COMMITMENT_PUSH,
            role_selection=uid == STORAGE_COMMITMENT_PUSH,
        )
        for uid, syntax in PROPOSED_CONTEXTS
    )
    return ServiceDeclaration(
        name=NAME,
        title="Storage Commitment",
        accepted=(accepted,),
        proposed=proposed,
        statuses={"N-ACTION": N_ACTION_STATUSES},
        service_classes={STORAGE_COMMITMENT_PUSH: CommitmentServiceClass},
        settings=settings.as_dict(),
        statement=statement(settings),
        background=_background,
    )


def _background(ctx: ServiceContext) -> DeliveryWorker:
    return start_worker(ctx)


@hookimpl
def dicomlab_services(config: Config) -> list[ServiceDeclaration]:
    return [declaration(config)]

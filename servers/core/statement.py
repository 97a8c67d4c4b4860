"""Render each AE group's conformance statement from the declarations and the config in effect.

The statement follows the structure of DICOM PS3.2 (the Annex F sample: overview,
introduction, networking with one specification per AE, configuration, media,
character sets, security). Every table is generated: SOP class names come from
pydicom's dictionary, presentation contexts and status tables from the services'
:class:`~servers.core.declaration.ServiceDeclaration`, the rejection table from
:data:`servers.core.network.REJECTION_ROWS`, titles, ports and parameters from the
configuration. Nothing is typed twice, so the document cannot drift from the code.

The output is deterministic (no dates, no paths), so ``statements/<group>.md``
can be committed and checked against the rendering in the tests.

>>> from servers.core import config
>>> text = render(config.load(path=None, environ={}), "archive")
>>> text.startswith("# DICOM Conformance Statement")
True
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from servers.core import tls
from servers.core.config import AEConfig, Config
from servers.core.declaration import (
    ContextRow,
    ServiceDeclaration,
    StartupError,
    StatusRow,
    uid_name,
)
from servers.core.network import APPLICATION_CONTEXT_NAME, REJECTION_ROWS
from servers.core.plugins import discover, services_for_ae

PRODUCT = "dicomlab"

# A declaration may name, in its settings, the local AE (by configuration key) that
# initiates its outgoing associations, e.g. C-MOVE sub-operations sent as STORAGE-SCU.
# Without it the proposed contexts are listed under the AEs that run the service.
INITIATOR_SETTING = "initiator_ae"
# A declaration may list extra Specific Character Set values it handles.
CHARACTER_SETS_SETTING = "character_sets"


@dataclass(frozen=True)
class GroupInfo:
    """What the generated text cannot derive: the group's name and what it models."""

    title: str
    model: str
    purpose: str
    data_flow: str = ""
    # Replaces the archive's note under the AE table (titles, ports, root).
    address_note: str = ""


GROUPS: Mapping[str, GroupInfo] = {
    "archive": GroupInfo(
        title="Query/Retrieve Archive",
        model='the sample statement "EXAMPLE-QUERY-RETRIEVE-SERVER" (DICOM PS3.2-2008 Annex F)',
        purpose="archives diagnostic images: external systems send images to it for "
        "permanent storage, ask it to commit them, query what it holds and retrieve the "
        "images themselves",
        data_flow="The only sequencing constraint between the AEs is that an instance must "
        "first have been received by the storage AE before a Storage Commitment, query or "
        "retrieve request about it can succeed. Storage Commitment does not have to happen "
        "before query or retrieve.",
    ),
    "ris": GroupInfo(
        title="RIS: Modality Worklist and MPPS",
        model='the sample statement "DICOMRis" (DICOM PS3.2-2008 Annex C)',
        purpose="provides scheduled procedure steps to modalities and tracks the steps "
        "they perform",
        data_flow="Orders reach the worklist over HL7 (or from `dicomlab worklist`) before "
        "a modality can query them; an MPPS needs no prior worklist query (unscheduled "
        "cases), but only an MPPS that matches an order updates it.",
        address_note="The sample names its AE DICOMSRV and leaves the title to "
        "configuration; the embedded default uses `DICOMSRV`. The sample's port 104 needs "
        "root, so the embedded default listens on 1104; the systemd deployment in `deploy/` "
        "may bind 104 (set `port = 104` in `[ae.ris_scp]`). The HL7 order listener uses "
        "its own port (`services.worklist.hl7_port`). Two listening AEs may not answer "
        "with the same title on the same port; a wrong called AE title is rejected as in "
        "the association acceptance policy.",
    ),
    "print": GroupInfo(
        title="Print Server",
        model='the sample statement "EXAMPLE-PRINT-SERVER-MANAGEMENT" (DICOM PS3.2-2008 Annex E)',
        purpose="prints films on a virtual printer for modalities and workstations",
    ),
}

RESULTS = {1: "rejected-permanent", 2: "rejected-transient"}
SOURCES = {
    1: "DICOM UL service-user",
    2: "DICOM UL service-provider (ACSE related function)",
    3: "DICOM UL service-provider (Presentation related function)",
}

TERMS: tuple[tuple[str, str], ...] = (
    ("AE", "Application Entity"),
    ("AET", "Application Entity Title"),
    ("DICOM", "Digital Imaging and Communications in Medicine"),
    ("DIMSE", "DICOM Message Service Element"),
    ("IOD", "Information Object Definition"),
    ("PDU", "Protocol Data Unit"),
    ("SCP", "Service Class Provider"),
    ("SCU", "Service Class User"),
    ("SOP", "Service-Object Pair"),
    ("TCP/IP", "Transmission Control Protocol / Internet Protocol"),
    ("UID", "Unique Identifier"),
)


def product_version() -> str:
    try:
        return importlib.metadata.version(PRODUCT)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# --- what the tests and the statement share -------------------------------------------


def status_rows(
    declarations: Iterable[ServiceDeclaration],
) -> Iterator[tuple[str, str, StatusRow]]:
    """Every documented status row as ``(service, operation, row)``."""
    for declaration in declarations:
        for operation, table in declaration.statuses.items():
            for row in table:
                yield declaration.name, operation, row


def missing_status_rows(
    declarations: Iterable[ServiceDeclaration],
    emitted: Mapping[tuple[str, str, int], int],
) -> list[tuple[str, str, StatusRow]]:
    """The documented rows never answered over an association (``emitted`` count 0).

    >>> from servers.verification import declaration
    >>> from servers.core import config
    >>> d = declaration(config.load(path=None, environ={}))
    >>> [row.hex for _, _, row in missing_status_rows([d], {})]
    ['0000']
    >>> missing_status_rows([d], {("verification", "C-ECHO", 0): 1})
    []
    """
    return [
        (service, operation, row)
        for service, operation, row in status_rows(declarations)
        if emitted.get((service, operation, row.code), 0) <= 0
    ]


# --- markdown helpers -------------------------------------------------------------------


def _cell(value: object) -> str:
    return " ".join(str(value).split()).replace("|", "\\|")


def _fmt(value: Any) -> str:
    """A setting's value as it would be written in the TOML file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {_fmt(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
        return "[" + ", ".join(_fmt(v) for v in items) + "]"
    return json.dumps(str(value))


def _seconds(value: float) -> str:
    return f"{_fmt(value)} s"


@dataclass
class _Doc:
    lines: list[str] = field(default_factory=list)
    tables: int = 0

    def heading(self, level: int, number: str, title: str) -> None:
        self.lines.extend([f"{'#' * min(level, 6)} {number} {title}".rstrip(), ""])

    def para(self, *texts: str) -> None:
        for text in texts:
            if text:
                self.lines.extend([text, ""])

    def table(self, caption: str, header: Sequence[str], rows: Iterable[Sequence[object]]) -> bool:
        """Append a numbered table; an empty one is left out (the caller says why)."""
        body = [("| " + " | ".join(_cell(c) for c in row) + " |") for row in rows]
        if not body:
            return False
        self.tables += 1
        self.lines.extend([f"*Table {self.tables}. {caption}*", ""])
        self.lines.append("| " + " | ".join(header) + " |")
        self.lines.append("|" + "|".join("---" for _ in header) + "|")
        self.lines.extend([*body, ""])
        return True

    def text(self) -> str:
        while self.lines and not self.lines[-1]:
            self.lines.pop()
        return "\n".join(self.lines) + "\n"


# --- the model the text is rendered from -----------------------------------------------


@dataclass(frozen=True)
class _AE:
    config: AEConfig
    services: tuple[ServiceDeclaration, ...]
    # Services whose proposed contexts this AE sends.
    initiates_for: tuple[ServiceDeclaration, ...]

    @property
    def name(self) -> str:
        return f"{self.config.title} (`[ae.{self.config.key}]`)"


def _initiator(declaration: ServiceDeclaration, runners: Sequence[str]) -> list[str]:
    named = declaration.settings.get(INITIATOR_SETTING)
    return [str(named)] if named else list(runners)


def _model(
    config: Config, group: str, available: Mapping[str, ServiceDeclaration], info: GroupInfo
) -> list[_AE]:
    members = config.aes_in_group(group)
    running: dict[str, list[ServiceDeclaration]] = {
        ae.key: services_for_ae(ae.key, ae.services, dict(available)) for ae in members
    }
    initiates: dict[str, list[ServiceDeclaration]] = {ae.key: [] for ae in members}
    seen: set[str] = set()
    for ae in members:
        for declaration in running[ae.key]:
            if not declaration.proposed or declaration.name in seen:
                continue
            seen.add(declaration.name)
            runners = [k for k, ds in running.items() if declaration.name in {d.name for d in ds}]
            targets = [k for k in _initiator(declaration, runners) if k in initiates]
            for key in targets or runners:
                initiates[key].append(declaration)
    return [
        _AE(config=ae, services=tuple(running[ae.key]), initiates_for=tuple(initiates[ae.key]))
        for ae in members
    ]


def _unique(declarations: Iterable[ServiceDeclaration]) -> list[ServiceDeclaration]:
    out: dict[str, ServiceDeclaration] = {}
    for declaration in declarations:
        out.setdefault(declaration.name, declaration)
    return list(out.values())


def _roles(ae: _AE) -> dict[str, tuple[str, bool, bool]]:
    """SOP class UID -> (name, SCU, SCP) for what this AE does on the network."""
    roles: dict[str, tuple[str, bool, bool]] = {}

    def add(row: ContextRow, scu: bool, scp: bool) -> None:
        name, was_scu, was_scp = roles.get(row.abstract_syntax, (row.sop_class_name, False, False))
        roles[row.abstract_syntax] = (name, was_scu or scu, was_scp or scp)

    if ae.config.listens:
        for declaration in ae.services:
            for row in declaration.accepted:
                add(row, False, row.scp_role)
    for declaration in ae.initiates_for:
        for row in declaration.proposed:
            add(row, row.scu_role, row.scp_role)
    return roles


def _yes(flag: bool) -> str:
    return "Yes" if flag else "No"


# --- sections ---------------------------------------------------------------------------


def _title(doc: _Doc, config: Config, group: str, info: GroupInfo, aes: list[_AE]) -> None:
    doc.lines.extend([f"# DICOM Conformance Statement: {PRODUCT} {info.title}", ""])
    doc.para(
        f"This statement is generated by `dicomlab statement` from the services' declarations "
        f"and the configuration in effect ({config.source}). Do not edit it; change the code "
        f"or the configuration and run `make statements`."
    )
    doc.table(
        "Product identification",
        ["Item", "Value"],
        [
            ("Product name", PRODUCT),
            ("Product version", product_version()),
            ("AE group", f"`{group}`"),
            ("Application entities", ", ".join(ae.config.title for ae in aes) or "none"),
            ("Modelled on", info.model),
        ],
    )


def _overview(doc: _Doc, group: str, info: GroupInfo, aes: list[_AE]) -> None:
    doc.heading(2, "1", "Conformance Statement Overview")
    services = _unique(d for ae in aes for d in ae.services)
    titles = ", ".join(d.title for d in services) or "no services"
    doc.para(
        f"The {PRODUCT} `{group}` group {info.purpose}. It consists of {len(aes)} "
        f"application entities running in one process on one index database and one "
        f"instance store, and provides these DICOM services: {titles}.",
    )
    rows: list[tuple[str, str, str, str]] = []
    by_class: dict[str, tuple[str, bool, bool]] = {}
    for ae in aes:
        for uid, (name, scu, scp) in _roles(ae).items():
            _, was_scu, was_scp = by_class.get(uid, (name, False, False))
            by_class[uid] = (name, scu or was_scu, scp or was_scp)
    for uid, (name, scu, scp) in by_class.items():
        rows.append((name, f"`{uid}`", _yes(scu), _yes(scp)))
    doc.table(
        "Network services",
        ["SOP Class", "SOP Class UID", "User of Service (SCU)", "Provider of Service (SCP)"],
        rows,
    )
    doc.para(
        "Media interchange is not supported. Extended negotiation (relational queries and "
        "other SOP class extended negotiation) is not supported as SCU or SCP."
    )


def _contents(doc: _Doc, body: list[str]) -> None:
    doc.heading(2, "2", "Table of Contents")
    for line in body:
        if line.startswith("## "):
            doc.lines.append(f"- {line[3:]}")
        elif line.startswith("### "):
            doc.lines.append(f"  - {line[4:]}")
    doc.lines.append("")


def _introduction(doc: _Doc, info: GroupInfo) -> None:
    doc.heading(2, "3", "Introduction")
    doc.heading(3, "3.1", "Revision History")
    doc.table(
        "Revision history",
        ["Document version", "Description"],
        [
            (
                product_version(),
                f"Generated for {PRODUCT} {product_version()}; the statement's revision is "
                "the package version, and it changes with every release that changes it.",
            )
        ],
    )
    doc.heading(3, "3.2", "Audience")
    doc.para(
        "Hospital staff, health system integrators, software designers and implementers, "
        "and people learning DICOM. A working understanding of DICOM is assumed."
    )
    doc.heading(3, "3.3", "Remarks")
    doc.para(
        "DICOM by itself does not guarantee interoperability. This statement is the first "
        "step towards assessing connectivity with other DICOM equipment; it does not replace "
        "testing with that equipment.",
        f"{PRODUCT} reproduces {info.model}. Where the sample statement is ambiguous or "
        "disagrees with the DICOM standard, the behaviour chosen is described in the "
        "SOP-specific conformance sections below. Every status code listed in this "
        "statement is provoked by the project's test suite over a real association, and "
        "the suite fails if a service answers with a status that is not listed.",
    )
    doc.heading(3, "3.4", "Definitions, Terms and Abbreviations")
    doc.table("Abbreviations", ["Abbreviation", "Meaning"], TERMS)


def _implementation_model(doc: _Doc, info: GroupInfo, aes: list[_AE]) -> None:
    doc.heading(3, "4.1", "Implementation Model")
    doc.heading(4, "4.1.1", "Application Data Flow")
    lines = []
    for ae in aes:
        services = ", ".join(d.title for d in ae.services)
        if ae.config.listens:
            what = f"listens on TCP port {ae.config.port} and provides {services or 'nothing'}"
        else:
            what = "does not accept associations"
        if ae.initiates_for:
            what += (
                "; it initiates associations for "
                + ", ".join(d.title for d in ae.initiates_for)
                + " (proposed contexts in its specification below)"
            )
        elif not ae.config.listens:
            what += " and initiates none on behalf of any service of this group"
        lines.append(f"- **{ae.config.title}** (`[ae.{ae.config.key}]`) {what}.")
    doc.lines.extend([*lines, ""])
    doc.para(
        "Remote AEs open associations to the listening AEs and request the services above. "
        "All AEs run in one process (`dicomlab serve`) and share one index database and "
        "one instance store, so what one AE receives is immediately visible to the others.",
        info.data_flow,
    )
    doc.heading(4, "4.1.2", "Functional Definition of AEs")
    for ae in aes:
        parts = []
        for declaration in ae.services:
            count = len(declaration.sop_classes)
            parts.append(
                f"{declaration.title} (`{declaration.name}`, "
                f"{count} SOP class{'' if count == 1 else 'es'})"
            )
        provides = "; ".join(parts) if parts else "no services of its own"
        doc.para(f"**{ae.config.title}**: {provides}.")


def _sop_classes(doc: _Doc, number: str, ae: _AE) -> None:
    doc.heading(5, number, "SOP Classes")
    rows = [
        (name, f"`{uid}`", _yes(scu), _yes(scp)) for uid, (name, scu, scp) in _roles(ae).items()
    ]
    if not doc.table(
        f"SOP classes for {ae.config.title}",
        ["SOP Class Name", "SOP Class UID", "SCU", "SCP"],
        rows,
    ):
        doc.para(f"{ae.config.title} supports no SOP class in this configuration.")


def _association_policies(doc: _Doc, number: str, ae: _AE) -> None:
    c = ae.config
    doc.heading(5, number, "Association Policies")
    doc.para(
        "**General.** The DICOM Application Context Name is the only one accepted and proposed."
    )
    doc.table(
        f"DICOM application context for {c.title}",
        ["Application Context Name", "Value"],
        [("DICOM Application Context", f"`{APPLICATION_CONTEXT_NAME}`")],
    )
    doc.para(
        f"The maximum PDU size {c.title} receives (announced in its associate request or "
        f"response) is {c.max_pdu} bytes. PDUs it sends never exceed the peer's announced "
        "maximum."
    )
    doc.para("**Number of associations.**")
    rows: list[tuple[str, str]] = []
    if c.listens:
        rows.append(
            ("Maximum number of simultaneous associations accepted", f"{c.max_associations}")
        )
        per_ae = (
            str(c.max_associations_per_calling_ae)
            if c.max_associations_per_calling_ae
            else "no separate limit"
        )
        rows.append(("Maximum number of simultaneous associations per calling AE title", per_ae))
    if ae.initiates_for:
        rows.append(
            (
                "Associations initiated",
                "as the services below describe ("
                + ", ".join(d.title for d in ae.initiates_for)
                + ")",
            )
        )
    if not doc.table(f"Number of associations for {c.title}", ["Item", "Value"], rows):
        doc.para(f"{c.title} neither accepts nor initiates associations in this configuration.")
    if c.listens:
        doc.para(
            "Each accepted association is served on its own thread. A request beyond either "
            "limit is rejected with result 2, source 3, reason 2 (local-limit-exceeded)."
        )
    doc.para(
        f"**Asynchronous nature.** {c.title} does not support asynchronous operations: at "
        "most one DIMSE operation is outstanding on an association at any time. An "
        "Asynchronous Operations Window sub-item proposed by a peer gets no reply sub-item."
    )
    doc.table(
        f"Asynchronous nature for {c.title}",
        ["Item", "Value"],
        [("Maximum number of outstanding asynchronous transactions", "1 (not configurable)")],
    )
    doc.para("**Implementation identifying information.**")
    doc.table(
        f"DICOM implementation class and version for {c.title}",
        ["Item", "Value"],
        [
            ("Implementation Class UID", f"`{c.implementation_class_uid}`"),
            ("Implementation Version Name", f"`{c.implementation_version_name}`"),
        ],
    )


def _context_rows(rows: Iterable[ContextRow], role: str | None = None) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for row in rows:
        for ts in row.transfer_syntaxes:
            out.append(
                (
                    row.sop_class_name,
                    f"`{row.abstract_syntax}`",
                    uid_name(ts),
                    f"`{ts}`",
                    role or row.role,
                    "None",
                )
            )
    return out


CONTEXT_HEADER = [
    "Abstract Syntax Name",
    "Abstract Syntax UID",
    "Transfer Syntax Name",
    "Transfer Syntax UID",
    "Role",
    "Extended Negotiation",
]


def _initiation(doc: _Doc, number: str, ae: _AE, runners: Mapping[str, list[str]]) -> None:
    doc.heading(5, number, "Association Initiation Policy")
    if not ae.initiates_for:
        doc.para(f"{ae.config.title} does not initiate associations for any service of this group.")
        return
    for declaration in ae.initiates_for:
        doc.para(
            f"**{declaration.title}.** When the {declaration.title} service initiates an "
            f"association, {ae.config.title} proposes the following presentation contexts "
            "(one row per abstract syntax and transfer syntax), with the timeouts and "
            "maximum PDU size of its configuration."
        )
        doc.table(
            f"Proposed presentation contexts for {ae.config.title} ({declaration.title})",
            CONTEXT_HEADER,
            _context_rows(declaration.proposed),
        )
        if declaration.name not in {d.name for d in ae.services}:
            doc.para(
                f"{ae.config.title} acts for the {declaration.title} service of "
                + ", ".join(runners.get(declaration.name, ()))
                + f"; its SOP-specific conformance, including how {ae.config.title} treats "
                "the responses it receives, is in that AE's specification."
            )


def _status_table(doc: _Doc, ae: _AE, declaration: ServiceDeclaration) -> None:
    for operation, table in declaration.statuses.items():
        doc.table(
            f"{operation} response status for {declaration.title} on {ae.config.title}",
            ["Service Status", "Further Meaning", "Error Code", "Behaviour"],
            [(row.category, row.meaning, row.hex, row.condition) for row in table],
        )


def _acceptance(doc: _Doc, number: str, ae: _AE) -> None:
    c = ae.config
    doc.heading(5, number, "Association Acceptance Policy")
    if not c.listens:
        doc.para(f"{c.title} does not accept associations (it has no listening port).")
        return
    checks = [f"the application context name is `{APPLICATION_CONTEXT_NAME}`"]
    if c.calling_ae_allow:
        checks.append(
            "the calling AE title is one of " + ", ".join(f"`{t}`" for t in c.calling_ae_allow)
        )
    if c.require_called_ae:
        checks.append(f"the called AE title is `{c.title}`")
    if c.ip_allow:
        checks.append("the peer's IP address is in " + ", ".join(f"`{n}`" for n in c.ip_allow))
    checks.append("the association limits are not exceeded")
    checks.append("at least one proposed presentation context is acceptable")
    doc.para(
        f"{c.title} accepts an association request only if "
        + "; ".join(checks)
        + ". If none of the proposed presentation contexts is accepted, the association "
        "request itself is rejected. Otherwise the association is rejected as follows:"
    )
    doc.table(
        f"Association rejection reasons for {c.title}",
        ["Result", "Source", "Reason/Diagnosis", "Explanation"],
        [
            (
                f"{row.result} – {RESULTS.get(row.result, '')}",
                f"{row.source} – {SOURCES.get(row.source, '')}",
                f"{row.reason} – {row.meaning}",
                row.condition,
            )
            for row in REJECTION_ROWS
        ],
    )
    doc.para(_user_identity_policy(c))
    accepted = [d for d in ae.services if d.accepted]
    doc.para(
        f"**Accepted presentation contexts.** Any of the presentation contexts below is "
        f"acceptable to {c.title}. For each abstract syntax the transfer syntaxes are listed "
        "in the AE's order of preference."
    )
    doc.table(
        f"Accepted presentation contexts for {c.title}",
        CONTEXT_HEADER,
        [r for d in accepted for r in _context_rows(d.accepted)],
    )
    doc.para(
        "**Transfer syntax selection policy.** Each proposed presentation context is "
        "negotiated on its own. When it offers several transfer syntaxes, the first one in "
        "the order of the table above that the peer offered is accepted; the order in which "
        "the peer proposed them does not matter. A context whose abstract syntax is not in "
        "the table is rejected with result 3 (abstract-syntax-not-supported); one whose "
        "transfer syntaxes are all absent from the table is rejected with result 4 "
        "(transfer-syntaxes-not-supported).",
        "**SCP/SCU role selection.** The Role column gives the role the AE takes. A role "
        "selection sub-item is honoured only for the abstract syntaxes whose service "
        "requires it; otherwise the default roles apply.",
    )
    for index, declaration in enumerate(ae.services, start=1):
        if not (declaration.statement or declaration.statuses):
            continue
        doc.heading(6, f"{number}.{index}", f"SOP Specific Conformance for {declaration.title}")
        for section in declaration.statement:
            doc.para(f"**{section.title}.**", section.body.strip())
        _status_table(doc, ae, declaration)


def _user_identity_policy(c: AEConfig) -> str:
    if c.user_identity == "ignore":
        return (
            "A User Identity sub-item proposed by the peer is ignored: the association "
            "proceeds as if none had been proposed, and no reply sub-item is sent."
        )
    if c.user_identity == "optional":
        rule = (
            "A request without a User Identity sub-item, or with a Kerberos, SAML or JWT "
            "identity (not supported), is accepted as anonymous. A username alone must be a "
            "configured user; a username and passcode must match a configured user."
        )
    else:
        rule = (
            "Only a User Identity sub-item of type 2 (username and passcode) naming a "
            "configured user with the matching passcode is accepted; anything else, including "
            "no sub-item, is rejected."
        )
    return (
        f"User Identity negotiation is {c.user_identity}. {rule} A request that fails is "
        "rejected with (1, 2, 1). When the peer asks for a positive response to an accepted "
        "identity, a User Identity sub-item with an empty server response is returned."
    )


def _ae_specifications(doc: _Doc, aes: list[_AE]) -> None:
    doc.heading(3, "4.2", "AE Specifications")
    # Service name -> titles of the AEs that run it (for services another AE initiates for).
    runners: dict[str, list[str]] = {}
    for ae in aes:
        for declaration in ae.services:
            runners.setdefault(declaration.name, []).append(ae.config.title)
    for index, ae in enumerate(aes, start=1):
        number = f"4.2.{index}"
        doc.heading(4, number, f"{ae.config.title} Application Entity Specification")
        _sop_classes(doc, f"{number}.1", ae)
        _association_policies(doc, f"{number}.2", ae)
        _initiation(doc, f"{number}.3", ae, runners)
        _acceptance(doc, f"{number}.4", ae)


def _network_interfaces(doc: _Doc, config: Config) -> None:
    doc.heading(3, "4.3", "Network Interfaces")
    doc.heading(4, "4.3.1", "Physical Network Interface")
    doc.para(
        "The suite uses whatever network interfaces the host provides; it has no "
        "interface-specific requirements."
    )
    doc.heading(4, "4.3.2", "Additional Protocols")
    doc.para(
        "DICOM upper layer over TCP/IP (PS3.8). Host name resolution, DHCP and time "
        "synchronisation are left to the host operating system."
    )
    doc.heading(4, "4.3.3", "IPv4 and IPv6 Support")
    doc.para(
        f"The listening AEs bind to `host` = `{config.host}`. `0.0.0.0` listens on every "
        "IPv4 address; an IPv6 address (for example `::`) listens on IPv6. Outgoing "
        "associations use IPv4 or IPv6 as the remote AE's configured host resolves. "
        "TCP_NODELAY is set on every accepted and opened socket, so small DIMSE messages "
        "are not delayed by Nagle's algorithm. No IPv6 configuration or security features "
        "are used."
    )


def _configuration(
    doc: _Doc,
    config: Config,
    aes: list[_AE],
    services: list[ServiceDeclaration],
    group: str = "archive",
) -> None:
    doc.heading(3, "4.4", "Configuration")
    doc.para(
        "Configuration is one TOML file (`dicomlab serve --config PATH`, or `DICOMLAB_CONFIG`) "
        "over the embedded default, then `DICOMLAB_*` environment variables, where `__` "
        "walks into tables: `DICOMLAB_AE__STORAGE_SCP__PORT=4104` sets `port` in "
        "`[ae.storage_scp]`. `dicomlab config` prints the effective configuration, and "
        "`dicomlab config --write-default PATH` writes a commented default file."
    )
    doc.heading(4, "4.4.1", "AE Title/Presentation Address Mapping")
    doc.heading(5, "4.4.1.1", "Local AE Titles")
    doc.table(
        "Application entity configuration",
        ["Application Entity", "AE Title", "TCP Port", "Configuration table"],
        [
            (
                ae.config.title,
                f"`{ae.config.title}`",
                str(ae.config.port) if ae.config.listens else "none (initiates only)",
                f"`[ae.{ae.config.key}]`",
            )
            for ae in aes
        ],
    )
    note = GROUPS[group].address_note if group in GROUPS else ""
    if note:
        doc.para(note)
    else:
        doc.para(
            "The embedded default uses the sample statement's AE titles and ports 4000 and 5000, "
            "so no root privileges are needed. For the systemd deployment (including port 104) "
            "see `deploy/` in the source tree. Two listening AEs may not answer with the same "
            "title on the same port."
        )
    doc.heading(5, "4.4.1.2", "Remote AE Title/Presentation Address Mapping")
    doc.para(
        "Remote AEs are needed only where a service opens an association to a peer by AE "
        "title (C-MOVE destinations, Storage Commitment reports over a new association). "
        "Each is a `[remote.TITLE]` table with `host` and `port`. Peers that only connect "
        "to the suite need no entry."
    )
    if not doc.table(
        "Remote AEs",
        ["AE Title", "Host", "TCP Port"],
        [(f"`{r.title}`", r.host, str(r.port)) for r in config.remotes.values()],
    ):
        doc.para("No remote AEs are configured.")
    doc.heading(4, "4.4.2", "Parameters")
    doc.para(
        "Every parameter below is configurable; the value column is the value in effect for "
        "this rendering."
    )
    rows: list[tuple[str, str, str, str]] = [
        ("Address the listening AEs bind to", "`host`", "Yes", _fmt(config.host)),
    ]
    for ae in aes:
        c = ae.config
        key = f"ae.{c.key}"
        t = c.title
        if c.listens:
            rows.append((f"{t}: TCP port", f"`{key}.port`", "Yes", str(c.port)))
        rows.extend(
            [
                (f"{t}: AE title", f"`{key}.title`", "Yes", _fmt(c.title)),
                (f"{t}: maximum PDU size received", f"`{key}.max_pdu`", "Yes", str(c.max_pdu)),
                (
                    f"{t}: time-out waiting for an association request, accept or reject "
                    "(ARTIM and association level)",
                    f"`{key}.acse_timeout`",
                    "Yes",
                    _seconds(c.acse_timeout),
                ),
                (
                    f"{t}: time-out waiting for a TCP connect() to a remote AE",
                    f"`{key}.connection_timeout`",
                    "Yes",
                    _seconds(c.connection_timeout),
                ),
                (
                    f"{t}: time-out waiting for a DIMSE response to a request it sent",
                    f"`{key}.dimse_timeout`",
                    "Yes",
                    _seconds(c.dimse_timeout),
                ),
            ]
        )
        if c.listens:
            rows.extend(
                [
                    (
                        f"{t}: time-out waiting on an open association for the next message "
                        "(restarted by every PDU received; expiry aborts the association)",
                        f"`{key}.idle_timeout`",
                        "Yes",
                        _seconds(c.idle_timeout),
                    ),
                    (
                        f"{t}: time-out waiting for data between TCP packets of a PDU "
                        "(low-level; expiry aborts the association)",
                        f"`{key}.network_timeout`",
                        "Yes",
                        _seconds(c.network_timeout),
                    ),
                    (
                        f"{t}: maximum number of simultaneous associations",
                        f"`{key}.max_associations`",
                        "Yes",
                        str(c.max_associations),
                    ),
                    (
                        f"{t}: maximum number of simultaneous associations per calling AE "
                        "(0: no separate limit)",
                        f"`{key}.max_associations_per_calling_ae`",
                        "Yes",
                        str(c.max_associations_per_calling_ae),
                    ),
                    (
                        f"{t}: check the called AE title",
                        f"`{key}.require_called_ae`",
                        "Yes",
                        _fmt(c.require_called_ae),
                    ),
                    (
                        f"{t}: calling AE titles allowed (empty: any)",
                        f"`{key}.calling_ae_allow`",
                        "Yes",
                        _fmt(list(c.calling_ae_allow)),
                    ),
                    (
                        f"{t}: IP addresses or networks allowed (empty: any)",
                        f"`{key}.ip_allow`",
                        "Yes",
                        _fmt(list(c.ip_allow)),
                    ),
                ]
            )
        rows.extend(
            [
                (
                    f"{t}: Implementation Class UID",
                    f"`{key}.implementation_class_uid`",
                    "Yes",
                    _fmt(c.implementation_class_uid),
                ),
                (
                    f"{t}: Implementation Version Name",
                    f"`{key}.implementation_version_name`",
                    "Yes",
                    _fmt(c.implementation_version_name),
                ),
                (f"{t}: services", f"`{key}.services`", "Yes", _fmt(list(c.services))),
            ]
        )
    for declaration in services:
        for name, value in declaration.settings.items():
            rows.append(
                (
                    f"{declaration.title}: `{name}`",
                    f"`services.{declaration.name}.{name}`",
                    "Yes",
                    _fmt(value),
                )
            )
    doc.table(
        "Configuration parameters",
        ["Parameter", "Configuration key", "Configurable", "Value"],
        rows,
    )
    doc.para(
        "The idle time-out restarts with every PDU received; an association that stays "
        "silent longer is aborted. The time-out between TCP packets applies while a PDU "
        "is partly received: when it expires the association is aborted and the partly "
        "received message is discarded."
    )


def _media(doc: _Doc) -> None:
    doc.heading(2, "5", "Media Interchange")
    doc.para("Media interchange (DICOM File-sets on removable media) is not supported.")


def _character_sets(doc: _Doc, services: list[ServiceDeclaration]) -> None:
    doc.heading(2, "6", "Support of Character Sets")
    extra: dict[str, None] = {}
    for declaration in services:
        for value in declaration.settings.get(CHARACTER_SETS_SETTING, ()) or ():
            if value != "ISO_IR 100":
                extra.setdefault(str(value), None)
    sets = ["ISO_IR 100 (ISO 8859-1, Latin alphabet No. 1)", *extra]
    doc.para(
        "All application entities support the default character repertoire (ISO-IR 6) and "
        + ", ".join(sets)
        + ". Where a service treats Specific Character Set (0008,0005) in a particular way, "
        "its SOP-specific conformance section says so."
    )
    sections = [
        f'{declaration.title}, "{section.title}"'
        for declaration in services
        for section in declaration.statement
        if "character set" in section.title.lower()
    ]
    if sections:
        doc.para("See " + "; ".join(sections) + ".")


def _security(doc: _Doc, config: Config, aes: list[_AE]) -> None:
    doc.heading(2, "7", "Security")
    doc.heading(3, "7.1", "Security Profiles")
    tls_aes = [ae.config for ae in aes if ae.config.tls]
    tls_remotes = sorted(r.title for r in config.remotes.values() if r.tls)
    if not tls_aes and not tls_remotes:
        doc.para(
            "No AE uses TLS in this configuration: associations are plain TCP. Any AE can "
            f"use the {tls.PROFILE} by configuring `tls_cert`, `tls_key` and `tls_ca`, and a "
            "remote AE is reached over TLS with `tls = true`. No audit trail messages are "
            "sent. Without TLS, use the suite on a trusted network."
        )
    else:
        doc.para(
            f"The {tls.PROFILE} is supported. An AE with a certificate (`tls_cert`, `tls_key`) "
            "accepts TLS connections only, on its configured port; it refuses TLS 1.1 and "
            "older, and in TLS 1.2 negotiates only the cipher suites "
            + ", ".join(tls.TLS12_CIPHER_NAMES)
            + " (RFC 7525 4.2); TLS 1.3 uses "
            + ", ".join(tls.TLS13_CIPHER_NAMES)
            + ". No TLS compression and no renegotiation. The peer's certificate must chain "
            "to the AE's `tls_ca`. An accepting AE does not check the requestor's host name "
            "(requestors are identified by AE title and the IP allow-list); when an AE "
            "initiates (C-MOVE sub-operations, Storage Commitment reports), the remote's "
            "certificate must also name the remote's configured `host` (a DNS name or IP "
            "address subject alternative name), else the connection is closed and "
            "`tls_connect_failed` is logged with the reason. The handshake of an accepted "
            "connection must be complete within the AE's `acse_timeout`, each read waiting at "
            "most `network_timeout`. A peer that fails or overruns the handshake never "
            "reaches association negotiation: the connection is closed and "
            "`tls_handshake_failed` is logged. No audit trail messages are sent."
        )
    doc.table(
        "Transport security in effect",
        ["Application Entity", "Transport", "Client certificate", "Certificates checked against"],
        [
            (
                ae.config.title,
                "TLS (BCP 195)" if ae.config.tls else "plain TCP",
                (
                    ("required" if ae.config.tls_require_client_cert else "optional")
                    if ae.config.tls and ae.config.listens
                    else ("presented when initiating" if ae.config.tls else "none")
                ),
                ae.config.tls_ca or "none",
            )
            for ae in aes
        ],
    )
    if tls_remotes:
        doc.para(
            "Remote AEs reached over TLS (the initiating AE presents its certificate and "
            "checks theirs against its `tls_ca`): " + ", ".join(tls_remotes) + "."
        )
    doc.heading(3, "7.2", "Association Level Security")
    doc.para(
        "Each listening AE can check the called AE title, restrict callers to a list of "
        "calling AE titles and to a list of IP addresses or networks, and negotiate User "
        "Identity (username and passcode, PS3.7 D.3.3.7) under a policy: `ignore` (the "
        "sub-item is ignored and gets no reply), `optional` (a request without one is "
        "accepted; a username must be configured and a passcode must match), or `required` "
        "(only a configured username with its matching passcode is accepted). Passcodes are "
        "kept as salted PBKDF2-SHA256 hashes. The rejection each check causes is in the AE's "
        "association acceptance policy."
    )
    doc.table(
        "Association level checks in effect",
        [
            "Application Entity",
            "Called AE title checked",
            "Calling AE allow-list",
            "IP allow-list",
            "User Identity",
        ],
        [
            (
                ae.config.title,
                _yes(ae.config.require_called_ae),
                ", ".join(ae.config.calling_ae_allow) or "none (any calling AE)",
                ", ".join(ae.config.ip_allow) or "none (any address)",
                ae.config.user_identity
                + (
                    f"; {len(ae.config.users)} user{'' if len(ae.config.users) == 1 else 's'}"
                    if ae.config.user_identity != "ignore"
                    else ""
                ),
            )
            for ae in aes
            if ae.config.listens
        ],
    )
    doc.para(
        "C-MOVE sends only to destinations in the remote AE table. Association limits, the "
        "maximum PDU size and the time-outs are in section 4.4.2. File names in the instance "
        "store are random, never built from a peer's strings, and query values reach the "
        "database only as bound parameters, with LIKE wildcards escaped."
    )


# --- entry points -----------------------------------------------------------------------


def groups(config: Config) -> list[str]:
    """The groups of the enabled AEs, in configuration order."""
    return list(dict.fromkeys(ae.group for ae in config.aes.values() if ae.enabled))


def render(
    config: Config,
    group: str,
    declarations: Mapping[str, ServiceDeclaration] | None = None,
) -> str:
    """The conformance statement of ``group`` as markdown.

    ``declarations`` defaults to every installed plugin's, for ``config``.
    """
    available = discover(config) if declarations is None else declarations
    if group not in groups(config):
        raise StartupError(f"no enabled AE in group {group!r}; groups: {', '.join(groups(config))}")
    info = GROUPS.get(group, GroupInfo(title=group, model="no sample statement", purpose="runs"))
    aes = _model(config, group, available, info)
    services = _unique(d for ae in aes for d in (*ae.services, *ae.initiates_for))

    body = _Doc()
    _introduction(body, info)
    body.heading(2, "4", "Networking")
    _implementation_model(body, info, aes)
    _ae_specifications(body, aes)
    _network_interfaces(body, config)
    _configuration(body, config, aes, services, group)
    _media(body)
    _character_sets(body, services)
    _security(body, config, aes)

    head = _Doc()
    _title(head, config, group, info, aes)
    _overview(head, group, info, aes)
    _contents(head, body.lines)
    # Tables are numbered in reading order: renumber the body after the head's tables.
    offset = head.tables
    renumbered = [_renumber(line, offset) for line in body.lines]
    return _Doc(lines=head.lines + renumbered).text()


def _renumber(line: str, offset: int) -> str:
    if line.startswith("*Table ") and ". " in line:
        number, rest = line[len("*Table ") :].split(". ", 1)
        if number.isdigit():
            return f"*Table {int(number) + offset}. {rest}"
    return line


def render_all(config: Config) -> dict[str, str]:
    """Every group's statement, keyed by group name (``statements/<group>.md``)."""
    declarations = discover(config)
    return {group: render(config, group, declarations) for group in groups(config)}

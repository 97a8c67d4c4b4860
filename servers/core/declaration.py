"""What a service plugin declares: contexts, roles, statuses, handlers, statement text.

A :class:`ServiceDeclaration` is the single source for association negotiation,
DIMSE dispatch, the status rows a handler may answer with, and the conformance
statement tables. Nothing about a service is typed twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydicom.uid import UID

if TYPE_CHECKING:
    from pynetdicom.service_class import ServiceClass

    from servers.core.context import ServiceContext

# Status categories as PS3.7 Annex C and the sample statements name them.
SUCCESS = "Success"
WARNING = "Warning"
FAILURE = "Failure"
REFUSED = "Refused"
ERROR = "Error"
CANCEL = "Cancel"
PENDING = "Pending"


@dataclass(frozen=True)
class StatusRow:
    """One row of a statement's status table: a code and when it is sent.

    >>> StatusRow(0xA700, "Refused", "Out of Resources", "Disk is full.").hex
    'A700'
    """

    code: int
    category: str
    meaning: str
    condition: str

    @property
    def hex(self) -> str:
        return f"{self.code:04X}"

    def __int__(self) -> int:
        return self.code


class StatusTable:
    """The status rows of one DIMSE operation, looked up by code or name."""

    def __init__(self, operation: str, rows: Iterable[StatusRow]) -> None:
        self.operation = operation
        self.rows: tuple[StatusRow, ...] = tuple(rows)
        self._by_code = {row.code: row for row in self.rows}
        if len(self._by_code) != len(self.rows):
            raise ValueError(f"duplicate status code in {operation} table")

    def __getitem__(self, code: int) -> StatusRow:
        return self._by_code[code]

    def __contains__(self, code: object) -> bool:
        return code in self._by_code

    def __iter__(self) -> Any:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def codes(self) -> frozenset[int]:
        return frozenset(self._by_code)


@dataclass(frozen=True)
class ContextRow:
    """A presentation context row: one abstract syntax, its transfer syntaxes.

    ``transfer_syntaxes`` are in the acceptor's preference order: when a peer
    proposes several, the first of these it proposed is accepted.
    """

    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]
    scu_role: bool = False
    scp_role: bool = True
    # Accept an SCP/SCU role selection sub-item for this class (PS3.4 J.2.1 for Storage
    # Commitment); without it pynetdicom would ignore a proposed role.
    role_selection: bool = False
    # Name to print when pydicom's dictionary has none (retired or private classes).
    name: str | None = None

    @property
    def sop_class_name(self) -> str:
        return self.name or uid_name(self.abstract_syntax)

    @property
    def role(self) -> str:
        if self.scu_role and self.scp_role:
            return "SCU/SCP"
        return "SCP" if self.scp_role else "SCU"


def uid_name(uid: str) -> str:
    """The dictionary name of a UID, or the UID itself when pydicom has none."""
    name = UID(uid).name
    return name if name != uid else uid


@dataclass(frozen=True)
class StatementSection:
    """A block of conformance statement prose, already rendered for the config in effect."""

    title: str
    body: str


# A handler factory binds a service's event handlers to the running suite.
HandlerFactory = Callable[["ServiceContext"], Mapping[Any, Callable[..., Any]]]


@dataclass(frozen=True)
class ServiceDeclaration:
    """Everything one service provides, as data.

    Parameters
    ----------
    name:
        Short identifier used in configuration (``services = ["storage"]``).
    title:
        Human name used in the statement ("Storage", "Query/Retrieve").
    accepted:
        Presentation contexts accepted when the AE is an association acceptor.
    proposed:
        Presentation contexts proposed when the service initiates associations
        (move sub-operations, commitment reports); informs the statement only.
    statuses:
        Operation name ("C-STORE", "N-ACTION", ...) to its status table.
    handlers:
        Factory returning ``{pynetdicom event: handler}`` for one running AE.
    service_classes:
        SOP class UID to the pynetdicom service class that serves it, for classes
        pynetdicom does not know or where the service replaces pynetdicom's logic.
    settings:
        The service's effective settings, shown in the statement's configuration section.
    statement:
        SOP-specific conformance prose.
    """

    name: str
    title: str
    accepted: tuple[ContextRow, ...] = ()
    proposed: tuple[ContextRow, ...] = ()
    statuses: Mapping[str, StatusTable] = field(default_factory=dict)
    handlers: HandlerFactory | None = None
    service_classes: Mapping[str, type[ServiceClass]] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)
    statement: tuple[StatementSection, ...] = ()
    # Extra work to run while the suite is up (retry queues, export workers).
    background: Callable[[ServiceContext], Any] | None = None

    @property
    def sop_classes(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for row in self.accepted:
            seen.setdefault(row.abstract_syntax, None)
        return tuple(seen)


class StartupError(RuntimeError):
    """Configuration or plugin set that cannot run; the message says what to change."""

"""C-MOVE SCP and its STORAGE-SCU sub-operations. STUB: helper C replaces this file.

Interface used by servers/query_retrieve/__init__.py (keep these names):
"""

from __future__ import annotations

from pynetdicom.service_class import QueryRetrieveServiceClass

from servers.core.config import Config
from servers.core.declaration import ContextRow, StatementSection, StatusTable

MOVE_SOP_CLASSES: tuple[str, ...] = (
    "1.2.840.10008.5.1.4.1.2.1.2",  # Patient Root Q/R MOVE
    "1.2.840.10008.5.1.4.1.2.2.2",  # Study Root Q/R MOVE
    "1.2.840.10008.5.1.4.1.2.3.2",  # Patient/Study Only Q/R MOVE (retired)
)

C_MOVE_STATUSES = StatusTable("C-MOVE", [])


class MoveServiceClass(QueryRetrieveServiceClass):
    """Replaces pynetdicom's C-MOVE SCP (digest E14)."""


def proposed_contexts(config: Config) -> tuple[ContextRow, ...]:
    """STORAGE-SCU's proposed contexts (Table F.4.2-6), for the statement."""
    return ()


def move_settings(config: Config) -> dict[str, object]:
    return {}


def move_statement(config: Config) -> tuple[StatementSection, ...]:
    return ()

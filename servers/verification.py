"""Verification SOP Class (C-ECHO) SCP, the smallest plugin and a template for the rest.

Both archive acceptors are Verification SCPs with Implicit VR Little Endian only
(Annex F Tables F.4.2-15 and F.4.2-30; digest A1, A10).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pynetdicom import evt

from servers.core.config import Config
from servers.core.context import ServiceContext
from servers.core.declaration import (
    SUCCESS,
    ContextRow,
    ServiceDeclaration,
    StatementSection,
    StatusRow,
    StatusTable,
)
from servers.core.hookspecs import hookimpl
from servers.core.transfer_syntax import IMPLICIT_VR_LE, VERIFICATION

C_ECHO_STATUSES = StatusTable(
    "C-ECHO",
    [StatusRow(0x0000, SUCCESS, "Success", "Always: the association and the AE are working.")],
)


def handlers(ctx: ServiceContext) -> Mapping[Any, Callable[..., Any]]:
    def handle_echo(event: Any) -> int:
        return C_ECHO_STATUSES[0x0000].code

    return {evt.EVT_C_ECHO: handle_echo}


def declaration(config: Config) -> ServiceDeclaration:
    settings = config.service_settings("verification")
    transfer_syntaxes = tuple(settings.get("transfer_syntaxes", (IMPLICIT_VR_LE,)))
    return ServiceDeclaration(
        name="verification",
        title="Verification",
        accepted=(ContextRow(VERIFICATION, transfer_syntaxes),),
        statuses={"C-ECHO": C_ECHO_STATUSES},
        handlers=handlers,
        settings={"transfer_syntaxes": list(transfer_syntaxes)},
        statement=(
            StatementSection(
                "Verification",
                "The AE answers every C-ECHO-RQ with status Success (0000). "
                "A peer may send C-ECHO on an open association to restart the idle timer.",
            ),
        ),
    )


@hookimpl
def dicomlab_services(config: Config) -> list[ServiceDeclaration]:
    return [declaration(config)]

"""An out-of-tree dicomlab plugin: a private verification-style SOP class.

This is what a third party ships, in full. ``tests/test_plugin.py`` installs it
into a temporary directory with a ``*.dist-info`` whose ``entry_points.txt`` says::

    [dicomlab]
    demo_echo = dicomlab_demo_plugin

and the suite, the statement and the status coverage pick it up with no change
to the core. pynetdicom's own Verification service class serves the private UID.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pynetdicom import evt
from pynetdicom.service_class import VerificationServiceClass

from servers.core.config import Config
from servers.core.context import ServiceContext
from servers.core.declaration import (
    FAILURE,
    SUCCESS,
    ContextRow,
    ServiceDeclaration,
    StatementSection,
    StatusRow,
    StatusTable,
)
from servers.core.hookspecs import hookimpl

NAME = "demo_echo"
# A private SOP class: a UUID-derived UID under 2.25, owned by nobody else.
SOP_CLASS = "2.25.160310232312938826227446389916290410771"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"

C_ECHO_STATUSES = StatusTable(
    "C-ECHO",
    [
        StatusRow(0x0000, SUCCESS, "Success", 'The setting `answer` is "ok" (the default).'),
        StatusRow(
            0x0110,
            FAILURE,
            "Processing failure",
            'The setting `answer` is "fail": every request is refused, for testing peers.',
        ),
    ],
)


def handlers(ctx: ServiceContext) -> Mapping[Any, Callable[..., Any]]:
    def handle_echo(event: Any) -> int:
        if ctx.settings["answer"] == "fail":
            return C_ECHO_STATUSES[0x0110].code
        return C_ECHO_STATUSES[0x0000].code

    return {evt.EVT_C_ECHO: handle_echo}


@hookimpl
def dicomlab_services(config: Config) -> list[ServiceDeclaration]:
    answer = str(config.service_settings(NAME).get("answer", "ok"))
    return [
        ServiceDeclaration(
            name=NAME,
            title="Demo Private Echo",
            accepted=(
                ContextRow(SOP_CLASS, (IMPLICIT_VR_LE,), name="Demo Private Echo SOP Class"),
            ),
            statuses={"C-ECHO": C_ECHO_STATUSES},
            handlers=handlers,
            service_classes={SOP_CLASS: VerificationServiceClass},
            settings={"answer": answer},
            statement=(
                StatementSection(
                    "Demo Private Echo",
                    "A C-ECHO-RQ on the private Demo Private Echo SOP Class is answered "
                    "like a Verification request, with the status the `answer` setting selects.",
                ),
            ),
        )
    ]

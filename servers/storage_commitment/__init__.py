"""Placeholder: being written."""

from __future__ import annotations

from servers.core.config import Config
from servers.core.declaration import ServiceDeclaration
from servers.core.hookspecs import hookimpl


@hookimpl
def dicomlab_services(config: Config) -> list[ServiceDeclaration]:
    return [ServiceDeclaration(name="storage_commitment", title="storage_commitment")]

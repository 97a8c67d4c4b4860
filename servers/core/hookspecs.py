"""The hooks a dicomlab plugin can implement.

A plugin is any module named in the ``dicomlab`` entry-point group. The built-in
services register through that same group (see ``pyproject.toml``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from servers.core.config import Config
    from servers.core.declaration import ServiceDeclaration

PROJECT = "dicomlab"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def dicomlab_services(config: Config) -> list[ServiceDeclaration]:
    """Return the services this plugin provides, for the configuration in effect."""
    raise NotImplementedError

"""Discover service plugins through the ``dicomlab`` entry-point group."""

from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType

import pluggy

from servers.core import hookspecs
from servers.core.config import Config
from servers.core.declaration import ServiceDeclaration, StartupError


def plugin_manager(extra: Iterable[ModuleType | object] = ()) -> pluggy.PluginManager:
    """A plugin manager with every installed plugin, plus ``extra`` (tests, embedding)."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    try:
        pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    except Exception as exc:
        raise StartupError(
            f"a plugin in the {hookspecs.PROJECT!r} entry-point group failed to load: "
            f"{type(exc).__name__}: {exc}; reinstall it or uninstall it"
        ) from exc
    for plugin in extra:
        pm.register(plugin)
    return pm


def discover(
    config: Config, pm: pluggy.PluginManager | None = None
) -> dict[str, ServiceDeclaration]:
    """Every declared service by name; two plugins declaring one name stop start-up."""
    pm = pm or plugin_manager()
    services: dict[str, ServiceDeclaration] = {}
    for declarations in pm.hook.dicomlab_services(config=config):
        for declaration in declarations:
            if declaration.name in services:
                raise StartupError(f"two plugins declare a service named {declaration.name!r}")
            services[declaration.name] = declaration
    return services


def services_for_ae(
    ae_key: str, names: Iterable[str], available: dict[str, ServiceDeclaration]
) -> list[ServiceDeclaration]:
    """The declarations one AE runs, checking that no SOP class is claimed twice."""
    chosen: list[ServiceDeclaration] = []
    claimed: dict[str, str] = {}
    for name in names:
        try:
            declaration = available[name]
        except KeyError:
            raise StartupError(
                f"[ae.{ae_key}] names service {name!r}, which no installed plugin provides; "
                f"available: {', '.join(sorted(available))}"
            ) from None
        for uid in declaration.sop_classes:
            if uid in claimed:
                raise StartupError(
                    f"[ae.{ae_key}]: services {claimed[uid]!r} and {name!r} both claim "
                    f"SOP class {uid}; remove one of them from the AE's services"
                )
            claimed.setdefault(uid, name)
        chosen.append(declaration)
    return chosen

"""The running suite: every enabled AE in one process, on one store."""

from __future__ import annotations

import inspect
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import GeneratorType
from typing import Any

from pynetdicom import evt
from pynetdicom.sop_class import uid_to_service_class

from db.engine import Database
from db.migrate import upgrade
from servers.core import logs
from servers.core.config import AEConfig, Config
from servers.core.context import ServiceContext
from servers.core.declaration import ServiceDeclaration, StartupError
from servers.core.network import DicomlabAE, NoDelayServer, start_acceptor
from servers.core.plugins import discover, plugin_manager, services_for_ae
from storage.filestore import FileStore

# The DIMSE operation whose status table a handler's answers are checked against.
EVENT_OPERATIONS: dict[Any, str] = {
    evt.EVT_C_ECHO: "C-ECHO",
    evt.EVT_C_STORE: "C-STORE",
    evt.EVT_C_FIND: "C-FIND",
    evt.EVT_C_GET: "C-GET",
    evt.EVT_C_MOVE: "C-MOVE",
    evt.EVT_N_ACTION: "N-ACTION",
    evt.EVT_N_CREATE: "N-CREATE",
    evt.EVT_N_SET: "N-SET",
    evt.EVT_N_GET: "N-GET",
    evt.EVT_N_DELETE: "N-DELETE",
    evt.EVT_N_EVENT_REPORT: "N-EVENT-REPORT",
}

# What pynetdicom's service classes answer when a handler raises (its "unable to
# process" / "processing failure" defaults). A service must declare it, or not raise.
HANDLER_EXCEPTION_STATUS: dict[str, int] = {
    "C-STORE": 0xC211,
    "C-FIND": 0xC311,
    "C-GET": 0xC411,
    "C-MOVE": 0xC511,
    "N-ACTION": 0x0110,
    "N-CREATE": 0x0110,
    "N-SET": 0x0110,
    "N-GET": 0x0110,
    "N-DELETE": 0x0110,
    "N-EVENT-REPORT": 0x0110,
}


def _status_code(result: Any) -> int | None:
    status = result[0] if isinstance(result, tuple) else result
    if status is None:
        return None
    if hasattr(status, "Status"):
        return int(status.Status)
    try:
        return int(status)
    except (TypeError, ValueError):
        return None


# What the suite has answered, per (service, operation, status code), and what it
# answered that its statement does not list. The tests read both: every documented
# row must be provoked over a real association, and nothing undocumented sent.
EMITTED: Counter[tuple[str, str, int]] = Counter()
UNDECLARED: list[tuple[str, str, int]] = []


def check_status(
    declaration: ServiceDeclaration, operation: str, code: int | None, log: Any
) -> None:
    """Record an answered status; log ``undeclared_status`` when the statement lacks it."""
    if code is None:
        return
    EMITTED[(declaration.name, operation, code)] += 1
    table = declaration.statuses.get(operation)
    if table is not None and code in table:
        return
    UNDECLARED.append((declaration.name, operation, code))
    log.error(
        "undeclared_status", service=declaration.name, operation=operation, status=f"0x{code:04X}"
    )


@dataclass
class _Route:
    declaration: ServiceDeclaration
    handler: Callable[..., Any]


def _router(event_type: Any, routes: dict[str, _Route]) -> Callable[..., Any]:
    """One intervention handler per event, routing on the context's SOP class."""
    operation = EVENT_OPERATIONS.get(event_type, event_type.name)

    def route(event: Any) -> Any:
        route = routes.get(event.context.abstract_syntax) or routes.get("*")
        log = logs.assoc_logger(event.assoc)
        if route is None:
            log.error("no_handler", operation=operation, sop_class=event.context.abstract_syntax)
            return 0xC000 if operation != "C-ECHO" else 0x0000
        try:
            result = route.handler(event)
        except Exception:
            # pynetdicom turns the exception into a status of its own: count it too.
            check_status(route.declaration, operation, HANDLER_EXCEPTION_STATUS.get(operation), log)
            raise
        if isinstance(result, GeneratorType) or inspect.isgenerator(result):
            return _checked_generator(result, route.declaration, operation, log)
        check_status(route.declaration, operation, _status_code(result), log)
        return result

    return route


def _checked_generator(
    gen: Iterator[Any], declaration: ServiceDeclaration, operation: str, log: Any
) -> Iterator[Any]:
    try:
        for item in gen:
            if isinstance(item, tuple) and len(item) == 2:
                check_status(declaration, operation, _status_code(item), log)
            yield item
    except GeneratorExit:
        raise
    except Exception:
        check_status(declaration, operation, HANDLER_EXCEPTION_STATUS.get(operation), log)
        raise


@dataclass
class RunningAE:
    config: AEConfig
    ae: DicomlabAE
    services: list[ServiceDeclaration]
    server: NoDelayServer | None = None


@dataclass
class Suite:
    """Build with :meth:`Suite.create`, then :meth:`start` and :meth:`stop`."""

    config: Config
    db: Database
    store: FileStore
    declarations: dict[str, ServiceDeclaration]
    aes: dict[str, RunningAE] = field(default_factory=dict)
    _background: list[Any] = field(default_factory=list)
    _stopped: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def create(
        cls, config: Config, extra_plugins: Iterable[object] = (), migrate: bool = True
    ) -> Suite:
        declarations = discover(config, plugin_manager(extra_plugins))
        if migrate:
            upgrade(config.database_url)
        db = Database(config.database_url)
        store = FileStore(
            config.storage_dir,
            min_free_bytes=int(config.service_settings("storage").get("min_free_bytes", 0)),
        )
        suite = cls(config=config, db=db, store=store, declarations=declarations)
        for key, ae_config in config.aes.items():
            if not ae_config.enabled:
                continue
            services = services_for_ae(key, ae_config.services, declarations)
            service_classes: dict[str, Any] = {}
            for declaration in services:
                service_classes.update(declaration.service_classes)
            ae = DicomlabAE(ae_config, service_classes)
            suite.aes[key] = RunningAE(config=ae_config, ae=ae, services=services)
            # Service classes reach their suite through the AE they run on.
            ae.service_contexts = {d.name: suite.context(key, d) for d in services}
            for declaration in services:
                for row in declaration.accepted:
                    if row.role_selection:
                        ae.add_supported_context(
                            row.abstract_syntax,
                            list(row.transfer_syntaxes),
                            # ContextRow names the roles this AE plays; pynetdicom's acceptor
                            # arguments name the roles it grants the requestor: our SCP role
                            # is the requestor's SCU role and vice versa.
                            scu_role=row.scp_role,
                            scp_role=row.scu_role,
                        )
                    else:
                        ae.add_supported_context(row.abstract_syntax, list(row.transfer_syntaxes))
        return suite

    def context(self, ae_key: str, declaration: ServiceDeclaration) -> ServiceContext:
        return ServiceContext(
            config=self.config,
            ae=self.config.ae(ae_key),
            db=self.db,
            store=self.store,
            settings=declaration.settings,
            suite=self,
        )

    def requestor(self, ae_key: str) -> DicomlabAE:
        """A fresh AE object for initiating associations as local AE ``ae_key``."""
        config = self.config.ae(ae_key)
        ae = DicomlabAE(config, {}, remotes=self.config.remotes)
        return ae

    def handlers_for(self, key: str) -> list[Any]:
        running = self.aes[key]
        bound: dict[Any, dict[str, _Route]] = {}
        notifications: list[tuple[Any, Callable[..., Any]]] = []
        for declaration in running.services:
            if declaration.handlers is None:
                continue
            for event_type, handler in declaration.handlers(self.context(key, declaration)).items():
                if event_type.is_intervention:
                    routes = bound.setdefault(event_type, {})
                    sop_classes = declaration.sop_classes or ("*",)
                    for uid in sop_classes:
                        routes[uid] = _Route(declaration, handler)
                else:
                    notifications.append((event_type, handler))
        handlers: list[Any] = list(logs.ASSOCIATION_HANDLERS)
        handlers.extend(notifications)
        handlers.extend(
            (event_type, _router(event_type, routes)) for event_type, routes in bound.items()
        )
        return handlers

    def start(self) -> None:
        self.store.sweep_partials()
        log = logs.get_logger()
        for key, running in self.aes.items():
            if running.config.listens:
                try:
                    running.server = start_acceptor(
                        running.ae, self.config.host, self.handlers_for(key)
                    )
                except OSError as exc:
                    self.stop()
                    raise StartupError(
                        f"[ae.{key}] cannot listen on {self.config.host}:{running.config.port}: "
                        f"{exc.strerror}; choose another port with "
                        f"DICOMLAB_AE__{key.upper()}__PORT or stop what holds it"
                    ) from None
                log.info(
                    "ae_listening",
                    ae=running.config.title,
                    key=key,
                    host=self.config.host,
                    port=running.server.server_address[1],
                    services=list(running.config.services),
                )
        for key, running in self.aes.items():
            for declaration in running.services:
                if declaration.background is not None:
                    try:
                        worker = declaration.background(self.context(key, declaration))
                    except StartupError:
                        # Nothing half-started is left listening.
                        self.stop()
                        raise
                    self._background.append(worker)

    def port_of(self, key: str) -> int:
        """The bound port of a listening AE (useful when configured as port 0 in tests)."""
        server = self.aes[key].server
        if server is None:
            raise StartupError(f"[ae.{key}] is not listening")
        return int(server.server_address[1])

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        for worker in self._background:
            stop = getattr(worker, "stop", None)
            if callable(stop):
                stop()
        for running in self.aes.values():
            if running.server is not None:
                running.server.shutdown()
                running.server = None
            running.ae.shutdown()
        self.db.dispose()


def known_sop_class(uid: str) -> bool:
    return uid_to_service_class(uid).__name__ != "ServiceClass"


__all__ = ["StartupError", "Suite", "check_status"]

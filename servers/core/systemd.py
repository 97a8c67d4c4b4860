"""systemd's service notification protocol, without a dependency (sd_notify(3)).

``Type=notify`` units learn that the suite is ready from ``READY=1`` written to
the datagram socket named by ``$NOTIFY_SOCKET``; ``WatchdogSec=`` units expect
``WATCHDOG=1`` at least every ``$WATCHDOG_USEC`` microseconds, or systemd kills
and restarts the service. Outside systemd (no ``$NOTIFY_SOCKET``) every call
here does nothing.

The watchdog is not a timer that pings regardless: it pings only while every
listening AE's acceptor thread is alive, so a suite whose acceptor died (and
that no longer answers associations) is restarted by systemd.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Mapping
from typing import Any


def _address(environ: Mapping[str, str]) -> str | None:
    address = environ.get("NOTIFY_SOCKET", "")
    if not address:
        return None
    if address.startswith("@"):
        # An abstract socket: the name starts with a NUL byte.
        return "\0" + address[1:]
    return address


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd; ``False`` when not under systemd.

    A failure to send is not an error of the suite: it is reported by the return
    value and the caller logs it.
    """
    address = _address(os.environ if environ is None else environ)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError:
        return False
    return True


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between pings (half of ``$WATCHDOG_USEC``), or ``None`` when not asked.

    ``$WATCHDOG_PID``, when set, must be this process (sd_watchdog_enabled(3)).
    """
    environ = os.environ if environ is None else environ
    if _address(environ) is None:
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    return usec / 2_000_000


class Watchdog:
    """A daemon thread that sends ``WATCHDOG=1`` every ``interval`` while ``healthy()``."""

    def __init__(
        self,
        interval: float,
        healthy: Callable[[], bool],
        log: Any,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.interval = interval
        self.healthy = healthy
        self.log = log
        self.environ = dict(os.environ if environ is None else environ)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="systemd-watchdog", daemon=True)
        self._unhealthy_logged = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.healthy():
                notify("WATCHDOG=1", self.environ)
                self._unhealthy_logged = False
            elif not self._unhealthy_logged:
                # No ping: systemd restarts the service after WatchdogSec=.
                self.log.error("watchdog_withheld", reason="an acceptor thread is not running")
                self._unhealthy_logged = True


def suite_healthy(suite: Any) -> bool:
    """True while every listening AE's acceptor thread runs."""
    for running in suite.aes.values():
        if not running.config.listens:
            continue
        server = running.server
        thread = getattr(server, "thread", None) if server is not None else None
        if thread is None or not thread.is_alive():
            return False
    return True

"""What a running service gets handed: configuration, the store, and its AE."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from db.engine import Database
from servers.core.config import AEConfig, Config
from storage.filestore import FileStore

if TYPE_CHECKING:
    from servers.core.runtime import Suite


@dataclass(frozen=True)
class ServiceContext:
    """Shared parts of the suite, bound once per (AE, service) at start-up."""

    config: Config
    ae: AEConfig
    db: Database
    store: FileStore
    settings: Mapping[str, Any]
    suite: Suite

    def local_ae(self, key: str) -> AEConfig:
        """Another local AE by configuration key, e.g. ``storage_scu`` for move exports."""
        return self.config.ae(key)

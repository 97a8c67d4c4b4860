"""One TOML configuration file, overridden by ``DICOMLAB_*`` environment variables.

The embedded default reproduces the sample statement (PS3.2 Annex F): the three
archive application entities with their titles and ports. Nothing here needs root.

Environment overrides use ``__`` to walk into tables, for example::

    DICOMLAB_DATA_DIR=/srv/dicomlab
    DICOMLAB_AE__STORAGE_SCP__PORT=4104
    DICOMLAB_REMOTE__VIEWER__HOST=127.0.0.1   (the remote AE "VIEWER"; its case is kept)
    DICOMLAB_REMOTE__VIEWER__PORT=11113
    DICOMLAB_SERVICES__STORAGE__DUPLICATE_POLICY=replace

Values are read as TOML values when they parse as such (numbers, booleans,
``["lists"]``), otherwise as plain strings.
"""

from __future__ import annotations

import copy
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servers.core.declaration import StartupError

ENV_PREFIX = "DICOMLAB_"
CONFIG_ENV = "DICOMLAB_CONFIG"

# Two valid implementation class UIDs replace the sample's placeholder
# "1.840.xxxxxxx.yyy.etc" (digest A6): STORAGE-SCP uses a different one from the
# other archive AEs, as the sample says. Derived from fixed UUIDs under 2.25.
IMPLEMENTATION_UID_ARCHIVE = "2.25.229946574521367303553431744106155930433"
IMPLEMENTATION_UID_STORAGE_SCP = "2.25.229946574521367303553431744106155930434"
IMPLEMENTATION_VERSION_NAME = "EX_VERS_01"
# Replaces the RIS sample's placeholder "xxxxxxx.yyy.etc.ad.inf.usw" (digest A1).
IMPLEMENTATION_UID_RIS = "2.25.229946574521367303553431744106155930435"
# The print sample's placeholder "xxxxxxxxxxx.yy.etc.ad.inf.usw" replaced by a valid UID.
IMPLEMENTATION_UID_PRINT = "2.25.229946574521367303553431744106155930436"

DEFAULTS: dict[str, Any] = {
    "data_dir": "./data",
    "database_url": "",
    "host": "0.0.0.0",
    "log_format": "auto",
    "log_level": "info",
    "ae": {
        "storage_scp": {
            "title": "EX_STORE_SCP",
            "port": 4000,
            "group": "archive",
            "services": ["verification", "storage", "storage_commitment"],
            "implementation_class_uid": IMPLEMENTATION_UID_STORAGE_SCP,
            "idle_timeout": 900,
        },
        "query_scp": {
            "title": "EX_QUERY_SCP",
            "port": 5000,
            "group": "archive",
            "services": ["verification", "query_retrieve"],
            "idle_timeout": 180,
        },
        "storage_scu": {
            "title": "EX_STORE_SCU",
            "port": 0,
            "group": "archive",
            "services": [],
            "max_pdu": 131072,
        },
        # The RIS (PS3.2 Annex C "DICOMRis"): the sample names its AE DICOMSRV and port
        # 104; 1104 needs no root, and deploy/ keeps 104 for the systemd service.
        "ris_scp": {
            "title": "DICOMSRV",
            "port": 1104,
            "group": "ris",
            "services": ["verification", "worklist", "mpps"],
            "implementation_class_uid": IMPLEMENTATION_UID_RIS,
            "implementation_version_name": "DICOMRis_260",
            "max_pdu": 65536,
            "max_associations": 20,
            "max_associations_per_calling_ae": 3,
            "acse_timeout": 30,
            "connection_timeout": 15,
            "network_timeout": 15,
            "idle_timeout": 60,
            "dimse_timeout": 30,
        },
        # The print server (PS3.2 Annex E). The sample leaves the AE title to
        # configuration and names port 104; 2104 needs no root (the systemd
        # deployment keeps 104). An empty calling AE allow-list lets any SCU print.
        "print_scp": {
            "title": "PRINT_SCP",
            "port": 2104,
            "group": "print",
            "services": [
                "verification",
                "print",
                "print_annotation",
                "print_job",
                "print_presentation_lut",
                "print_configuration",
            ],
            "implementation_class_uid": IMPLEMENTATION_UID_PRINT,
            "implementation_version_name": "PRINTSCP_VERS_01",
            "max_pdu": 131072,
            "max_associations": 8,
            "acse_timeout": 30,
            "connection_timeout": 20,
            "dimse_timeout": 360,
            "idle_timeout": 600,
        },
    },
    "remote": {},
    "services": {},
}

AE_DEFAULTS: dict[str, Any] = {
    "title": "",
    "port": 0,
    "group": "archive",
    "services": [],
    "enabled": True,
    "max_pdu": 16384,
    "max_associations": 10,
    "max_associations_per_calling_ae": 0,
    "require_called_ae": True,
    "calling_ae_allow": [],
    "ip_allow": [],
    "implementation_class_uid": IMPLEMENTATION_UID_ARCHIVE,
    "implementation_version_name": IMPLEMENTATION_VERSION_NAME,
    "acse_timeout": 30,
    "connection_timeout": 10,
    "network_timeout": 30,
    "idle_timeout": 900,
    "dimse_timeout": 300,
    # DICOM TLS (PS3.15 B.9, BCP 195): PEM files. With tls_cert and tls_key the AE's
    # port speaks TLS only, and the AE presents them when it initiates to a remote
    # with tls = true; tls_ca holds the certificates peers' certificates must chain to.
    "tls_cert": "",
    "tls_key": "",
    "tls_ca": "",
    "tls_require_client_cert": True,
    # User Identity negotiation (PS3.7 D.3.3.7): "ignore", "optional" or "required";
    # users: username -> salted hash from `python -m servers.core.identity`.
    "user_identity": "ignore",
    "users": {},
}

USER_IDENTITY_POLICIES = ("ignore", "optional", "required")


@dataclass(frozen=True)
class AEConfig:
    """One local application entity. ``port == 0`` means it only initiates."""

    key: str
    title: str
    port: int
    group: str
    services: tuple[str, ...]
    enabled: bool
    max_pdu: int
    max_associations: int
    max_associations_per_calling_ae: int
    require_called_ae: bool
    calling_ae_allow: tuple[str, ...]
    ip_allow: tuple[str, ...]
    implementation_class_uid: str
    implementation_version_name: str
    acse_timeout: float
    connection_timeout: float
    network_timeout: float
    idle_timeout: float
    dimse_timeout: float
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    tls_require_client_cert: bool = True
    user_identity: str = "ignore"
    users: Mapping[str, str] = field(default_factory=dict)

    @property
    def listens(self) -> bool:
        return self.port > 0 and self.enabled

    @property
    def tls(self) -> bool:
        """The AE has a certificate: its port speaks TLS only."""
        return bool(self.tls_cert)


@dataclass(frozen=True)
class RemoteAE:
    """A peer we may open associations to: a move destination or commitment peer."""

    title: str
    host: str
    port: int
    tls: bool = False


@dataclass(frozen=True)
class Config:
    data_dir: Path
    database_url: str
    host: str
    log_format: str
    log_level: str
    aes: Mapping[str, AEConfig]
    remotes: Mapping[str, RemoteAE]
    services: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    source: str = "embedded default"
    raw: Mapping[str, Any] = field(default_factory=dict)

    @property
    def storage_dir(self) -> Path:
        return self.data_dir / "instances"

    def service_settings(self, name: str) -> Mapping[str, Any]:
        return self.services.get(name, {})

    def ae(self, key: str) -> AEConfig:
        try:
            return self.aes[key]
        except KeyError:
            raise StartupError(
                f"no application entity [ae.{key}] in the configuration; "
                f"configured: {', '.join(sorted(self.aes))}"
            ) from None

    def remote(self, title: str) -> RemoteAE | None:
        return self.remotes.get(title.strip())

    def aes_in_group(self, group: str) -> list[AEConfig]:
        return [ae for ae in self.aes.values() if ae.group == group and ae.enabled]


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def _parse_env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Nested overrides from ``DICOMLAB_A__B__C=value`` variables."""
    out: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        if name.startswith("DICOMLAB_TEST_"):
            continue
        path = name[len(ENV_PREFIX) :].split("__")
        # Setting names are case-insensitive; a remote AE's key is its AE title
        # and keeps its case (DICOMLAB_REMOTE__VIEWER__PORT configures "VIEWER").
        path = [
            part if i > 0 and path[i - 1].lower() == "remote" else part.lower()
            for i, part in enumerate(path)
        ]
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _parse_env_value(value)
    return out


def _ae_config(key: str, raw: Mapping[str, Any]) -> AEConfig:
    values = {**AE_DEFAULTS, **raw}
    unknown = set(values) - set(AE_DEFAULTS)
    if unknown:
        raise StartupError(f"[ae.{key}] has unknown settings: {', '.join(sorted(unknown))}")
    title = str(values["title"]).strip()
    if not title or len(title) > 16:
        raise StartupError(f"[ae.{key}] title must be 1 to 16 characters, got {title!r}")
    return AEConfig(
        key=key,
        title=title,
        port=int(values["port"]),
        group=str(values["group"]),
        services=tuple(values["services"]),
        enabled=bool(values["enabled"]),
        max_pdu=int(values["max_pdu"]),
        max_associations=int(values["max_associations"]),
        max_associations_per_calling_ae=int(values["max_associations_per_calling_ae"]),
        require_called_ae=bool(values["require_called_ae"]),
        calling_ae_allow=tuple(str(v) for v in values["calling_ae_allow"]),
        ip_allow=tuple(str(v) for v in values["ip_allow"]),
        implementation_class_uid=str(values["implementation_class_uid"]),
        implementation_version_name=str(values["implementation_version_name"]),
        acse_timeout=float(values["acse_timeout"]),
        connection_timeout=float(values["connection_timeout"]),
        network_timeout=float(values["network_timeout"]),
        idle_timeout=float(values["idle_timeout"]),
        dimse_timeout=float(values["dimse_timeout"]),
        **_security_settings(key, values),
    )


def _security_settings(key: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """TLS and User Identity settings of ``[ae.KEY]``, checked."""
    tls = {name: str(values[name]) for name in ("tls_cert", "tls_key", "tls_ca")}
    if bool(tls["tls_cert"]) != bool(tls["tls_key"]):
        raise StartupError(f"[ae.{key}] tls_cert and tls_key go together: set both or neither")
    if tls["tls_cert"] and not tls["tls_ca"]:
        raise StartupError(
            f"[ae.{key}] TLS needs tls_ca, the CA certificates peers' certificates are checked "
            "against"
        )
    policy = str(values["user_identity"])
    if policy not in USER_IDENTITY_POLICIES:
        raise StartupError(
            f"[ae.{key}] user_identity must be one of {', '.join(USER_IDENTITY_POLICIES)}, "
            f"got {policy!r}"
        )
    users = values["users"]
    if not isinstance(users, Mapping) or not all(isinstance(v, str) for v in users.values()):
        raise StartupError(f'[ae.{key}] users must be a table of username = "hash"')
    if policy == "required" and not users:
        raise StartupError(f'[ae.{key}] user_identity = "required" needs at least one user')
    return {
        **tls,
        "tls_require_client_cert": bool(values["tls_require_client_cert"]),
        "user_identity": policy,
        "users": {str(k): v for k, v in users.items()},
    }


def _remote(key: str, raw: Mapping[str, Any]) -> RemoteAE:
    try:
        title = str(raw.get("title", key)).strip()
        return RemoteAE(
            title=title,
            host=str(raw["host"]),
            port=int(raw["port"]),
            tls=bool(raw.get("tls", False)),
        )
    except KeyError as exc:
        raise StartupError(f"[remote.{key}] needs {exc.args[0]!r}") from None


def build(raw: Mapping[str, Any], source: str = "embedded default") -> Config:
    """Validate a merged raw configuration into a :class:`Config`."""
    data_dir = Path(str(raw["data_dir"])).expanduser()
    database_url = str(raw.get("database_url") or "")
    if not database_url:
        database_url = f"sqlite:///{(data_dir / 'dicomlab.sqlite3').absolute()}"
    aes = {key: _ae_config(key, value) for key, value in raw.get("ae", {}).items()}
    titles: dict[tuple[str, int], str] = {}
    for ae in aes.values():
        if ae.listens:
            where = (ae.title, ae.port)
            if where in titles:
                raise StartupError(
                    f"[ae.{ae.key}] and [ae.{titles[where]}] both answer as {ae.title} "
                    f"on port {ae.port}; give one a different title or port"
                )
            titles[where] = ae.key
    remotes = {}
    for key, value in raw.get("remote", {}).items():
        remote = _remote(key, value)
        remotes[remote.title] = remote
    return Config(
        data_dir=data_dir,
        database_url=database_url,
        host=str(raw["host"]),
        log_format=str(raw["log_format"]),
        log_level=str(raw["log_level"]),
        aes=aes,
        remotes=remotes,
        services={k: dict(v) for k, v in raw.get("services", {}).items()},
        source=source,
        raw=raw,
    )


def load(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Embedded default, then the TOML file, then the environment, then ``overrides``."""
    environ = os.environ if environ is None else environ
    raw = copy.deepcopy(DEFAULTS)
    source = "embedded default"
    path = path or environ.get(CONFIG_ENV)
    if path:
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise StartupError(
                f"cannot read configuration {file}: {exc.strerror}; "
                "write one with `dicomlab config --write-default PATH`"
            ) from None
        try:
            _merge(raw, tomllib.loads(text))
        except tomllib.TOMLDecodeError as exc:
            raise StartupError(f"{file} is not valid TOML: {exc}") from None
        source = str(file)
    _merge(raw, env_overrides(environ))
    if overrides:
        _merge(raw, overrides)
    return build(raw, source)

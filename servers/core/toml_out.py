"""Write configuration as TOML: the effective one, or a commented default."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

# Comments printed above keys of the written default, by dotted path.
COMMENTS: Mapping[str, str] = {
    "data_dir": "SQLite file and instance files live here (created on first start).",
    "database_url": 'Empty: SQLite under data_dir. PostgreSQL: "postgresql://user@host/dbname".',
    "host": "Address every AE listens on.",
    "log_format": "auto (readable on a terminal, JSON otherwise), json or console.",
    "log_level": "debug, info or warning.",
    "ae": "Local application entities. port = 0: initiates only, never listens.\n"
    "Defaults reproduce the archive sample statement (PS3.2 Annex F).",
    "remote": "Peers we open associations to: C-MOVE destinations and Storage Commitment\n"
    'peers. Example:\n[remote.VIEWER]\nhost = "127.0.0.1"\nport = 11112',
    "services": "Per-service settings; `dicomlab statement` shows their effect.",
}


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _comment(path: str, out: list[str], commented: bool) -> None:
    if commented and path in COMMENTS:
        out.extend(f"# {line}" for line in COMMENTS[path].splitlines())


def dumps(data: Mapping[str, Any], commented: bool = False) -> str:
    """TOML text for ``data`` (scalars first, then tables, recursively)."""
    out: list[str] = []

    def table(prefix: str, node: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in node.items() if not isinstance(v, Mapping)}
        tables = {k: v for k, v in node.items() if isinstance(v, Mapping)}
        if prefix and (scalars or not tables):
            out.append("")
            _comment(prefix, out, commented)
            out.append(f"[{prefix}]")
        for key, value in scalars.items():
            _comment(f"{prefix}.{key}" if prefix else key, out, commented)
            out.append(f"{key} = {_value(value)}")
        for key, value in tables.items():
            path = f"{prefix}.{key}" if prefix else key
            if not value:
                out.append("")
                _comment(path, out, commented)
                out.append(f"[{path}]")
                continue
            if (
                commented
                and path in COMMENTS
                and any(isinstance(v, Mapping) for v in value.values())
            ):
                out.append("")
                _comment(path, out, commented)
            table(path, value)

    table("", data)
    return "\n".join(out).lstrip("\n") + "\n"

"""The conformance statement: committed text, completeness, and the contract on the wire."""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE

from servers.core import config as config_mod
from servers.core.config import Config
from servers.core.declaration import ContextRow, ServiceDeclaration, StartupError
from servers.core.network import REJECTION_ROWS
from servers.core.plugins import discover
from servers.core.statement import groups, render, render_all, status_rows
from servers.core.transfer_syntax import EXPLICIT_VR_LE, IMPLICIT_VR_LE

ROOT = Path(__file__).resolve().parent.parent
STATEMENTS = ROOT / "statements"

# A SOP class no service of the suite declares (a private UID under 2.25).
UNKNOWN_SOP_CLASS = "2.25.311873541592316476186340287358066734391"


def default_config(**overrides: object) -> Config:
    return config_mod.load(path=None, environ={}, overrides=overrides or None)


def cell(text: object) -> str:
    """A value as a markdown table cell (whitespace collapsed, pipes escaped)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def group_declarations(config: Config, group: str) -> list[ServiceDeclaration]:
    available = discover(config)
    names: dict[str, None] = {}
    for ae in config.aes_in_group(group):
        names.update(dict.fromkeys(ae.services))
    return [available[name] for name in names]


ALL_GROUPS = groups(config_mod.load(path=None, environ={}))


@pytest.mark.parametrize("group", ALL_GROUPS)
def test_committed_statement_is_the_rendering_of_the_embedded_default(group: str) -> None:
    expected = render(default_config(), group)
    committed = STATEMENTS / f"{group}.md"
    assert committed.exists(), f"statements/{group}.md is missing; run `make statements`"
    actual = committed.read_text(encoding="utf-8")
    if actual != expected:
        diff = "".join(
            list(
                difflib.unified_diff(
                    actual.splitlines(keepends=True),
                    expected.splitlines(keepends=True),
                    f"statements/{group}.md (committed)",
                    "rendering",
                )
            )[:60]
        )
        pytest.fail(f"statements/{group}.md is out of date; run `make statements`\n{diff}")


def test_rendering_is_deterministic() -> None:
    assert render(default_config(), "archive") == render(default_config(), "archive")


def test_render_all_covers_every_group_of_enabled_aes() -> None:
    config = default_config()
    rendered = render_all(config)
    assert list(rendered) == groups(config)
    assert set(rendered) == {"archive", "print", "ris"}
    for group in rendered:
        assert rendered[group] == render(config, group)


def test_unknown_group_is_a_clear_error() -> None:
    with pytest.raises(StartupError, match="no enabled AE in group 'nosuch'"):
        render(default_config(), "nosuch")


@pytest.mark.parametrize("group", ALL_GROUPS)
def test_every_status_row_of_every_declaration_is_in_the_statement(group: str) -> None:
    config = default_config()
    text = render(config, group)
    rows = list(status_rows(group_declarations(config, group)))
    assert rows, f"the {group} group declares no status rows at all"
    missing = [
        (service, operation, row.hex)
        for service, operation, row in rows
        if f"| {cell(row.category)} | {cell(row.meaning)} | {row.hex} | {cell(row.condition)} |"
        not in text
    ]
    assert missing == []


@pytest.mark.parametrize("group", ALL_GROUPS)
def test_every_operation_has_its_own_status_table(group: str) -> None:
    config = default_config()
    text = render(config, group)
    for declaration in group_declarations(config, group):
        for operation in declaration.statuses:
            assert f"{operation} response status for {declaration.title} on" in text


@pytest.mark.parametrize("group", ALL_GROUPS)
def test_every_accepted_and_proposed_context_row_is_in_the_statement(group: str) -> None:
    config = default_config()
    text = render(config, group)
    for declaration in group_declarations(config, group):
        for row in (*declaration.accepted, *declaration.proposed):
            for ts in row.transfer_syntaxes:
                assert f"| {cell(row.sop_class_name)} | `{row.abstract_syntax}` |" in text
                assert f"| `{ts}` |" in text


def test_rejection_table_is_generated_from_the_network_layer() -> None:
    text = render(default_config(), "archive")
    for row in REJECTION_ROWS:
        assert f"| {row.reason} – {row.meaning} | {cell(row.condition)} |" in text


def test_statement_reflects_titles_ports_and_limits_in_effect() -> None:
    before = render(default_config(), "archive")
    after = render(
        default_config(
            ae={
                "storage_scp": {"title": "MY_ARCHIVE", "port": 11112, "max_associations": 3},
                "query_scp": {"calling_ae_allow": ["VIEWER"], "max_pdu": 65536},
            },
            remote={"VIEWER": {"host": "10.0.0.9", "port": 104}},
        ),
        "archive",
    )
    assert before != after
    assert "MY_ARCHIVE" not in before and "11112" not in before
    assert "| MY_ARCHIVE | `MY_ARCHIVE` | 11112 | `[ae.storage_scp]` |" in after
    assert "| MY_ARCHIVE: maximum number of simultaneous associations | " in after
    assert "`ae.storage_scp.max_associations` | Yes | 3 |" in after
    assert "the called AE title is `MY_ARCHIVE`" in after
    assert "the calling AE title is one of `VIEWER`" in after
    assert "| `VIEWER` | 10.0.0.9 | 104 |" in after
    assert "| EX_QUERY_SCP | Yes | VIEWER | none (any address) |" in after
    assert "The maximum PDU size EX_QUERY_SCP receives" in after
    assert "is 65536 bytes" in after


def test_statement_reflects_service_settings_in_effect() -> None:
    before = render(default_config(), "archive")
    changed = default_config(
        services={"verification": {"transfer_syntaxes": [EXPLICIT_VR_LE, IMPLICIT_VR_LE]}}
    )
    after = render(changed, "archive")
    explicit_row = (
        f"| Verification SOP Class | `1.2.840.10008.1.1` | Explicit VR Little Endian | "
        f"`{EXPLICIT_VR_LE}` | SCP | None |"
    )
    assert explicit_row not in before
    assert explicit_row in after
    assert f'`services.verification.transfer_syntaxes` | Yes | ["{EXPLICIT_VR_LE}", ' in after


def test_disabled_ae_leaves_the_statement() -> None:
    text = render(default_config(ae={"query_scp": {"enabled": False}}), "archive")
    assert "EX_QUERY_SCP" not in text
    assert "EX_STORE_SCP" in text


# --- the statement as a contract on the wire --------------------------------------------


def _accepted_rows(config: Config, key: str) -> list[ContextRow]:
    available = discover(config)
    return [row for name in config.ae(key).services for row in available[name].accepted]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("key", ["storage_scp", "query_scp"])
def test_every_documented_context_is_accepted_with_its_transfer_syntax(suite, key) -> None:
    """One context per (abstract syntax, transfer syntax) row: each is accepted as printed."""
    rows = _accepted_rows(suite.config, key)
    pairs = [(row.abstract_syntax, ts) for row in rows for ts in row.transfer_syntaxes]
    assert pairs
    ae = AE(ae_title="TEST_SCU")
    ae.acse_timeout = 30
    for abstract_syntax, ts in pairs[:127]:
        ae.add_requested_context(abstract_syntax, [ts])
    ae.add_requested_context(UNKNOWN_SOP_CLASS, [ImplicitVRLittleEndian])
    title = suite.config.ae(key).title
    assoc = ae.associate("127.0.0.1", suite.port_of(key), ae_title=title)
    try:
        assert assoc.is_established
        accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        assert accepted == set(pairs[:127])
        rejected = [(cx.abstract_syntax, cx.result) for cx in assoc.rejected_contexts]
        # 3: abstract-syntax-not-supported, as the selection policy says.
        assert rejected == [(UNKNOWN_SOP_CLASS, 3)]
    finally:
        assoc.release()
        ae.shutdown()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("key", ["storage_scp", "query_scp"])
def test_transfer_syntax_preference_is_the_documented_order(suite, key) -> None:
    """All of a class's syntaxes proposed in reverse: the first of the table's order wins."""
    rows = _accepted_rows(suite.config, key)
    ae = AE(ae_title="TEST_SCU")
    ae.acse_timeout = 30
    expected: dict[int, str] = {}
    for index, row in enumerate(rows[:127]):
        ae.add_requested_context(row.abstract_syntax, list(reversed(row.transfer_syntaxes)))
        expected[2 * index + 1] = row.transfer_syntaxes[0]
    title = suite.config.ae(key).title
    assoc = ae.associate("127.0.0.1", suite.port_of(key), ae_title=title)
    try:
        assert assoc.is_established
        got = {cx.context_id: cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
        assert got == expected
    finally:
        assoc.release()
        ae.shutdown()

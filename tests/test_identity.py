"""User Identity negotiation: the three policies over real associations."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import UserIdentityNegotiation

from servers.core import config as config_mod
from servers.core import identity
from servers.core.declaration import StartupError
from servers.core.network import REJECT_USER_IDENTITY, REJECTION_ROWS
from servers.core.runtime import Suite
from servers.core.statement import render
from tests.helpers import request_association

VERIFICATION = "1.2.840.10008.1.1"
# Few iterations: the tests check the policy, not the cost of guessing.
ALICE = identity.hash_passcode("wonderland", iterations=1000)
USERS = {"alice": ALICE}


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """Negotiation does not touch the database: SQLite only (overrides conftest)."""
    return f"sqlite:///{tmp_path / 'index.sqlite3'}"


def identity_item(
    kind: int, user: bytes, passcode: bytes = b"", response: bool = True
) -> UserIdentityNegotiation:
    item = UserIdentityNegotiation()
    item.user_identity_type = kind
    item.primary_field = user
    if kind == 2:
        item.secondary_field = passcode
    item.positive_response_requested = response
    return item


def attempt(suite: Suite, item: UserIdentityNegotiation | None) -> Association:
    ae = AE(ae_title="ID_SCU")
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(VERIFICATION)
    assoc = request_association(
        ae,
        "127.0.0.1",
        suite.port_of("storage_scp"),
        ae_title="EX_STORE_SCP",
        ext_neg=[item] if item is not None else None,
    )
    if assoc.is_established:
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    return assoc


def rsd(assoc: Association) -> tuple[int, int, int]:
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    return (rj.result, rj.result_source, rj.diagnostic)


def suite_with(make_suite: Callable[..., Suite], policy: str) -> Suite:
    return make_suite({"ae": {"storage_scp": {"user_identity": policy, "users": USERS}}})


GOOD = identity_item(2, b"alice", b"wonderland")
WRONG = identity_item(2, b"alice", b"looking-glass")
UNKNOWN = identity_item(2, b"mallory", b"wonderland")
NAME_ONLY = identity_item(1, b"alice")
UNKNOWN_NAME_ONLY = identity_item(1, b"mallory")
SAML = identity_item(4, b"<saml/>")


def test_required_accepts_only_a_matching_passcode(make_suite: Callable[..., Suite]) -> None:
    suite = suite_with(make_suite, "required")
    accepted = attempt(suite, GOOD)
    assert accepted.is_established or accepted.is_released
    # Asked for a positive response: an empty server response confirms the identity.
    response = accepted.acceptor.user_identity
    assert response is not None and not response.server_response
    for item in (None, WRONG, UNKNOWN, NAME_ONLY, SAML):
        assert rsd(attempt(suite, item)) == REJECT_USER_IDENTITY, item
    assert attempt(suite, GOOD).is_released  # still serving


def test_optional_accepts_anonymous_but_not_wrong_credentials(
    make_suite: Callable[..., Suite],
) -> None:
    suite = suite_with(make_suite, "optional")
    for item in (None, GOOD, NAME_ONLY, SAML):
        assert attempt(suite, item).is_released, item
    for item in (WRONG, UNKNOWN, UNKNOWN_NAME_ONLY):
        assert rsd(attempt(suite, item)) == REJECT_USER_IDENTITY, item
    no_response = attempt(suite, identity_item(2, b"alice", b"wonderland", response=False))
    assert no_response.is_released and no_response.acceptor.user_identity is None


def test_ignore_accepts_anything_and_replies_nothing(make_suite: Callable[..., Suite]) -> None:
    suite = suite_with(make_suite, "ignore")
    for item in (WRONG, UNKNOWN, GOOD):
        assoc = attempt(suite, item)
        assert assoc.is_released
        assert assoc.acceptor.user_identity is None


def test_rejection_row_is_documented() -> None:
    rows = [row for row in REJECTION_ROWS if "user_identity" in row.condition]
    assert [row.rsd for row in rows] == [REJECT_USER_IDENTITY]


def test_hashes_are_salted_and_verified() -> None:
    a, b = (
        identity.hash_passcode("x", iterations=1000),
        identity.hash_passcode("x", iterations=1000),
    )
    assert a != b  # salted
    assert identity.verify_passcode(a, "x") and identity.verify_passcode(b, "x")
    assert not identity.verify_passcode(a, "y")
    assert not identity.verify_passcode("plain-text", "plain-text")
    assert not identity.verify_passcode("pbkdf2_sha256$1000$!!$!!", "x")
    assert identity.hash_passcode("x").split("$")[1] == str(identity.ITERATIONS)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"user_identity": "sometimes"}, "user_identity must be one of"),
        ({"user_identity": "required"}, "needs at least one user"),
        ({"users": {"bob": 1}}, "users must be a table"),
    ],
)
def test_bad_identity_settings_stop_startup(settings: dict[str, object], message: str) -> None:
    with pytest.raises(StartupError, match=message):
        config_mod.load(environ={}, overrides={"ae": {"storage_scp": settings}})


def test_statement_states_the_policy() -> None:
    config = config_mod.load(
        environ={},
        overrides={"ae": {"storage_scp": {"user_identity": "required", "users": USERS}}},
    )
    text = render(config, "archive")
    assert "User Identity negotiation is required." in text
    assert (
        "| EX_STORE_SCP | Yes | none (any calling AE) | none (any address) | required; 1 user |"
        in text
    )
    assert ALICE not in text  # hashes are not published

"""User Identity negotiation (PS3.7 D.3.3.7): username and passcode, salted hashes.

Passcodes are never stored: ``users`` in an AE's configuration maps a username
to ``pbkdf2_sha256$<iterations>$<salt>$<hash>`` (salt and hash base64), which
``python -m servers.core.identity USERNAME`` prints after asking for the passcode.

Policies (``user_identity``):

* ``ignore``: a User Identity sub-item is ignored and gets no reply.
* ``optional``: a request without one is accepted; a username and passcode
  (type 2) must match a configured user; a username alone (type 1) must name a
  configured user; Kerberos, SAML and JWT (types 3-5) are not supported and are
  ignored as if absent.
* ``required``: only a username and passcode (type 2) matching a configured user
  is accepted.

A request that fails its policy is rejected with (1, 2, 1) as PS3.7 D.3.3.7.2
says for an authorisation failure: rejected-permanent, DICOM UL
service-provider (ACSE related function), no-reason-given.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

SCHEME = "pbkdf2_sha256"
ITERATIONS = 600_000
USERNAME = 1
USERNAME_AND_PASSCODE = 2
TYPE_NAMES = {1: "username", 2: "username and passcode", 3: "Kerberos", 4: "SAML", 5: "JWT"}


def hash_passcode(passcode: str, *, iterations: int = ITERATIONS, salt: bytes | None = None) -> str:
    """A salted PBKDF2-SHA256 hash of ``passcode`` for the ``users`` table.

    >>> stored = hash_passcode("secret", iterations=1000)
    >>> verify_passcode(stored, "secret"), verify_passcode(stored, "Secret")
    (True, False)
    """
    salt = salt or os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", passcode.encode("utf-8"), salt, iterations)
    b64 = base64.b64encode
    return f"{SCHEME}${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def verify_passcode(stored: str, passcode: str) -> bool:
    """True when ``passcode`` matches ``stored``; a malformed ``stored`` matches nothing."""
    try:
        scheme, iterations, salt, digest = stored.split("$")
        if scheme != SCHEME:
            return False
        expected = base64.b64decode(digest, validate=True)
        actual = hashlib.pbkdf2_hmac(
            "sha256",
            passcode.encode("utf-8"),
            base64.b64decode(salt, validate=True),
            int(iterations),
        )
    except ValueError:
        return False
    return hmac.compare_digest(expected, actual)


@dataclass(frozen=True)
class Decision:
    accepted: bool
    user: str  # the identified user, "" when anonymous
    reason: str  # for the log line


def decide(
    policy: str,
    users: Mapping[str, str],
    identity_type: int | None,
    primary: bytes,
    secondary: bytes,
) -> Decision:
    """Apply ``policy`` to a proposed identity (``identity_type`` None: no sub-item)."""
    if policy == "ignore":
        return Decision(True, "", "user identity ignored")
    try:
        username = primary.decode("utf-8")
        passcode = secondary.decode("utf-8")
    except UnicodeDecodeError:
        return Decision(False, "", "username or passcode is not UTF-8")
    supported = identity_type in (USERNAME, USERNAME_AND_PASSCODE)
    if not supported:
        if policy == "required":
            kind = TYPE_NAMES.get(identity_type or 0, "none") if identity_type else "none"
            return Decision(False, "", f"identity required, got {kind}")
        return Decision(True, "", "no usable identity (anonymous)")
    stored = users.get(username)
    if identity_type == USERNAME:
        if policy == "required":
            return Decision(False, username, "passcode required")
        if stored is None:
            return Decision(False, username, "unknown user")
        return Decision(True, username, "username only")
    if stored is None or not verify_passcode(stored, passcode):
        return Decision(False, username, "unknown user or wrong passcode")
    return Decision(True, username, "passcode verified")


def main(argv: list[str] | None = None) -> int:
    """``python -m servers.core.identity USERNAME``: print a ``users`` entry."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m servers.core.identity USERNAME", file=sys.stderr)
        return 2
    passcode = getpass.getpass(f"passcode for {args[0]}: ")
    if passcode != getpass.getpass("again: "):
        print("the passcodes differ", file=sys.stderr)
        return 1
    print(f'{args[0]} = "{hash_passcode(passcode)}"')
    return 0


if __name__ == "__main__":
    sys.exit(main())

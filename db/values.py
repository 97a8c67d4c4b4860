"""How received attribute values become index columns, shared by ingest and query.

>>> split_person_name("Doe^John^M^Dr")
('Doe', 'John')
>>> split_person_name("Doe, John")
('Doe', 'John')
>>> person_name("Doe", "")
'Doe'
>>> normalize_sex("female")
'F'
>>> normalize_time("1015")
'101500'
"""

from __future__ import annotations

import re
from datetime import date

LO_MAX = 64
DATE_RE = re.compile(r"[0-9]{8}")


def clean(value: object) -> str:
    """A received value as text, without the padding DICOM allows around it."""
    if value is None:
        return ""
    return str(value).strip(" \0")


def split_person_name(raw: object) -> tuple[str, str]:
    """(family, given) from the first (alphabetic) component group.

    Forms ``last^first`` and ``last, first`` are parsed; anything else is all
    family name (Annex F Table F.8.1-2; digest C11). Each part is cut to 64.
    """
    text = clean(raw).split("=")[0]
    if "^" in text:
        parts = text.split("^")
        family, given = parts[0], parts[1] if len(parts) > 1 else ""
    elif "," in text:
        family, _, given = text.partition(",")
    else:
        family, given = text, ""
    return family.strip()[:LO_MAX], given.strip()[:LO_MAX]


def person_name(family: str, given: str) -> str:
    """``family^given``, without a trailing ``^`` when there is no given name."""
    return f"{family}^{given}" if given else family


def name_key(value: str) -> str:
    """The case-insensitive matching form of a person name or name pattern."""
    return value.casefold()


def normalize_sex(raw: object) -> str:
    """M, F or O from the first character; anything else is U (Table F.8.1-2)."""
    first = clean(raw)[:1].upper()
    return first if first in ("M", "F", "O") else "U"


def normalize_time(raw: object) -> str:
    """A TM value padded to ``HHMMSS[.ffffff]`` so that string order is time order.

    Legacy ``HH:MM:SS`` colons are removed. Returns "" for an empty value.
    """
    text = clean(raw).replace(":", "")
    if not text:
        return ""
    whole, dot, fraction = text.partition(".")
    whole = whole.ljust(6, "0")[:6]
    return f"{whole}.{fraction}" if dot and fraction else whole


def valid_date(value: str) -> bool:
    """True for a DA value ``YYYYMMDD`` that names a real calendar date."""
    if not DATE_RE.fullmatch(value):
        return False
    try:
        date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        return False
    return True

"""Reading C-FIND key values: character sets and time bounds, for Q/R and worklist alike.

Both C-FIND SCPs (``servers/query_retrieve/find.py``, ``servers/worklist/find.py``)
decode identifiers the same way; each maps :class:`CharsetError` to its own status
table and Error Comment.

>>> time_bounds("1015")
('101500', '101559.999999')
>>> time_bounds("101530.25")
('101530.25', '101530.259999')
>>> time_bounds("2460") is None
True
"""

from __future__ import annotations

import re

from pydicom.charset import convert_encodings, decode_bytes, python_encoding
from pydicom.dataset import Dataset
from pydicom.tag import Tag

TEXT_VRS = frozenset({"PN", "LO", "SH", "LT", "ST", "UT", "UC"})
PN_DELIMITERS = {0x5C, 0x3D, 0x5E}
TEXT_DELIMITERS = {0x5C}
ESC = 0x1B
TIME_RE = re.compile(r"([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:\.([0-9]{1,6}))?)?)?")

# Values with bytes outside ASCII and no Specific Character Set are read in the one
# extended set the statements declare.
DEFAULT_CHARSET = "ISO_IR 100"


class CharsetError(ValueError):
    """A text value that cannot be decoded: set unknown (``unsupported``) or bytes invalid."""

    def __init__(self, unsupported: bool) -> None:
        super().__init__("character set not supported" if unsupported else "invalid bytes")
        self.unsupported = unsupported


def query_encodings(identifier: Dataset) -> list[str] | None:
    """Python codecs for the identifier's Specific Character Set; None when one is unknown."""
    element = identifier.get_item(Tag("SpecificCharacterSet"))
    terms: list[str] = []
    if element is not None:
        raw = element.value
        if isinstance(raw, bytes):
            text = raw.decode("ascii", errors="replace")
        elif raw is None:
            text = ""
        else:
            text = "\\".join(raw) if not isinstance(raw, str) else raw
        terms = [t.strip(" \0") for t in text.split("\\")]
    if not terms or terms == [""]:
        return [python_encoding[DEFAULT_CHARSET]]
    if any(term not in python_encoding for term in terms):
        return None
    return convert_encodings(terms)


def decode_text(raw: bytes, vr: str, encodings: list[str] | None) -> str:
    """The bytes of a text-VR value (``TEXT_VRS``) as a string; raises :class:`CharsetError`."""
    if raw.isascii() and ESC not in raw:
        return raw.decode("ascii")
    if encodings is None:
        raise CharsetError(unsupported=True)
    try:
        if ESC not in raw:
            text = raw.decode(encodings[0])
        else:
            text = decode_bytes(raw, encodings, PN_DELIMITERS if vr == "PN" else TEXT_DELIMITERS)
    except (UnicodeError, LookupError):
        text = "\ufffd"
    if "\ufffd" in text:
        raise CharsetError(unsupported=False)
    return text


def time_bounds(value: str) -> tuple[str, str] | None:
    """The period a TM value denotes, as inclusive bounds; None when it is not a time.

    A partial time stands for the whole period (``1015`` is 10:15:00 to
    10:15:59.999999); the fraction is kept as given in the low bound.
    """
    match = TIME_RE.fullmatch(value)
    if not match:
        return None
    hh, mm, ss, frac = match.groups()
    if int(hh) > 23 or (mm and int(mm) > 59) or (ss and int(ss) > 60):
        return None
    low = hh + (mm or "00") + (ss or "00") + (f".{frac}" if frac else "")
    if frac:
        high = f"{hh}{mm}{ss}.{frac.ljust(6, '9')}"
    else:
        high = hh + (mm or "59") + (ss or "59") + ".999999"
    return low, high

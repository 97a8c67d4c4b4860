"""Image Box pixel data to stored values: masking and the signed offset, 8 and 16 bits."""

from __future__ import annotations

import random

import pytest

from servers.print.scp import _decode


def _reference(pixel: bytes, count: int, alloc: int, stored: int, signed: int) -> list[int]:
    """Value by value, as PS3.5 8.1.1 reads them: bits above Bits Stored ignored; signed
    values offset by 2^(stored-1) so that the most negative is 0."""
    step = alloc // 8
    out = []
    for i in range(count):
        v = int.from_bytes(pixel[i * step : (i + 1) * step], "little") & ((1 << stored) - 1)
        if signed and v >= 1 << (stored - 1):
            v -= 1 << stored
        out.append(v + (1 << (stored - 1)) if signed else v)
    return out


@pytest.mark.parametrize(
    ("alloc", "stored", "signed"),
    [
        (8, 8, 0),
        (8, 8, 1),
        (8, 7, 1),
        (16, 8, 1),
        (16, 12, 0),
        (16, 12, 1),
        (16, 16, 0),
        (16, 16, 1),
    ],
)
def test_decode_masks_and_offsets(alloc: int, stored: int, signed: int) -> None:
    rng = random.Random(alloc * 100 + stored * 2 + signed)
    count = 999
    noisy = bytes(rng.randrange(256) for _ in range(count * alloc // 8 + 1))  # high bits set
    assert list(_decode(noisy, count, alloc, stored, signed)) == _reference(
        noisy, count, alloc, stored, signed
    )
    clean = b"".join(
        rng.randrange(1 << stored).to_bytes(alloc // 8, "little") for _ in range(count)
    )
    assert list(_decode(clean, count, alloc, stored, signed)) == _reference(
        clean, count, alloc, stored, signed
    )
